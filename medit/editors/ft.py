"""Constrained fine-tuning baselines: FT-L and FT-M.

Both train the weight of one module kind (default: the MLP output projection) in a few decoder
layers with Adam, everything else frozen.

* **FT-L** (Zhu et al. 2020, as used in the ROME paper): every target token is read at the *last
  prompt position* (``objective="prompt_last"``) and the weight change is kept inside an L-inf
  ball around the original (``norm_constraint``).
* **FT-M** (EasyEdit): masked cross-entropy on the target tokens under teacher forcing
  (``objective="target_new"``). The labels include the first target token (the MedLaSA code masks
  it out by mistake).

Speed: only layers >= the lowest trained layer change, so the hidden state entering that layer is
computed once per batch and each step runs the remaining layers only (``hooks.frozen_prefix``).
Training stops early once the loss is below ``early_stop_loss``.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import torch

from medit.core.arch import ArchSpec, get_arch
from medit.core.errors import UserError
from medit.core.forward import logits_at, per_sequence_mean, target_nll
from medit.core.hooks import capture_input, frozen_prefix, trainable_only
from medit.core.memory import Component, Shapes, Workload, activations, trained, weight_copy
from medit.core.text import TeacherBatch, teacher_batch
from medit.editors.base import (
    Capabilities,
    Defaults,
    Editor,
    HParams,
    check_kinds,
    check_layers,
    hp,
)
from medit.editors.results import WeightEdit
from medit.facts.requests import EditRequest


@dataclasses.dataclass(frozen=True)
class FTHParams(HParams):
    layers: tuple[int, ...] = hp((), "decoder layers to train; empty: the layer at `layer_depth`")
    layer_depth: float = hp(0.66, "relative depth of the default layer (0 first, 1 last)")
    module: str = hp("mlp_out", "module kind trained in each layer (see medit.core.arch)")
    objective: str = hp(
        "target_new", "loss: FT-M's target tokens, or FT-L's", choices=("target_new", "prompt_last")
    )
    steps: int = hp(25, "maximum optimisation steps (EasyEdit default)")
    lr: float = hp(5e-4, "Adam learning rate (EasyEdit default)")
    weight_decay: float = hp(0.0, "Adam weight decay")
    norm_constraint: float = hp(0.0, "L-inf bound on each weight's change; 0 = unconstrained")
    early_stop_loss: float = hp(1e-2, "stop once the mean target loss is below this")
    batch_size: int = hp(16, "requests per optimisation step in batch mode")

    DEFAULTS = (
        Defaults({"layer_depth": 0.66}, "EasyEdit's FT preset: layer 21 of LLaMA-7B's 32", "llama"),
        Defaults({"layer_depth": 0.66}, "the same relative depth as for LLaMA", "gpt2"),
    )

    def __post_init__(self):
        super().__post_init__()
        self._at_least(1, "steps", "batch_size")
        self._at_least(0, "layers", "weight_decay", "norm_constraint")
        self._positive("lr")
        self._within("layer_depth", 0.0, 1.0)

    def check_arch(self, arch: ArchSpec, n_layers: int | None) -> None:
        check_layers("layers", self.layers, n_layers)
        check_kinds("module", (self.module,), arch, fused=False)

    def resolve_layers(self, n_layers: int) -> tuple[int, ...]:
        layers = self.layers or (round(self.layer_depth * (n_layers - 1)),)
        bad = [layer for layer in layers if not 0 <= layer < n_layers]
        if bad:
            raise UserError(f"layers {bad} out of range: the model has {n_layers} layers")
        return tuple(sorted(set(layers)))


@dataclasses.dataclass(frozen=True)
class FTLHParams(FTHParams):
    objective: str = hp("prompt_last", "'target_new' (FT-M) or 'prompt_last' (FT-L)")
    norm_constraint: float = hp(5e-4, "L-inf bound on each weight's change (ROME's FT-L: 5e-4)")


class FineTune(Editor):
    """Shared implementation of FT-L and FT-M."""

    capabilities = Capabilities(batch=True)

    def edited_modules(self, hp: FTHParams, arch: ArchSpec, n_layers: int) -> tuple[str, ...]:
        return tuple(arch.layer_path(layer, hp.module) for layer in hp.resolve_layers(n_layers))

    def memory_plan(self, hp: FTHParams, config: Any, work: Workload) -> list[Component]:
        """The trained weights' originals, gradients and Adam moments; the activations of the
        layers from the lowest trained one up (the ones below run once, without grad)."""
        s = Shapes.of(config)
        layers = hp.resolve_layers(s.layers)
        d_in, d_out = s.linear(hp.module)
        what, numel = f"{len(layers)} x {hp.module}", len(layers) * d_in * d_out
        return [
            weight_copy(what, numel, work.dtype_bytes),
            *trained(what, numel, bytes_per=work.dtype_bytes, own=False),
            activations(s, work, min(work.edits, hp.batch_size), s.layers - layers[0]),
        ]

    def _apply(
        self, model: Any, tok: Any, requests: list[EditRequest], hp: FTHParams, prior=None
    ) -> WeightEdit:
        arch = get_arch(model)
        layers = hp.resolve_layers(arch.n_layers(model))
        names = [arch.weight_name(layer, hp.module) for layer in layers]
        result = WeightEdit.before(self.name, hp, model, names, [r.id for r in requests])
        params = [result._params[n] for n in names]
        device = params[0].device
        chunks = [
            teacher_batch(tok, [r.prompt for r in chunk], [r.target_new for r in chunk]).to(device)
            for chunk in _chunks(requests, hp.batch_size)
        ]
        start_layer = layers[0]
        entering = [_entering_hidden(model, arch, start_layer, b) for b in chunks]
        with trainable_only(model, params):
            opt = torch.optim.Adam(params, lr=hp.lr, weight_decay=hp.weight_decay)
            losses, t0, converged = [], time.perf_counter(), False
            for _ in range(hp.steps):
                step_losses = []
                for batch, hidden in zip(chunks, entering, strict=True):
                    with frozen_prefix(model, arch, start_layer, hidden):
                        loss = self._loss(model, arch, batch, hp.objective)
                    step_losses.append(loss.item())
                    if loss.item() < hp.early_stop_loss:
                        continue
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    if hp.norm_constraint > 0:
                        _clamp(params, [result.originals[n] for n in names], hp.norm_constraint)
                losses.append(sum(step_losses) / len(step_losses))
                if losses[-1] < hp.early_stop_loss:
                    converged = True
                    break
        result.diagnostics.append(
            {
                "requests": [r.id for r in requests],
                "layers": list(layers),
                "losses": losses,
                "steps": len(losses),
                "converged": converged,
                "train_seconds": time.perf_counter() - t0,
            }
        )
        return result

    @staticmethod
    def _loss(model: Any, arch, batch: TeacherBatch, objective: str) -> torch.Tensor:
        if objective == "target_new":
            return target_nll(model, arch, batch)
        # prompt_last: every target token is predicted from the last prompt position
        logp = torch.log_softmax(logits_at(model, arch, batch, at_prompt_end=True).float(), -1)
        token_lp = logp[batch.owner, batch.labels]
        return -per_sequence_mean(token_lp, batch).mean()


class FTM(FineTune):
    name = "ft-m"
    hparams_class = FTHParams
    summary = "fine-tuning with masked cross-entropy on the target tokens (EasyEdit FT-M)"


class FTL(FineTune):
    name = "ft-l"
    hparams_class = FTLHParams
    summary = "constrained fine-tuning, targets read at the last prompt token (Zhu et al. 2020)"


def _chunks(items: list, size: int) -> list[list]:
    return [items[i : i + size] for i in range(0, len(items), size)]


@torch.no_grad()
def _entering_hidden(model, arch, layer: int, batch: TeacherBatch) -> torch.Tensor:
    """The hidden state entering ``layer`` for this batch (constant while layers >= it train)."""
    base = arch.base_model(model)
    return capture_input(
        arch.module(model, layer),
        lambda: base(
            input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False
        ),
    )


@torch.no_grad()
def _clamp(params, originals, eps: float) -> None:
    for p, orig in zip(params, originals, strict=True):
        p.copy_(torch.maximum(torch.minimum(p, orig + eps), orig - eps))
