"""``run_edit``: the one plain function behind ``medit edit``.

Modes:

* ``single`` — each request is applied, evaluated and restored (independent edits; the paper
  protocol). No artifact: nothing stays edited.
* ``batch`` — all requests applied in one call, then evaluated.
* ``sequential`` — requests applied one after another without restoring, then *all* evaluated
  again (retention).

Input is validated before the model is loaded (requests, hyper-parameters against the model's
config, output paths: writable, not overlapping each other or the base model), and the run
directory is assembled in a temporary directory that replaces ``out`` only when the run succeeds:
a failed run writes nothing. Every run is appended to the workspace's edit journal
(``medit.artifacts.journal``; by default ``journal.jsonl`` beside the run directory), and the run directory
keeps a copy of its entry (``journal-entry.json``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import time
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from medit.artifacts import savedmodel
from medit.core import results as R
from medit.core.errors import UserError
from medit.core.fs import atomic_dir, atomic_write_text, check_disjoint, check_out
from medit.core.models import DEFAULT_MODEL, load_config, load_model, state_dict_sha256
from medit.editors.registry import editor_modules, make_editor
from medit.editors.results import EditResult
from medit.evaluation import EvalConfig, aggregate, evaluate
from medit.facts.probes import add_known_probes
from medit.facts.requests import check_lengths, context_length, load_requests
from medit.loop import MODES, EditRecord, Plan, run_edits, set_seed
from medit.plan import check_fits, plan_memory, workload

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class RunConfig:
    out: str  #: run directory to write
    model: str = DEFAULT_MODEL  #: model spec (see medit.core.models)
    method: str = "ft-m"  #: editor name (see `medit methods`)
    requests: str = "builtin"  #: request file, or "builtin" for the shipped sample set
    mode: str = "single"  #: single | batch | sequential
    hparams: dict[str, Any] = dataclasses.field(default_factory=dict)  #: editor overrides
    seed: int = 0  #: seeds python, numpy and torch before editing
    device: str = "auto"
    dtype: str = "auto"
    #: instead of ``device``: auto | balanced | sequential | FILE.json, placed by accelerate over
    #: GPUs, CPU and disk; the editor's modules are kept resident (see medit.core.placement)
    device_map: str | None = None
    max_memory: str | None = None  #: with device_map: per-device budget, "0=20GiB,cpu=64GiB"
    #: "8bit" | "4bit": bitsandbytes weights except the head and the editor's modules
    quantize: str | None = None
    limit: int | None = None  #: use only the first N requests
    save_model: str | None = None  #: also save the edited model (HF dir) here
    overwrite: bool = False  #: replace an existing run directory
    allow_pickle: bool = False
    trust_remote_code: bool = False
    eval: EvalConfig = EvalConfig()
    #: pass rates the report's verdict requires, declared before the run (see medit.report)
    thresholds: dict[str, float] = dataclasses.field(default_factory=dict)
    quiet: bool = False  #: no progress bars
    author: str | None = None  #: who made the edit (journal; default: the OS user)
    reason: str | None = None  #: why (journal)
    workspace: str | None = None  #: directory of the edit journal (default: the parent of out)
    #: known facts (a requests file, e.g. `medit check`'s right.jsonl) sampled as locality probes
    locality_from: str | None = None
    locality_per_edit: int = 3  #: known facts added to each request as probes
    #: edit even where the memory plan (medit.plan) says the edit will not fit
    force: bool = False

    def __post_init__(self):
        if self.mode not in MODES:
            raise UserError(f"mode must be one of {', '.join(MODES)}, not {self.mode!r}")
        if self.save_model and self.mode == "single":
            raise UserError(
                "--save-model needs --mode batch or sequential (single mode restores "
                "the model after each edit)"
            )
        if self.limit is not None and self.limit < 1:
            raise UserError("--limit must be >= 1")


def check_paths(cfg: RunConfig) -> tuple[Path, Path]:
    """Output paths checked before any work; (run directory, journal file)."""
    journal = savedmodel.journal_file(cfg.workspace, cfg.out)
    check_disjoint(
        {
            "--out": cfg.out,
            "--save-model": cfg.save_model,
            "--model": savedmodel.local_model_path(cfg.model),
        }
    )
    check_disjoint({"--out": cfg.out, "the journal": journal})
    check_disjoint({"--save-model": cfg.save_model, "the journal": journal})
    out = check_out(cfg.out, cfg.overwrite, "edit-run")
    if cfg.save_model:
        check_out(cfg.save_model, cfg.overwrite, "model", "--save-model")
    return out, journal


def run_edit(cfg: RunConfig) -> dict[str, Any]:
    """Load, evaluate, edit, evaluate again; write the run directory; return results.json."""
    out, journal = check_paths(cfg)
    editor = make_editor(cfg.method, **cfg.hparams)
    requests = load_requests(cfg.requests)[: cfg.limit]
    if cfg.locality_from:
        known = load_requests(cfg.locality_from)
        requests = add_known_probes(
            requests, known, cfg.locality_per_edit, cfg.seed, cfg.locality_from
        )
    config = load_config(cfg.model, trust_remote_code=cfg.trust_remote_code)
    editor.check_config(config)
    _check_memory(cfg, requests, config)
    t_load = time.perf_counter()
    lm = load_model(
        cfg.model,
        cfg.device,
        cfg.dtype,
        allow_pickle=cfg.allow_pickle,
        trust_remote_code=cfg.trust_remote_code,
        device_map=cfg.device_map,
        max_memory=cfg.max_memory,
        keep_resident=editor_modules(editor, config, cfg.device_map, cfg.quantize),
        quantize=cfg.quantize,
    )
    editor.check_placement(lm.model)
    load_seconds = time.perf_counter() - t_load
    model, tok, arch = lm.model, lm.tokenizer, lm.arch
    check_lengths(requests, tok, context_length(model.config), source=cfg.requests)
    set_seed(cfg.seed)
    if lm.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(lm.device)

    log.info("evaluating %d requests before editing", len(requests))
    t0 = time.perf_counter()
    pre = evaluate(model, tok, arch, requests, cfg.eval, progress=_bar(cfg, "evaluating before"))
    eval_seconds = time.perf_counter() - t0
    bar = tqdm(total=len(requests), desc=f"{cfg.method} {cfg.mode}", disable=cfg.quiet, unit="edit")
    post, edits, combined = _run_mode(cfg, editor, lm, requests, pre, bar)
    bar.close()

    edited_sha = _edited_sha256(model, combined)
    resolved = editor.hparams_for(model).to_dict()
    provenance = R.provenance(
        model=lm.provenance(),
        seed=cfg.seed,
        requests_sha256=R.file_hash(cfg.requests),
        **({"locality_from_sha256": R.file_hash(cfg.locality_from)} if cfg.locality_from else {}),
        load_seconds=load_seconds,
    )
    res: dict[str, Any] = {
        "schema": R.SCHEMA,
        "kind": "edit",
        "config": {**_config_dict(cfg), "hparams": resolved},
        "provenance": provenance,
        "metrics": {"pre": aggregate(pre), "post": aggregate(post)},
        "edit": _edit_summary(cfg, edits, combined, edited_sha, lm, eval_seconds, len(requests)),
        "artifact": None,
        "saved_model": None,
        "journal": str(journal.resolve()),
    }
    samples = [
        {"id": r.id, "request": r.to_dict(), "pre": p, "post": q, "edit": e}
        for r, p, q, e in zip(requests, pre, post, _per_request(edits, len(requests)), strict=True)
    ]
    _write_run(cfg, out, journal, res, samples, requests, combined, lm, edited_sha)
    return res


def _check_memory(cfg: RunConfig, requests, config) -> None:
    """The memory plan, logged (one line per device); refuse a run it says cannot fit unless
    ``force`` (see medit.plan)."""
    mem = plan_memory(
        cfg.model,
        cfg.method,
        hparams=cfg.hparams,
        device=cfg.device,
        dtype=cfg.dtype,
        device_map=cfg.device_map,
        max_memory=cfg.max_memory,
        work=workload(requests, cfg.mode, cfg.eval.batch_size),
        config=config,
        trust_remote_code=cfg.trust_remote_code,
    )
    log.info("%s", mem.summary())
    check_fits(mem, force=cfg.force)


def _bar(cfg: RunConfig, desc: str) -> str | None:
    return None if cfg.quiet else desc


def _edited_sha256(model: Any, combined: EditResult | None) -> str | None:
    """The hash of the edited weights (for a module edit, with its patches merged in: what
    ``--save-model`` and ``medit apply`` write)."""
    if combined is None or not combined.mergeable:
        return None  # a codebook, extra neurons, a memory: no weights hold the edit
    with combined.merged():
        return state_dict_sha256(model)


def _write_run(cfg, out, journal, res, samples, requests, combined, lm, edited_sha) -> None:
    """The run directory (and the saved model), journaled; all of it renamed into place only
    after the journal entry is written, so no edit that exists is missing from the journal."""
    with contextlib.ExitStack() as stack:
        tmp = stack.enter_context(atomic_dir(out, "edit-run"))
        artifacts: dict[str, str] = {}
        if combined is not None:
            combined.export(
                tmp,
                base_model=lm.spec,
                base_weights_sha256=lm.weights_sha256,
                edited_weights_sha256=edited_sha,
            )
            res["artifact"] = "artifact"
            artifacts |= savedmodel.hashes(tmp, "artifact", "run:")
        model_tmp = None
        if cfg.save_model:
            model_tmp = stack.enter_context(atomic_dir(cfg.save_model, "model"))
            _save_model(cfg, model_tmp, combined, res, lm, edited_sha)
            res["saved_model"] = str(Path(cfg.save_model).resolve())
            artifacts |= savedmodel.hashes(model_tmp, ".", "saved_model:", weights_only=True)
        entry = savedmodel.journal_edit(journal, cfg, res, requests, artifacts, out)
        res["journal_entry"] = entry["sha256"]
        if model_tmp is not None:
            savedmodel.write_run_card(model_tmp, res, requests, entry)
        atomic_write_text(tmp / savedmodel.ENTRY_FILE, json.dumps(entry, indent=2))
        atomic_write_text(tmp / R.SAMPLES_FILE, R.jsonl(samples))
        atomic_write_text(tmp / R.RESULTS_FILE, json.dumps(res, indent=2, ensure_ascii=False))


def _save_model(cfg, directory, combined, res, lm, edited_sha) -> None:
    """An HF directory of the edited weights; adapter edits are merged in (each fully on: the
    per-input routing of MedLaSA lives only in the artifact)."""
    savedmodel.write_edited(
        directory,
        lm,
        combined,
        method=cfg.method,
        hparams=res["config"]["hparams"],
        edited_sha=edited_sha,
    )


def _run_mode(cfg, editor, lm, requests, pre, bar):
    """Apply the edits in the configured mode; return (post states, edit records, combined)."""
    post: list[Any] = [None] * len(requests)

    def on_case(i, state, _seconds, _result):
        post[i] = state

    plan = Plan(
        cfg.mode, cfg.eval, keep=cfg.mode != "single", progress=_bar(cfg, "evaluating after")
    )
    outcome = run_edits(editor, lm, requests, pre, plan, on_case, bar)
    return post, outcome.edits, outcome.combined


def _per_request(edits: list[EditRecord], n: int) -> list[dict[str, Any]]:
    if len(edits) == n:
        return [{"seconds": e.seconds, "diagnostics": e.diagnostics} for e in edits]
    return [{"seconds": edits[0].seconds / n, "diagnostics": "batch"} for _ in range(n)]


def _edit_summary(cfg, edits, combined, edited_sha, lm, eval_seconds, n_requests) -> dict[str, Any]:
    seconds = [e.seconds for e in edits]
    steps = [d["steps"] for e in edits for d in e.diagnostics if "steps" in d]
    out = {
        "method": cfg.method,
        "mode": cfg.mode,
        "edit_seconds_total": sum(seconds),
        "seconds_per_edit": sum(seconds) / n_requests,
        "mean_steps": sum(steps) / len(steps) if steps else None,
        "pre_eval_seconds": eval_seconds,
        "memory": R.peak_memory_mb(lm.device),
        "edited_weights_sha256": edited_sha,
        "model_state": "edited" if combined is not None else "restored after each edit",
    }
    if combined is not None:
        out["tensors"] = combined.update_norms()
    else:
        out["tensors"] = {n: None for n in edits[0].names} if edits else {}
    return out


def _config_dict(cfg: RunConfig) -> dict[str, Any]:
    d = dataclasses.asdict(cfg)
    d["eval"] = dataclasses.asdict(cfg.eval)
    return d
