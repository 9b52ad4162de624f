"""Render a run directory into one self-contained HTML (or Markdown) report.

The report reads only the run directory: ``results.json`` + ``samples.jsonl`` for an edit run,
``results.json`` (schema ``medit.bench/1``) for a benchmark run or a ``--compare``. Templates
autoescape everything; model text can never become markup.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from jinja2 import Environment, PackageLoader, select_autoescape

from medit.artifacts import journal
from medit.artifacts.savedmodel import ENTRY_FILE
from medit.bench import tables
from medit.core.errors import UserError
from medit.core.fs import atomic_write_text
from medit.core.results import format_summary, read_json_object, verdict
from medit.report import svg
from medit.tracing.heatmap import trace_svg


def _env() -> Environment:
    env = Environment(
        loader=PackageLoader("medit.report", "templates"),
        autoescape=select_autoescape(default=True, default_for_string=True),
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters["pct"] = lambda v: "–" if v is None else f"{100 * v:.1f}%"
    env.filters["num"] = lambda v, d=3: "–" if v is None else f"{v:.{d}f}"
    return env


def load_run(run_dir: str | Path) -> tuple[str, dict[str, Any], list[dict[str, Any]]]:
    """(kind, results, samples) of a run directory."""
    run = Path(run_dir)
    path = run / "results.json"
    if not path.is_file() and (run / "traces.json").is_file():
        path = run / "traces.json"  # a `medit trace` run
    if not path.is_file():
        raise UserError(f"{run} is not a medit run directory (no results.json)")
    results = read_json_object(path)
    schema = str(results.get("schema", ""))
    if schema.startswith("medit.bench/"):
        return "bench", results, []
    if schema.startswith("medit.traces/"):
        return "trace", results, []
    if schema.startswith("medit.check/"):
        return "check", results, []
    if schema.startswith("medit.train/"):
        return "train", results, []
    if not schema.startswith("medit.results/"):
        raise UserError(f"{path}: unknown schema {schema!r}")
    for field in ("config", "metrics", "provenance", "edit"):
        if not isinstance(results.get(field), dict):
            raise UserError(f"{path}, field '{field}': missing or not an object")
    results["_journal"] = journal_status(run, results)
    samples = []
    samples_path = run / "samples.jsonl"
    if samples_path.is_file():
        for i, line in enumerate(samples_path.read_text(encoding="utf-8").splitlines(), 1):
            try:
                samples.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise UserError(f"{samples_path}: line {i}: invalid JSON ({exc.msg})") from None
    return "edit", results, samples


def journal_status(run: Path, results: dict[str, Any]) -> dict[str, Any] | None:
    """The run's journal entry (its copy in the run directory) and, where the workspace journal
    is reachable, whether that journal is intact and holds the entry."""
    if not (run / ENTRY_FILE).is_file():
        return None
    entry = read_json_object(run / ENTRY_FILE)
    status = {"entry": entry, "path": results.get("journal"), "checked": False}
    path = Path(results["journal"]) if results.get("journal") else None
    if path is not None and path.is_file():
        try:
            problems = journal.verify(path)
            held = any(e.get("sha256") == entry.get("sha256") for e in journal.read(path))
        except ValueError as exc:
            problems, held = [str(exc)], False
        status.update(checked=True, problems=problems, held=held)
    return status


# -- edit runs -----------------------------------------------------------------------------------
def _edit_rows(samples: list[dict[str, Any]]) -> list[dict[str, Any]]:
    rows = []
    for s in samples:
        pre, post = s["pre"], s["post"]
        pg, qg = pre.get("generation"), post.get("generation")
        row = {
            "id": s["id"],
            "request": s["request"],
            "edit": s.get("edit") or {},
            "prob_before": pre["teacher_forced"]["target_prob"],
            "prob_after": post["teacher_forced"]["target_prob"],
            "tf_before": pre["teacher_forced"],
            "tf_after": post["teacher_forced"],
        }
        if qg is not None:
            row["prompt"] = {
                "before": pg["prompt"]["text"],
                "after": qg["prompt"]["text"],
                "passed": qg["efficacy_contains"],
            }
            row["rephrases"] = [
                {
                    "prompt": a["prompt"],
                    "before": b["text"],
                    "after": a["text"],
                    "passed": a["contains"],
                }
                for a, b in zip(qg["rephrases"], pg["rephrases"], strict=True)
            ]
            row["locality"] = [
                {
                    **a,
                    "before": b["text"],
                    "after": a["text"],
                    "regressed": not a["unchanged"]
                    or (a["answer_stated_before"] and not a["answer_stated"]),
                }
                for a, b in zip(qg["locality"], pg["locality"], strict=True)
            ]
            row["passed"] = qg["efficacy_contains"] and not any(
                x["regressed"] for x in row["locality"]
            )
        rows.append(row)
    return rows


def _edit_charts(results: dict[str, Any], rows: list[dict[str, Any]]) -> dict[str, Any]:
    pre, post = results["metrics"]["pre"], results["metrics"]["post"]
    charts = {}
    tf_groups = [
        "efficacy",
        "generality",
        *(f"loc:{k}" for k in post["teacher_forced"]["locality"]),
    ]

    def get_tf(m):
        return [
            m["teacher_forced"].get(g)
            if not g.startswith("loc:")
            else m["teacher_forced"].get("locality", {}).get(g[4:])
            for g in tf_groups
        ]

    charts["teacher_forced"] = svg.bars(
        tf_groups,
        {"before": get_tf(pre), "after": get_tf(post)},
        "teacher-forced token accuracy / locality agreement",
    )
    if "generation" in post:
        g = post["generation"]
        groups = ["efficacy", "generality", *(f"loc:{k}" for k in g["locality_unchanged"])]

        def values(m):
            return [
                m.get("efficacy_contains"),
                m.get("generality_contains"),
                *(m.get("locality_unchanged", {}).get(k[4:]) for k in groups[2:]),
            ]

        charts["generation"] = svg.bars(
            groups,
            {"before": values(pre["generation"]), "after": values(g)},
            "generation-based pass rates (greedy decoding)",
        )
    if rows and "prompt" in rows[0]:
        cols = [
            "efficacy",
            *(f"para {i + 1}" for i in range(max(len(r["rephrases"]) for r in rows))),
        ]
        cols += [f"loc {x['type']}" for x in rows[0]["locality"]]
        cells = []
        for r in rows:
            para = [p["passed"] for p in r["rephrases"]]
            para += [None] * (len(cols) - 1 - len(rows[0]["locality"]) - len(para))
            cells.append(
                [r["prompt"]["passed"], *para, *(not x["regressed"] for x in r["locality"])]
            )
        charts["grid"] = svg.pass_grid(
            [str(i + 1) for i in range(len(rows))],
            cols,
            cells,
            "per edit: green = pass, red = fail / regression",
        )
    return charts


def edit_context(results: dict[str, Any], samples: list[dict[str, Any]]) -> dict[str, Any]:
    rows = _edit_rows(samples)
    return {
        "r": results,
        "verdict": verdict(results),
        "rows": rows,
        "charts": _edit_charts(results, rows),
        "prov": results["provenance"],
    }


# -- benchmark runs ------------------------------------------------------------------------------
def bench_context(results: dict[str, Any]) -> dict[str, Any]:
    out = {"r": results, "tables": {}, "charts": {}}
    for protocol, label in tables.PROTOCOL_LABELS.items():
        header, body = tables.rows(results, protocol)
        if not body:
            continue
        out["tables"][label] = (header, body)
        methods = [m for m, v in results["methods"].items() if protocol in v]
        groups = ["efficacy", "generality", "locality_avg", "average"]
        out["charts"][label] = svg.bars(
            groups,
            {m: [results["methods"][m][protocol].get(g) for g in groups] for m in methods},
            label,
        )
    out["curves"] = curve_charts(results.get("curves") or {})
    return out


def curve_charts(curves: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """The retention curves of a sequential run: per method and protocol, efficacy, generality
    and locality against the number of edits made; and seconds per edit for every method."""
    charts: dict[str, Any] = {}
    for method, points in curves.items():
        for protocol, label in tables.PROTOCOL_LABELS.items():
            have = [p for p in points if protocol in p]
            if not have:
                continue
            series = {
                metric: [(p["edits"], p[protocol].get(metric)) for p in have]
                for metric in ("efficacy", "generality", "locality_avg")
            }
            charts[f"{method}: {label}"] = svg.lines(
                series, f"{method}: retention ({label})", "edits made"
            )
    if curves:
        charts["seconds per edit"] = svg.lines(
            {
                m: [(p["edits"], p.get("seconds_per_edit")) for p in pts]
                for m, pts in curves.items()
            },
            "seconds per edit (mean over the edits since the previous point)",
            "edits made",
            y_max=None,
        )
    return charts


# -- causal traces -------------------------------------------------------------------------------
def trace_context(results: dict[str, Any]) -> dict[str, Any]:
    """Heatmaps (escaped SVG from medit.tracing.heatmap) and the set's association profile chart."""
    from markupsafe import Markup

    items = [{**t, "svg": Markup(trace_svg(t))} for t in results["traces"]]
    profile = results.get("association_profile") or {}
    chart = None
    if profile:
        n_layers = len(next(iter(profile.values())))
        top = max((abs(v) for vals in profile.values() for v in vals), default=1.0) or 1.0
        chart = svg.bars(
            [str(i) for i in range(n_layers)],
            {k: [v / top for v in vals] for k, vals in profile.items()},
            "association profile over subject tokens (indirect effect, scaled)",
            width=max(560, 24 * n_layers),
        )
    return {"r": results, "items": items, "profile_chart": chart}


# -- entry points --------------------------------------------------------------------------------
def render(run_dir: str | Path, fmt: str = "html") -> str:
    kind, results, samples = load_run(run_dir)
    if fmt == "md":
        return markdown(kind, results, samples)
    if fmt != "html":
        raise UserError(f"unknown report format {fmt!r}; use html or md")
    env = _env()
    if kind == "check":
        return env.get_template("check.html.j2").render(**check_context(results))
    if kind == "bench":
        return env.get_template("bench.html.j2").render(**bench_context(results))
    if kind == "trace":
        return env.get_template("trace.html.j2").render(**trace_context(results))
    if kind == "train":
        return env.get_template("train.html.j2").render(**train_context(results))
    return env.get_template("edit.html.j2").render(**edit_context(results, samples))


def train_context(results: dict[str, Any]) -> dict[str, Any]:
    """A ``medit train-editor`` run's page: the running losses and the validation figures
    against the step, and the validations as a table."""
    train, valid = results.get("train", []), results.get("valid", [])
    loss_keys = sorted({k for r in train for k in r if k not in ("step", "seconds")})
    valid_keys = sorted({k for v in valid for k, x in v.items() if k != "step" and _number(x)})
    charts = {}
    if loss_keys:
        charts["training losses"] = svg.lines(
            {k: [(r["step"], r.get(k)) for r in train] for k in loss_keys},
            "training losses (per step)",
            "step",
            y_max=None,
        )
    if valid_keys:
        charts["validation"] = svg.lines(
            {k: [(v["step"], v.get(k)) for v in valid] for k in valid_keys},
            "validation figures",
            "step",
            y_max=None,
        )
    return {"r": results, "charts": charts, "valid_keys": valid_keys}


def _number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def check_context(results: dict[str, Any]) -> dict[str, Any]:
    """A ``medit check`` run's page: the wrong answers first, then the right ones."""
    rows = results["answers"]
    return {
        "r": results,
        "prov": results["provenance"],
        "wrong": [a for a in rows if not a["right"]],
        "right": [a for a in rows if a["right"]],
    }


def markdown(kind: str, results: dict[str, Any], samples: list[dict[str, Any]]) -> str:
    if kind == "train":
        keys = train_context(results)["valid_keys"]
        lines = [
            f"# medit train-editor {results['method']}",
            "",
            f"{results['steps']} steps, {results['seconds']:.1f} s; best {results['best']} at "
            f"step {results['best_step']}",
            "",
            "| step | " + " | ".join(keys) + " |",
            "|---|" + "---|" * len(keys),
        ]
        for v in results.get("valid", []):
            lines.append(f"| {v['step']} | " + " | ".join(f"{v.get(k, '')}" for k in keys) + " |")
        return "\n".join(lines) + "\n"
    if kind == "bench":
        return tables.markdown(results)
    if kind == "check":
        c = results["counts"]
        lines = [
            f"# medit check — {results['config']['model']}",
            "",
            f"{c['asked']} questions: {c['right']} right, {c['wrong']} wrong",
            "",
            "| | question | expected | the model's answer |",
            "|---|---|---|---|",
        ]
        for a in sorted(results["answers"], key=lambda a: a["right"]):
            cells = [a["prompt"], a["expected"], a["answer"].strip()]
            cells = [" ".join(x.split()).replace("|", "\\|") for x in cells]
            lines.append(f"| {'right' if a['right'] else 'WRONG'} | " + " | ".join(cells) + " |")
        return "\n".join(lines) + "\n"
    if kind == "trace":
        lines = ["# medit causal traces", ""]
        for t in results["traces"]:
            peaks = ", ".join(f"{k} {v}" for k, v in t["peak_layers"].items())
            lines.append(
                f"- {t['prompt']} → {t['answer_token']!r}: p {t['clean_prob']:.3f} clean, "
                f"{t['corrupted_prob']:.3f} corrupted; peak layers {peaks}"
            )
        return "\n".join(lines) + "\n"
    v = verdict(results)
    cfg = results["config"]
    lines = [
        f"# medit edit report — {cfg['method']} ({cfg['mode']}) on {cfg['model']}",
        "",
        f"**Verdict: {'PASS' if v['passed'] else 'FAIL'}**",
        "",
    ]
    for c in v["checks"]:
        value = "–" if c["value"] is None else f"{c['value']:.3f}"
        lines.append(
            f"- {c['label']}: {value} (threshold {c['threshold']}) — "
            f"{'pass' if c['passed'] else 'FAIL'}"
        )
    lines += [
        "",
        "```",
        format_summary(results),
        "```",
        "",
        f"{len(samples)} edits; weights sha256 "
        f"{results['provenance']['model']['weights_sha256'][:16]}…",
    ]
    return "\n".join(lines) + "\n"


def write_report(run_dir: str | Path, output: str | Path | None = None, fmt: str = "html") -> Path:
    """Render and write the report atomically (default: RUN_DIR/report.html or report.md)."""
    text = render(run_dir, fmt)
    path = Path(output) if output else Path(run_dir) / f"report.{fmt}"
    atomic_write_text(path, text)
    return path
