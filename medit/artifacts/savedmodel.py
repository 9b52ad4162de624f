"""What travels with an edit: saved model directories, their model cards, and journal entries.

Shared by ``medit edit --save-model``, ``medit apply`` and ``medit revert``, so that every
saved model carries the same things: the HF weights (safetensors), ``medit-delta.safetensors``
(the edited and original tensors, so the base can be given back bit-exactly), a model card
(``README.md``) and a ``medit_edit`` record in ``config.json``; and every change is appended to
the workspace's edit journal.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from medit.artifacts import journal
from medit.artifacts.modelcard import add_edit_record, edit_record, model_card
from medit.artifacts.weights import DELTA_FILE, write_model_dir
from medit.core.fs import atomic_write_text, tree_sha256
from medit.core.results import medit_version, verdict
from medit.facts.requests import EditRequest

#: the run directory's copy of its journal entry
ENTRY_FILE = "journal-entry.json"


def journal_file(workspace: str | Path | None, out: str | Path) -> Path:
    """The journal of a workspace (default: the directory that holds ``out``)."""
    root = Path(workspace) if workspace else Path(out).absolute().parent
    return journal.journal_path(root)


def local_model_path(spec: str) -> str | None:
    """The local path a model spec names (to keep outputs away from it), if any."""
    if spec.startswith("builtin:"):
        return None
    path = Path(spec).expanduser()
    return str(path) if path.exists() else None


def hashes(root: Path, sub: str, prefix: str, weights_only: bool = False) -> dict[str, str]:
    """sha256 of the files under ``root/sub``, keyed ``prefix + path``."""
    found = tree_sha256(root / sub)
    base = "" if sub == "." else f"{sub}/"
    return {
        f"{prefix}{base}{name}": sha
        for name, sha in found.items()
        if not weights_only or name.endswith(".safetensors")
    }


def evaluation_summary(res: dict[str, Any]) -> dict[str, Any]:
    """The headline figures of an edit run, before -> after, and its verdict."""
    keys = {
        "teacher_forced": ("efficacy", "generality", "locality_mean"),
        "generation": ("efficacy_contains", "generality_contains", "locality_mean"),
    }
    out: dict[str, Any] = {"n": res["metrics"]["post"].get("n")}
    for when in ("pre", "post"):
        m = res["metrics"][when]
        out[when] = {f"{p}.{k}": m[p].get(k) for p, ks in keys.items() if p in m for k in ks}
    v = verdict(res)
    out["verdict"] = "PASS" if v["passed"] else "FAIL"
    return out


def journal_edit(
    path: Path,
    cfg: Any,
    res: dict[str, Any],
    requests: Sequence[EditRequest],
    artifacts: dict[str, str],
    out: Path,
) -> dict[str, Any]:
    """Append an edit run to the journal; the stored entry."""
    entry = journal.make_entry(
        action="edit",
        author=cfg.author,
        reason=cfg.reason,
        method=cfg.method,
        hparams=res["config"]["hparams"],
        requests=[r.to_dict() for r in requests],
        base_weights_sha256=res["provenance"]["model"]["weights_sha256"],
        result_weights_sha256=res["edit"]["edited_weights_sha256"],
        artifacts=artifacts,
        evaluation=evaluation_summary(res),
        run_dir=str(out.absolute()),
        model=cfg.model,
        extra={
            "mode": cfg.mode,
            "saved_model": res.get("saved_model"),
            "model_state": res["edit"]["model_state"],
        },
    )
    return journal.append(path, entry)


def write_edited(
    directory: Path, lm: Any, combined: Any, *, method: str, hparams: dict, edited_sha: str
) -> None:
    """The edited model as an HF directory plus its delta file. Module edits are merged in
    (each patch fully on: the per-input routing of MedLaSA lives only in the artifact)."""
    edited, originals = combined.merged_weights()
    with combined.merged():
        write_model_dir(
            lm.model,
            lm.tokenizer,
            directory,
            delta=dict(
                method=method,
                hparams=hparams,
                edited=edited,
                originals=originals,
                state=combined.editor_state or None,
                base_model=lm.spec,
                base_weights_sha256=lm.weights_sha256,
                edited_weights_sha256=edited_sha,
            ),
        )


def write_card(
    directory: Path,
    *,
    base_model: str,
    base_sha: str,
    edited_sha: str,
    method: str,
    hparams: dict,
    requests: list[dict],
    res: dict[str, Any] | None,
    entry: dict[str, Any],
) -> None:
    """README.md (the model card) and the ``medit_edit`` record in config.json."""
    created = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    card = model_card(
        base_model=base_model,
        base_weights_sha256=base_sha,
        edited_weights_sha256=edited_sha,
        method=method,
        hparams=hparams,
        requests=requests,
        evaluation=res["metrics"]["post"] if res else None,
        verdict=verdict(res) if res else None,
        journal_head=entry["sha256"],
        medit_version=medit_version(),
        created=created,
    )
    atomic_write_text(directory / "README.md", card)
    record = edit_record(
        method=method,
        base_weights_sha256=base_sha,
        edited_weights_sha256=edited_sha,
        n_edits=len(requests),
        journal_head=entry["sha256"],
        medit_version=medit_version(),
        created=created,
    )
    add_edit_record(directory / "config.json", record)


def write_run_card(
    directory: Path, res: dict[str, Any], requests: Sequence[EditRequest], entry: dict[str, Any]
) -> None:
    """The model card of a model saved by ``medit edit --save-model``."""
    write_card(
        directory,
        base_model=res["config"]["model"],
        base_sha=res["provenance"]["model"]["weights_sha256"],
        edited_sha=res["edit"]["edited_weights_sha256"],
        method=res["config"]["method"],
        hparams=res["config"]["hparams"],
        requests=[r.to_dict() for r in requests],
        res=res,
        entry=entry,
    )


def has_delta(directory: str | Path) -> bool:
    return (Path(directory) / DELTA_FILE).is_file()
