"""``run_bench``: editors over a suite, resumable case by case.

Run directory:

* ``bench.json`` — the configuration, data hash and provenance (checked again on ``--resume``);
* ``cases.jsonl`` — one line per finished (method, case), appended and fsynced as each finishes;
  a line cut short by a crash is dropped on resume and the case is run again;
* ``curve.jsonl`` — sequential mode: the retention curve, one line per (method, point) every
  ``curve_every`` edits (efficacy and generality on a fixed sample of the edits made so far,
  locality on a fixed probe sample, seconds per edit);
* ``checkpoints/<method>/`` — sequential mode: the cumulative weight edit after each request
  (adapter editors: one directory per edit, ``edits/NNNNNN``, written once), so a resumed run
  continues from the last edit instead of starting over;
* ``results.json``, ``table.md``, ``table.csv`` — the aggregate, rewritten at the end.

The pre-edit baseline of each case is computed once per (model weights, evaluation settings) and
cached on disk, keyed by the case's content.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from medit.bench import tables
from medit.bench.metrics import (
    case_metrics,
    curve_point,
    edit_groups,
    other_edit_flags,
    quality_flags,
)
from medit.bench.shard import current_shard, merge_shards
from medit.bench.store import (
    CASES_STEM,
    CURVE_STEM,
    SCHEMA,
    append_case,
    append_curve_point,
    baseline,
    read_cases,
    read_curve,
    results_of,
)
from medit.bench.suites import data_sha256, get_suite
from medit.core import results as R
from medit.core.errors import UserError
from medit.core.fs import (
    atomic_write_text,
    check_writable,
    marker_kind,
    write_marker,
)
from medit.core.models import DEFAULT_MODEL, load_config, load_model
from medit.core.results import read_json_object
from medit.editors.registry import editor_modules, make_editor
from medit.editors.results import EditResult
from medit.facts.requests import check_lengths, context_length
from medit.loop import MODES, Curve, Plan, run_edits, set_seed

log = logging.getLogger(__name__)

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
    "device_map",
    "quantize",
    "max_memory",
    "dtype",
    "eval_batch_size",
    "curve_every",
    "curve_sample",
)


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
    device_map: str | None = None  #: instead of device: auto | balanced | sequential | FILE.json
    max_memory: str | None = None  #: with device_map: "0=20GiB,cpu=64GiB"
    quantize: str | None = None  #: "8bit" | "4bit" (bitsandbytes; the editors' modules kept)
    hparams: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)  #: per method
    resume: bool = False
    keep_flagged: bool = False  #: aggregate flagged cases' affected metrics too
    eval_batch_size: int = 32
    curve_every: int = 50  #: sequential mode: a retention-curve point every N edits (0: none)
    curve_sample: int = 50  #: edits (and locality probes) evaluated per curve point
    quiet: bool = False

    def __post_init__(self):
        if self.mode not in MODES:
            raise UserError(f"mode must be one of {', '.join(MODES)}, not {self.mode!r}")
        if not self.methods:
            raise UserError("give at least one method")
        for name in ("batch_size", "eval_batch_size", "limit", "curve_sample"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise UserError(f"--{name.replace('_', '-')} must be >= 1, not {value}")
        if self.curve_every < 0:
            raise UserError(f"--curve-every must be >= 0 (0: no curve), not {self.curve_every}")


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
    shard = current_shard(cfg.device, cfg.device_map)
    _check_dir(out, identity, cfg.resume)  # every process: the same answer, before any write
    shard.barrier()
    if shard.main:
        _prepare_dir(out)
    shard.barrier()
    done = {(c["method"], c["case"]) for c in read_cases(out)}
    config = load_config(cfg.model, trust_remote_code=False)
    for editor in editors.values():
        editor.check_config(config)
    lm = load_model(
        cfg.model,
        shard.device or cfg.device,
        cfg.dtype,
        device_map=cfg.device_map,
        max_memory=cfg.max_memory,
        keep_resident=_resident(editors.values(), config, cfg.device_map, cfg.quantize),
        quantize=cfg.quantize,
    )
    for editor in editors.values():
        editor.check_placement(lm.model)
    _check_resumed_model(out, lm)
    check_lengths(requests, lm.tokenizer, context_length(lm.model.config), source=cfg.data)
    ecfg = dataclasses.replace(suite.eval, batch_size=cfg.eval_batch_size)
    if shard.main and not (out / "bench.json").exists():
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
    elif shard.main:
        _record_extension(out, cfg, identity)
    if shard.main:  # computed once, cached; the other processes read it from the cache
        pre = baseline(lm, requests, ecfg, quiet=cfg.quiet)
    shard.barrier()
    if not shard.main:
        pre = baseline(lm, requests, ecfg, quiet=True)
    for m, (method, editor) in enumerate(editors.items()):
        todo = [i for i in range(len(requests)) if (method, i) not in done]
        todo = shard.mine(cfg.mode, todo, cfg.batch_size, m)
        if not todo:
            continue
        set_seed(cfg.seed)
        desc = f"{cfg.suite} {method}" + (
            f" [{shard.index + 1}/{shard.count}]" if shard.count > 1 else ""
        )
        bar = tqdm(total=len(todo), desc=desc, unit="case", disable=cfg.quiet)
        _run_method(cfg, suite, method, editor, lm, requests, pre, todo, ecfg, out, bar, shard)
        bar.close()
    shard.barrier()  # every shard's cases written
    if shard.main:
        merge_shards(out, CASES_STEM)
        merge_shards(out, CURVE_STEM)
        res = finish(out)
    shard.barrier()  # the others return the tables the first process wrote
    return res if shard.main else results_of(out)


def _record_extension(out: Path, cfg: BenchConfig, identity: dict) -> None:
    """A resumed run given more methods or (single mode) a larger limit: its ``bench.json``
    takes the new settings, so the tables aggregate them, and lists the extension with the
    command and time (the provenance of the start stays)."""
    bench = read_json_object(out / "bench.json")
    stored = bench.get("identity", {})
    new = json.loads(json.dumps(identity))
    changed = {k: new[k] for k in new if k in stored and stored[k] != new[k]}
    if not changed:
        return
    config = dataclasses.asdict(cfg)
    kept = bench.get("config", {})
    bench["config"] = {
        **kept,
        "methods": config["methods"],
        "limit": config["limit"],
        # the methods of the start keep their settings; a new method's come from this command
        "hparams": {**config["hparams"], **kept.get("hparams", {})},
    }
    bench["identity"] = {**stored, **changed}
    bench.setdefault("extensions", []).append({"changed": changed, "provenance": R.provenance()})
    atomic_write_text(out / "bench.json", json.dumps(bench, indent=2))


def _resident(editors, config, device_map, quantize) -> tuple[str, ...]:
    """The modules any of the editors touches, kept off a device map's offload and out of the
    quantisation."""
    found = [editor_modules(e, config, device_map, quantize) for e in editors]
    return tuple(dict.fromkeys(m for names in found for m in names))


def _check_dir(out: Path, identity: dict, resume: bool) -> None:
    """Refuse a run directory this run cannot write or continue (reads only)."""
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


def _prepare_dir(out: Path) -> None:
    """Create or reopen the run directory; damaged case lines set aside (:func:`read_cases`)."""
    out.mkdir(parents=True, exist_ok=True)
    if marker_kind(out) is None:
        write_marker(out, "bench-run")
    read_cases(out, repair=True)


def _identity_diff(old: dict, new: dict) -> list[str]:
    """The settings of a resumed run that differ from the stored ones ("name: old -> new"),
    except the ones that only extend it (:func:`_extends`). Settings a run from an earlier
    medit did not record are checked after the model loads."""
    return [
        f"{k}: {old[k]!r} -> {new[k]!r}"
        for k in new
        if k in old and old[k] != new[k] and not _extends(k, old, new)
    ]


def _extends(key: str, old: dict, new: dict) -> bool:
    """Whether a changed setting only adds work to a run, leaving what it did valid: more methods
    (each runs its own cases; the methods already there keep their settings), or, in single
    mode, a larger ``--limit`` (case i is the same request whatever the limit, and each case is
    edited on the base model alone). A sequential or batch run's cases depend on the edits
    before them, so its limit is fixed."""
    if key == "methods":
        return set(old["methods"]) <= set(new["methods"])
    if key == "hparams":
        kept = [m for m in old.get("methods", []) if m in new.get("methods", [])]
        return all(old["hparams"].get(m) == new["hparams"].get(m) for m in kept)
    if key == "limit":
        single = old.get("mode") == new.get("mode") == "single"
        return single and old["limit"] is not None and (new["limit"] or float("inf")) > old["limit"]
    return False


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


def _run_method(cfg, suite, method, editor, lm, requests, pre, todo, ecfg, out, bar, shard) -> None:
    """The cases ``todo`` of one method through the run loop, each appended as it finishes (to
    this process's file in a sharded run); sequential runs checkpoint under
    ``checkpoints/<method>/`` after every edit."""
    file = shard.cases_file(CASES_STEM)

    def on_case(i, post, seconds, result):
        record = _record(suite, method, i, requests[i], post, seconds, _steps(result), lm)
        append_case(out, record, file)
        if cfg.mode != "batch":
            bar.update(1)

    plan = Plan(
        cfg.mode,
        ecfg,
        todo=todo,
        batch_size=cfg.batch_size,
        checkpoint=out / "checkpoints" / method if cfg.mode == "sequential" else None,
        curve=_curve(cfg, suite, method, requests, out, shard.cases_file(CURVE_STEM)),
        seed=cfg.seed,
    )
    run_edits(editor, lm, requests, pre, plan, on_case, bar if cfg.mode == "batch" else None)


def _curve(cfg, suite, method, requests, out: Path, file: str) -> Curve | None:
    """The retention curve of a sequential run, each point appended to ``curve.jsonl``."""
    if cfg.mode != "sequential" or not cfg.curve_every:
        return None
    others = other_edit_flags(requests, edit_groups(len(requests), "sequential", 1))

    def case(i, post):
        flags = {**quality_flags(requests[i]), **others[i]}
        return {"metrics": case_metrics(requests[i], post, suite.explanation), "flags": flags}

    def on_point(n, edited, probes, posts, seconds):
        window = seconds[-cfg.curve_every :]
        point = curve_point(
            [case(i, posts[i]) for i in edited],
            [case(i, posts[i]) for i in probes],
            suite.locality_types,
        )
        point = {
            "method": method,
            "edits": n,
            **point,
            "seconds_per_edit": sum(window) / len(window),
            "edit_seconds_total": sum(seconds),
            # the tensors the n edits occupy as stored (the sequence's checkpoint): how a
            # memory grows with the edits (a weight edit's stays the same size)
            "stored_bytes": _tensor_bytes(out / "checkpoints" / method),
        }
        append_curve_point(out, point, file)

    done = {p["edits"] for p in read_curve(out) if p["method"] == method}
    return Curve(cfg.curve_every, cfg.curve_sample, on_point, seed=cfg.seed, done=done)


def _tensor_bytes(root: Path) -> int:
    """Bytes of tensor data in the safetensors files under ``root`` (their JSON headers, which
    carry provenance, left out)."""
    total = 0
    for f in root.rglob("*.safetensors") if root.is_dir() else ():
        with open(f, "rb") as fh:
            header = int.from_bytes(fh.read(8), "little")
        total += f.stat().st_size - 8 - header
    return total


def finish(out: Path) -> dict[str, Any]:
    """Aggregate ``cases.jsonl`` into results.json, table.md and table.csv."""
    res = results_of(out)
    atomic_write_text(out / "results.json", json.dumps(res, indent=2))
    atomic_write_text(out / "table.md", tables.markdown(res))
    atomic_write_text(out / "table.csv", tables.csv_text(res))
    return res
