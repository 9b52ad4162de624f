"""``medit apply`` and ``medit revert``: an edit put onto its base model as a saved model, and a
saved edited model given back as its base, bit-exactly. Both are journaled.

* apply: a run directory or artifact (weights or adapters) + the base model it was made for ->
  an HF directory of the edited model (adapters merged in, each fully on), with its delta file,
  model card and ``medit_edit`` config record. A base whose weights hash differs from the one the
  edit records is refused before anything is written.
* revert: a model directory saved by medit (it holds ``medit-delta.safetensors``) -> the base
  model, the originals written back; the result's weights hash must equal the recorded base hash.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Any

from medit.artifacts import journal, savedmodel
from medit.artifacts.weights import (
    DELTA_FILE,
    apply_artifact,
    find_artifact,
    read_artifact,
    write_model_dir,
)
from medit.core.errors import UserError
from medit.core.fs import atomic_dir, atomic_write_text, check_disjoint, check_out, file_sha256
from medit.core.models import LoadedModel, load_model, state_dict_sha256
from medit.core.results import read_json_object
from medit.editors.load import load_edit
from medit.editors.patching.adapters import is_adapter_artifact, read_adapters


@dataclasses.dataclass(frozen=True)
class ApplyConfig:
    source: str  #: apply: run directory or artifact; revert: saved model directory
    out: str  #: the model directory to write
    model: str = "builtin:smollm2"  #: apply: the base model spec
    device: str = "auto"
    dtype: str = "auto"
    overwrite: bool = False  #: replace a model directory medit wrote earlier
    author: str | None = None
    reason: str | None = None
    workspace: str | None = None  #: journal directory (default: the parent of out)


def _check(cfg: ApplyConfig, model_path: str | None) -> Path:
    out = check_out(cfg.out, cfg.overwrite, "model")
    check_disjoint({"--out": out, "the edit": cfg.source, "--model": model_path})
    journal_path = savedmodel.journal_file(cfg.workspace, out)
    check_disjoint({"--out": out, "the journal": journal_path})
    return journal_path


def _artifact_manifest(source: str) -> tuple[dict[str, Any], Path]:
    """The manifest of a run directory's or artifact's edit, read before any model loads."""
    adapter = is_adapter_artifact(source)
    if adapter is not None:
        return read_adapters(adapter)[0], adapter
    file = find_artifact(source)
    return read_artifact(file)[0], file


def apply_edit(cfg: ApplyConfig) -> dict[str, Any]:
    """Write the edited model of ``cfg.source`` applied to ``cfg.model``; the journal entry."""
    journal_path = _check(cfg, savedmodel.local_model_path(cfg.model))
    manifest, file = _artifact_manifest(cfg.source)
    lm = load_model(cfg.model, cfg.device, cfg.dtype)
    expected = manifest.get("base_weights_sha256")
    if expected and expected != lm.weights_sha256:
        raise UserError(
            f"--model {cfg.model} has weights sha256 {lm.weights_sha256[:16]}..., but the edit "
            f"{file} was made for {expected[:16]}... ({manifest.get('base_model', '?')}): "
            "refusing to apply it to another model"
        )
    with atomic_dir(cfg.out, "model") as tmp:
        result = load_edit(lm.model, lm.tokenizer, file)
        with result.merged():
            edited_sha = state_dict_sha256(lm.model)
        savedmodel.write_edited(
            tmp,
            lm,
            result,
            method=manifest["method"],
            hparams=manifest["hparams"],
            edited_sha=edited_sha,
        )
        requests = _manifest_requests(cfg.source, manifest)
        artifacts = {f"edit:{file.name}": file_sha256(file)}
        artifacts |= savedmodel.hashes(tmp, ".", "model:", weights_only=True)
        entry = _journal(
            journal_path, "apply", cfg, manifest, lm.weights_sha256, edited_sha, artifacts, requests
        )
        savedmodel.write_card(
            tmp,
            base_model=cfg.model,
            base_sha=lm.weights_sha256,
            edited_sha=edited_sha,
            method=manifest["method"],
            hparams=manifest["hparams"],
            requests=requests,
            res=_run_results(cfg.source),
            entry=entry,
        )
    return entry


def revert_model(cfg: ApplyConfig) -> dict[str, Any]:
    """Write the base model of the medit-saved model ``cfg.source``; the journal entry."""
    src = Path(cfg.source)
    if not savedmodel.has_delta(src):
        raise UserError(f"{src} is not a model saved by medit (no {DELTA_FILE}): nothing to revert")
    journal_path = _check(cfg, None)
    manifest = read_artifact(src / DELTA_FILE)[0]
    lm: LoadedModel = load_model(str(src), cfg.device, cfg.dtype)
    apply_artifact(lm.model, src / DELTA_FILE, revert=True)
    base_sha = state_dict_sha256(lm.model)
    if manifest.get("base_weights_sha256") and base_sha != manifest["base_weights_sha256"]:
        raise UserError(
            f"{src}: the reverted weights hash {base_sha[:16]}... differs from the base hash the "
            f"edit records ({manifest['base_weights_sha256'][:16]}...): the model directory was "
            "changed after medit saved it"
        )
    if hasattr(lm.model.config, "medit_edit"):
        delattr(lm.model.config, "medit_edit")
    with atomic_dir(cfg.out, "model") as tmp:
        write_model_dir(lm.model, lm.tokenizer, tmp, delta=None)
        artifacts = {f"edit:{DELTA_FILE}": file_sha256(src / DELTA_FILE)}
        artifacts |= savedmodel.hashes(tmp, ".", "model:", weights_only=True)
        entry = _journal(
            journal_path, "revert", cfg, manifest, lm.weights_sha256, base_sha, artifacts, None
        )
        atomic_write_text(tmp / "README.md", _revert_card(src, manifest, base_sha, entry))
    return entry


def _journal(
    path: Path,
    action: str,
    cfg: ApplyConfig,
    manifest: dict,
    base: str,
    result: str,
    artifacts: dict[str, str],
    requests: list[dict] | None,
) -> dict[str, Any]:
    entry = journal.make_entry(
        action=action,
        author=cfg.author,
        reason=cfg.reason,
        method=manifest.get("method"),
        hparams=manifest.get("hparams"),
        requests=requests,
        base_weights_sha256=base,
        result_weights_sha256=result,
        artifacts=artifacts,
        evaluation=None,
        run_dir=None,
        model=cfg.model if action == "apply" else cfg.source,
        extra={"source": str(Path(cfg.source).absolute()), "out": str(Path(cfg.out).absolute())},
    )
    return journal.append(path, entry)


def _manifest_requests(source: str, manifest: dict) -> list[dict]:
    """The edit's requests: from its run directory's samples where there is one."""
    samples = Path(source) / "samples.jsonl"
    if samples.is_file():
        lines = samples.read_text(encoding="utf-8").splitlines()
        return [json.loads(line)["request"] for line in lines if line.strip()]
    return [
        {"prompt": e.get("prompt"), "id": e.get("request_id")} for e in manifest.get("edits", [])
    ]


def _run_results(source: str) -> dict[str, Any] | None:
    path = Path(source) / "results.json"
    if not path.is_file():
        return None
    return read_json_object(path)


def _revert_card(src: Path, manifest: dict, base_sha: str, entry: dict) -> str:
    created = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    base = json.dumps(str(manifest.get("base_model", "unknown")))
    return (
        f"---\nlibrary_name: transformers\ntags: [medit, model-editing, reverted]\n"
        f"medit:\n  reverted_from: {json.dumps(str(src.absolute()))}\n  base_model: {base}\n"
        f'  weights_sha256: "{base_sha}"\n  journal_head: "{entry["sha256"]}"\n---\n\n'
        f"# Base model restored by medit\n\nThe edit ({manifest.get('method')}) of the model "
        f"saved in `{src.name}` was reverted on {created}: these weights are the base model's, "
        f"bit for bit (weights sha256 `{base_sha}`), as the edit recorded them.\n"
    )
