"""``run_edit``: the one plain function behind ``medit edit``.

Modes:

* ``single`` — each request is applied, evaluated and restored (independent edits; the paper
  protocol). No artifact: nothing stays edited.
* ``batch`` — all requests applied in one call, then evaluated.
* ``sequential`` — requests applied one after another without restoring, then *all* evaluated
  again (retention).

Input is validated before the model is loaded, and the run directory is assembled in a temporary
directory that replaces ``out`` only when the run succeeds: a failed run writes nothing.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import random
import time
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from medit import results as R
from medit.editors.base import EditResult, make_editor
from medit.evaluation import EvalConfig, aggregate, evaluate
from medit.export import atomic_dir, atomic_write_text, save_edited_model
from medit.models import DEFAULT_MODEL, load_model, state_dict_sha256
from medit.requests import check_lengths, context_length, load_requests

log = logging.getLogger(__name__)

MODES = ("single", "batch", "sequential")


@dataclasses.dataclass(frozen=True)
class RunConfig:
    out: str  #: run directory to write
    model: str = DEFAULT_MODEL  #: model spec (see medit.models)
    method: str = "ft-m"  #: editor name (see `medit methods`)
    requests: str = "builtin"  #: request file, or "builtin" for the shipped sample set
    mode: str = "single"  #: single | batch | sequential
    hparams: dict[str, Any] = dataclasses.field(default_factory=dict)  #: editor overrides
    seed: int = 0  #: seeds python, numpy and torch before editing
    device: str = "auto"
    dtype: str = "auto"
    limit: int | None = None  #: use only the first N requests
    save_model: str | None = None  #: also save the edited model (HF dir) here
    overwrite: bool = False  #: replace an existing run directory
    allow_pickle: bool = False
    trust_remote_code: bool = False
    eval: EvalConfig = EvalConfig()
    #: pass rates the report's verdict requires, declared before the run (see medit.report)
    thresholds: dict[str, float] = dataclasses.field(default_factory=dict)
    quiet: bool = False  #: no progress bars

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}, not {self.mode!r}")
        if self.save_model and self.mode == "single":
            raise ValueError("--save-model needs --mode batch or sequential (single mode restores "
                             "the model after each edit)")  # fmt: skip
        if self.limit is not None and self.limit < 1:
            raise ValueError("--limit must be >= 1")


def set_seed(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)
    try:
        import numpy as np

        np.random.seed(seed)
    except ImportError:
        pass


def _check_out(cfg: RunConfig) -> Path:
    out = Path(cfg.out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} exists and is not a directory")
    if out.exists() and any(out.iterdir()) and not cfg.overwrite:
        raise ValueError(f"--out {out} is not empty; choose another directory or pass --overwrite")
    return out


def run_edit(cfg: RunConfig) -> dict[str, Any]:
    """Load, evaluate, edit, evaluate again; write the run directory; return results.json."""
    out = _check_out(cfg)
    editor = make_editor(cfg.method, **cfg.hparams)
    requests = load_requests(cfg.requests)[: cfg.limit]
    t_load = time.perf_counter()
    lm = load_model(cfg.model, cfg.device, cfg.dtype, allow_pickle=cfg.allow_pickle,
                    trust_remote_code=cfg.trust_remote_code)  # fmt: skip
    load_seconds = time.perf_counter() - t_load
    model, tok, arch = lm.model, lm.tokenizer, lm.arch
    check_lengths(requests, tok, context_length(model.config))
    set_seed(cfg.seed)
    if lm.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(lm.device)

    log.info("evaluating %d requests before editing", len(requests))
    t0 = time.perf_counter()
    pre = evaluate(model, tok, arch, requests, cfg.eval)
    eval_seconds = time.perf_counter() - t0
    bar = tqdm(total=len(requests), desc=f"{cfg.method} {cfg.mode}", disable=cfg.quiet, unit="edit")
    post, edits, combined = _run_mode(cfg, editor, lm, requests, pre, bar)
    bar.close()

    edited_sha = state_dict_sha256(model) if combined is not None else None
    resolved = editor.hparams_for(model).to_dict()
    provenance = R.provenance(
        model=lm.provenance(),
        seed=cfg.seed,
        requests_sha256=R.file_hash(cfg.requests),
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
    }
    samples = [
        {"id": r.id, "request": r.to_dict(), "pre": p, "post": q, "edit": e}
        for r, p, q, e in zip(requests, pre, post, _per_request(edits, len(requests)), strict=True)
    ]
    with atomic_dir(out) as tmp:
        if combined is not None:
            combined.export(tmp, base_model=lm.spec, base_weights_sha256=lm.weights_sha256,
                            edited_weights_sha256=edited_sha)  # fmt: skip
            res["artifact"] = "artifact"
        if cfg.save_model:
            _save_model(cfg, model, tok, combined, resolved, lm, edited_sha)
            res["saved_model"] = str(Path(cfg.save_model).resolve())
        atomic_write_text(tmp / R.SAMPLES_FILE, R.jsonl(samples))
        atomic_write_text(tmp / R.RESULTS_FILE, json.dumps(res, indent=2, ensure_ascii=False))
    return res


def _save_model(cfg, model, tok, combined, resolved, lm, edited_sha) -> None:
    """An HF directory of the edited weights; adapter edits are merged in (each fully on: the
    per-input routing of MedLaSA lives only in the artifact)."""
    merged = getattr(combined, "merged_into_model", None)
    ctx = merged() if merged is not None else contextlib.nullcontext()
    originals = combined.merged_originals if merged is not None else combined.originals
    with ctx:
        save_edited_model(model, tok, cfg.save_model, delta=dict(
            method=cfg.method, hparams=resolved, edited=combined.edited_tensors(),
            originals=originals, base_model=lm.spec,
            base_weights_sha256=lm.weights_sha256, edited_weights_sha256=edited_sha))  # fmt: skip


def _run_mode(cfg, editor, lm, requests, pre, bar):
    """Apply the edits in the configured mode; return (post states, edit results, combined)."""
    model, tok, arch = lm.model, lm.tokenizer, lm.arch
    if cfg.mode == "single":
        post, edits = [], []
        for i, req in enumerate(requests):
            result = editor.apply(model, tok, [req])
            post += evaluate(model, tok, arch, [req], cfg.eval, reference=[pre[i]])
            result.restore()
            edits.append(result)
            bar.update(1)
        return post, edits, None
    if cfg.mode == "batch":
        combined = editor.apply(model, tok, requests)
        bar.update(len(requests))
        edits = [combined]
    else:  # sequential: one after another, never restored in between
        edits = []
        for req in requests:
            edits.append(editor.apply(model, tok, [req]))
            bar.update(1)
        combined = type(edits[0]).combine(edits)
    post = evaluate(model, tok, arch, requests, cfg.eval, reference=pre)
    return post, edits, combined


def _per_request(edits: list[EditResult], n: int) -> list[dict[str, Any]]:
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
