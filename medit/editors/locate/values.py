"""Values of the locate-then-edit editors: the residual that makes the model state a new target.

:func:`optimise_values` finds δ added at the subject's last token of a layer's output that makes
the model state the new target: NLL of the target over the templated prompts + ``kl_factor`` ·
KL(new ‖ old) of the next token after "{subject} is a" + weight decay, the norm of δ clamped to
``clamp_norm_factor`` × the norm of the value it is added to, Adam, early stop (ROME eq. 4;
MEMIT's z). Layers below the edited one cannot change, so their output is computed once and every
step runs only the layers above (``hooks.frozen_prefix``).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from typing import Any

import torch

from medit.core.arch import ArchSpec, get_module
from medit.core.forward import per_sequence_mean
from medit.core.hooks import edited_outputs, frozen_prefix, record, trainable_only
from medit.core.placement import input_device
from medit.core.text import right_padded, teacher_batch
from medit.editors.locate.keys import subject_last
from medit.facts.requests import EditRequest
from medit.facts.subject import subject_tokens

log = logging.getLogger(__name__)


# -- values --------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class ValueSettings:
    steps: int  #: Adam steps on δ
    lr: float  #: Adam learning rate
    weight_decay: float  #: weight of ||δ|| / ||v0||^2
    clamp_norm_factor: float  #: ||δ|| <= factor * ||v0||
    kl_factor: float  #: weight of the KL term on "{subject} is a"
    early_stop_loss: float = 5e-2  #: stop once the target NLL is below this (ROME: 5e-2)
    anchor: str = "mlp"  #: v0, the value δ is measured against: "mlp" output or "layer" output


def optimise_values(
    model: Any,
    tok: Any,
    arch: ArchSpec,
    layer: int,
    requests: Sequence[EditRequest],
    subjects: Sequence[str],
    templates: Sequence[str],
    vs: ValueSettings,
) -> tuple[torch.Tensor, dict[str, Any]]:
    """δ (N, d) for each request, added to the output of decoder ``layer`` at the subject's last
    token of every templated prompt and of its KL prompt. Requests are optimised together, each
    with its own δ, clamp and early stop (their losses are independent)."""
    n, t_count = len(requests), len(templates)
    prompts, targets, positions, owner = [], [], [], []
    for i, (req, subj) in enumerate(zip(requests, subjects, strict=True)):
        for template in templates:
            text, pos = subject_last(tok, template, req, subj)
            prompts.append(text), targets.append(req.target_new), positions.append(pos)
            owner.append(i)
    for i, subj in enumerate(subjects):  # KL prompts, one per request, after the rewrites
        kl = f"{subj} is a"
        prompts.append(kl), targets.append(requests[i].target_new)
        positions.append(subject_tokens(tok, kl, subj)[1] - 1), owner.append(i)
    device = input_device(model)
    batch = right_padded(tok, lambda: teacher_batch(tok, prompts, targets)).to(device)
    rows = torch.arange(len(prompts), device=device)
    pos = torch.tensor(positions, device=device)
    owner_t = torch.tensor(owner, device=device)
    entering, v0 = _frozen_state(model, arch, layer, batch, rows[: n * t_count : t_count], pos, vs)
    n_layers = arch.n_layers(model)
    delta = torch.zeros(n, entering.shape[-1], device=device, requires_grad=True)
    opt = torch.optim.Adam([delta], lr=vs.lr)
    max_norm = vs.clamp_norm_factor * v0.norm(dim=-1)
    v0_sq = v0.norm(dim=-1) ** 2
    kl_rows = rows[n * t_count :]
    done = torch.zeros(n, dtype=torch.bool, device=device)
    kl_init, history = None, []
    with torch.enable_grad(), trainable_only(model, []):  # δ is the only leaf that takes gradients
        for _step in range(vs.steps):
            hidden = entering.index_put(
                (rows, pos), delta[owner_t].to(entering.dtype), accumulate=True
            )
            final = _run_from(model, arch, layer + 1, n_layers, hidden, batch)
            logp = torch.log_softmax(arch.head(model, final[batch.rows, batch.cols]).float(), -1)
            tok_nll = -logp.gather(1, batch.labels[:, None]).squeeze(1)
            # the KL prompts' own target rows are scored too (a few tokens) and left out here
            nll = per_sequence_mean(tok_nll, batch)[: n * t_count].view(n, t_count).mean(1)
            kl_logp = torch.log_softmax(
                arch.head(model, final[kl_rows, batch.prompt_last[kl_rows]]).float(), -1
            )
            if kl_init is None:
                kl_init = kl_logp.detach()
            kl = (kl_logp.exp() * (kl_logp - kl_init)).sum(-1)
            decay = vs.weight_decay * delta.norm(dim=-1) / v0_sq
            history.append(nll.detach().cpu().tolist())
            done |= nll.detach() < vs.early_stop_loss
            if bool(done.all()):
                break
            loss = (nll + vs.kl_factor * kl + decay)[~done].sum()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            frozen = delta.detach()[done].clone()
            opt.step()
            with torch.no_grad():
                delta[done] = frozen
                scale = (max_norm / delta.norm(dim=-1).clamp_min(1e-12)).clamp(max=1.0)
                delta.mul_(scale[:, None])
    info = {
        "value_steps": len(history),
        "value_nll": history[-1] if history else [],
        "value_nll_start": history[0] if history else [],
        "delta_norm": delta.detach().norm(dim=-1).tolist(),
        "converged": bool(done.all()),
    }
    return delta.detach(), info


@torch.no_grad()
def _frozen_state(model, arch, layer, batch, plain_rows, pos, vs: ValueSettings):
    """(output of ``layer`` for the whole batch, v0 at each request's plain prompt)."""
    store: list[torch.Tensor] = []
    mlp = arch.module(model, layer, "mlp")
    with edited_outputs(
        [(arch.module(model, layer), lambda t: record(store, t)), (mlp, lambda t: record(store, t))]
    ):
        arch.base_model(model)(
            input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False
        )
    mlp_out, layer_out = store[0], store[1]  # the MLP runs inside the layer, so it comes first
    v0 = (mlp_out if vs.anchor == "mlp" else layer_out)[plain_rows, pos[plain_rows]].float()
    return layer_out.detach(), v0


def _run_from(model, arch: ArchSpec, start: int, n_layers: int, hidden, batch) -> torch.Tensor:
    """Final hidden states (after the final norm) given the state entering layer ``start``."""
    if start >= n_layers:
        return get_module(model, arch.final_norm)(hidden)
    with frozen_prefix(model, arch, start, hidden):
        out = arch.base_model(model)(
            input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False
        )
    return out.last_hidden_state
