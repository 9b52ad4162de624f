"""What learned editors (MEND, SERAC) share: the trainer interface ``medit train-editor`` drives,
and the editor checkpoint (``editor.safetensors`` + ``editor.json``) an edit loads.

A learned editor is an :class:`~medit.editors.base.Editor` whose hyper-parameters have a field
``checkpoint`` (the directory ``medit train-editor`` wrote) and whose class defines
``trainer(model, tok, hp) -> EditorTrainer``. The generic loop (batches, progress, validation,
early stopping, resumable checkpoints, ``train_log.jsonl``) is :mod:`medit.train`; the editor
says only how one step, one validation and its state look.

A checkpoint records the sha256 of the base weights it was trained for
(:func:`weights_fingerprint`): an editor trained for other weights is refused with a clear
error, since its networks (MEND) or its scope embeddings (SERAC) mean nothing for them.
"""

from __future__ import annotations

import hashlib
import json
import time
from abc import ABC, abstractmethod
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from medit.artifacts.weights import open_safetensors
from medit.core.cache import base_weights_sha256, mark_base_weights
from medit.core.errors import UserError
from medit.core.fs import atomic_dir, atomic_file, marker_kind
from medit.facts.requests import EditRequest

CHECKPOINT_KIND = "editor-checkpoint"
TENSORS_FILE = "editor.safetensors"
CONFIG_FILE = "editor.json"
FORMAT = "medit-editor"


def weights_fingerprint(model: Any) -> str:
    """The sha256 of the base weights: the one medit recorded when it loaded the model, else one
    computed now over every parameter and buffer (name, shape, dtype, bytes) and recorded on the
    model as its base (later edits do not change it), so that a model built in memory (tests, a
    user's own) has one too."""
    known = base_weights_sha256(model)
    if known:
        return known
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().contiguous().cpu().reshape(-1)
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    mark_base_weights(model, h.hexdigest())
    return h.hexdigest()


class EditorTrainer(ABC):
    """One learned editor in training. ``medit.train`` calls :meth:`step` on batches of training
    edits, :meth:`validate` every so often, and saves :meth:`state` (learned tensors, optimiser
    moments, JSON-able config) to resume or to edit with."""

    #: the lower the better (e.g. "loss"), or, with ``higher_is_better``, a success rate: what
    #: early stopping and the best checkpoint watch among :meth:`validate`'s figures
    monitor: str = "score"
    higher_is_better: bool = True
    #: training edits per step
    batch_size: int = 1

    def prepare(self, train: Sequence[EditRequest], progress: Any = None) -> None:  # noqa: B027
        """Work done once before the first step (precomputed embeddings, statistics)."""

    @abstractmethod
    def step(self, batch: Sequence[EditRequest]) -> dict[str, float]:
        """One optimisation step on ``batch``; returns its losses (logged and shown)."""

    @abstractmethod
    def validate(self, requests: Sequence[EditRequest]) -> dict[str, float]:
        """Figures on held-out edits (edit success, locality, ...), including :attr:`monitor`."""

    @abstractmethod
    def state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """(tensors, config): everything an edit or a resumed training needs."""

    @abstractmethod
    def load_state(self, tensors: dict[str, torch.Tensor], config: dict[str, Any]) -> None:
        """Continue from :meth:`state`'s output."""


# -- optimiser state as flat tensors (safetensors holds no nested objects) ------------------------
def optimizer_tensors(opt: torch.optim.Optimizer, prefix: str = "optim") -> dict[str, torch.Tensor]:
    """An optimiser's per-parameter state (Adam's moments and step) as ``prefix.I.KEY`` tensors."""
    out = {}
    for i, s in opt.state_dict()["state"].items():
        for key, value in s.items():
            t = value if torch.is_tensor(value) else torch.tensor(value)
            out[f"{prefix}.{i}.{key}"] = t.detach().clone()
    return out


def load_optimizer_tensors(
    opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], prefix: str = "optim"
) -> None:
    """Put :func:`optimizer_tensors`' output back (the parameter groups are the optimiser's)."""
    sd = opt.state_dict()
    state: dict[int, dict[str, torch.Tensor]] = {}
    for name, t in tensors.items():
        head, _, key = name.rpartition(".")
        p, _, i = head.partition(".")
        if p == prefix:
            state.setdefault(int(i), {})[key] = t
    sd["state"] = state
    opt.load_state_dict(sd)


# -- checkpoints -----------------------------------------------------------------------------------
def save_checkpoint(
    directory: str | Path,
    method: str,
    model: Any,
    tensors: dict[str, torch.Tensor],
    config: dict[str, Any],
    **info: Any,
) -> Path:
    """Write ``directory`` atomically (a medit directory of kind ``editor-checkpoint``): the
    learned tensors in safetensors and a JSON config naming the method and the base weights."""
    doc = {
        "format": FORMAT,
        "version": 1,
        "method": method,
        "base_weights_sha256": weights_fingerprint(model),
        "model_type": getattr(model.config, "model_type", None),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "config": config,
        **info,
    }
    target = Path(directory)
    with atomic_dir(target, CHECKPOINT_KIND) as tmp:
        plain = {k: t.detach().contiguous().cpu().clone() for k, t in tensors.items()}
        with atomic_file(tmp / TENSORS_FILE) as f:
            save_file(plain, str(f), metadata={"method": method})
        (tmp / CONFIG_FILE).write_text(json.dumps(doc, indent=2))
    return target


def read_checkpoint(directory: str | Path, method: str) -> tuple[dict, dict[str, torch.Tensor]]:
    """(document, tensors) of a checkpoint of ``method``; a clear error otherwise."""
    path = Path(directory)
    for candidate in (path, path / "best", path / "checkpoint"):  # a training run's directory
        if (candidate / CONFIG_FILE).is_file():
            path = candidate
            break
    else:
        raise UserError(
            f"{directory}: no {method} editor checkpoint here (no {CONFIG_FILE}); train one with "
            f"`medit train-editor {method} --out DIR` and pass checkpoint=DIR"
        )
    try:
        doc = json.loads((path / CONFIG_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise UserError(f"{path / CONFIG_FILE}: unreadable editor checkpoint ({exc})") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise UserError(f"{path / CONFIG_FILE}: not a medit editor checkpoint")
    if doc.get("method") != method:
        raise UserError(
            f"{path}: a checkpoint of {doc.get('method')!r}, not of {method!r}: pass a "
            f"checkpoint trained with `medit train-editor {method}`"
        )
    if not (path / TENSORS_FILE).is_file():
        raise UserError(f"{path}: {TENSORS_FILE} is missing: the checkpoint is incomplete")
    with open_safetensors(path / TENSORS_FILE) as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    doc["path"] = str(path)
    return doc, tensors


def load_checkpoint(
    directory: str | Path, method: str, model: Any
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(config, tensors) of ``method``'s checkpoint for ``model``: refused when it was trained
    for other base weights."""
    doc, tensors = read_checkpoint(directory, method)
    mine = weights_fingerprint(model)
    theirs = doc.get("base_weights_sha256")
    if theirs != mine:
        raise UserError(
            f"{doc['path']}: this {method} editor was trained for other base weights (sha256 "
            f"{str(theirs)[:12]}..., this model's: {mine[:12]}...); train one for this model "
            f"with `medit train-editor {method}`"
        )
    return doc["config"], tensors


def checkpoint_key(path: str | Path, model: Any) -> tuple:
    """What identifies a loaded checkpoint within a process: its directory, the base weights it
    is used with and its files' modification times (a training run rewrites them)."""
    root = Path(path).resolve()
    stamps = tuple(
        (str(c), c.stat().st_mtime_ns)
        for c in (
            root / CONFIG_FILE,
            root / "best" / CONFIG_FILE,
            root / "checkpoint" / CONFIG_FILE,
        )
        if c.is_file()
    )
    return (str(root), weights_fingerprint(model), stamps)


def is_checkpoint_dir(directory: str | Path) -> bool:
    return marker_kind(directory) == CHECKPOINT_KIND
