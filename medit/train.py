"""``medit train-editor``: the training loop of learned editors (MEND, SERAC).

A training run directory (a medit directory of kind ``train-run``) holds:

* ``train.json`` — method, hyper-parameters, data files and their hashes, base weights (checked
  again on ``--resume``);
* ``train_log.jsonl`` — one line per step (``{"step", "seconds", losses...}``) and one per
  validation (``{"step", "valid": {...}}``); on resume the lines after the checkpoint's step
  are dropped, so the log reads as one uninterrupted run;
* ``checkpoint/`` — the latest state (learned tensors, optimiser moments, step), written every
  ``--eval-every`` steps and at the end: ``--resume`` continues from it;
* ``best/`` — the state with the best validation figure: what ``--hparam checkpoint=DIR``
  loads (a run directory works as well as ``best/`` itself);
* ``results.json`` — the summary ``medit report DIR`` renders (loss and validation curves).

Training stops after ``--steps`` steps, or earlier when the monitored validation figure has
not improved for ``--patience`` validations.
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from medit.core.errors import UserError
from medit.core.fs import (
    append_line,
    atomic_write_bytes,
    atomic_write_text,
    check_writable,
    file_sha256,
    marker_kind,
    write_marker,
)
from medit.core.results import read_json_object
from medit.editors.learned import EditorTrainer, read_checkpoint, save_checkpoint
from medit.editors.registry import get_editor_class
from medit.facts.requests import EditRequest

RUN_KIND = "train-run"
LOG = "train_log.jsonl"


@dataclass
class TrainConfig:
    method: str
    hparams: dict[str, Any]
    steps: int = 1000
    eval_every: int = 100
    patience: int = 5
    seed: int = 0
    resume: bool = False
    quiet: bool = False
    data: dict[str, str] | None = None  #: {"train": path, "valid": path} for the record


def _trainer(method: str, model: Any, tok: Any, overrides: dict) -> tuple[Any, EditorTrainer]:
    cls = _trainer_class(method)
    editor = cls(**overrides)
    hp = editor.hparams_for(model)
    return hp, cls.trainer(model, tok, hp)


def _prepare(out: Path, identity: dict, resume: bool) -> None:
    _prepare_check(out, resume)
    if out.exists() and any(out.iterdir()):
        old = read_json_object(out / "train.json").get("identity", {})
        differ = [f"{k}: {old.get(k)!r} -> {v!r}" for k, v in identity.items() if old.get(k) != v]
        if differ:
            raise UserError(
                f"--resume: {out} was started with other settings ({'; '.join(differ)}); "
                "use the same settings or another --out"
            )
    out.mkdir(parents=True, exist_ok=True)
    if marker_kind(out) is None:
        write_marker(out, RUN_KIND)


def _read_log(path: Path, upto: int) -> list[dict]:
    """The log's complete lines with step <= ``upto`` (a line a crash cut short is dropped)."""
    rows = []
    if path.exists():
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                row = json.loads(line)
            except ValueError:
                continue
            if isinstance(row, dict) and row.get("step", 0) <= upto:
                rows.append(row)
    return rows


def batches(requests: Sequence[EditRequest], size: int, seed: int, start: int):
    """Step ``i``'s batch for i = start, start + 1, ...: epochs of a seeded shuffle, so a resumed
    run sees the batches the uninterrupted one would have."""
    n, step = len(requests), start
    while True:
        per_epoch = max(1, n // size)
        epoch, k = divmod(step, per_epoch)
        order = list(range(n))
        random.Random(seed * 1_000_003 + epoch).shuffle(order)
        yield [requests[i] for i in order[k * size : (k + 1) * size]]
        step += 1


def train_editor(
    cfg: TrainConfig,
    model: Any,
    tok: Any,
    train: Sequence[EditRequest],
    valid: Sequence[EditRequest],
    out: str | Path,
) -> dict[str, Any]:
    """Train ``cfg.method``'s editor for ``model`` and write the run directory (module docstring)."""
    if not train:
        raise UserError("no training edits")
    if not valid:
        raise UserError("no validation edits")
    out = Path(out)
    hp, trainer = _trainer(cfg.method, model, tok, cfg.hparams)
    data = {k: {"path": v, "sha256": file_sha256(v)} for k, v in (cfg.data or {}).items()}
    identity = {
        "method": cfg.method,
        "hparams": hp.to_dict(),
        "seed": cfg.seed,
        "train": data.get("train", {}).get("sha256"),
        "valid": data.get("valid", {}).get("sha256"),
        "n_train": len(train),
        "n_valid": len(valid),
    }
    _prepare(out, identity, cfg.resume)
    torch.manual_seed(cfg.seed)
    step, best, bad, seconds = 0, None, 0, 0.0
    if cfg.resume and (out / "checkpoint").exists():
        doc, tensors = read_checkpoint(out / "checkpoint", cfg.method)
        trainer.load_state(tensors, doc["config"])
        step, best, bad = doc["step"], doc.get("best"), doc.get("bad", 0)
        seconds = doc.get("seconds", 0.0)
        torch.manual_seed(cfg.seed + step)
    log = _read_log(out / LOG, step)
    atomic_write_bytes(out / LOG, "".join(json.dumps(r) + "\n" for r in log).encode())
    atomic_write_text(
        out / "train.json",
        json.dumps({"identity": identity, "data": data, "steps": cfg.steps}, indent=2),
    )
    bar = tqdm(
        total=cfg.steps, initial=step, desc=f"train {cfg.method}", unit="step", disable=cfg.quiet
    )
    start = time.perf_counter()
    trainer.prepare(train, progress=None if cfg.quiet else "preparing")
    seconds += time.perf_counter() - start
    feed = batches(train, trainer.batch_size, cfg.seed, step)
    stopped = "steps"

    def save(name: str) -> None:
        tensors, config = trainer.state()
        save_checkpoint(
            out / name,
            cfg.method,
            model,
            tensors,
            config,
            hparams=hp.to_dict(),
            step=step,
            best=best,
            bad=bad,
            seconds=round(seconds, 3),
        )

    while step < cfg.steps:
        t0 = time.perf_counter()
        losses = trainer.step(next(feed))
        seconds += time.perf_counter() - t0
        step += 1
        append_line(out / LOG, json.dumps({"step": step, "seconds": round(seconds, 3), **losses}))
        bar.update(1)
        bar.set_postfix({k: f"{v:.3g}" for k, v in losses.items()}, refresh=False)
        if step % cfg.eval_every == 0 or step == cfg.steps:
            figures = trainer.validate(valid)
            if trainer.monitor not in figures:
                raise RuntimeError(f"{cfg.method}'s validation lacks {trainer.monitor!r}")
            value = figures[trainer.monitor]
            better = best is None or (value > best if trainer.higher_is_better else value < best)
            if better:
                best, bad = value, 0
            else:
                bad += 1
            append_line(out / LOG, json.dumps({"step": step, "valid": figures}))
            bar.write(
                f"step {step}: "
                + ", ".join(f"{k} {v:.4g}" for k, v in figures.items())
                + (" (best)" if better else "")
            )
            if better:
                save("best")
            save("checkpoint")
            if bad >= cfg.patience:
                stopped = "patience"
                break
    bar.close()
    if not (out / "best").exists():  # steps ran out before any validation
        save("best")
    result = summary(out, cfg.method, stopped)
    atomic_write_text(out / "results.json", json.dumps(result, indent=2))
    return result


def summary(out: Path, method: str, stopped: str = "steps") -> dict[str, Any]:
    """The run's ``results.json``: its curves from the log and where the best state is."""
    rows = _read_log(out / LOG, 10**12)
    steps = [r for r in rows if "valid" not in r]
    valid = [r for r in rows if "valid" in r]
    best = read_json_object(out / "best" / "editor.json") if (out / "best").exists() else {}
    return {
        "schema": "medit.train/1",
        "method": method,
        "steps": steps[-1]["step"] if steps else 0,
        "seconds": steps[-1]["seconds"] if steps else 0.0,
        "stopped": stopped,
        "best_step": best.get("step"),
        "best": best.get("best"),
        "train": steps,
        "valid": [{"step": r["step"], **r["valid"]} for r in valid],
        "config": read_json_object(out / "train.json"),
    }


def data_files(data: str | None, train: str | None, valid: str | None) -> dict[str, str]:
    """The training and validation files: ``--train`` / ``--valid``, else ``train.json`` /
    ``valid.json`` of the ``--data`` folder (MedCF as published, or a folder holding MCF/)."""
    out = {"train": train, "valid": valid}
    for split in ("train", "valid"):
        if out[split]:
            continue
        if not data:
            raise UserError(
                f"no --{split} file: pass --{split} FILE, or --data FOLDER holding {split}.json "
                "(MedCF's folder as published with the MedLaSA paper's code)"
            )
        folder = Path(data)
        for candidate in (folder / f"{split}.json", folder / "MedCF" / f"{split}.json"):
            if candidate.is_file():
                out[split] = str(candidate)
                break
        else:
            raise UserError(f"--data {data}: no {split}.json in this folder")
    return out  # type: ignore[return-value]


def run_training(
    cfg: TrainConfig,
    *,
    model_spec: str,
    out: str,
    device: str = "auto",
    dtype: str = "auto",
    device_map: str | None = None,
    max_memory: str | None = None,
    limit_train: int | None = None,
    limit_valid: int | None = None,
    allow_pickle: bool = False,
    trust_remote_code: bool = False,
) -> dict[str, Any]:
    """``medit train-editor``: read the data (errors name file, record and field), check the
    method and the output before loading the model, then train."""
    from medit.core.models import load_config, load_model
    from medit.facts.requests import load_requests

    files = cfg.data or {}
    train = load_requests(files["train"])[:limit_train]
    valid = load_requests(files["valid"])[:limit_valid]
    for name, reqs in (("train", train), ("valid", valid)):
        if not any(r.rephrase_prompts for r in reqs):
            raise UserError(
                f"--{name} {files[name]}: no record has a paraphrase (rephrase_prompt): a learned "
                "editor trains on paraphrases and locality probes"
            )
    editor = _trainer_class(cfg.method)(**cfg.hparams)
    _prepare_check(Path(out), cfg.resume)
    config = load_config(model_spec, trust_remote_code=trust_remote_code)
    editor.check_config(config)
    lm = load_model(
        model_spec,
        device,
        dtype,
        allow_pickle=allow_pickle,
        trust_remote_code=trust_remote_code,
        device_map=device_map,
        max_memory=max_memory,
        keep_resident=(editor.resident_modules(config) or ()) if device_map else (),
    )
    editor.check_placement(lm.model)
    return train_editor(cfg, lm.model, lm.tokenizer, train, valid, out)


def _trainer_class(method: str) -> type:
    cls = get_editor_class(method)
    if not hasattr(cls, "trainer"):
        raise UserError(f"{method} is not a learned editor: nothing to train (try mend or serac)")
    return cls


def _prepare_check(out: Path, resume: bool) -> None:
    """The output checks of :func:`_prepare` that need no model (made before loading it)."""
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} exists and is not a directory")
    if out.exists() and any(out.iterdir()) and not resume:
        raise UserError(f"--out {out} is not empty; pass --resume to continue that training")
    if resume and out.exists() and any(out.iterdir()) and marker_kind(out) != RUN_KIND:
        raise UserError(f"--resume: {out} is not a medit training run")
    check_writable(out, "--out")
