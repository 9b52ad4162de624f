"""Module and memory artifacts from plain tensors: ``artifact/patches.safetensors`` with a JSON
manifest (kind ``modules`` or ``memory``, method, hparams, edits, provenance) in its metadata and
in a readable ``manifest.json``. What the tensors mean is the method's business (its
``Editor.load`` reads them back)."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from medit.artifacts.weights import ARTIFACT_DIR, FORMAT, open_safetensors
from medit.core.errors import UserError
from medit.core.fs import atomic_dir, atomic_file

PATCHES_FILE = "patches.safetensors"


def write_module_artifact(
    directory: str | Path,
    kind: str,
    method: str,
    hparams: dict,
    edits: list[dict],
    tensors: dict[str, torch.Tensor],
    **provenance: Any,
) -> Path:
    """Write ``directory/artifact/`` atomically; returns it."""
    manifest = {
        "format": FORMAT,
        "version": 1,
        "kind": kind,
        "method": method,
        "hparams": hparams,
        "edits": edits,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        **provenance,
    }
    target = Path(directory) / ARTIFACT_DIR
    with atomic_dir(target, "artifact") as tmp:
        plain = {k: t.detach().contiguous().cpu().clone() for k, t in tensors.items()}
        with atomic_file(tmp / PATCHES_FILE) as f:
            save_file(plain, str(f), metadata={"medit_manifest": json.dumps(manifest)})
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return target


def find_module_artifact(path: str | Path) -> Path | None:
    p = Path(path)
    for candidate in (p, p / PATCHES_FILE, p / ARTIFACT_DIR / PATCHES_FILE):
        if candidate.is_file() and candidate.name == PATCHES_FILE:
            return candidate
    return None


def read_module_artifact(file: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """(manifest, tensors) of a safetensors file that carries medit's manifest in its metadata."""
    with open_safetensors(file) as f:
        meta = f.metadata() or {}
        if "medit_manifest" not in meta:
            raise UserError(f"{file} is not a medit edit artifact (no manifest)")
        return json.loads(meta["medit_manifest"]), {k: f.get_tensor(k) for k in f.keys()}
