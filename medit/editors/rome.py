"""ROME: Rank-One Model Editing (Meng et al., NeurIPS 2022).

One fact, one layer: the MLP output projection W of the layer found by causal tracing is read as
a linear key-value memory, and a rank-one update makes it map the subject's key to a new value.

1. the key (``locate.keys.template_keys``) — k* (d_in): the input of W at the subject's last token, averaged over the
   prompt and sampled context prefixes (eq. 3).
2. the value (``locate.values.optimise_values``) — δ (d): the change of the layer's output at the subject's last token that
   makes the model state the target (NLL + KL on "{subject} is a" + weight decay, clamped,
   eq. 4), so that v* = W k* + δ.
3. ``rank_one_update`` — W' = W + Λ (C⁻¹k̄)ᵀ with Λ = (v* − W k*) / ((C⁻¹k̄)ᵀ k*) (eq. 2),
   C = E[k kᵀ] of the layer's keys over an offline corpus (``mom2_adjustment``; off: C = I),
   k̄ the key averaged over prefixes and k* the prompt's own key (as ROME's implementation
   normalises Λ). Then W' k* = v* exactly, and any key k with (C⁻¹k̄)ᵀ k = 0 is mapped as
   before.

Defaults: the paper's GPT-2 XL preset (20 value steps at lr 0.5, weight decay 0.5, clamp 4·‖v0‖
on the MLP output, KL 0.0625, prefixes 10 × 5 and 10 × 10 tokens), mom2 adjustment on (the
covariance is cheap here), and the layer chosen by causal tracing of the model: the largest
average indirect effect of the MLP at the subject's last token over built-in medical facts.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any, ClassVar

import torch

from medit.core.arch import ArchSpec, get_arch
from medit.core.errors import UserError
from medit.core.memory import Component, Shapes, Workload, no_grad_forward
from medit.editors.base import Capabilities, Defaults, Editor, check_layers, hp
from medit.editors.locate.common import (
    KeyValueHParams,
    key_value_plan,
    second_moments,
    traced_layer,
)
from medit.editors.locate.keys import template_keys
from medit.editors.locate.values import optimise_values
from medit.editors.results import WeightEdit
from medit.facts.requests import EditRequest
from medit.facts.subject import request_subjects


@dataclasses.dataclass(frozen=True)
class ROMEHParams(KeyValueHParams):
    layer: int = hp(-1, "layer edited; -1: chosen by `layer_selection`")
    layer_selection: str = hp(
        "trace", "the layer by causal tracing of the model, or by depth", choices=("trace", "depth")
    )
    layer_depth: float = hp(0.16, "relative depth of the layer with layer_selection='depth'")
    trace_prompts: int = hp(8, "built-in facts traced to choose the layer (cached per model)")
    mom2_adjustment: bool = hp(True, "use C⁻¹k* as the update direction (off: k*)")
    prefix_lengths: tuple[int, ...] = hp((5, 10), "token lengths of the sampled context prefixes")
    prefix_count: int = hp(
        2,
        "prefixes sampled per length (plus the bare prompt); the paper: 10 (21 templates), "
        "which on MedCF validation edits no better and takes ~3x longer",
    )
    v_steps: int = hp(20, "Adam steps of the value optimisation")
    clamp_norm_factor: float = hp(4.0, "||δ|| is clamped to this multiple of ||v0||")

    value_anchor: ClassVar[str] = "mlp"  # ROME measures δ against the MLP output it replaces

    DEFAULTS = (
        Defaults(
            {"layer_depth": 0.35}, "ROME: layer 17 of GPT-2 XL's 48 (without tracing)", "gpt2"
        ),
        Defaults(
            {"layer_depth": 0.16}, "EasyEdit: layer 5 of LLaMA-7B's 32 (without tracing)", "llama"
        ),
    )

    def __post_init__(self):
        super().__post_init__()
        self._at_least(-1, "layer")
        self._at_least(1, "trace_prompts")
        self._within("layer_depth", 0.0, 1.0)

    def check_arch(self, arch: ArchSpec, n_layers: int | None) -> None:
        if self.layer >= 0:
            check_layers("layer", self.layer, n_layers)


class ROME(Editor):
    name = "rome"
    hparams_class = ROMEHParams
    capabilities = Capabilities(batch=True)
    summary = "rank-one update of one MLP projection at the traced layer (Meng et al. 2022)"

    def edited_modules(self, hp: ROMEHParams, arch: ArchSpec, n_layers: int) -> tuple[str, ...]:
        """The given layer's mlp_out; with causal tracing, every layer's (any may be chosen)."""
        if hp.layer >= 0:
            layers: Sequence[int] = (hp.layer,)
        elif hp.layer_selection == "depth":
            layers = (round(hp.layer_depth * (n_layers - 1)),)
        else:
            layers = range(n_layers)
        return tuple(arch.layer_path(layer, "mlp_out") for layer in layers)

    def memory_plan(self, hp: ROMEHParams, config: Any, work: Workload) -> list[Component]:
        """One request at a time; with causal tracing the layer is unknown before the edit, so
        the value optimisation is counted from layer 0 (the most layers above it) and the
        tracing forwards (``max_batch_tokens``) are a step of their own."""
        s = Shapes.of(config)
        one = dataclasses.replace(work, edits=1)
        if hp.layer < 0 and hp.layer_selection == "trace":
            rows = max(1, 16384 // work.seq_len)
            trace = no_grad_forward(s, work, rows, work.seq_len, "causal tracing", "trace", False)
            return [*key_value_plan(hp, s, one, [0], 0), trace]
        layer = hp.layer if hp.layer >= 0 else round(hp.layer_depth * (s.layers - 1))
        return key_value_plan(hp, s, one, [layer], layer)

    def _apply(
        self, model: Any, tok: Any, requests: list[EditRequest], hp: ROMEHParams, prior=None
    ) -> WeightEdit:
        """Several requests are edited one after another, each a rank-one update on the weights
        the previous ones left (as ROME's own code applies a list of requests)."""
        arch = get_arch(model)
        layer, trace_profile = self._layer(model, tok, arch, hp)
        name = arch.weight_name(layer, "mlp_out")
        ids = [r.id for r in requests]
        result = WeightEdit.before(self.name, hp, model, [name], ids, peft=hp.peft(arch))
        templates = hp.templates(model, tok)
        for req, subject in zip(requests, request_subjects(requests), strict=True):
            keys = template_keys(model, tok, arch, [layer], [req], [subject], templates)[layer][0]
            k_star, k_mean = keys[0], keys.mean(0)  # templates[0] is the bare prompt "{}"
            delta, info = optimise_values(
                model, tok, arch, layer, [req], [subject], templates, hp.values()
            )
            C = (
                second_moments(model, tok, arch, [layer], hp, [req])[layer]
                if hp.mom2_adjustment
                else None
            )
            update = rank_one_update(k_star, delta[0], C, k_mean)
            W = result._params[name]
            with torch.no_grad():
                W.add_((update.T if arch.conv1d else update).to(W.device, W.dtype))
            result.diagnostics.append(
                {
                    "requests": [req.id],
                    "layer": layer,
                    "subject": subject,
                    "templates": len(templates),
                    "steps": info["value_steps"],
                    **info,
                    "trace_profile": trace_profile,
                }
            )
        return result

    @staticmethod
    def _layer(model, tok, arch, hp: ROMEHParams) -> tuple[int, list[float] | None]:
        n = arch.n_layers(model)
        if hp.layer >= 0:
            if hp.layer >= n:
                raise UserError(f"layer {hp.layer} out of range: the model has {n} layers")
            return hp.layer, None
        if hp.layer_selection == "trace":
            return traced_layer(model, tok, arch, hp.trace_prompts)
        return round(hp.layer_depth * (n - 1)), None


def rank_one_update(
    k_star: torch.Tensor,
    delta: torch.Tensor,
    C: torch.Tensor | None,
    k_mean: torch.Tensor | None = None,
) -> torch.Tensor:
    """ΔW (d_out, d_in) = Λ uᵀ with u = C⁻¹k̄ and Λ = δ / (uᵀ k*): so ΔW k* = δ (the prompt's
    own key is mapped to v* = W k* + δ exactly) and ΔW k = 0 for every k with uᵀk = 0. ``k_mean``
    (k̄, the key averaged over context prefixes) sets the direction; default k*. float64."""
    k = k_star.double().cpu()
    kbar = k if k_mean is None else k_mean.double().cpu()
    u = torch.linalg.solve(C.double(), kbar) if C is not None else kbar  # C⁻¹ k̄  (d_in,)
    lam = delta.double().cpu() / (u @ k)  # (d_out,)
    return torch.outer(lam, u).float().to(delta.device)
