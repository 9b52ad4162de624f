"""Results of adapter edits (MedLaSA): restore, combine, export, and loading artifacts back.

An adapter edit never writes the base weights: ``restore()`` removes its adapters from the
model's :class:`~medit.editors.patching.adapters.AdapterBank`, which leaves the model bit-identical to
before. The artifact (``RUN_DIR/artifact/``) holds:

* ``adapters.safetensors`` — every adapter's A and B per module, its routing key and the
  background centre, with a JSON manifest (kind ``adapters``: method, hparams, routing, per-edit
  scales and request ids, base weights hash);
* ``peft/edit-<i>/`` — each adapter as a standard PEFT LoRA directory at its training scales
  (``peft.PeftModel.from_pretrained(base, dir)``): what the edit does where it is fully on. The
  per-input routing exists only in medit (``medit generate --artifact RUN_DIR``).
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from medit.artifacts.weights import ARTIFACT_DIR, FORMAT, atomic_dir, open_safetensors
from medit.core.errors import UserError
from medit.core.fs import atomic_file
from medit.editors.base import EditResult, HParams
from medit.editors.patching.adapters import Adapter, AdapterBank, RoutingConfig

ADAPTERS_FILE = "adapters.safetensors"


class AdapterEditResult(EditResult):
    """An edit made of adapters in a bank (no weight written)."""

    def __init__(
        self, method: str, hparams: HParams, bank: AdapterBank, adapters: Sequence[Adapter]
    ):
        self.method, self.hparams, self.bank = method, hparams, bank
        self.adapters = list(adapters)
        self._params, self.originals = {}, {}
        self.diagnostics: list[dict[str, Any]] = []
        self.state = "edited"
        self.seconds = 0.0

    @property
    def names(self) -> list[str]:
        return sorted({m for a in self.adapters for m in a.A})

    def restore(self) -> None:
        """Remove this edit's adapters; the model is then bit-identical to before the edit."""
        self.bank.remove(*self.adapters)
        self.state = "restored"

    @classmethod
    def combine(cls, results: Sequence[EditResult]) -> AdapterEditResult:
        first = results[0]
        assert isinstance(first, AdapterEditResult)
        out = cls(first.method, first.hparams, first.bank, [a for r in results for a in r.adapters])  # type: ignore[attr-defined]
        for r in results:
            out.diagnostics += r.diagnostics
            out.seconds += r.seconds
        return out

    def merged_deltas(self) -> dict[str, torch.Tensor]:
        """Weight name -> sum over adapters of (alpha/r)·B·A (each adapter fully on)."""
        conv1d = self.bank.arch.conv1d
        out: dict[str, torch.Tensor] = {}
        for a in self.adapters:
            for m in a.A:
                d = (a.B[m] @ a.A[m]) * a.scale[m]
                d = d.T if conv1d else d
                out[f"{m}.weight"] = out.get(f"{m}.weight", 0) + d
        return out

    def edited_tensors(self) -> dict[str, torch.Tensor]:
        """The base weights with every adapter merged in (routing is lost: each fully on)."""
        params = dict(self.bank.model.named_parameters())
        return {
            n: (params[n].detach().float() + d.to(params[n].device)).to(params[n].dtype)
            for n, d in self.merged_deltas().items()
        }

    @property
    def merged_originals(self) -> dict[str, torch.Tensor]:
        """Copies of the base weights that merging would change."""
        params = dict(self.bank.model.named_parameters())
        return {f"{m}.weight": params[f"{m}.weight"].detach().clone() for m in self.names}

    @contextlib.contextmanager
    def merged_into_model(self):
        """Inside the block the model's weights hold every adapter merged in (for saving)."""
        params = dict(self.bank.model.named_parameters())
        originals = self.merged_originals
        was, self.bank.enabled = self.bank.enabled, False
        try:
            with torch.no_grad():
                for n, t in self.edited_tensors().items():
                    params[n].copy_(t)
            yield
        finally:
            with torch.no_grad():
                for n, t in originals.items():
                    params[n].copy_(t)
            self.bank.enabled = was

    def update_norms(self) -> dict[str, dict[str, float]]:
        params = dict(self.bank.model.named_parameters())
        out = {}
        for n, d in self.merged_deltas().items():
            base = params[n].detach().float().norm().item()
            delta = d.norm().item()
            out[n] = {"delta_norm": delta, "relative": delta / base if base else float("inf")}
        return out

    def export(self, directory: str | Path, peft: bool = True, **provenance: Any) -> Path:
        """The artifact; ``peft=False`` leaves out the PEFT directories (checkpoints)."""
        target = Path(directory) / ARTIFACT_DIR
        with atomic_dir(target, "artifact") as tmp:
            write_adapters(tmp, self, **provenance)
            for i, a in enumerate(self.adapters if peft else []):
                write_peft_adapter(
                    tmp / "peft" / f"edit-{i}",
                    a.A,
                    a.B,
                    a.scale,
                    self.bank.arch.conv1d,
                    provenance.get("base_model"),
                )
        return target


def write_adapters(directory: Path, result: AdapterEditResult, **provenance: Any) -> dict:
    bank = result.bank
    tensors: dict[str, torch.Tensor] = {}
    for i, a in enumerate(result.adapters):
        for m in a.A:  # copies: adapters=shared holds views of one tensor per module
            tensors[f"{i}::{m}::A"] = a.A[m].detach().cpu().clone()
            tensors[f"{i}::{m}::B"] = a.B[m].detach().cpu().clone()
        if a.key is not None:
            tensors[f"{i}::key"] = a.key.detach().contiguous().cpu()
    if bank._center is not None:
        tensors["center"] = bank._center.detach().contiguous().cpu()
        tensors["token_mean"], tensors["token_std"] = (
            t.detach().contiguous().cpu() for t in bank._token_stats
        )
    manifest = {
        "format": FORMAT,
        "version": 1,
        "kind": "adapters",
        "method": result.method,
        "hparams": result.hparams.to_dict(),
        "routing": vars(bank.routing),
        "edits": [
            {"request_id": a.request_id, "prompt": a.prompt, "subject": a.subject, "scale": a.scale}
            for a in result.adapters
        ],
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        **provenance,
    }
    path = directory / ADAPTERS_FILE
    with atomic_file(path) as tmp:
        save_file(tensors, str(tmp), metadata={"medit_manifest": json.dumps(manifest)})
    (directory / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return manifest


def write_peft_adapter(
    directory: Path,
    A: dict[str, torch.Tensor],
    B: dict[str, torch.Tensor],
    scale: dict[str, float],
    conv1d: bool,
    base_model: str | None = None,
) -> None:
    """A LoRA update per module (scale·B·A) as a PEFT LoRA directory, each module's rank and
    alpha given through PEFT's rank and alpha patterns; ``base_model`` (a model spec) becomes
    its ``base_model_name_or_path``."""
    from peft import LoraConfig

    from medit.artifacts.modelcard import peft_base

    names = sorted(A)
    ranks = {n: int(A[n].shape[0]) for n in names}
    alphas = {n: scale[n] * ranks[n] for n in names}
    config = LoraConfig(
        r=max(ranks.values()),
        lora_alpha=max(alphas.values()),
        target_modules=names,
        rank_pattern={f"^{n}$": r for n, r in ranks.items()},
        alpha_pattern={f"^{n}$": a for n, a in alphas.items()},
        lora_dropout=0.0,
        bias="none",
        fan_in_fan_out=conv1d,
        task_type="CAUSAL_LM",
        base_model_name_or_path=peft_base(base_model),
    )
    directory.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(str(directory))
    tensors = {}
    for n in names:
        tensors[f"base_model.model.{n}.lora_A.weight"] = A[n].float().contiguous().cpu()
        tensors[f"base_model.model.{n}.lora_B.weight"] = B[n].float().contiguous().cpu()
    save_file(tensors, str(directory / "adapter_model.safetensors"))


def low_rank_factors(delta: torch.Tensor, max_rank: int, rtol: float = 1e-6):
    """Exact factors (A (k, in), B (out, k)) of a weight change of rank <= max_rank, by SVD."""
    A, B, _ = low_rank_approx(delta, max_rank, rtol)
    return A, B


def low_rank_approx(delta: torch.Tensor, max_rank: int = 0, rtol: float = 1e-6, pad: int = 1):
    """(A (k, in), B (out, k), relative Frobenius error) of ``delta`` ≈ B·A by SVD: every
    singular value above ``rtol``·σ₁ is kept (exact up to rounding), at most ``max_rank`` of
    them (0: no cap); the factors are zero-padded to rank ``pad``."""
    U, S, Vh = torch.linalg.svd(delta.double(), full_matrices=False)
    k = int((S > S[0] * rtol).sum().item()) if S[0] > 0 else 1
    k = max(1, min(k, max_rank) if max_rank else k)
    err = (S[k:].square().sum().sqrt() / S.square().sum().sqrt().clamp_min(1e-300)).item()
    A, B = Vh[:k].float(), (U[:, :k] * S[:k]).float()
    if pad > k:
        A = torch.cat([A, A.new_zeros(pad - k, A.shape[1])])
        B = torch.cat([B, B.new_zeros(B.shape[0], pad - k)], dim=1)
    return A, B, err


def write_lowrank_peft(
    directory: Path,
    deltas: dict[str, torch.Tensor],
    conv1d: bool,
    max_rank: int = 0,
    pad: int = 1,
    base_model: str | None = None,
) -> dict[str, dict[str, float]]:
    """Weight changes per module (``(out, in)`` layout, or ``(in, out)`` for Conv1D) as a PEFT
    LoRA directory; writes and returns each module's rank and relative truncation error."""
    A, B, scale, report = {}, {}, {}, {}
    for module, delta in deltas.items():
        A[module], B[module], err = low_rank_approx(delta.T if conv1d else delta, max_rank, pad=pad)
        scale[module] = 1.0
        report[module] = {"rank": int(A[module].shape[0]), "relative_error": err}
    write_peft_adapter(directory, A, B, scale, conv1d, base_model)
    (directory / "medit_lowrank.json").write_text(json.dumps(report, indent=2))
    return report


def is_adapter_artifact(path: str | Path) -> Path | None:
    p = Path(path)
    for candidate in (
        p if p.name == ADAPTERS_FILE else p / ADAPTERS_FILE,
        p / ARTIFACT_DIR / ADAPTERS_FILE,
    ):
        if candidate.is_file():
            return candidate
    return None


def load_adapter_artifact(model: Any, tok: Any, path: str | Path) -> AdapterEditResult:
    """Install an adapter artifact's edits on ``model`` (the base model it was made for)."""
    from medit.core.arch import get_arch
    from medit.editors.base import get_editor_class

    file = is_adapter_artifact(path)
    if file is None:
        raise UserError(f"no adapter artifact at {path}")
    with open_safetensors(file) as f:
        meta = f.metadata() or {}
        if "medit_manifest" not in meta:
            raise UserError(f"{file} is not a medit edit artifact (no manifest)")
        manifest = json.loads(meta["medit_manifest"])
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    sha = getattr(model, "medit_weights_sha256", None)
    if sha and manifest.get("base_weights_sha256") and sha != manifest["base_weights_sha256"]:
        raise UserError(
            f"{file} was made for another base model (weights sha256 "
            f"{manifest['base_weights_sha256'][:12]}..., this model {sha[:12]}...)"
        )
    arch = get_arch(model)
    device = arch.embedding(model).weight.device
    hparams = get_editor_class(manifest["method"]).hparams_class.from_dict(manifest["hparams"])
    bank = AdapterBank.of(model, tok, arch, RoutingConfig(**manifest["routing"]))
    if "center" in tensors and bank._center is None:
        bank._center = tensors["center"].to(device)
        bank._token_stats = (tensors["token_mean"].to(device), tensors["token_std"].to(device))
    adapters = []
    for i, e in enumerate(manifest["edits"]):
        mods = e["scale"]
        adapters.append(
            Adapter(
                request_id=e["request_id"],
                prompt=e["prompt"],
                subject=e.get("subject", ""),
                A={m: tensors[f"{i}::{m}::A"].to(device) for m in mods},
                B={m: tensors[f"{i}::{m}::B"].to(device) for m in mods},
                scale=dict(mods),
                key=tensors[f"{i}::key"].to(device) if f"{i}::key" in tensors else None,
            )
        )
    if bank.routing.mode == "oracle" and bank.oracle_scales is None:
        editor = get_editor_class(manifest["method"])()
        bank.oracle_scales = lambda p: editor._oracle_alphas(
            model, tok, arch, p, hparams, [a.subject for a in bank.adapters]
        )
    bank.add(*adapters)
    result = AdapterEditResult(manifest["method"], hparams, bank, adapters)
    result.manifest = manifest
    return result
