"""Edits as PEFT LoRA adapters: a directory ``peft.PeftModel.from_pretrained(base, dir)`` loads.

Module edits export each adapter at its training scales; weight edits export their change
factorised exactly by SVD (:func:`write_lowrank_peft`), for serving engines that load LoRA.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from medit.artifacts.modelcard import peft_base


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
    from peft import LoraConfig  # peft takes seconds to import: only when an artifact is written

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
