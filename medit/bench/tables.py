"""Benchmark tables (Markdown, CSV) rendered from results.json alone, and run comparison."""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any

from medit.bench.store import case_indices, results_of
from medit.core.errors import UserError
from medit.core.results import read_json_object

PROTOCOL_LABELS = {
    "teacher_forced": "teacher-forced (comparable to the MedLaSA paper)",
    "generation": "generation-based (greedy decoding)",
}


def _fmt(v: Any, scale: float = 100.0) -> str:
    return "–" if v is None else f"{v * scale:.1f}"


def _columns(res: dict[str, Any], protocol: str) -> list[tuple[str, Any]]:
    """(header, getter) pairs of one protocol's table."""
    rouge = protocol == "generation" and res.get("explanation", False)
    suffix = " (ROUGE-L)" if rouge else ""  # MedFE: generated explanation vs the reference
    cols = [
        (f"Efficacy{suffix}", lambda t: _fmt(t.get("efficacy"))),
        (f"Generality{suffix}", lambda t: _fmt(t.get("generality"))),
    ]
    for kind in res["locality_types"]:
        cols.append((f"Loc:{kind}", lambda t, k=kind: _fmt(t.get("locality", {}).get(k))))
    cols += [
        ("Locality", lambda t: _fmt(t.get("locality_avg"))),
        ("Average", lambda t: _fmt(t.get("average"))),
    ]
    if protocol == "generation":
        cols.append(("Fluency", lambda t: _fmt(t.get("fluency"), 1.0)))
        if rouge:
            cols.append(("Answer stated", lambda t: _fmt(t.get("answer_stated"))))
    return cols


def rows(res: dict[str, Any], protocol: str) -> tuple[list[str], list[list[str]]]:
    cols = _columns(res, protocol)
    header = ["Method", *(h for h, _ in cols), "n", "s/edit", "peak MB"]
    body = []
    for label, m in res["methods"].items():
        if protocol not in m:
            continue
        t = m[protocol]
        sec, mem = m.get("seconds_per_edit"), m.get("peak_memory_mb")
        body.append(
            [
                label,
                *(get(t) for _, get in cols),
                str(m["n"]),
                "–" if sec is None else f"{sec:.2f}",
                "–" if mem is None else f"{mem:.0f}",
            ]
        )
    return header, body


def curve_markdown(curves: dict[str, list[dict[str, Any]]]) -> list[str]:
    """The retention curves as one table: per method and point, both protocols' efficacy,
    generality and locality, and seconds per edit since the previous point."""
    if not curves:
        return []
    out = [
        "## retention curve (sample of the edits made so far; fixed locality probes)\n",
        "| Method | Edits | TF Eff | TF Gen | TF Loc | Gen Eff | Gen Gen | Gen Loc | s/edit |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for method, points in curves.items():
        for p in points:
            tf, gen = p.get("teacher_forced", {}), p.get("generation", {})
            cells = [
                _fmt(t.get(k))
                for t in (tf, gen)
                for k in ("efficacy", "generality", "locality_avg")
            ]
            spe = p.get("seconds_per_edit")
            secs = "–" if spe is None else f"{spe:.1f}"
            out.append(f"| {method} | {p['edits']} | " + " | ".join(cells) + f" | {secs} |")
    out.append("")
    return out


def markdown(res: dict[str, Any]) -> str:
    out = [f"# {res['suite']} — {res['mode']} editing on {res['model']}\n"]
    for protocol, label in PROTOCOL_LABELS.items():
        header, body = rows(res, protocol)
        if not body:
            continue
        out.append(f"## {label}\n")
        out.append("| " + " | ".join(header) + " |")
        out.append("|" + "---|" * len(header))
        out += ["| " + " | ".join(r) + " |" for r in body]
        out.append("")
    out += curve_markdown(res.get("curves") or {})
    excluded = {k: v for m in res["methods"].values() for k, v in m.get("excluded", {}).items()}
    if excluded:
        out.append(
            "Data-quality flags (affected metrics excluded): "
            + ", ".join(f"{k}: {v} cases" for k, v in sorted(excluded.items()))
        )
    if res.get("common_cases"):
        out.append(
            f"Every row is aggregated over the {len(res['common_cases'])} cases that all "
            "compared rows hold."
        )
    if res.get("explanation"):
        out.append(
            "Generation-based Efficacy/Generality: ROUGE-L F1 of the greedy explanation of "
            "the edit prompt / its paraphrases against the reference explanation; Answer "
            "stated: the fact's answer appears in the generated explanation."
        )
    out.append(
        "Scores in %; Average = (mean(Efficacy, Generality) + Locality) / 2 as in the "
        "MedLaSA paper; Fluency = n-gram entropy; peak MB = CUDA allocator peak on GPU, "
        "process peak RSS on CPU."
    )
    return "\n".join(out) + "\n"


def csv_text(res: dict[str, Any]) -> str:
    """Tidy CSV: one row per (protocol, method, metric), scores in %."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["protocol", "method", "metric", "value"])
    for protocol in PROTOCOL_LABELS:
        header, body = rows(res, protocol)
        for r in body:
            for metric, value in zip(header[1:], r[1:], strict=True):
                w.writerow([protocol, r[0], metric, value])
    return buf.getvalue()


def compare(run_dirs: list[str | Path], common: bool = False) -> dict[str, Any]:
    """Merge several benchmark runs of one suite into one results dict (method labels get the
    run's mode when it differs between runs). ``common``: every row is re-aggregated over the
    cases that all rows hold, so partial runs compare like for like."""
    runs = []
    for d in run_dirs:
        path = Path(d) / "results.json"
        if not path.is_file():
            raise UserError(f"{d} is not a finished benchmark run (no results.json)")
        run = read_json_object(path)
        if not str(run.get("schema", "")).startswith("medit.bench/"):
            raise UserError(
                f"{path}: not a benchmark run (schema {run.get('schema')!r}); "
                "--compare takes `medit bench` run directories"
            )
        for field in ("suite", "mode", "methods"):
            if field not in run:
                raise UserError(f"{path}, field '{field}': missing")
        runs.append(run)
    shared = None
    if common:
        for d in run_dirs:
            for found in case_indices(Path(d)).values():
                shared = found if shared is None else shared & found
        if not shared:
            raise UserError("the compared runs have no case in common")
        runs = [results_of(Path(d), shared) for d in run_dirs]
    suites = {r["suite"] for r in runs}
    if len(suites) > 1:
        raise UserError(f"cannot compare runs of different suites: {', '.join(sorted(suites))}")
    modes = {r["mode"] for r in runs}
    merged = {
        **runs[0],
        "methods": {},
        "mode": "/".join(sorted(modes)),
        "compared": [str(d) for d in run_dirs],
        **({"common_cases": sorted(shared)} if shared is not None else {}),
    }
    for r in runs:
        for label, m in r["methods"].items():
            name = label
            overrides = (r.get("config") or {}).get("hparams", {}).get(label) or {}
            if overrides:  # the same method with other settings: say which
                name += " (" + ", ".join(f"{k}={v}" for k, v in sorted(overrides.items())) + ")"
            if len(modes) > 1:
                name += f" ({r['mode']})"
            if name in merged["methods"]:
                name = f"{name} [{len(merged['methods'])}]"
            merged["methods"][name] = m
    return merged
