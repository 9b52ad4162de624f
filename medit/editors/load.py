"""One way back from an artifact to an edited model: :func:`load_edit` dispatches on the manifest.

A weights artifact (kind ``weights``) is written into the model after its originals are checked
to be exactly the model's tensors; any other kind is installed by its method's
``Editor.load`` (module and memory edits). Sequential runs keep checkpoints that
:func:`load_checkpoint` continues from.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any

from medit.artifacts.modules import find_module_artifact, read_module_artifact
from medit.artifacts.weights import (
    ARTIFACT_DIR,
    apply_artifact,
    find_artifact,
    read_artifact,
    read_state,
)
from medit.core.cache import base_weights_sha256
from medit.core.errors import UserError
from medit.core.fs import marker_kind
from medit.editors.patching.adapters import is_adapter_artifact, read_adapters
from medit.editors.registry import get_editor_class
from medit.editors.results import EditResult, WeightEdit

log = logging.getLogger(__name__)


def load_edit(model: Any, tok: Any, path: str | Path) -> EditResult:
    """Put an edit artifact (a run directory, an artifact directory or file) onto the base model
    it was made for; the result can restore, remove, combine and export as a fresh edit can."""
    sha = base_weights_sha256(model)
    adapters, patches = is_adapter_artifact(path), find_module_artifact(path)
    if adapters is not None or patches is not None:
        file = adapters or patches
        manifest, tensors = (read_adapters if adapters else read_module_artifact)(file)
        expected = manifest.get("base_weights_sha256")
        if sha and expected and sha != expected:
            raise UserError(
                f"{file} was made for another base model (weights sha256 {expected[:12]}..., "
                f"this model {sha[:12]}...)"
            )
        result = get_editor_class(manifest["method"]).load(model, tok, manifest, tensors)
    else:
        file = find_artifact(path)
        manifest = apply_artifact(model, file)  # checks the originals, bit for bit
        _, _, originals = read_artifact(file)
        state = read_state(file) if manifest.get("state") else {}
        cls = get_editor_class(manifest["method"])
        params = dict(model.named_parameters())
        result = WeightEdit(
            manifest["method"],
            cls.hparams_class.from_dict(manifest["hparams"]),
            {n: params[n] for n in originals},
            originals,
            manifest.get("edit_ids", []),
            editor_state=state,
        )
    result.manifest = manifest
    return result


def written_modules(path: str | Path) -> tuple[str, ...]:
    """The modules whose weights an artifact writes (a weights artifact's; module and memory
    edits write none: they patch or route around the module's output)."""
    if is_adapter_artifact(path) is not None or find_module_artifact(path) is not None:
        return ()
    _, _, originals = read_artifact(find_artifact(path))
    return tuple(dict.fromkeys(name.rsplit(".", 1)[0] for name in originals))


def load_checkpoint(model: Any, tok: Any, directory: Path) -> tuple[EditResult | None, list[float]]:
    """The edits a sequential run's checkpoint holds, installed on ``model`` in order, and the
    seconds of each. A weight edit's checkpoint is one cumulative artifact; module and memory
    edits keep one directory per edit (``edits/NNNNNN``): one whose write was cut short ends
    the sequence and is dropped with the ones after it."""
    seconds: list[float] = []
    results: list[EditResult] = []
    if (directory / ARTIFACT_DIR).exists():
        r = load_edit(model, tok, directory)
        results.append(r)
        seconds += r.manifest["edit_seconds"]
    edits = sorted((directory / "edits").iterdir()) if (directory / "edits").is_dir() else []
    for i, d in enumerate(edits):
        if d.name != f"{i:06d}" or not (d / ARTIFACT_DIR).exists():
            for rest in edits[i:]:
                _remove_own_checkpoint(rest)
            break
        r = load_edit(model, tok, d)
        results.append(r)
        seconds += r.manifest["edit_seconds"]
    if not results:
        return None, []
    return type(results[0]).combine(results), seconds


def _remove_own_checkpoint(directory: Path) -> None:
    """Drop an edit checkpoint left behind the sequence's end, when it holds nothing but what
    medit writes there: its artifact (marked by medit) or the leftovers of an interrupted atomic
    write (``.artifact.tmp-*``). Anything else is left where it is, with a warning."""
    if not directory.is_dir():
        return
    for entry in directory.iterdir():
        own = entry.name == ARTIFACT_DIR and marker_kind(entry) == "artifact"
        if not (own or (entry.name.startswith(f".{ARTIFACT_DIR}.") and ".tmp-" in entry.name)):
            log.warning("%s holds %s, which medit did not write: left in place", directory, entry)
            return
    shutil.rmtree(directory)
