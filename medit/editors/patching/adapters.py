"""Low-rank adapters as patches: MedLaSA's edits, beside the base weights, routed per sequence.

Each edited piece of knowledge owns one :class:`Adapter`: for every adapted linear module ``m``
a pair ``A_m (r, in)``, ``B_m (out, r)`` and a scale ``alpha_m / r``, plus a *key*, the base
model's representation of its prompt (:class:`~medit.editors.patching.routing.SequenceRouter`).
On row b routed to adapter e with coefficient c_m[b] the module's output becomes

    y_b + c_m[b] · B_{e,m} A_{e,m} x_b

The artifact (``RUN_DIR/artifact/``) holds ``adapters.safetensors`` (every adapter's A and B per
module, its routing key and the background statistics, with a JSON manifest of kind
``adapters``: method, hparams, routing, per-edit scales and request ids) and, unless left out,
``peft/edit-<i>/``: each adapter as a standard PEFT LoRA directory at its training scales
(``peft.PeftModel.from_pretrained(base, dir)``) — what the edit does where it is fully on.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from medit.artifacts.modules import read_module_artifact
from medit.artifacts.peft import write_peft_adapter
from medit.artifacts.weights import ARTIFACT_DIR, FORMAT
from medit.core.arch import ArchSpec
from medit.core.fs import atomic_dir, atomic_file
from medit.editors.patching.bank import Patch

ADAPTERS_FILE = "adapters.safetensors"


@dataclasses.dataclass(eq=False)
class Adapter(Patch):
    """The adapter of one edited piece of knowledge."""

    edit_id: str  #: the request's id
    prompt: str
    A: dict[str, torch.Tensor]  #: module name -> (r, in)
    B: dict[str, torch.Tensor]  #: module name -> (out, r)
    scale: dict[str, float]  #: module name -> alpha / r used in training
    key: torch.Tensor | None = None  #: routing representation of the prompt (unit norm)
    subject: str = ""  #: the edit's subject ("" when unknown: no lexical evidence asked)
    info: dict[str, Any] = dataclasses.field(default_factory=dict)  #: alphas, ranks, profile

    routed = True

    @property
    def modules(self) -> list[str]:
        return list(self.A)

    def rank(self, module: str) -> int:
        return int(self.A[module].shape[0])

    @classmethod
    def act(cls, patches, module, x, out, gate):
        """out + c · (x Aᵀ) Bᵀ per row, with the row's own adapter; gate: (n, 1) coefficients."""
        y = torch.empty(out.shape, dtype=torch.float32, device=out.device)
        groups: dict[int, list[int]] = {}
        for row, p in enumerate(patches):
            groups.setdefault(id(p), []).append(row)
        for rows in groups.values():
            p = patches[rows[0]]
            A, B = p.A[module], p.B[module]  # (r, in), (out, r)
            idx = torch.tensor(rows, device=x.device)
            xs = x if len(rows) == x.shape[0] else x[idx]
            part = (xs.to(A.dtype) @ A.T) @ B.T  # (n, pos, out)
            y[idx] = part.float()
        c = gate[:, :1, None].to(torch.float32)  # (n, 1, 1)
        return out + (y * c).to(out.dtype)

    def weight_deltas(self, arch: ArchSpec) -> dict[str, torch.Tensor]:
        """Weight name -> (alpha/r)·B·A (fully on); GPT-2's Conv1D weights are transposed."""
        out = {}
        for m in self.A:
            d = (self.B[m] @ self.A[m]) * self.scale[m]
            out[f"{m}.weight"] = d.T if arch.conv1d else d
        return out

    # -- artifacts -------------------------------------------------------------------------------
    @classmethod
    def write_artifact(cls, directory, result, bank, peft: bool = True, **provenance) -> Path:
        target = Path(directory) / ARTIFACT_DIR
        with atomic_dir(target, "artifact") as tmp:
            write_adapters(tmp, result, bank, **provenance)
            for i, a in enumerate(result.patches if peft else []):
                write_peft_adapter(
                    tmp / "peft" / f"edit-{i}",
                    a.A,
                    a.B,
                    a.scale,
                    bank.arch.conv1d,
                    provenance.get("base_model"),
                )
        return target


def write_adapters(directory: Path, result: Any, bank: Any, **provenance: Any) -> dict:
    """``adapters.safetensors`` (and a readable ``manifest.json``) of a module edit's adapters."""
    router = bank.router
    tensors: dict[str, torch.Tensor] = {}
    for i, a in enumerate(result.patches):
        for m in a.A:  # copies: adapters=shared holds views of one tensor per module
            tensors[f"{i}::{m}::A"] = a.A[m].detach().cpu().clone()
            tensors[f"{i}::{m}::B"] = a.B[m].detach().cpu().clone()
        if a.key is not None:
            tensors[f"{i}::key"] = a.key.detach().contiguous().cpu()
    if router._center is not None:
        tensors["center"] = router._center.detach().contiguous().cpu()
        tensors["token_mean"], tensors["token_std"] = (
            t.detach().contiguous().cpu() for t in router._token_stats
        )
    manifest = {
        "format": FORMAT,
        "version": 1,
        "kind": "adapters",
        "method": result.method,
        "hparams": result.hparams.to_dict(),
        "routing": dataclasses.asdict(router.routing),
        "edits": [
            {"request_id": a.edit_id, "prompt": a.prompt, "subject": a.subject, "scale": a.scale}
            for a in result.patches
        ],
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        **provenance,
    }
    with atomic_file(directory / ADAPTERS_FILE) as tmp:
        save_file(tensors, str(tmp), metadata={"medit_manifest": json.dumps(manifest)})
    (directory / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return manifest


def read_adapters(file: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """(manifest, tensors) of an ``adapters.safetensors`` file (stored as a module artifact's)."""
    return read_module_artifact(file)


def adapters_from(manifest: dict, tensors: dict[str, torch.Tensor], device) -> list[Adapter]:
    """The adapters an artifact holds, on ``device``."""
    out = []
    for i, e in enumerate(manifest["edits"]):
        mods = e["scale"]
        key = tensors.get(f"{i}::key")
        out.append(
            Adapter(
                edit_id=e["request_id"],
                prompt=e["prompt"],
                subject=e.get("subject", ""),
                A={m: tensors[f"{i}::{m}::A"].to(device) for m in mods},
                B={m: tensors[f"{i}::{m}::B"].to(device) for m in mods},
                scale=dict(mods),
                key=key.to(device) if key is not None else None,
            )
        )
    return out


def is_adapter_artifact(path: str | Path) -> Path | None:
    p = Path(path)
    for candidate in (
        p if p.name == ADAPTERS_FILE else p / ADAPTERS_FILE,
        p / ARTIFACT_DIR / ADAPTERS_FILE,
    ):
        if candidate.is_file():
            return candidate
    return None


def lora_init(
    r: int, n_in: int, n_out: int, device, dtype, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """LoRA's initialisation (as in peft): A Kaiming-uniform (a = sqrt 5), B zero."""
    A = torch.empty(r, n_in, dtype=dtype)
    torch.nn.init.kaiming_uniform_(A, a=math.sqrt(5), generator=generator)
    A = A.to(device)
    return A, torch.zeros(n_out, r, device=device, dtype=dtype)


def linear_dims(module: Any, conv1d: bool) -> tuple[int, int]:
    """(in, out) features of a linear module (GPT-2's Conv1D stores its weight transposed)."""
    w = module.weight
    return (w.shape[0], w.shape[1]) if conv1d else (w.shape[1], w.shape[0])
