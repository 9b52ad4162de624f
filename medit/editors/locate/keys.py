"""Shared math of the locate-then-edit editors (ROME, MEMIT, AlphaEdit).

A decoder layer's MLP output projection ``W`` (``mlp_out``: down_proj, c_proj, fc_out) is read as
a key-value memory: its input at the subject's last token is the *key* k, its output the *value*.

* :func:`context_templates` — ``"{}"`` plus short prefixes sampled from the model itself
  ("<prefix>. {}"), so that keys and values do not depend on one exact wording (cached).
* :func:`request_keys` — k* for each request: the key at the subject's last token, averaged over
  the templates (ROME eq. 3).
* :func:`optimise_values` — the residual δ added at the subject's last token of a layer's output
  that makes the model state the new target: NLL of the target over the templated prompts
  + ``kl_factor`` · KL(new ‖ old) of the next token after "{subject} is a" + weight decay, the
  norm of δ clamped to ``clamp_norm_factor`` × the norm of the value it is added to, Adam, early
  stop (ROME eq. 4; MEMIT's z). Layers below the edited one cannot change, so their output is
  computed once and every step runs only the layers above (``hooks.frozen_prefix``).
* :func:`covariance` — C = E[k kᵀ] of a layer's keys over an offline corpus (``medit.facts.corpus``),
  cached on disk by weights hash, layer and corpus hash; :func:`null_space_projector` — AlphaEdit's
  projector onto the eigenvectors of C with eigenvalues under a threshold (cached).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import logging
import time
from collections.abc import Sequence
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from medit.core.arch import ArchSpec, get_module
from medit.core.errors import UserError
from medit.core.forward import per_sequence_mean
from medit.core.fs import atomic_file, atomic_write_text
from medit.core.hooks import (
    capture_input,
    capture_inputs,
    edited_outputs,
    frozen_prefix,
    record,
    trainable_only,
)
from medit.core.models import cache_dir
from medit.core.text import teacher_batch
from medit.facts.corpus import Corpus, sample_continuations
from medit.facts.requests import EditRequest
from medit.facts.subject import subject_tokens

log = logging.getLogger(__name__)

#: first words of the sampled prefixes (MEMIT's)
PREFIX_STARTS = ("The", "Therefore", "Because", "I", "You")
_MEMORY: dict[str, Any] = {}  #: in-process cache of templates, covariances and projectors


# -- context templates ---------------------------------------------------------------------------
def context_templates(
    model: Any, tok: Any, lengths: Sequence[int], count: int, seed: int = 0
) -> list[str]:
    """``["{}"]`` plus ``count`` sampled prefixes of each length in ``lengths`` tokens, each as
    "<prefix>. {}" (top-5 sampling, fixed seed; cached by the weights' hash)."""
    sha = getattr(model, "medit_weights_sha256", None)
    key = hashlib.sha256(json.dumps([sha, list(lengths), count, seed]).encode()).hexdigest()[:24]
    if sha and key in _MEMORY:
        return _MEMORY[key]
    path = cache_dir() / "templates" / f"{key}.json" if sha else None
    if path is not None and path.is_file():
        out = json.loads(path.read_text("utf-8"))
    else:
        out = ["{}"] + _sample_prefixes(model, tok, lengths, count, seed)
        if path is not None:
            atomic_write_text(path, json.dumps(out))
    if sha:
        _MEMORY[key] = out
    return out


@torch.no_grad()
def _sample_prefixes(model, tok, lengths, count, seed) -> list[str]:
    starts = [PREFIX_STARTS[i % len(PREFIX_STARTS)] for i in range(count)]
    out = []
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for length in lengths:
            for text in sample_continuations(model, tok, starts, length, top_k=5):
                text = " ".join(text.replace("{", " ").replace("}", " ").split())
                out.append(text + ". {}")
    return out


def fill(template: str, prompt: str) -> tuple[str, int]:
    """The templated prompt and the character offset where ``prompt`` starts in it."""
    head = template.split("{}")[0]
    return head + prompt, len(head)


def subject_last(tok: Any, template: str, req: EditRequest, subject: str) -> tuple[str, int]:
    """(templated prompt, index of the subject's last token in it)."""
    text, offset = fill(template, req.prompt)
    return text, subject_tokens(tok, text, subject, offset)[1] - 1


# -- keys ----------------------------------------------------------------------------------------
@torch.no_grad()
def module_inputs(
    model: Any,
    tok: Any,
    arch: ArchSpec,
    layers: Sequence[int],
    texts: Sequence[str],
    positions: Sequence[int],
    batch_size: int = 32,
) -> dict[int, torch.Tensor]:
    """Input of each layer's ``mlp_out`` at ``positions[i]`` of ``texts[i]`` -> {layer: (N, d_in)}
    (float32). The forward stops after the last layer asked for."""
    layers = sorted(layers)
    modules = [arch.module(model, layer, "mlp_out") for layer in layers]
    base, device = arch.base_model(model), arch.embedding(model).weight.device
    out: dict[int, list[torch.Tensor]] = {layer: [] for layer in layers}
    for i in range(0, len(texts), batch_size):
        chunk = list(texts[i : i + batch_size])
        enc = _right_padded(tok, lambda: tok(chunk, return_tensors="pt", padding=True))  # noqa: B023
        pos = torch.tensor(positions[i : i + batch_size], device=device)
        rows = torch.arange(len(pos), device=device)
        ids, mask = enc.input_ids.to(device), enc.attention_mask.to(device)
        got = capture_inputs(
            modules,
            functools.partial(base, input_ids=ids, attention_mask=mask, use_cache=False),
        )
        for layer, x in zip(layers, got, strict=True):
            out[layer].append(x[rows, pos].float())
    return {layer: torch.cat(v) for layer, v in out.items()}


def template_keys(
    model: Any,
    tok: Any,
    arch: ArchSpec,
    layers: Sequence[int],
    requests: Sequence[EditRequest],
    subjects: Sequence[str],
    templates: Sequence[str],
) -> dict[int, torch.Tensor]:
    """Each request's key at the subject's last token in each templated prompt
    -> {layer: (N, T, d_in)}."""
    pairs = [
        subject_last(tok, t, r, s)
        for r, s in zip(requests, subjects, strict=True)
        for t in templates
    ]
    keys = module_inputs(model, tok, arch, layers, [p[0] for p in pairs], [p[1] for p in pairs])
    return {layer: k.view(len(requests), len(templates), -1) for layer, k in keys.items()}


def request_keys(
    model: Any,
    tok: Any,
    arch: ArchSpec,
    layers: Sequence[int],
    requests: Sequence[EditRequest],
    subjects: Sequence[str],
    templates: Sequence[str],
) -> dict[int, torch.Tensor]:
    """k* of each request at each layer: the key at the subject's last token averaged over the
    templates (ROME eq. 3) -> {layer: (N, d_in)}."""
    keys = template_keys(model, tok, arch, layers, requests, subjects, templates)
    return {layer: k.mean(1) for layer, k in keys.items()}


def _right_padded(tok, run):
    side, tok.padding_side = tok.padding_side, "right"
    try:
        return run()
    finally:
        tok.padding_side = side


@torch.no_grad()
def layer_outputs_at(model, tok, arch: ArchSpec, layer: int, requests, subjects) -> torch.Tensor:
    """Output of decoder ``layer`` at each request's subject-last token (plain prompt) (N, d)."""
    pairs = [subject_last(tok, "{}", r, s) for r, s in zip(requests, subjects, strict=True)]
    enc = _right_padded(tok, lambda: tok([p[0] for p in pairs], return_tensors="pt", padding=True))
    device = arch.embedding(model).weight.device
    ids, mask = enc.input_ids.to(device), enc.attention_mask.to(device)
    store: list[torch.Tensor] = []
    nxt = layer + 1
    if nxt < arch.n_layers(model):
        hidden = capture_input(
            arch.module(model, nxt),
            lambda: arch.base_model(model)(input_ids=ids, attention_mask=mask),
        )
    else:
        with edited_outputs([(arch.module(model, layer), lambda t: record(store, t))]):
            arch.base_model(model)(input_ids=ids, attention_mask=mask, use_cache=False)
        hidden = store[0]
    rows = torch.arange(len(pairs), device=device)
    return hidden[rows, torch.tensor([p[1] for p in pairs], device=device)].float()


# -- values --------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class ValueSettings:
    steps: int  #: Adam steps on δ
    lr: float  #: Adam learning rate
    weight_decay: float  #: weight of ||δ|| / ||v0||^2
    clamp_norm_factor: float  #: ||δ|| <= factor * ||v0||
    kl_factor: float  #: weight of the KL term on "{subject} is a"
    early_stop_loss: float = 5e-2  #: stop once the target NLL is below this (ROME: 5e-2)
    anchor: str = "mlp"  #: v0, the value δ is measured against: "mlp" output or "layer" output


def optimise_values(
    model: Any,
    tok: Any,
    arch: ArchSpec,
    layer: int,
    requests: Sequence[EditRequest],
    subjects: Sequence[str],
    templates: Sequence[str],
    vs: ValueSettings,
) -> tuple[torch.Tensor, dict[str, Any]]:
    """δ (N, d) for each request, added to the output of decoder ``layer`` at the subject's last
    token of every templated prompt and of its KL prompt. Requests are optimised together, each
    with its own δ, clamp and early stop (their losses are independent)."""
    n, t_count = len(requests), len(templates)
    prompts, targets, positions, owner = [], [], [], []
    for i, (req, subj) in enumerate(zip(requests, subjects, strict=True)):
        for template in templates:
            text, pos = subject_last(tok, template, req, subj)
            prompts.append(text), targets.append(req.target_new), positions.append(pos)
            owner.append(i)
    for i, subj in enumerate(subjects):  # KL prompts, one per request, after the rewrites
        kl = f"{subj} is a"
        prompts.append(kl), targets.append(requests[i].target_new)
        positions.append(subject_tokens(tok, kl, subj)[1] - 1), owner.append(i)
    device = arch.embedding(model).weight.device
    batch = _right_padded(tok, lambda: teacher_batch(tok, prompts, targets)).to(device)
    rows = torch.arange(len(prompts), device=device)
    pos = torch.tensor(positions, device=device)
    owner_t = torch.tensor(owner, device=device)
    entering, v0 = _frozen_state(model, arch, layer, batch, rows[: n * t_count : t_count], pos, vs)
    n_layers = arch.n_layers(model)
    delta = torch.zeros(n, entering.shape[-1], device=device, requires_grad=True)
    opt = torch.optim.Adam([delta], lr=vs.lr)
    max_norm = vs.clamp_norm_factor * v0.norm(dim=-1)
    v0_sq = v0.norm(dim=-1) ** 2
    kl_rows = rows[n * t_count :]
    done = torch.zeros(n, dtype=torch.bool, device=device)
    kl_init, history = None, []
    with torch.enable_grad(), trainable_only(model, []):  # δ is the only leaf that takes gradients
        for _step in range(vs.steps):
            hidden = entering.index_put(
                (rows, pos), delta[owner_t].to(entering.dtype), accumulate=True
            )
            final = _run_from(model, arch, layer + 1, n_layers, hidden, batch)
            logp = torch.log_softmax(arch.head(model, final[batch.rows, batch.cols]).float(), -1)
            tok_nll = -logp.gather(1, batch.labels[:, None]).squeeze(1)
            # the KL prompts' own target rows are scored too (a few tokens) and left out here
            nll = per_sequence_mean(tok_nll, batch)[: n * t_count].view(n, t_count).mean(1)
            kl_logp = torch.log_softmax(
                arch.head(model, final[kl_rows, batch.prompt_last[kl_rows]]).float(), -1
            )
            if kl_init is None:
                kl_init = kl_logp.detach()
            kl = (kl_logp.exp() * (kl_logp - kl_init)).sum(-1)
            decay = vs.weight_decay * delta.norm(dim=-1) / v0_sq
            history.append(nll.detach().cpu().tolist())
            done |= nll.detach() < vs.early_stop_loss
            if bool(done.all()):
                break
            loss = (nll + vs.kl_factor * kl + decay)[~done].sum()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            frozen = delta.detach()[done].clone()
            opt.step()
            with torch.no_grad():
                delta[done] = frozen
                scale = (max_norm / delta.norm(dim=-1).clamp_min(1e-12)).clamp(max=1.0)
                delta.mul_(scale[:, None])
    info = {
        "value_steps": len(history),
        "value_nll": history[-1] if history else [],
        "value_nll_start": history[0] if history else [],
        "delta_norm": delta.detach().norm(dim=-1).tolist(),
        "converged": bool(done.all()),
    }
    return delta.detach(), info


@torch.no_grad()
def _frozen_state(model, arch, layer, batch, plain_rows, pos, vs: ValueSettings):
    """(output of ``layer`` for the whole batch, v0 at each request's plain prompt)."""
    store: list[torch.Tensor] = []
    mlp = arch.module(model, layer, "mlp")
    with edited_outputs(
        [(arch.module(model, layer), lambda t: record(store, t)), (mlp, lambda t: record(store, t))]
    ):
        arch.base_model(model)(
            input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False
        )
    mlp_out, layer_out = store[0], store[1]  # the MLP runs inside the layer, so it comes first
    v0 = (mlp_out if vs.anchor == "mlp" else layer_out)[plain_rows, pos[plain_rows]].float()
    return layer_out.detach(), v0


def _run_from(model, arch: ArchSpec, start: int, n_layers: int, hidden, batch) -> torch.Tensor:
    """Final hidden states (after the final norm) given the state entering layer ``start``."""
    if start >= n_layers:
        return get_module(model, arch.final_norm)(hidden)
    with frozen_prefix(model, arch, start, hidden):
        out = arch.base_model(model)(
            input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False
        )
    return out.last_hidden_state


# -- second moments ------------------------------------------------------------------------------
def covariance(
    model: Any,
    tok: Any,
    arch: ArchSpec,
    layers: Sequence[int],
    corpus: Corpus,
    max_length: int = 256,
    batch_size: int = 16,
    cache: bool = True,
) -> dict[int, tuple[torch.Tensor, int]]:
    """{layer: (Σ k kᵀ in float64 on the CPU, number of tokens)} over ``corpus``; cached by the
    weights' hash (``model.medit_weights_sha256``), layer and corpus hash where the hash is known."""
    sha = getattr(model, "medit_weights_sha256", None) if cache else None
    keys = {layer: _cov_key(sha, arch, layer, corpus, max_length) for layer in layers}
    out, todo = {}, []
    for layer, key in keys.items():
        got = _load_cov(key) if sha else None
        if got is None:
            todo.append(layer)
        else:
            out[layer] = got
    if todo:
        t0 = time.perf_counter()
        fresh = _accumulate(model, tok, arch, todo, corpus, max_length, batch_size)
        log.info(
            "second moments of layers %s over %d tokens in %.1f s",
            todo,
            next(iter(fresh.values()))[1],
            time.perf_counter() - t0,
        )
        for layer, value in fresh.items():
            out[layer] = value
            if sha:
                _save_cov(keys[layer], *value)
    return out


def _cov_key(sha, arch, layer, corpus: Corpus, max_length) -> str:
    blob = json.dumps(
        ["medit.mom2/1", sha, arch.weight_name(layer, "mlp_out"), corpus.sha256, max_length]
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


def _load_cov(key: str):
    if key in _MEMORY:
        return _MEMORY[key]
    path = cache_dir() / "covariance" / f"{key}.safetensors"
    if not path.is_file():
        return None
    t = load_file(str(path))
    _MEMORY[key] = (t["sum"], int(t["count"].item()))
    return _MEMORY[key]


def _save_cov(key: str, total: torch.Tensor, count: int) -> None:
    path = cache_dir() / "covariance" / f"{key}.safetensors"
    with atomic_file(path) as tmp:
        save_file({"sum": total.contiguous(), "count": torch.tensor([count])}, str(tmp))
    _MEMORY[key] = (total, count)


@torch.no_grad()
def _accumulate(model, tok, arch, layers, corpus: Corpus, max_length, batch_size):
    chunks = []
    for text in corpus.texts:
        ids = tok(text).input_ids
        chunks += [ids[i : i + max_length] for i in range(0, len(ids), max_length)]
    chunks.sort(key=len)
    device = arch.embedding(model).weight.device
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    modules = [arch.module(model, layer, "mlp_out") for layer in sorted(layers)]
    base = arch.base_model(model)
    sums = {layer: None for layer in layers}
    count = 0
    for i in range(0, len(chunks), batch_size):
        part = chunks[i : i + batch_size]
        width = max(len(c) for c in part)
        ids = torch.full((len(part), width), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for j, c in enumerate(part):
            ids[j, : len(c)], mask[j, : len(c)] = torch.tensor(c), 1
        ids, mask = ids.to(device), mask.to(device)
        got = capture_inputs(
            modules,
            functools.partial(base, input_ids=ids, attention_mask=mask, use_cache=False),
        )
        real = mask.bool()
        count += int(real.sum())
        for layer, x in zip(sorted(layers), got, strict=True):
            k = x[real].float()
            s = (k.T @ k).double().cpu()
            sums[layer] = s if sums[layer] is None else sums[layer] + s
    if count == 0:
        raise UserError(f"corpus {corpus.name!r} has no tokens")
    return {layer: (sums[layer], count) for layer in layers}


def null_space_projector(C: torch.Tensor, threshold: float, key: str | None = None):
    """(P, null-space dimension): the projector U Uᵀ onto the eigenvectors of C whose eigenvalues
    are below ``threshold`` (AlphaEdit), float64."""
    mkey = f"null:{key}:{threshold}" if key else None
    if mkey and mkey in _MEMORY:
        return _MEMORY[mkey]
    evals, evecs = torch.linalg.eigh(C.double())
    U = evecs[:, evals < threshold]
    out = (U @ U.T, int(U.shape[1]))
    if mkey:
        _MEMORY[mkey] = out
    return out
