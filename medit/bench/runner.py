"""``run_bench``: editors over a suite, resumable case by case.

Run directory:

* ``bench.json`` — the configuration, data hash and provenance (checked again on ``--resume``);
* ``cases.jsonl`` — one line per finished (method, case), appended and fsynced as each finishes;
  a line cut short by a crash is dropped on resume and the case is run again;
* ``checkpoints/<method>/`` — sequential mode: the cumulative weight edit after each request
  (adapter editors: one directory per edit, ``edits/NNNNNN``, written once), so a resumed run
  continues from the last edit instead of starting over;
* ``results.json``, ``table.md``, ``table.csv`` — the aggregate, rewritten at the end.

The pre-edit baseline of each case is computed once per (model weights, evaluation settings) and
cached on disk, keyed by the case's content.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from medit.artifacts.weights import (
    ARTIFACT_DIR,
    ARTIFACT_FILE,
    STATE,
    apply_artifact,
    load_edit,
    write_weights_artifact,
)
from medit.bench import tables
from medit.bench.metrics import (
    aggregate_cases,
    case_metrics,
    edit_groups,
    other_edit_flags,
    quality_flags,
)
from medit.bench.suites import data_sha256, get_suite
from medit.core import results as R
from medit.core.errors import UserError
from medit.core.fs import (
    append_line,
    atomic_write_bytes,
    atomic_write_text,
    check_writable,
    marker_kind,
    write_marker,
)
from medit.core.models import DEFAULT_MODEL, cache_dir, load_config, load_model
from medit.core.results import read_json_object
from medit.editors.adapter_result import AdapterEditResult
from medit.editors.base import EditResult, make_editor
from medit.editors.patching.routing import ROUTER
from medit.evaluation import evaluate
from medit.facts.requests import check_lengths, context_length
from medit.runner import MODES, set_seed

log = logging.getLogger(__name__)

SCHEMA = "medit.bench/1"
CASES_FILE = "cases.jsonl"
_IDENTITY = (
    "suite",
    "data_sha256",
    "methods",
    "model",
    "mode",
    "batch_size",
    "limit",
    "seed",
    "hparams",
    "device",
    "dtype",
    "eval_batch_size",
)
REJECTED_FILE = "cases.rejected.jsonl"


@dataclasses.dataclass(frozen=True)
class BenchConfig:
    out: str  #: run directory
    suite: str = "builtin"  #: medcf | medfe | builtin
    data: str | None = None  #: suite file or folder (MedCF/MedFE)
    methods: tuple[str, ...] = ("ft-m",)
    model: str = DEFAULT_MODEL
    mode: str = "single"  #: single | batch | sequential
    batch_size: int = 8  #: edits applied together in batch mode
    limit: int | None = None  #: first N cases
    seed: int = 0
    device: str = "auto"
    dtype: str = "auto"
    hparams: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)  #: per method
    resume: bool = False
    keep_flagged: bool = False  #: aggregate flagged cases' affected metrics too
    eval_batch_size: int = 32
    quiet: bool = False

    def __post_init__(self):
        if self.mode not in MODES:
            raise UserError(f"mode must be one of {', '.join(MODES)}, not {self.mode!r}")
        if not self.methods:
            raise UserError("give at least one method")
        for name in ("batch_size", "eval_batch_size", "limit"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise UserError(f"--{name.replace('_', '-')} must be >= 1, not {value}")


def run_bench(cfg: BenchConfig) -> dict[str, Any]:
    suite = get_suite(cfg.suite)
    editors = {
        m: make_editor(m, **{**suite.method_defaults.get(m, {}), **cfg.hparams.get(m, {})})
        for m in cfg.methods
    }
    requests = suite.load(cfg.data, cfg.limit)
    out = Path(cfg.out)
    identity = {
        **{k: getattr(cfg, k) for k in _IDENTITY if hasattr(cfg, k)},
        "methods": list(cfg.methods),
        "data_sha256": data_sha256(suite.resolve(cfg.data)),
    }
    done = _prepare_dir(out, identity, cfg.resume)
    config = load_config(cfg.model, trust_remote_code=False)
    for editor in editors.values():
        editor.check_config(config)
    lm = load_model(cfg.model, cfg.device, cfg.dtype)
    _check_resumed_model(out, lm)
    check_lengths(requests, lm.tokenizer, context_length(lm.model.config), source=cfg.data)
    ecfg = dataclasses.replace(suite.eval, batch_size=cfg.eval_batch_size)
    if not (out / "bench.json").exists():
        atomic_write_text(
            out / "bench.json",
            json.dumps(
                {
                    "schema": SCHEMA,
                    "config": dataclasses.asdict(cfg),
                    "identity": identity,
                    "provenance": R.provenance(model=lm.provenance()),
                },
                indent=2,
            ),
        )
    pre = baseline(lm, requests, ecfg, quiet=cfg.quiet)
    for method, editor in editors.items():
        todo = [i for i in range(len(requests)) if (method, i) not in done]
        if not todo:
            continue
        set_seed(cfg.seed)
        bar = tqdm(total=len(todo), desc=f"{cfg.suite} {method}", unit="case", disable=cfg.quiet)
        run = _RUNNERS[cfg.mode]
        run(cfg, suite, method, editor, lm, requests, pre, todo, ecfg, out, bar)
        bar.close()
    return finish(out)


def _prepare_dir(out: Path, identity: dict, resume: bool) -> set[tuple[str, int]]:
    """Create or reopen the run directory; the (method, case) pairs already finished."""
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} exists and is not a directory")
    if out.exists() and any(out.iterdir()):
        if not resume:
            raise UserError(f"--out {out} is not empty; pass --resume to continue that run")
        if marker_kind(out) != "bench-run" and not (out / "bench.json").is_file():
            raise UserError(f"--resume: {out} is not a medit benchmark run (no bench.json)")
        bench = read_json_object(out / "bench.json") if (out / "bench.json").exists() else {}
        differ = _identity_diff(bench.get("identity", {}), json.loads(json.dumps(identity)))
        if differ:
            raise UserError(
                f"--resume: {out} was started with other settings ({'; '.join(differ)}); "
                "use the same settings or another --out"
            )
    check_writable(out, "--out")
    out.mkdir(parents=True, exist_ok=True)
    if marker_kind(out) is None:
        write_marker(out, "bench-run")
    return {(c["method"], c["case"]) for c in read_cases(out, repair=True)}


def _identity_diff(old: dict, new: dict) -> list[str]:
    """The settings of a resumed run that differ from the stored ones ("name: old -> new").
    Settings a run from an earlier medit did not record are checked after the model loads."""
    return [f"{k}: {old[k]!r} -> {new[k]!r}" for k in new if k in old and old[k] != new[k]]


def _check_resumed_model(out: Path, lm) -> None:
    """A resumed run continues on the device type and dtype it started with."""
    path = out / "bench.json"
    if not path.exists():
        return
    started = read_json_object(path).get("provenance", {}).get("model", {})
    now = lm.provenance()
    for key in ("weights_sha256", "dtype", "device"):
        old, new = started.get(key), now.get(key)
        if key == "device":
            old, new = old and old.split(":")[0], new.split(":")[0]
        if old is not None and old != new:
            raise UserError(
                f"--resume: {out} was started with model {key} {old}, this run has "
                f"{new}; the table would mix them: use the same --{key.split('_')[0]} "
                "or another --out"
            )


def read_cases(out: Path, repair: bool = False) -> list[dict[str, Any]]:
    """Finished cases. A line that is not a complete case record (a crash cut the last line
    short, or a line was damaged) is skipped; with ``repair`` such lines are moved out of
    ``cases.jsonl`` into ``cases.rejected.jsonl`` (nothing is thrown away) and those cases run
    again."""
    path = out / CASES_FILE
    if not path.exists():
        return []
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
    seen, unique = set(), []
    for c in cases:  # a case is never counted twice
        if (c["method"], c["case"]) not in seen:
            seen.add((c["method"], c["case"]))
            unique.append(c)
    return unique


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


def _append(out: Path, record: dict[str, Any]) -> None:
    append_line(out / CASES_FILE, json.dumps(record, ensure_ascii=False))


def _record(suite, method, i, req, post, seconds, steps, lm) -> dict[str, Any]:
    post = dict(post)
    post["teacher_forced"] = {
        k: v for k, v in post["teacher_forced"].items() if k != "locality_tokens"
    }
    return {
        "method": method,
        "case": i,
        "id": req.id,
        "flags": quality_flags(req),
        "metrics": case_metrics(req, post, suite.explanation),
        "seconds": seconds,
        "steps": steps,
        "peak_memory_mb": _peak_mb(lm.device),
        "post": post,
    }


def _peak_mb(device: torch.device) -> float:
    mem = R.peak_memory_mb(device)
    return mem.get("cuda_peak_allocated_mb", mem["process_peak_rss_mb"])


def _steps(result: EditResult) -> float | None:
    steps = [d["steps"] for d in result.diagnostics if "steps" in d]
    return sum(steps) / len(steps) if steps else None


def _run_single(cfg, suite, method, editor, lm, requests, pre, todo, ecfg, out, bar):
    model, tok, arch = lm.model, lm.tokenizer, lm.arch
    for i in todo:
        if lm.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(lm.device)
        result = editor.apply(model, tok, [requests[i]])
        post = evaluate(model, tok, arch, [requests[i]], ecfg, reference=[pre[i]])[0]
        _append(
            out, _record(suite, method, i, requests[i], post, result.seconds, _steps(result), lm)
        )
        result.restore()
        bar.update(1)


def _run_batch(cfg, suite, method, editor, lm, requests, pre, todo, ecfg, out, bar):
    """Fixed chunks of ``batch_size`` cases; a chunk with missing cases is redone whole and only
    its missing cases are written (the edit is deterministic for a given seed)."""
    model, tok, arch = lm.model, lm.tokenizer, lm.arch
    missing = set(todo)
    for start in range(0, len(requests), cfg.batch_size):
        idx = list(range(start, min(start + cfg.batch_size, len(requests))))
        if not missing.intersection(idx):
            continue
        chunk = [requests[i] for i in idx]
        result = editor.apply(model, tok, chunk)
        posts = evaluate(model, tok, arch, chunk, ecfg, reference=[pre[i] for i in idx])
        for i, post in zip(idx, posts, strict=True):
            if i in missing:
                _append(
                    out,
                    _record(
                        suite,
                        method,
                        i,
                        requests[i],
                        post,
                        result.seconds / len(idx),
                        _steps(result),
                        lm,
                    ),
                )
                bar.update(1)
        result.restore()


def _run_sequential(cfg, suite, method, editor, lm, requests, pre, todo, ecfg, out, bar):
    """All edits one after another (checkpointed), then every case evaluated (retention)."""
    model, tok, arch = lm.model, lm.tokenizer, lm.arch
    ckpt = out / "checkpoints" / method
    seconds: list[float] = []
    combined: EditResult | None = None  # folded edit by edit: memory stays O(1) in the edits
    if (ckpt / "artifact").exists():
        seconds = load_edit(model, tok, ckpt)["edit_seconds"]
    seconds += _load_adapter_checkpoints(model, tok, ckpt)
    if seconds:
        log.info("resumed %s after %d sequential edits", method, len(seconds))
    base_originals = _checkpoint_originals(ckpt)
    for i in range(len(seconds), len(requests)):
        last = editor.apply(model, tok, [requests[i]])
        seconds.append(last.seconds)
        combined = last if combined is None else type(last).combine([combined, last])
        if isinstance(combined, AdapterEditResult):  # one file per edit, written once: O(E)
            AdapterEditResult(method, last.hparams, last.bank, last.adapters).export(
                ckpt / "edits" / f"{i:06d}", peft=False, edit_seconds=[seconds[-1]]
            )
        else:
            originals = {**combined.originals, **base_originals}  # weights before the first edit
            params = dict(model.named_parameters())
            edited = {n: params[n].detach() for n in originals}
            write_weights_artifact(
                ckpt,
                method=method,
                hparams=combined.hparams.to_dict(),
                edited=edited,
                originals=originals,
                edit_seconds=seconds,
                state=getattr(model, STATE, None),
            )
        bar.set_postfix_str(f"edit {i + 1}/{len(requests)}")
    posts = evaluate(
        model, tok, arch, [requests[i] for i in todo], ecfg, reference=[pre[i] for i in todo]
    )
    for i, post in zip(todo, posts, strict=True):
        _append(out, _record(suite, method, i, requests[i], post, seconds[i], None, lm))
        bar.update(1)
    bank = getattr(model, ROUTER, None)
    if bank is not None:  # adapter edits: take every adapter out again
        bank.remove(*bank.adapters)
    elif (ckpt / "artifact").exists():
        apply_artifact(model, ckpt, revert=True)


def _load_adapter_checkpoints(model, tok, ckpt: Path) -> list[float]:
    """Install the adapters of the complete per-edit checkpoints, in order; an edit whose write
    was cut short (no artifact) ends the sequence and is dropped."""
    seconds: list[float] = []
    edits = sorted((ckpt / "edits").iterdir()) if (ckpt / "edits").is_dir() else []
    for i, d in enumerate(edits):
        if d.name != f"{i:06d}" or not (d / ARTIFACT_DIR).exists():
            for rest in edits[i:]:
                shutil.rmtree(rest, ignore_errors=True)
            break
        seconds += load_edit(model, tok, d)["edit_seconds"]
    return seconds


def _checkpoint_originals(ckpt: Path) -> dict[str, torch.Tensor]:
    if not (ckpt / ARTIFACT_DIR / ARTIFACT_FILE).exists():  # none yet, or adapter edits
        return {}
    from medit.artifacts.weights import read_artifact

    return read_artifact(ckpt)[2]


_RUNNERS = {"single": _run_single, "batch": _run_batch, "sequential": _run_sequential}


def baseline(lm, requests, ecfg, quiet: bool = False) -> list[dict[str, Any]]:
    """Pre-edit states, computed once per (model weights, evaluation settings) and cached."""
    key = hashlib.sha256(
        json.dumps([lm.weights_sha256, dataclasses.asdict(ecfg)], sort_keys=True).encode()
    ).hexdigest()[:24]
    path = cache_dir() / "baselines" / f"{key}.json"
    cache = json.loads(path.read_text()) if path.exists() else {}
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
        atomic_write_text(path, json.dumps(cache))
    return [cache[h] for h in hashes]


def finish(out: Path) -> dict[str, Any]:
    """Aggregate ``cases.jsonl`` into results.json, table.md and table.csv."""
    res = results_of(out)
    atomic_write_text(out / "results.json", json.dumps(res, indent=2))
    atomic_write_text(out / "table.md", tables.markdown(res))
    atomic_write_text(out / "table.csv", tables.csv_text(res))
    return res


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
    return {
        "schema": SCHEMA,
        "suite": cfg["suite"],
        "mode": cfg["mode"],
        "model": cfg["model"],
        "locality_types": list(suite.locality_types),
        "explanation": suite.explanation,
        "methods": methods,
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
