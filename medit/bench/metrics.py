"""Per-case benchmark metrics, data-quality flags, and the MedLaSA paper's aggregate.

Each case's evaluation state is flattened into ``{"tf.efficacy": .., "gen.locality.mapping": ..}``
(``tf`` = teacher-forced, ``gen`` = generation-based). Data-quality flags name the metrics a case
cannot measure honestly; those values are excluded from the aggregate unless asked to keep them.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from medit.core.text import normalise
from medit.facts.requests import EditRequest

PROTOCOLS = {"tf": "teacher_forced", "gen": "generation"}


# -- data quality --------------------------------------------------------------------------------
def quality_flags(req: EditRequest) -> dict[str, list[str]]:
    """Flags for a case: name -> metric keys it invalidates.

    * ``locality_prompt_is_edit_prompt:<type>`` — a locality probe asks the edited question
      itself (46 "mapping" probes in MedCF test): its answer is *supposed* to change.
    * ``target_equals_ground_truth`` — the "edit" asks for the answer the data says is already
      true (4 cases in MedCF test): efficacy and generality do not measure an edit.
    """
    flags: dict[str, list[str]] = {}
    edit_prompts = {normalise(req.prompt), *(normalise(p) for p in req.rephrase_prompts)}
    for kind, probes in req.locality.items():
        if any(normalise(p) in edit_prompts for p, _ in probes):
            flags[f"locality_prompt_is_edit_prompt:{kind}"] = [
                f"tf.locality.{kind}",
                f"gen.locality.{kind}",
            ]
    if req.ground_truth and normalise(req.ground_truth) == normalise(req.target_new):
        flags["target_equals_ground_truth"] = [
            "tf.efficacy",
            "tf.generality",
            "gen.efficacy",
            "gen.efficacy_exact",
            "gen.generality",
        ]
    return flags


def edit_groups(n: int, mode: str, batch_size: int) -> list[list[int]]:
    """The cases whose edits are on the model together when each is evaluated: alone (single),
    the batch (batch), every case of the run (sequential: all edits, then all evaluations)."""
    if mode == "single":
        return [[i] for i in range(n)]
    if mode == "batch":
        return [list(range(s, min(s + batch_size, n))) for s in range(0, n, batch_size)]
    return [list(range(n))]


def other_edit_flags(requests: Sequence[EditRequest], groups: Sequence[Sequence[int]]):
    """Per case, ``locality_prompt_is_other_edit:<type>`` where a locality probe asks the
    question (prompt or paraphrase) of *another* edit on the model at the same time: in batch
    and sequential editing its answer is supposed to change (MedCF's struc probes are often
    another case's edit prompt)."""
    out: list[dict[str, list[str]]] = [{} for _ in requests]
    for group in groups:
        asked: dict[str, set[int]] = {}
        for i in group:
            for p in (requests[i].prompt, *requests[i].rephrase_prompts):
                asked.setdefault(normalise(p), set()).add(i)
        for i in group:
            for kind, probes in requests[i].locality.items():
                if any(asked.get(normalise(p), set()) - {i} for p, _ in probes):
                    out[i][f"locality_prompt_is_other_edit:{kind}"] = [
                        f"tf.locality.{kind}",
                        f"gen.locality.{kind}",
                    ]
    return out


# -- explanation quality (MedFE) -----------------------------------------------------------------
def _words(text: str) -> list[str]:
    return re.findall(r"\w+", text.lower())


def rouge_l(candidate: str, reference: str) -> float:
    """ROUGE-L F1 (Lin 2004) over lower-cased word tokens, via the longest common subsequence."""
    c, r = _words(candidate), _words(reference)
    if not c or not r:
        return 0.0
    prev = [0] * (len(r) + 1)
    for cw in c:
        cur = [0]
        for j, rw in enumerate(r, 1):
            cur.append(prev[j - 1] + 1 if cw == rw else max(prev[j], cur[j - 1]))
        prev = cur
    lcs = prev[-1]
    if lcs == 0:
        return 0.0
    p, rec = lcs / len(c), lcs / len(r)
    return 2 * p * rec / (p + rec)


# -- per-case flattening -------------------------------------------------------------------------
def case_metrics(req: EditRequest, post: dict[str, Any], explanation: bool) -> dict[str, Any]:
    tf, gen = post["teacher_forced"], post.get("generation")
    out: dict[str, Any] = {"tf.efficacy": tf["efficacy"], "tf.generality": tf["generality"]}
    for kind, v in tf.get("locality", {}).items():
        out[f"tf.locality.{kind}"] = v
    if gen is not None:
        if explanation:
            # A reference explanation is ~100 words: "is it stated verbatim" is 0 for every
            # method, so the generated explanation is scored by its ROUGE-L against the reference.
            out["gen.efficacy"] = rouge_l(gen["prompt"]["text"], req.target_new)
            scores = [rouge_l(r["text"], req.target_new) for r in gen["rephrases"]]
            out["gen.generality"] = sum(scores) / len(scores) if scores else None
            answer = req.subject or ""
            text = gen["prompt"]["text"]
            out["gen.answer_stated"] = float(bool(answer) and normalise(answer) in normalise(text))
        else:
            out |= {
                "gen.efficacy": float(gen["efficacy_contains"]),
                "gen.efficacy_exact": float(gen["efficacy_exact"]),
                "gen.generality": gen["generality_contains"],
            }
        out["gen.fluency"] = gen["fluency"]
        for kind, v in gen["locality_unchanged"].items():
            out[f"gen.locality.{kind}"] = v
    return out


def apply_exclusions(metrics: dict[str, Any], flags: dict[str, list[str]]) -> dict[str, Any]:
    excluded = {k for keys in flags.values() for k in keys}
    return {k: (None if k in excluded else v) for k, v in metrics.items()}


# -- aggregation ---------------------------------------------------------------------------------
def _mean(values: Sequence[float | None]) -> float | None:
    vals = [v for v in values if v is not None]
    return sum(vals) / len(vals) if vals else None


def aggregate_cases(
    cases: Sequence[dict[str, Any]], locality_types: Sequence[str], keep_flagged: bool = False
) -> dict[str, Any]:
    """The paper's table row for one method, both protocols.

    ``average`` = (mean(efficacy, generality) + mean(locality types)) / 2, as in the MedLaSA paper.
    """
    rows = [
        c["metrics"] if keep_flagged else apply_exclusions(c["metrics"], c["flags"]) for c in cases
    ]
    out: dict[str, Any] = {"n": len(cases)}
    for short, name in PROTOCOLS.items():
        col = lambda key, s=short: _mean([r.get(f"{s}.{key}") for r in rows])  # noqa: E731
        if col("efficacy") is None:
            continue
        table = {"efficacy": col("efficacy"), "generality": col("generality")}
        table["locality"] = {t: col(f"locality.{t}") for t in locality_types}
        table["locality_avg"] = _mean(list(table["locality"].values()))
        head = _mean([table["efficacy"], table["generality"]])
        table["average"] = _mean([head, table["locality_avg"]]) if head is not None else None
        for extra in ("efficacy_exact", "fluency", "answer_stated"):
            if col(extra) is not None:
                table[extra] = col(extra)
        out[name] = table
    out["excluded"] = _excluded_counts(cases) if not keep_flagged else {}
    seconds = [c["seconds"] for c in cases if c.get("seconds") is not None]
    out["seconds_per_edit"] = _mean(seconds)
    memory = [c.get("peak_memory_mb") for c in cases]
    out["peak_memory_mb"] = max((m for m in memory if m is not None), default=None)
    return out


def curve_point(
    edited: Sequence[dict[str, Any]],
    probes: Sequence[dict[str, Any]],
    locality_types: Sequence[str],
) -> dict[str, Any]:
    """One point of a retention curve: efficacy and generality over the ``edited`` sample's
    metrics, locality over the ``probes`` sample's (both with their flags' exclusions applied:
    each item is a case's ``{"metrics", "flags"}``)."""
    e_rows = [apply_exclusions(c["metrics"], c["flags"]) for c in edited]
    p_rows = [apply_exclusions(c["metrics"], c["flags"]) for c in probes]
    out: dict[str, Any] = {"sample": len(edited), "probes": len(probes)}
    for short, name in PROTOCOLS.items():
        efficacy = _mean([r.get(f"{short}.efficacy") for r in e_rows])
        if efficacy is None:
            continue
        loc = {t: _mean([r.get(f"{short}.locality.{t}") for r in p_rows]) for t in locality_types}
        out[name] = {
            "efficacy": efficacy,
            "generality": _mean([r.get(f"{short}.generality") for r in e_rows]),
            "locality": loc,
            "locality_avg": _mean(list(loc.values())),
        }
    return out


def _excluded_counts(cases: Sequence[dict[str, Any]]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for c in cases:
        for flag in c["flags"]:
            counts[flag.split(":")[0]] = counts.get(flag.split(":")[0], 0) + 1
    return counts
