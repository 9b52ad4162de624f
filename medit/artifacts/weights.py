"""Weights artifacts: write, read, apply to a base model, revert; and writing an edited model.

A weights artifact is one safetensors file (``edit.safetensors``) holding, for every touched
tensor, its edited value (``edited::NAME``) and its original value (``original::NAME``), with a
JSON manifest in the file's metadata (and a readable copy in ``manifest.json`` beside it).
Applying checks that the base model's tensors equal the recorded originals exactly, so an
artifact can never be applied to the wrong model; reverting writes the originals back.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from medit.core.errors import UserError
from medit.core.fs import atomic_dir, atomic_file
from medit.core.placement import check_resident

FORMAT = "medit.artifact"
ARTIFACT_DIR = "artifact"
ARTIFACT_FILE = "edit.safetensors"
DELTA_FILE = "medit-delta.safetensors"


# -- weights artifacts ---------------------------------------------------------------------------
def _manifest(method: str, hparams: dict, edited: dict[str, torch.Tensor], **provenance) -> dict:
    return {
        "format": FORMAT,
        "version": 1,
        "kind": "weights",
        "method": method,
        "hparams": hparams,
        "tensors": {n: {"shape": list(t.shape), "dtype": str(t.dtype)} for n, t in edited.items()},
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        **provenance,
    }


def write_delta_file(
    path: Path,
    method: str,
    hparams: dict,
    edited: dict,
    originals: dict,
    state: dict | None = None,
    **provenance: Any,
) -> dict:
    """Write one safetensors file with edited and original tensors (and the editor ``state`` that
    later sequential edits read, e.g. AlphaEdit's accumulated keys); return its manifest."""
    manifest = _manifest(method, hparams, edited, **provenance)
    tensors = {f"edited::{n}": t.detach().contiguous().cpu().clone() for n, t in edited.items()}
    tensors |= {
        f"original::{n}": t.detach().contiguous().cpu().clone() for n, t in originals.items()
    }
    if state:
        manifest["state"] = sorted(state)
        tensors |= {f"state::{n}": t.detach().contiguous().cpu().clone() for n, t in state.items()}
    with atomic_file(path) as tmp:
        save_file(tensors, str(tmp), metadata={"medit_manifest": json.dumps(manifest)})
    return manifest


def write_weights_artifact(directory: str | Path, **kwargs: Any) -> Path:
    """Write ``directory/artifact/{edit.safetensors,manifest.json}`` atomically."""
    target = Path(directory) / ARTIFACT_DIR
    with atomic_dir(target, "artifact") as tmp:
        manifest = write_delta_file(tmp / ARTIFACT_FILE, **kwargs)
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return target


def find_artifact(path: str | Path) -> Path:
    """Accept a run directory, an artifact directory or the artifact file itself."""
    p = Path(path)
    for candidate in (p, p / ARTIFACT_FILE, p / ARTIFACT_DIR / ARTIFACT_FILE, p / DELTA_FILE):
        if candidate.is_file():
            return candidate
    raise UserError(
        f"no edit artifact at {p}: expected a run directory with {ARTIFACT_DIR}/{ARTIFACT_FILE} "
        "(written by `medit edit` in batch or sequential mode) or an artifact file"
    )


def read_artifact(
    path: str | Path,
) -> tuple[dict, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(manifest, edited tensors, original tensors) of an artifact."""
    manifest, parts = _read_parts(path)
    return manifest, parts["edited"], parts["original"]


def read_state(path: str | Path) -> dict[str, torch.Tensor]:
    """The editor state an artifact carries (empty for most editors)."""
    return _read_parts(path)[1]["state"]


def open_safetensors(file: str | Path):
    """``safe_open`` with a user error naming the file when it is not a safetensors file."""
    try:
        return safe_open(str(file), framework="pt")
    except (SafetensorError, OSError) as exc:
        raise UserError(f"{file} is not a readable safetensors edit artifact ({exc})") from None


def _read_parts(path: str | Path) -> tuple[dict, dict[str, dict[str, torch.Tensor]]]:
    file = find_artifact(path)
    parts: dict[str, dict[str, torch.Tensor]] = {"edited": {}, "original": {}, "state": {}}
    with open_safetensors(file) as f:
        meta = f.metadata() or {}
        if "medit_manifest" not in meta:
            raise UserError(f"{file} is not a medit edit artifact (no manifest)")
        manifest = json.loads(meta["medit_manifest"])
        for key in f.keys():
            part, _, name = key.partition("::")
            if part not in parts or not name:
                raise UserError(f"{file}: unexpected tensor {key!r}; not a medit weights artifact")
            parts[part][name] = f.get_tensor(key)
    if manifest.get("format") != FORMAT:
        raise UserError(f"{file}: unknown artifact format {manifest.get('format')!r}")
    return manifest, parts


@torch.no_grad()
def apply_artifact(model: torch.nn.Module, path: str | Path, revert: bool = False) -> dict:
    """Write an artifact's edited tensors into ``model`` (or its originals, with ``revert``).

    Refuses when the model's current tensors are not exactly the ones the artifact expects
    (the originals to apply, the edited values to revert): the wrong base model, dtype or state.
    """
    manifest, edited, original = read_artifact(path)
    params = dict(model.named_parameters())
    expect, write = (edited, original) if revert else (original, edited)
    for name, value in expect.items():
        if name not in params:
            raise UserError(f"artifact tensor {name!r} does not exist in this model")
        check_resident(model, [name.rpartition(".")[0]], "applying the artifact")
        p = params[name]
        if p.shape != value.shape:
            raise UserError(
                f"artifact tensor {name!r} has shape {tuple(value.shape)}, the model's has "
                f"{tuple(p.shape)}: this artifact was made for another model "
                f"({manifest.get('base_model', '?')})"
            )
        if p.dtype != value.dtype:
            dtype = str(value.dtype).removeprefix("torch.")
            raise UserError(
                f"artifact tensor {name!r} is {dtype}, the model's is "
                f"{str(p.dtype).removeprefix('torch.')}: load the base model with --dtype {dtype}"
            )
        if not torch.equal(p.detach().cpu(), value):
            state = "edited" if revert else "base"
            raise UserError(
                f"the model's {name!r} differs from the artifact's {state} weights: this artifact "
                f"was made for another model (base weights sha256 "
                f"{manifest.get('base_weights_sha256', '?')[:12]}...)"
            )
    for name, value in write.items():
        params[name].copy_(value.to(params[name].device))
    return manifest


def write_model_dir(model: Any, tok: Any, directory: str | Path, delta: dict | None) -> None:
    """Write a loadable HF directory (safetensors) plus ``medit-delta.safetensors`` of the edit
    into ``directory`` (a temporary directory of the caller's :func:`~medit.core.fs.atomic_dir`).

    ``delta``: keyword arguments of :func:`write_delta_file` (method, hparams, edited, originals).
    """
    directory = Path(directory)
    model.save_pretrained(directory, safe_serialization=True)
    tok.save_pretrained(directory)
    if delta is not None:
        write_delta_file(directory / DELTA_FILE, **delta)


def save_edited_model(model: Any, tok: Any, directory: str | Path, delta: dict | None) -> Path:
    """:func:`write_model_dir` into ``directory``, atomically (a medit ``model`` directory)."""
    target = Path(directory)
    with atomic_dir(target, "model") as tmp:
        write_model_dir(model, tok, tmp, delta)
    return target
