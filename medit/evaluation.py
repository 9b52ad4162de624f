"""Editing metrics under two labelled protocols, batched, in eval mode.

* **teacher_forced** — what EasyEdit and the MedLaSA paper report: token accuracy of the target
  under teacher forcing for the prompt (efficacy) and its paraphrases (generality); locality is the
  agreement of the edited model's argmax tokens on each locality answer with the unedited model's.
* **generation** — what a clinician sees: greedy continuations. Efficacy/generality: does the
  continuation state the target (``exact``: it starts with it; ``contains``: anywhere in it).
  Locality: is each probe's continuation unchanged from the unedited model's, and is its answer
  still stated. Fluency: ROME's weighted bi/tri-gram entropy of the prompt's continuation.

``evaluate`` returns one state per request; the post-edit call takes the pre-edit states as
``reference`` (computed once) for the locality comparisons.
"""

from __future__ import annotations

import collections
import dataclasses
import math
import re
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from medit.core.arch import ArchSpec, get_arch
from medit.core.errors import UserError
from medit.core.forward import cache_kwargs, prefix_logits
from medit.core.placement import input_device
from medit.core.text import encode_pair, left_padded, normalise, prefix_batch
from medit.facts.requests import EditRequest


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    batch_size: int = 32  #: sequences per forward pass
    answer_slack: int = 4  #: extra generated tokens beyond the answer's own length
    max_new_tokens: int = 32  #: cap on tokens generated for an answer
    fluency_tokens: int = 48  #: tokens generated from each edit prompt to measure fluency
    generation: bool = True  #: run the generation-based protocol (greedy decoding)

    def __post_init__(self):
        for name, low in (
            ("batch_size", 1),
            ("max_new_tokens", 1),
            ("answer_slack", 0),
            ("fluency_tokens", 0),
        ):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise UserError(f"evaluation {name} must be >= {low}, got {value!r}")


@dataclasses.dataclass
class TargetScore:
    correct: list[bool]  #: per target token: is the teacher-forced argmax the target token
    predicted: list[int]  #: per target token: the argmax token id
    logprob: float  #: sum of the target tokens' log-probabilities

    @property
    def accuracy(self) -> float:
        return sum(self.correct) / len(self.correct)


def _length_order(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Index batches grouped by similar length (less padding)."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


@torch.inference_mode()
def score_targets(
    model: Any,
    tok: Any,
    arch: ArchSpec,
    pairs: Sequence[tuple[str, str]],
    batch_size: int = 32,
    bar: Any = None,
) -> list[TargetScore]:
    """Teacher-forced scores of (prompt, target) pairs, batched; logits only at target rows.
    Each prompt is presented as generation presents it (a prefill, then the target on its KV
    cache), so input-routed edits route on the prompt alone.
    ``bar``: a tqdm progress bar advanced by one per pair."""
    device = input_device(model)
    _grow(bar, len(pairs))
    lengths = [len(p) + len(t) for p, t in pairs]  # characters: a cheap proxy for tokens
    results: list[TargetScore | None] = [None] * len(pairs)
    for idx in _length_order(lengths, batch_size):
        batch = prefix_batch(tok, [pairs[i][0] for i in idx], [pairs[i][1] for i in idx])
        batch = batch.to(device)
        logits = prefix_logits(model, arch, batch)  # (N, V)
        logp = torch.log_softmax(logits.float(), dim=-1)
        label_lp = logp.gather(1, batch.labels[:, None]).squeeze(1).cpu()
        argmax = logp.argmax(-1).cpu()
        labels, owner = batch.labels.cpu(), batch.owner.cpu()
        for j, i in enumerate(idx):
            sel = owner == j
            results[i] = TargetScore(
                correct=(argmax[sel] == labels[sel]).tolist(),
                predicted=argmax[sel].tolist(),
                logprob=float(label_lp[sel].sum()),
            )
        if bar is not None:
            bar.update(len(idx))
    return results  # type: ignore[return-value]


@torch.inference_mode()
def generate_ids(
    model: Any, tok: Any, prompts: Sequence[str], max_new_tokens: int, batch_size: int = 32
) -> list[list[int]]:
    """Greedy continuation token ids (up to the first EOS), batched with left padding."""
    device = input_device(model)
    arch = get_arch(model)
    stop = torch.tensor(sorted({tok.eos_token_id, tok.pad_token_id} - {None}), device=device)
    out: list[list[int] | None] = [None] * len(prompts)
    for idx in _length_order([len(p) for p in prompts], batch_size):
        enc = left_padded(tok, [prompts[i] for i in idx], device)
        rows = _greedy(model, arch, enc["input_ids"], enc["attention_mask"], max_new_tokens, stop)
        for i, row in zip(idx, rows, strict=True):
            out[i] = row
    return out  # type: ignore[return-value]


def _greedy(model, arch: ArchSpec, ids, mask, max_new_tokens: int, stop) -> list[list[int]]:
    """Greedy decoding with a KV cache that drops each row as soon as it emits a stop token, so
    a batch costs what its live rows cost (a plain batched generate keeps decoding every row
    until the longest finishes). Logits only at the last position."""
    from transformers import DynamicCache

    base = arch.base_model(model)
    cache = DynamicCache(config=model.config)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    alive = torch.arange(ids.shape[0], device=ids.device)
    rows: list[list[int]] = [[] for _ in range(ids.shape[0])]
    step_ids, step_pos = ids, positions
    for _ in range(max_new_tokens):
        hidden = base(
            input_ids=step_ids,
            attention_mask=mask,
            position_ids=step_pos,
            use_cache=True,
            **cache_kwargs(base, cache),
        ).last_hidden_state
        nxt = arch.head(model, hidden[:, -1]).argmax(-1)
        done = torch.isin(nxt, stop)
        for r, t, d in zip(alive.tolist(), nxt.tolist(), done.tolist(), strict=True):
            if not d:
                rows[r].append(t)
        keep = (~done).nonzero().squeeze(1)
        if keep.numel() == 0:
            break
        if keep.numel() < alive.numel():
            alive, nxt, mask, step_pos = alive[keep], nxt[keep], mask[keep], step_pos[keep]
            cache.reorder_cache(keep)  # routing state follows the cache's rows
        mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
        step_ids, step_pos = nxt[:, None], step_pos[:, -1:] + 1
    return rows


def generate(
    model: Any, tok: Any, prompts: Sequence[str], max_new_tokens: int, batch_size: int = 32
) -> list[str]:
    """Greedy continuations (new text only, up to the first EOS), batched with left padding."""
    ids = generate_ids(model, tok, prompts, max_new_tokens, batch_size)
    return [tok.decode(row, skip_special_tokens=True) for row in ids]


def states_answer(text: str, answer: str) -> dict[str, bool]:
    """Does a continuation state the answer: at its start (exact) or anywhere (contains)."""
    t, a = normalise(text), normalise(answer)
    return {"exact": bool(a) and t.startswith(a), "contains": bool(a) and a in t}


def ngram_entropy(text: str, ns: Sequence[int] = (2, 3), weights: Sequence[float] = (2 / 3, 4 / 3)):
    """ROME's fluency measure: weighted mean of n-gram entropies (bits) of the word sequence."""
    words = re.findall(r"\w+|[^\w\s]", text.lower())
    values = []
    for n in ns:
        grams = collections.Counter(tuple(words[i : i + n]) for i in range(len(words) - n + 1))
        total = sum(grams.values())
        values.append(
            -sum(c / total * math.log2(c / total) for c in grams.values()) if total else 0
        )
    return float(np.mean(np.asarray(weights) * np.asarray(values)))


def _mean(xs: Sequence[float | bool | None]) -> float | None:
    xs = [float(x) for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else None


def evaluate(
    model: Any,
    tok: Any,
    arch: ArchSpec,
    requests: Sequence[EditRequest],
    config: EvalConfig = EvalConfig(),
    reference: Sequence[dict] | None = None,
    progress: str | None = None,
) -> list[dict[str, Any]]:
    """Evaluate every request under both protocols; ``reference`` = the pre-edit states.
    ``progress``: the description of a progress bar on stderr (None: no bar)."""
    was_training = model.training
    model.eval()  # dropout off, always: LoRA scores become random otherwise
    bar = tqdm(total=0, desc=progress, unit="seq", disable=progress is None, leave=False)
    try:
        tf = _teacher_forced(model, tok, arch, requests, config, bar)
        gen = _generation(model, tok, requests, config, bar) if config.generation else None
    finally:
        model.train(was_training)
        bar.close()
    states = []
    for i, req in enumerate(requests):
        ref = reference[i] if reference is not None else None
        state = {"teacher_forced": _tf_state(req, tf[i], ref)}
        if gen is not None:
            state["generation"] = _gen_state(req, gen[i], ref)
        states.append(state)
    return states


@torch.no_grad()
def answers(
    model: Any, tok: Any, requests: Sequence[EditRequest], config: EvalConfig, bar: Any = None
) -> list[str]:
    """Each request's prompt answered as the generation-based protocol answers it: greedy,
    batched, within the budget of its ``target_new`` (the expected answer's tokens plus
    ``answer_slack``, at most ``max_new_tokens``)."""
    was_training = model.training
    model.eval()
    try:
        prompts = [r.prompt for r in requests]
        budgets = [_budget(tok, r.prompt, r.target_new, config) for r in requests]
        ids = _generate_budgeted(model, tok, prompts, budgets, config, bar)
    finally:
        model.train(was_training)
    return [tok.decode(row, skip_special_tokens=True) for row in ids]


def _grow(bar: Any, n: int) -> None:
    """Add ``n`` items to a progress bar's total (evaluation counts its work as it goes)."""
    if bar is not None:
        bar.total = (bar.total or 0) + n
        bar.refresh()


def _teacher_forced(model, tok, arch, requests, config, bar=None) -> list[dict[str, Any]]:
    jobs: list[tuple[int, str, Any, tuple[str, str]]] = []
    for i, r in enumerate(requests):
        jobs.append((i, "efficacy", None, (r.prompt, r.target_new)))
        jobs += [(i, "generality", j, (p, r.target_new)) for j, p in enumerate(r.rephrase_prompts)]
        jobs += [(i, "locality", (n, p), (p, a)) for n, p, a in r.locality_probes()]
        jobs += [(i, "portability", n, (p, a)) for n, ps in r.portability.items() for p, a in ps]
        if r.ground_truth:
            jobs.append((i, "ground_truth", None, (r.prompt, r.ground_truth)))
    scores = score_targets(model, tok, arch, [j[3] for j in jobs], config.batch_size, bar)
    per_req: list[dict[str, Any]] = [collections.defaultdict(list) for _ in requests]
    for (i, kind, key, _), score in zip(jobs, scores, strict=True):
        per_req[i][kind].append((key, score))
    return per_req


def _tf_state(req: EditRequest, raw: dict, ref: dict | None) -> dict[str, Any]:
    eff = raw["efficacy"][0][1]
    out: dict[str, Any] = {
        "efficacy": eff.accuracy,
        "generality": _mean([s.accuracy for _, s in raw["generality"]]),
        "target_logprob": eff.logprob,
        "target_prob": math.exp(eff.logprob),
        "rephrase_target_prob": [math.exp(s.logprob) for _, s in raw["generality"]],
    }
    if raw["ground_truth"]:
        gt = raw["ground_truth"][0][1]
        out["ground_truth_logprob"] = gt.logprob
        out["new_beats_true"] = eff.logprob > gt.logprob  # CounterFact's efficacy score
    out["locality_tokens"] = [s.predicted for _, s in raw["locality"]]
    out["locality_accuracy"] = _by_type([(k[0], s.accuracy) for k, s in raw["locality"]])
    if ref is not None:
        ref_tokens = ref["teacher_forced"]["locality_tokens"]
        agree = [
            (k[0], _agreement(s.predicted, before))
            for (k, s), before in zip(raw["locality"], ref_tokens, strict=True)
        ]
        out["locality"] = _by_type(agree)
    out["portability"] = _by_type([(n, s.accuracy) for n, s in raw["portability"]])
    return out


def _agreement(after: list[int], before: list[int]) -> float:
    return sum(a == b for a, b in zip(after, before, strict=True)) / len(before)


def _by_type(values: Sequence[tuple[str, float]]) -> dict[str, float]:
    groups: dict[str, list[float]] = collections.defaultdict(list)
    for name, v in values:
        groups[name].append(v)
    return {k: sum(v) / len(v) for k, v in groups.items()}


def _budget(tok: Any, prompt: str, answer: str, config: EvalConfig) -> int:
    n = len(encode_pair(tok, prompt, answer)[1]) + config.answer_slack
    return min(n, config.max_new_tokens)


def _generation(model, tok, requests, config, bar=None) -> list[dict[str, Any]]:
    """Greedy continuations of every prompt, each judged within its own token budget; the edit
    prompt's continuation is generated longer (``fluency_tokens``) for the fluency measure."""
    jobs: list[tuple[int, str, Any, str, int]] = []  # (request, kind, key, answer, budget)
    for i, r in enumerate(requests):
        n = _budget(tok, r.prompt, r.target_new, config)
        jobs.append((i, "prompt", r.prompt, r.target_new, max(n, config.fluency_tokens)))
        jobs += [(i, "rephrase", p, r.target_new, n) for p in r.rephrase_prompts]
        jobs += [
            (i, "locality", (t, p), a, _budget(tok, p, a, config))
            for t, p, a in r.locality_probes()
        ]
    prompts = [j[2][1] if j[1] == "locality" else j[2] for j in jobs]
    ids = _generate_budgeted(model, tok, prompts, [j[4] for j in jobs], config, bar)
    per_req: list[dict[str, Any]] = [{"rephrase": [], "locality": []} for _ in requests]
    for (i, kind, key, answer, _), row in zip(jobs, ids, strict=True):
        text = tok.decode(row, skip_special_tokens=True)
        if kind == "prompt":  # the answer is judged within its own budget, fluency on it all
            n = _budget(tok, key, answer, config)
            per_req[i]["prompt"] = (key, text)
            per_req[i]["answer_window"] = tok.decode(row[:n], skip_special_tokens=True)
        else:
            per_req[i][kind].append((key, answer, text))
    return per_req


def _generate_budgeted(model, tok, prompts: list[str], budgets: list[int], config, bar=None):
    """Token ids of each prompt's greedy continuation, cut to its budget.

    Greedy decoding is prefix-consistent, so a longer generation cut to n tokens equals a
    generation of n tokens. Prompts are sorted by budget and generated in full batches, each at
    the largest budget in it: few calls, little wasted decoding.
    """
    order = sorted(range(len(prompts)), key=lambda k: (budgets[k], len(prompts[k])))
    out: list[list[int] | None] = [None] * len(prompts)
    _grow(bar, len(prompts))
    for start in range(0, len(order), config.batch_size):
        idx = order[start : start + config.batch_size]
        n = max(budgets[k] for k in idx)
        rows = generate_ids(model, tok, [prompts[k] for k in idx], n, len(idx))
        for k, row in zip(idx, rows, strict=True):
            out[k] = row[: budgets[k]]
        if bar is not None:
            bar.update(len(idx))
    return out


def _gen_state(req: EditRequest, raw: dict, ref: dict | None) -> dict[str, Any]:
    prompt, full = raw["prompt"]
    head = states_answer(raw["answer_window"], req.target_new)
    rephrases = [
        {"prompt": p, "text": text, **states_answer(text, answer)}
        for p, answer, text in raw["rephrase"]
    ]
    locality = []
    ref_loc = ref["generation"]["locality"] if ref is not None else None
    for k, ((kind, p), answer, text) in enumerate(raw["locality"]):
        item = {
            "type": kind,
            "prompt": p,
            "answer": answer,
            "text": text,
            "answer_stated": states_answer(text, answer)["contains"],
        }
        if ref_loc is not None:
            item["unchanged"] = text == ref_loc[k]["text"]
            item["answer_stated_before"] = ref_loc[k]["answer_stated"]
        locality.append(item)
    return {
        "prompt": {"prompt": prompt, "text": full, **head},
        "rephrases": rephrases,
        "locality": locality,
        "efficacy_exact": head["exact"],
        "efficacy_contains": head["contains"],
        "generality_contains": _mean([r["contains"] for r in rephrases]),
        "locality_unchanged": _by_type([(x["type"], x["unchanged"]) for x in locality])
        if ref_loc is not None
        else {},
        "locality_answer_stated": _by_type([(x["type"], x["answer_stated"]) for x in locality]),
        "fluency": ngram_entropy(full),
    }


# -- aggregation ---------------------------------------------------------------------------------
def aggregate(states: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Means over requests, per protocol; per-type locality and its mean over types."""
    tf = [s["teacher_forced"] for s in states]
    out: dict[str, Any] = {
        "n": len(states),
        "teacher_forced": {
            "efficacy": _mean([s["efficacy"] for s in tf]),
            "generality": _mean([s["generality"] for s in tf]),
            "locality": _type_means([s.get("locality", {}) for s in tf]),
            "locality_accuracy": _type_means([s["locality_accuracy"] for s in tf]),
            "portability": _type_means([s["portability"] for s in tf]),
            "new_beats_true": _mean([s.get("new_beats_true") for s in tf]),
            "target_prob": _mean([s["target_prob"] for s in tf]),
        },
    }
    out["teacher_forced"]["locality_mean"] = _mean(list(out["teacher_forced"]["locality"].values()))
    if states and "generation" in states[0]:
        g = [s["generation"] for s in states]
        gen = {
            "efficacy_exact": _mean([s["efficacy_exact"] for s in g]),
            "efficacy_contains": _mean([s["efficacy_contains"] for s in g]),
            "generality_contains": _mean([s["generality_contains"] for s in g]),
            "locality_unchanged": _type_means([s["locality_unchanged"] for s in g]),
            "locality_answer_stated": _type_means([s["locality_answer_stated"] for s in g]),
            "fluency": _mean([s["fluency"] for s in g]),
        }
        gen["locality_mean"] = _mean(list(gen["locality_unchanged"].values()))
        out["generation"] = gen
    return out


def _type_means(dicts: Sequence[dict[str, float]]) -> dict[str, float]:
    groups: dict[str, list[float]] = collections.defaultdict(list)
    for d in dicts:
        for k, v in d.items():
            groups[k].append(v)
    return {k: sum(v) / len(v) for k, v in sorted(groups.items())}
