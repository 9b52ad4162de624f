"""LoRA and AdaLoRA editing on upstream peft.

* **LoRA** (Hu et al. 2022): a rank-r update (alpha/r)·B·A on chosen projections of every layer,
  trained on the target tokens; EasyEdit's preset (rank 8, alpha 32, q and v projections, 70
  Adam steps at lr 5e-3).
* **AdaLoRA** (Zhang et al. 2023): the update in SVD form P·Λ·Q, its rank budget reallocated
  during training from importance scores (peft's ``update_and_allocate``), with the orthogonality
  regulariser on P and Q.

The adapters are injected with peft's tuner classes, trained, saved in PEFT's format for export,
then merged into the base weights and unloaded: the edited model is a plain model again, and
``restore()`` copies the touched weights back bit for bit. The run's artifact therefore holds the
weights (``medit generate --artifact``) plus ``artifact/peft/`` (``PeftModel.from_pretrained``).

Evaluation runs in eval mode, so LoRA dropout (EasyEdit: 0.1) is off at evaluation; incumbents
that evaluated in train mode scored with dropout on.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import torch

from medit.core.arch import ArchSpec, get_arch
from medit.core.forward import target_nll
from medit.core.memory import Component, Shapes, Workload, activations, trained, weight_copy
from medit.core.placement import input_device
from medit.core.text import teacher_batch
from medit.editors.base import (
    Capabilities,
    Editor,
    HParamError,
    HParams,
    check_kinds,
    check_layers,
    hp,
)
from medit.editors.results import PeftExport, WeightEdit
from medit.facts.requests import EditRequest


@dataclasses.dataclass(frozen=True)
class LoRAHParams(HParams):
    targets: tuple[str, ...] = hp(("q", "v"), "module kinds adapted (see medit.core.arch)")
    layers: tuple[int, ...] = hp((), "layers adapted; empty: all")
    rank: int = hp(8, "LoRA rank r (AdaLoRA: the final average rank)")
    alpha: float = hp(32.0, "LoRA alpha; the update is scaled by alpha / r")
    dropout: float = hp(0.1, "LoRA dropout while training (EasyEdit: 0.1)")
    lr: float = hp(5e-3, "Adam learning rate (EasyEdit: 5e-3)")
    steps: int = hp(70, "Adam steps (EasyEdit: 70)")
    early_stop_loss: float = hp(
        0.01,
        "stop once the target loss is below this; 0: never (EasyEdit's 70 steps: on MedCF "
        "validation the edit is done after ~7)",
    )
    batch_size: int = hp(16, "requests per optimisation step in batch mode")

    def __post_init__(self):
        super().__post_init__()
        if not self.targets:
            raise HParamError("targets", ": give at least one module kind")
        self._at_least(1, "rank", "steps", "batch_size")
        self._at_least(0, "layers")
        self._positive("lr", "alpha")
        self._within("dropout", 0.0, 1.0, open_high=True)

    def check_arch(self, arch: ArchSpec, n_layers: int | None) -> None:
        check_layers("layers", self.layers, n_layers)
        check_kinds("targets", self.targets, arch, fused=True)


@dataclasses.dataclass(frozen=True)
class AdaLoRAHParams(LoRAHParams):
    init_rank: int = hp(12, "AdaLoRA: initial rank of every module before pruning")
    tinit: int = hp(7, "AdaLoRA: warm-up steps before the rank budget shrinks")
    tfinal: int = hp(14, "AdaLoRA: final steps at the target budget")
    delta_t: int = hp(5, "AdaLoRA: steps between two budget allocations")
    orth_reg_weight: float = hp(0.5, "AdaLoRA: weight of the orthogonality regulariser")

    def __post_init__(self):
        super().__post_init__()
        if self.init_rank < self.rank:
            raise HParamError("init_rank", f"must be >= rank ({self.rank}), got {self.init_rank}")
        self._at_least(0, "tinit", "tfinal", "orth_reg_weight")
        self._at_least(1, "delta_t")
        if self.tinit + self.tfinal >= self.steps:
            raise HParamError(
                "tinit",
                f": tinit + tfinal ({self.tinit + self.tfinal}) must be < steps ({self.steps})",
            )


class _PeftEditor(Editor):
    capabilities = Capabilities(batch=True)
    adaptive = False

    def edited_modules(self, hp: LoRAHParams, arch: ArchSpec, n_layers: int) -> tuple[str, ...]:
        layers = hp.layers or tuple(range(n_layers))
        kinds = arch.resolve_kinds(hp.targets)
        return tuple(arch.layer_path(layer, kind) for layer in layers for kind in kinds)

    def memory_plan(self, hp: LoRAHParams, config: Any, work: Workload) -> list[Component]:
        """The adapters (float32) with gradients and Adam moments, the originals of every adapted
        weight (merged in after training), activations from the lowest adapted layer up."""
        s = Shapes.of(config)
        layers = hp.layers or tuple(range(s.layers))
        dims = [s.linear(k) for k in get_arch(config).resolve_kinds(hp.targets)]
        rank = hp.init_rank if isinstance(hp, AdaLoRAHParams) else hp.rank
        adapters = len(layers) * sum(rank * (i + o) for i, o in dims)
        weights = len(layers) * sum(i * o for i, o in dims)
        return [
            weight_copy(f"{len(layers) * len(dims)} adapted weights", weights, work.dtype_bytes),
            *trained(f"rank-{rank} adapters", adapters),
            activations(s, work, min(work.edits, hp.batch_size), s.layers - min(layers)),
        ]

    def _config(self, modules: list[str], hp: LoRAHParams, conv1d: bool):
        from peft import AdaLoraConfig, LoraConfig

        common = dict(
            target_modules=modules,
            lora_alpha=hp.alpha,
            lora_dropout=hp.dropout,
            fan_in_fan_out=conv1d,
            bias="none",
            task_type="CAUSAL_LM",
        )
        if not self.adaptive:
            return LoraConfig(r=hp.rank, **common)
        return AdaLoraConfig(
            init_r=hp.init_rank,
            target_r=hp.rank,
            tinit=hp.tinit,
            tfinal=hp.tfinal,
            deltaT=hp.delta_t,
            total_step=hp.steps,
            orth_reg_weight=hp.orth_reg_weight,
            **common,
        )

    def _apply(
        self, model: Any, tok: Any, requests: list[EditRequest], hp: LoRAHParams, prior=None
    ) -> WeightEdit:
        from peft import AdaLoraModel, LoraModel

        arch = get_arch(model)
        layers = hp.layers or tuple(range(arch.n_layers(model)))
        kinds = arch.resolve_kinds(hp.targets)
        modules = [arch.layer_path(layer, kind) for layer in layers for kind in kinds]
        rank = hp.init_rank if isinstance(hp, AdaLoRAHParams) else hp.rank
        peft = PeftExport(conv1d=arch.conv1d, max_rank=rank)
        names = [f"{m}.weight" for m in modules]
        result = WeightEdit.before(self.name, hp, model, names, [r.id for r in requests], peft=peft)
        config = self._config(modules, hp, arch.conv1d)
        flags = {p: p.requires_grad for p in model.parameters()}
        tuner = (AdaLoraModel if self.adaptive else LoraModel)(model, config, "default")
        try:
            diag = self._train(tuner, model, tok, arch, requests, hp)
            tuner.merge_and_unload()
        except BaseException:
            tuner.unload()  # take the adapters out again, unmerged
            result.restore()
            raise
        finally:
            for p, flag in flags.items():
                p.requires_grad_(flag)
            model.eval()
        result.diagnostics.append(diag)
        return result

    def _train(self, tuner, model, tok, arch, requests, hp: LoRAHParams) -> dict[str, Any]:
        device = input_device(model)
        chunks = [requests[i : i + hp.batch_size] for i in range(0, len(requests), hp.batch_size)]
        batches = [
            teacher_batch(tok, [r.prompt for r in c], [r.target_new for r in c]).to(device)
            for c in chunks
        ]
        params = [p for n, p in model.named_parameters() if "lora_" in n]
        opt = torch.optim.Adam(params, lr=hp.lr)
        _lora_dropout(model, training=True)
        losses, t0, step = [], time.perf_counter(), 0
        with torch.enable_grad():
            for _ in range(hp.steps):
                step_losses = []
                for batch in batches:
                    loss = target_nll(model, arch, batch)
                    step_losses.append(loss.item())
                    if self.adaptive:
                        loss = loss + hp.orth_reg_weight * _orth_penalty(model)
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    if self.adaptive:
                        tuner.update_and_allocate(step)
                    step += 1
                losses.append(sum(step_losses) / len(step_losses))
                if losses[-1] < hp.early_stop_loss:
                    break
        _lora_dropout(model, training=False)
        return {
            "requests": [r.id for r in requests],
            "losses": losses,
            "steps": len(losses),
            "train_seconds": time.perf_counter() - t0,
        }


def _lora_dropout(model, training: bool) -> None:
    """LoRA dropout on while training; the base model's own modules stay in eval mode."""
    for name, module in model.named_modules():
        if "lora_dropout" in name:
            module.train(training)


def _orth_penalty(model) -> torch.Tensor:
    """AdaLoRA's regulariser: ||P^T P - I||_F^2 + ||Q Q^T - I||_F^2 averaged over modules."""
    terms = []
    for n, p in model.named_parameters():
        if "lora_A" in n or "lora_B" in n:
            m = p @ p.T if "lora_A" in n else p.T @ p
            eye = torch.eye(m.shape[0], device=m.device, dtype=m.dtype)
            terms.append(((m - eye) ** 2).sum())
    return torch.stack(terms).mean()


class LoRA(_PeftEditor):
    name = "lora"
    hparams_class = LoRAHParams
    summary = "low-rank adapters on every layer's projections, merged after training (peft)"


class AdaLoRA(_PeftEditor):
    name = "adalora"
    hparams_class = AdaLoRAHParams
    adaptive = True
    summary = "LoRA with an importance-driven rank budget (AdaLoRA, peft)"
