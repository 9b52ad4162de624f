"""UltraEdit (Gu et al., "UltraEdit: Training-, Subject-, and Memory-Free Lifelong Editing in
Large Language Models", 2025): a closed-form update of a few MLP projections per turn, from the
turn's hidden states and gradients, with normalisation statistics carried across turns.

One turn (one ``apply``: the requests given together; one request per turn in sequential mode):

1. **rows**: for each request, the positions that predict its target tokens under teacher
   forcing (the paper's ``token: ans``); requests sorted longest first and run in mini-batches of
   ``batch_size`` on the model as it stands at the start of the turn;
2. **keys and gradients**: per edited module, its input k at those rows and g = dL/d(output),
   L the mean cross-entropy of the mini-batch's target tokens (one forward and one backward; no
   weight gets a gradient);
3. **lifelong normalisation**: running mean and sum of squared deviations of [k; g], one pair per
   weight shape (the paper pools modules of one shape), merged per mini-batch and module with
   Chan's exact parallel formula, never reset. They are the edit's ``editor_state``: sequential
   edits, checkpoints and artifacts carry them, so a resumed run continues bit for bit;
4. **update**: with k^, g^ the normalised rows, the value shift v = -lr * |k^|^2 * g^ (a gradient
   step's effect on the output, in normalised units) and, per module,
   ΔW = solve(KᵀK + λI, KᵀV)ᵀ over the turn's raw keys K (float64), all modules at once.

Nothing else is kept: no subject, no covariance, no memory of earlier edits (the title's three
"free"s). Modules: the paper's Llama-3-8B choice (gate_proj of layers 11-15 and up_proj of
18-24 of 32) at the same relative depths; for MLPs without a gate, its GPT-J choice (the output
projection of layers 18-26 of 28).

Deviations, said once: the statistics are float64 with an exact merge (the reference's float32
merge weighs a mini-batch's variance by b instead of b - 1 and turns a one-row mini-batch into
NaN for good); the update is float64 on CPU. ``iters`` repeats the turn on the updated model
(1: the paper).
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F

from medit.core.arch import ArchSpec, get_arch, get_module
from medit.core.errors import UserError
from medit.core.forward import logits_at
from medit.core.hooks import hooked, output_tensor, trainable_only, with_output_tensor
from medit.core.models import solve_device
from medit.core.placement import input_device
from medit.core.text import teacher_batch
from medit.editors.base import Capabilities, Editor, HParamError, HParams, check_layers, hp
from medit.editors.results import PeftExport, WeightEdit
from medit.facts.requests import EditRequest

#: the paper's modules for Llama-3-8B (32 layers) and GPT-J (28 layers)
_GATED = (("gate", range(11, 16), 32), ("up", range(18, 25), 32))
_PLAIN = (("mlp_out", range(18, 27), 28),)
#: float32's epsilon, the reference's guard on the standard deviation
EPS = float(torch.finfo(torch.float32).eps)


@dataclasses.dataclass(frozen=True)
class UltraEditHParams(HParams):
    modules: tuple[str, ...] = hp(
        (), "edited modules as 'kind:layer' (e.g. 'gate:10'); empty: the paper's at its depths"
    )
    lr: float = hp(1e-6, "step size of the value shift -lr·|k^|²·g^ (the paper's 1e-6)")
    ridge: float = hp(1.0, "λ of the solve (KᵀK + λI), in raw key units (the paper's 1)")
    batch_size: int = hp(10, "requests per forward/backward within a turn (the paper's 10)")
    iters: int = hp(
        1, "passes over the turn at most, each on the model the last one updated (1: the paper)"
    )
    stop_loss: float = hp(0.0, "no further pass once the turn's mean target loss is below this")
    preset: str = hp(
        "default",
        "default: the paper's values for now (no step size measured on MedCF validation both "
        "edits and keeps locality on a small model yet); paper: UltraEdit's own, pinned "
        "(lr 1e-6, λ 1, one pass)",
        ("default", "paper"),
    )

    PRESETS = {"default": {}, "paper": {"lr": 1e-6, "ridge": 1.0, "iters": 1}}
    NO_DEFAULTS = ("paper",)

    def __post_init__(self):
        super().__post_init__()
        self._positive("lr")
        self._at_least(0, "ridge", "stop_loss")
        self._at_least(1, "batch_size", "iters")
        for m in self.modules:
            kind, _, layer = m.partition(":")
            if not kind or not layer.isdigit():
                raise HParamError("modules", f"entries are 'kind:layer', got {m!r}")

    @property
    def named_modules(self) -> list[tuple[str, int]]:
        """``modules`` as (kind, layer) pairs."""
        return [(k, int(layer)) for k, _, layer in (m.partition(":") for m in self.modules)]

    def resolve(self, arch: ArchSpec, n_layers: int) -> list[tuple[str, int]]:
        """(kind, layer) of every edited module, in the order the paper lists them."""
        if self.modules:
            out = self.named_modules
        else:
            pattern = _GATED if "gate" in arch.kinds else _PLAIN
            out = []
            for kind, layers, depth in pattern:
                for layer in layers:
                    at = min(n_layers - 1, round(layer * n_layers / depth))
                    if (kind, at) not in out:
                        out.append((kind, at))
        for kind, layer in out:
            if kind not in arch.kinds:
                raise UserError(
                    f"ultraedit: module kind {kind!r} is not in this architecture "
                    f"(it has: {', '.join(sorted(arch.kinds))})"
                )
            if not 0 <= layer < n_layers:
                raise UserError(f"ultraedit: layer {layer} out of range (the model has {n_layers})")
        return out

    def check_arch(self, arch: ArchSpec, n_layers: int | None) -> None:
        check_layers("modules", tuple(layer for _, layer in self.named_modules), n_layers)


def _shape_key(shape: tuple[int, int]) -> str:
    return f"{shape[0]}x{shape[1]}"


class RunningStats:
    """Count, mean and sum of squared deviations (float64) of the [key; gradient] rows seen so
    far, one set per weight shape; merged with Chan's exact parallel formula."""

    def __init__(self, state: dict[str, torch.Tensor] | None = None):
        self.state = {k: v.clone() for k, v in (state or {}).items() if k.startswith("ultraedit.")}

    def _get(self, shape, width: int):
        key = _shape_key(shape)
        names = [f"ultraedit.{key}.{part}" for part in ("n", "mean", "m2")]
        if names[0] not in self.state:
            self.state[names[0]] = torch.zeros((), dtype=torch.float64)
            self.state[names[1]] = torch.zeros(width, dtype=torch.float64)
            self.state[names[2]] = torch.zeros(width, dtype=torch.float64)
        return names

    def update(self, shape, rows: torch.Tensor) -> None:
        rows = rows.detach().to("cpu", torch.float64)
        n_key, mean_key, m2_key = self._get(shape, rows.shape[1])
        n, mean, m2 = self.state[n_key], self.state[mean_key], self.state[m2_key]
        b = rows.shape[0]
        batch_mean = rows.mean(0)
        batch_m2 = ((rows - batch_mean) ** 2).sum(0)
        total = n + b
        delta = batch_mean - mean
        self.state[mean_key] = mean + delta * (b / total)
        self.state[m2_key] = m2 + batch_m2 + delta**2 * (n * b / total)
        self.state[n_key] = total

    def normalise(self, shape, rows: torch.Tensor) -> torch.Tensor:
        n_key, mean_key, m2_key = self._get(shape, rows.shape[1])
        n = self.state[n_key]
        var = self.state[m2_key] / (n - 1) if n > 1 else torch.zeros_like(self.state[m2_key])
        return (rows.to(torch.float64) - self.state[mean_key]) / (var.sqrt() + EPS)


class UltraEdit(Editor):
    name = "ultraedit"
    hparams_class = UltraEditHParams
    capabilities = Capabilities(batch=True)
    summary = "closed-form lifelong update from hidden states and gradients (Gu et al. 2025)"

    def edited_modules(
        self, hp: UltraEditHParams, arch: ArchSpec, n_layers: int
    ) -> tuple[str, ...]:
        return tuple(arch.layer_path(layer, kind) for kind, layer in hp.resolve(arch, n_layers))

    def _apply(self, model, tok, requests: list[EditRequest], hp: UltraEditHParams, prior=None):
        arch = get_arch(model)
        targets = hp.resolve(arch, arch.n_layers(model))
        names = [arch.weight_name(layer, kind) for kind, layer in targets]
        result = WeightEdit.before(
            self.name, hp, model, names, [r.id for r in requests], peft=PeftExport(arch.conv1d)
        )
        stats = RunningStats(prior.editor_state if prior is not None else None)
        modules = [get_module(model, arch.layer_path(layer, kind)) for kind, layer in targets]
        shapes = [tuple(result._params[n].shape) for n in names]
        order = sorted(range(len(requests)), key=lambda i: -len(requests[i].target_new))
        diagnostics = []
        for _ in range(hp.iters):
            keys, grads, losses = _turn(model, tok, arch, modules, requests, order, hp)
            if diagnostics and sum(losses) / len(losses) < hp.stop_loss:
                diagnostics.append({"loss": losses, "stopped": True})
                break
            for batch_keys, batch_grads in zip(keys, grads, strict=True):
                for j, shape in enumerate(shapes):
                    stats.update(shape, torch.cat([batch_keys[j], batch_grads[j]], dim=1))
            norms = {}
            for j, (name, shape) in enumerate(zip(names, shapes, strict=True)):
                K = torch.cat([k[j] for k in keys])
                G = torch.cat([g[j] for g in grads])
                delta = _update(K, stats.normalise(shape, torch.cat([K, G], dim=1)), hp)
                W = result._params[name]
                with torch.no_grad():
                    W.add_((delta if arch.conv1d else delta.T).to(W.device, W.dtype))
                norms[name] = float(delta.norm())
            diagnostics.append({"loss": losses, "rows": sum(len(k[0]) for k in keys), **norms})
        result.editor_state = stats.state
        result.diagnostics.append(
            {"requests": [r.id for r in requests], "modules": names, "turns": diagnostics}
        )
        return result


def _turn(model, tok, arch, modules, requests, order, hp: UltraEditHParams):
    """Per mini-batch: each module's inputs and output gradients at the target rows (float32),
    and the mini-batch's mean target loss; the weights are as at the start of the turn."""
    device = input_device(model)
    keys, grads, losses = [], [], []
    for start in range(0, len(order), hp.batch_size):
        chosen = [requests[i] for i in order[start : start + hp.batch_size]]
        batch = teacher_batch(tok, [r.prompt for r in chosen], [r.target_new for r in chosen])
        k, g, loss = _rows(model, arch, modules, batch.to(device))
        keys.append(k)
        grads.append(g)
        losses.append(loss)
    return keys, grads, losses


def _rows(model, arch, modules, batch):
    """One forward and backward of a teacher-forced batch: each module's input and the loss's
    gradient with respect to its output, at the rows that predict target tokens. A zero tensor
    added to each output carries that gradient; no weight gets one."""
    inputs: list[torch.Tensor] = [torch.empty(0)] * len(modules)
    probes: list[torch.Tensor] = [torch.empty(0)] * len(modules)

    def hook(j):
        def post(_module, args, _kwargs, output):
            inputs[j] = args[0][batch.rows, batch.cols].detach().float()
            out = output_tensor(output)
            probes[j] = torch.zeros_like(out, requires_grad=True)
            return with_output_tensor(output, out + probes[j])

        return post

    with torch.enable_grad(), trainable_only(model, []):
        with hooked([(m, None, hook(j)) for j, m in enumerate(modules)]):
            logits = logits_at(model, arch, batch).float()
        loss = F.cross_entropy(logits, batch.labels)
        dout = torch.autograd.grad(loss, probes)
    return inputs, [d[batch.rows, batch.cols].float() for d in dout], float(loss.detach())


def _update(K: torch.Tensor, Z: torch.Tensor, hp: UltraEditHParams):
    """ΔW (d_in, d_out) = (KᵀK + λI)⁻¹ Kᵀ V with V = -lr·|k^|²·g^ (float64); ``Z`` holds the
    rows [k^; g^] normalised with the lifelong statistics."""
    device = solve_device(K)
    K64 = K.to(device, torch.float64)
    k_hat, g_hat = Z[:, : K.shape[1]].to(device), Z[:, K.shape[1] :].to(device)
    V = -hp.lr * (k_hat**2).sum(1, keepdim=True) * g_hat
    A = K64.T @ K64 + hp.ridge * torch.eye(K.shape[1], dtype=torch.float64, device=device)
    return torch.linalg.solve(A, K64.T @ V).float().to(K.device)
