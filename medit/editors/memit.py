"""MEMIT: Mass-Editing Memory in a Transformer (Meng et al., ICLR 2023), and AlphaEdit's base.

Many facts at once, spread over a range of MLP layers:

1. the target z (``locate.values.optimise_values``, ``layer_outputs_at``) — per request z = h + δ:
   the output of the range's last layer at the subject's last token, changed by δ so that the
   model states the target.
2. For each layer l of the range, lowest first, with the updates of the layers below applied:
   K (N, d_in) the requests' keys at l (averaged over context prefixes), R = z − h_now the
   residual still missing at the last layer, divided over the layers left: R_i = R / (L − i).
   ``layer_update``: ΔW = R_iᵀ K (λC + KᵀK)⁻¹ (float64), C = E[k kᵀ] over an offline corpus,
   λ = ``mom2_update_weight``.

Defaults: the paper's GPT-J preset (25 value steps at lr 0.5, weight decay 0.5, clamp 0.75·‖h‖,
KL 0.0625, 5 prefixes of 10 tokens) over five layers starting at 1/8 depth (EasyEdit's LLaMA-7B
range 4–8 of 32); λ = 15000 scaled by d_in / 16384 (see :func:`mom2_weight`).

Departure from MEMIT's code: the z of a batch are optimised in groups of requests
(:func:`value_groups`) whose activations kept for backward fit about the weights' bytes. The
requests' losses are independent, so the grouping changes no δ beyond float rounding (bitwise
equal on 4 built-in facts; 8e-6 relative in ΔW on 20, the size of changing the thread count).
In one group, 20 built-in facts on the default model peaked at 6.0 GB resident, 5 GB of it the
activations; in groups of two, at 1.5 GB (``benchmarks/bench_memory.py``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import torch

from medit.core.arch import ArchSpec, get_arch
from medit.core.errors import UserError
from medit.core.memory import Component, Shapes, Workload, grad_activation_bytes
from medit.core.models import solve_device
from medit.core.text import encode_pair
from medit.editors.base import Capabilities, Editor, check_layers, hp
from medit.editors.locate.common import KeyValueHParams, key_value_plan, second_moments
from medit.editors.locate.keys import fill, layer_outputs_at, request_keys
from medit.editors.locate.values import optimise_values
from medit.editors.results import WeightEdit
from medit.facts.requests import EditRequest
from medit.facts.subject import request_subjects


@dataclasses.dataclass(frozen=True)
class MEMITHParams(KeyValueHParams):
    layers: tuple[int, ...] = hp((), "layers edited; empty: `n_edit_layers` from `first_depth`")
    first_depth: float = hp(0.125, "relative depth of the first edited layer")
    n_edit_layers: int = hp(5, "number of consecutive layers edited (at most layers - 1)")
    mom2_update_weight: float = hp(
        -1.0,
        "λ, the weight of C against the new keys; -1: 15000 "
        "× d_in / 16384 (the GPT-J preset's λ per key dim)",
    )

    def __post_init__(self):
        super().__post_init__()
        self._at_least(1, "n_edit_layers")
        self._at_least(0, "layers")
        self._within("first_depth", 0.0, 1.0)

    def check_arch(self, arch: ArchSpec, n_layers: int | None) -> None:
        check_layers("layers", self.layers, n_layers)

    def resolve_layers(self, n_layers: int) -> tuple[int, ...]:
        if self.layers:
            bad = [layer for layer in self.layers if not 0 <= layer < n_layers]
            if bad:
                raise UserError(f"layers {bad} out of range: the model has {n_layers} layers")
            return tuple(sorted(set(self.layers)))
        count = min(self.n_edit_layers, max(1, n_layers - 1))
        first = min(round(self.first_depth * (n_layers - 1)), n_layers - count)
        return tuple(range(first, first + count))


class MEMIT(Editor):
    name = "memit"
    hparams_class = MEMITHParams
    capabilities = Capabilities(batch=True)
    summary = "batch key-value updates spread over a range of MLP layers (Meng et al. 2023)"

    def edited_modules(self, hp: MEMITHParams, arch: ArchSpec, n_layers: int) -> tuple[str, ...]:
        return tuple(arch.layer_path(layer, "mlp_out") for layer in hp.resolve_layers(n_layers))

    def memory_plan(self, hp: MEMITHParams, config: Any, work: Workload) -> list[Component]:
        s = Shapes.of(config)
        layers = hp.resolve_layers(s.layers)
        rows = hp.prefix_count * len(hp.prefix_lengths) + 2 if hp.prefix_count else 2
        seq = work.seq_len + (max(hp.prefix_lengths) if hp.prefix_count else 0)
        one = RequestShape(rows, seq, rows * work.target_len)
        groups = value_groups(s, [one] * work.edits, s.layers - layers[-1] - 1, work.dtype_bytes)
        group = max(g.stop - g.start for g in groups)
        return key_value_plan(hp, s, work, layers, layers[-1], value_edits=group)

    def _apply(
        self, model: Any, tok: Any, requests: list[EditRequest], hp: MEMITHParams, prior=None
    ) -> WeightEdit:
        arch = get_arch(model)
        layers = hp.resolve_layers(arch.n_layers(model))
        names = [arch.weight_name(layer, "mlp_out") for layer in layers]
        ids = [r.id for r in requests]
        result = WeightEdit.before(self.name, hp, model, names, ids, peft=hp.peft(arch))
        subjects = request_subjects(requests)
        templates = hp.templates(model, tok)
        z_layer = layers[-1]
        delta, info = self._values(model, tok, arch, z_layer, requests, subjects, templates, hp)
        z = layer_outputs_at(model, tok, arch, z_layer, requests, subjects) + delta
        ctx = self._context(model, tok, arch, layers, hp, requests, prior)
        residuals, keys = [], {}
        for i, (layer, name) in enumerate(zip(layers, names, strict=True)):
            K = request_keys(model, tok, arch, [layer], requests, subjects, templates)[layer]
            now = layer_outputs_at(model, tok, arch, z_layer, requests, subjects)
            residuals.append((z - now).norm(dim=-1).mean().item())  # before this layer's update
            update = self.layer_update(K, (z - now) / (len(layers) - i), layer, ctx, hp)
            W = result._params[name]
            with torch.no_grad():
                W.add_((update.T if arch.conv1d else update).to(W.device, W.dtype))
            keys[layer] = K
        now = layer_outputs_at(model, tok, arch, z_layer, requests, subjects)
        residuals.append((z - now).norm(dim=-1).mean().item())  # after the last update
        result.editor_state = self._state_after(keys, ctx)
        result.diagnostics.append(
            {
                "requests": [r.id for r in requests],
                "layers": list(layers),
                "templates": len(templates),
                "steps": info["value_steps"],
                "residual_norms": residuals,
                **info,
                **ctx.get("diag", {}),
            }
        )
        return result

    @staticmethod
    def _values(model, tok, arch, layer, requests, subjects, templates, hp: MEMITHParams):
        """δ (N, d) and the value diagnostics of ``optimise_values``, run on groups of requests
        (:func:`value_groups`) and joined as one run over all of them would report them."""
        shapes = [
            request_shape(tok, r, s, templates) for r, s in zip(requests, subjects, strict=True)
        ]
        dtype_bytes = next(model.parameters()).element_size()
        above = arch.n_layers(model) - layer - 1
        parts = [
            optimise_values(
                model, tok, arch, layer, requests[g], subjects[g], templates, hp.values()
            )
            for g in value_groups(Shapes.of(model.config), shapes, above, dtype_bytes)
        ]
        infos = [info for _, info in parts]
        joined = {k: sum((i[k] for i in infos), []) for k in ("value_nll", "value_nll_start")}
        return torch.cat([d for d, _ in parts]), {
            "value_steps": max(i["value_steps"] for i in infos),
            **joined,
            "delta_norm": sum((i["delta_norm"] for i in infos), []),
            "converged": all(i["converged"] for i in infos),
            "value_groups": len(parts),
        }

    def _context(self, model, tok, arch, layers, hp: MEMITHParams, requests, prior) -> dict:
        """What every layer's update needs: C = E[k kᵀ] per layer."""
        return {"C": second_moments(model, tok, arch, layers, hp, requests)}

    def _state_after(self, keys: dict[int, torch.Tensor], ctx: dict) -> dict[str, torch.Tensor]:
        """The editor state later sequential edits read (none for MEMIT; AlphaEdit's keys)."""
        return {}

    @staticmethod
    def layer_update(K, resid, layer: int, ctx: dict, hp: MEMITHParams) -> torch.Tensor:
        """ΔW (d_out, d_in) = residᵀ K (λC + KᵀK)⁻¹ for keys K (N, d_in), residuals (N, d_out)."""
        device = solve_device(K)
        K64, R64 = K.to(device, torch.float64), resid.to(device, torch.float64)
        A = mom2_weight(hp, K.shape[1]) * ctx["C"][layer].to(device) + K64.T @ K64
        return (R64.T @ torch.linalg.solve(A, K64.T).T).float().to(K.device)


def mom2_weight(hp: MEMITHParams, d_in: int) -> float:
    """λ: as given, or MEMIT's GPT-J value scaled to the key dimension. λC + KᵀK weighs the
    corpus against the new keys, and a key's Mahalanobis norm kᵀC⁻¹k grows with d_in, so a fixed
    λ = 15000 (tuned for d_in = 16384) leaves a 1536-wide MLP almost unedited."""
    return hp.mom2_update_weight if hp.mom2_update_weight > 0 else 15000.0 * d_in / 16384


# -- the value optimisation in groups of requests ------------------------------------------------
#: the activations one group of the value optimisation keeps for backward are held under this
#: multiple of the weights' bytes (as the config gives them; at least one request a group)
VALUE_ACTIVATIONS_PER_WEIGHT = 1.0


@dataclasses.dataclass(frozen=True)
class RequestShape:
    """What one request adds to the value optimisation's batch."""

    rows: int  #: prompts (one per context template, plus the KL prompt)
    seq_len: int  #: tokens of its longest prompt + target
    scored: int  #: positions the output head runs at (the targets' tokens, the KL positions)


def request_shape(
    tok: Any, req: EditRequest, subject: str, templates: Sequence[str]
) -> RequestShape:
    """The prompts ``optimise_values`` builds for ``req``, tokenised as its batch is."""
    texts = [fill(t, req.prompt)[0] for t in templates] + [f"{subject} is a"]
    pairs = [encode_pair(tok, text, req.target_new) for text in texts]
    seq = max(len(p) + len(t) for p, t in pairs)
    return RequestShape(len(pairs), seq, sum(len(t) for _, t in pairs) + 1)


def value_groups(
    s: Shapes, shapes: Sequence[RequestShape], layers: int, dtype_bytes: int
) -> list[slice]:
    """Consecutive requests grouped so that each group's activations through the ``layers``
    layers above the value's (:func:`medit.core.memory.grad_activation_bytes`, padded to the
    group's longest prompt) stay under ``VALUE_ACTIVATIONS_PER_WEIGHT`` x the weights' bytes."""
    budget = VALUE_ACTIVATIONS_PER_WEIGHT * weight_bytes(s, dtype_bytes)

    def cost(group: Sequence[RequestShape]) -> int:
        rows, seq = sum(g.rows for g in group), max(g.seq_len for g in group)
        return grad_activation_bytes(
            s, rows, seq, layers, dtype_bytes, sum(g.scored for g in group)
        )

    groups, start = [], 0
    for end in range(1, len(shapes) + 1):
        if end - start > 1 and cost(shapes[start:end]) > budget:
            groups.append(slice(start, end - 1))
            start = end - 1
    return [*groups, slice(start, len(shapes))]


def weight_bytes(s: Shapes, dtype_bytes: int) -> int:
    """The bytes of a decoder's weights from its shapes: the embedding and per layer the
    attention's and the MLP's projections (norms, biases and an untied head left out)."""
    mlp = (3 if s.gated else 2) * s.d * s.ff
    return (s.vocab * s.d + s.layers * (2 * s.d * s.d + 2 * s.d * s.kv + mlp)) * dtype_bytes
