"""A benchmark run directory's storage: the case records of ``cases.jsonl``, the results
aggregated from them, and the on-disk cache of pre-edit baselines.

* ``cases.jsonl`` — one line per finished (method, case), appended and fsynced as each finishes;
  a line cut short by a crash is dropped on resume (moved to ``cases.rejected.jsonl``) and the
  case is run again;
* ``bench.json`` — the configuration, data hash and provenance the results are aggregated with.

The pre-edit baseline of each case is computed once per (model weights, evaluation settings) and
cached on disk, keyed by the case's content.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import time
from pathlib import Path
from typing import Any

from medit.bench.metrics import (
    aggregate_cases,
    case_metrics,
    edit_groups,
    other_edit_flags,
    quality_flags,
)
from medit.bench.shard import shard_files
from medit.bench.suites import data_sha256, get_suite
from medit.core.cache import Cache
from medit.core.fs import append_line, atomic_write_bytes
from medit.core.results import read_json_object
from medit.evaluation import evaluate

log = logging.getLogger(__name__)

SCHEMA = "medit.bench/1"
CASES_STEM, CURVE_STEM = "cases", "curve"
CASES_FILE = f"{CASES_STEM}.jsonl"
CURVE_FILE = f"{CURVE_STEM}.jsonl"
REJECTED_FILE = "cases.rejected.jsonl"


def read_cases(out: Path, repair: bool = False) -> list[dict[str, Any]]:
    """Finished cases, from ``cases.jsonl`` and the files of a sharded run's processes
    (:mod:`medit.bench.shard`). A line that is not a complete case record (a crash cut the last
    line short, or a line was damaged) is skipped; with ``repair`` such lines are moved out of
    their file into ``cases.rejected.jsonl`` (nothing is thrown away) and those cases run
    again. A case is never counted twice."""
    cases = []
    for path in [out / CASES_FILE, *shard_files(out, CASES_STEM)]:
        if path.exists():
            cases += _read_case_file(out, path, repair)
    seen, unique = set(), []
    for c in cases:
        if (c["method"], c["case"]) not in seen:
            seen.add((c["method"], c["case"]))
            unique.append(c)
    return unique


def _read_case_file(out: Path, path: Path, repair: bool) -> list[dict[str, Any]]:
    lines = path.read_bytes().splitlines(keepends=True)
    cases, good, bad = [], [], []
    for n, line in enumerate(lines, 1):
        record = _case_record(line)
        if record is None:
            bad.append((n, line))
        else:
            cases.append(record)
            good.append(line)
    if repair and bad:
        for n, line in bad:
            what = (
                "incomplete last line (interrupted run)"
                if n == len(lines) and not line.endswith(b"\n")
                else "not a valid case record"
            )
            log.warning(
                "%s: line %d: %s; moved to %s, the case runs again", path, n, what, REJECTED_FILE
            )
        rejected = b"".join(line if line.endswith(b"\n") else line + b"\n" for _, line in bad)
        with open(out / REJECTED_FILE, "ab") as f:
            f.write(rejected)
            f.flush()
            os.fsync(f.fileno())
        atomic_write_bytes(path, b"".join(good))
    return cases


def _case_record(line: bytes) -> dict[str, Any] | None:
    """The case a cases.jsonl line holds, or None for a cut-short or damaged line."""
    if not line.endswith(b"\n"):
        return None
    try:
        record = json.loads(line)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
    ok = (
        isinstance(record, dict)
        and isinstance(record.get("method"), str)
        and isinstance(record.get("case"), int)
        and isinstance(record.get("metrics"), dict)
    )
    return record if ok else None


def append_case(out: Path, record: dict[str, Any], file: str = CASES_FILE) -> None:
    append_line(out / file, json.dumps(record, ensure_ascii=False))


def append_curve_point(out: Path, point: dict[str, Any], file: str = CURVE_FILE) -> None:
    append_line(out / file, json.dumps(point, ensure_ascii=False))


def read_curve(out: Path) -> list[dict[str, Any]]:
    """The retention-curve points of a run (sequential mode), in the order they were written;
    a line a crash cut short is skipped (the point is computed again on resume)."""
    points, seen = [], set()
    paths = [Path(out) / CURVE_FILE, *shard_files(Path(out), CURVE_STEM)]
    lines = [ln for p in paths if p.exists() for ln in p.read_bytes().splitlines(keepends=True)]
    for line in lines:
        try:
            point = json.loads(line) if line.endswith(b"\n") else None
        except (json.JSONDecodeError, UnicodeDecodeError):
            point = None
        ok = isinstance(point, dict) and isinstance(point.get("edits"), int) and "method" in point
        if ok and (point["method"], point["edits"]) not in seen:
            seen.add((point["method"], point["edits"]))
            points.append(point)
    return points


#: pre-edit evaluation states: one entry per (weights, settings) holding every case seen
BASELINES = Cache("baselines", version=1)


def baseline(lm, requests, ecfg, quiet: bool = False) -> list[dict[str, Any]]:
    """Pre-edit states, computed once per (model weights, evaluation settings) and cached."""
    key = BASELINES.key(lm.weights_sha256, dataclasses.asdict(ecfg))
    cache = BASELINES.get(key) or {}
    hashes = [
        hashlib.sha256(
            json.dumps({k: v for k, v in r.to_dict().items() if k != "id"}, sort_keys=True).encode()
        ).hexdigest()
        for r in requests
    ]
    missing = [i for i, h in enumerate(hashes) if h not in cache]
    if missing:
        log.info(
            "pre-edit baseline: evaluating %d cases (cached: %d)",
            len(missing),
            len(requests) - len(missing),
        )
        t = time.perf_counter()
        states = evaluate(lm.model, lm.tokenizer, lm.arch, [requests[i] for i in missing], ecfg)
        log.info("baseline took %.1f s", time.perf_counter() - t)
        for i, state in zip(missing, states, strict=True):
            cache[hashes[i]] = state
        BASELINES.put(key, cache)
    return [cache[h] for h in hashes]


def case_indices(out: Path) -> dict[str, set[int]]:
    """Per method of a run, the indices of its finished cases."""
    found: dict[str, set[int]] = {}
    for c in read_cases(Path(out)):
        found.setdefault(c["method"], set()).add(c["case"])
    return found


def results_of(out: Path, only: set[int] | None = None) -> dict[str, Any]:
    """A run's results aggregated from its ``cases.jsonl``; ``only``: just these case indices."""
    out = Path(out)
    bench = read_json_object(out / "bench.json")
    cfg = bench["config"]
    suite = get_suite(cfg["suite"])
    cases = rescore(read_cases(out), suite, cfg, bench["identity"])
    methods = {}
    for method in cfg["methods"]:
        mine = sorted(
            (c for c in cases if c["method"] == method and (only is None or c["case"] in only)),
            key=lambda c: c["case"],
        )
        if mine:
            methods[method] = aggregate_cases(mine, suite.locality_types, cfg["keep_flagged"])
    curves: dict[str, list[dict[str, Any]]] = {}
    for point in read_curve(out):
        curves.setdefault(point["method"], []).append(point)
    for points in curves.values():
        points.sort(key=lambda p: p["edits"])
    return {
        "schema": SCHEMA,
        "suite": cfg["suite"],
        "mode": cfg["mode"],
        "model": cfg["model"],
        "locality_types": list(suite.locality_types),
        "explanation": suite.explanation,
        "methods": methods,
        **({"curves": curves} if curves else {}),
        "provenance": bench["provenance"],
        "config": cfg,
    }


def rescore(cases: list[dict[str, Any]], suite, cfg: dict[str, Any], identity: dict[str, Any]):
    """Recompute each case's metrics and flags from its stored outputs (``post``), so a run is
    aggregated with the current metric definitions without editing again. Falls back to the
    stored metrics when the suite's data is not at hand or has changed since the run."""
    try:
        source = suite.resolve(cfg.get("data"))
        if data_sha256(source) != identity.get("data_sha256"):
            log.warning("data changed since the run; aggregating the stored metrics")
            return cases
        requests = suite.load(cfg.get("data"), cfg.get("limit"))
    except (ValueError, OSError) as exc:
        log.warning("cannot re-read the suite's data (%s); aggregating the stored metrics", exc)
        return cases
    groups = edit_groups(len(requests), cfg.get("mode", "single"), cfg.get("batch_size", 1))
    others = other_edit_flags(requests, groups)
    out = []
    for c in cases:
        if "post" in c and c["case"] < len(requests):
            req = requests[c["case"]]
            c = {
                **c,
                "flags": {**quality_flags(req), **others[c["case"]]},
                "metrics": case_metrics(req, c["post"], suite.explanation),
            }
        out.append(c)
    return out
