"""MEND (Mitchell et al., "Fast Model Editing at Scale", ICLR 2022): a small learned network turns
the fine-tuning gradient of one edit into a weight change that generalises to paraphrases and
leaves unrelated inputs alone.

**The idea.** For a linear layer y = x W^T the gradient of a loss over one sequence is a sum of
rank-one terms, one per token: dL/dW = sum_t delta_t u_t^T, with u_t the layer's input at token
t and delta_t the gradient of the loss with respect to the layer's output there. MEND never
forms the (huge) gradient: it maps each token's pair (u_t, delta_t) through an editor network to
(u~_t, delta~_t) and uses the *pseudo-gradient* sum_t delta~_t u~_t^T instead. The update is

    W <- W - edit_lr[layer] * sum_t delta~_t u~_t^T

so the network's cost grows with the layer's width, not with its size, and the change has rank at
most the number of tokens of the edit.

**The network** (one per weight shape, shared by every edited weight of that shape): the
concatenation [u; delta] is normalised by running per-feature mean and standard deviation
(collected while training, per edited weight, frozen afterwards), then passes two residual
blocks z + B relu(s_l * (A z + a) + o_l) + b, where A is ``rank`` x (d_in + d_out), B is zero at
initialisation (so each block starts as the identity) and s_l, o_l are a scale and a shift
learned per edited weight; the result is split back into u~ and delta~. The edit rates edit_lr
are learned too, one per edited weight.

**Training** (``medit train-editor mend``; :class:`MENDTrainer`): for each training edit, u and
delta come from one forward and backward of the target's NLL after the prompt with the base
weights frozen. The post-edit model is never materialised: forward hooks on the edited modules
add the change -edit_lr (x U~^T) D~ to their outputs, so the loss reaches the networks and the
edit rates. The loss is c_edit * NLL(target | paraphrase) + c_loc * KL(pre-edit || post-edit)
over the next-token distributions of the request's locality probes (of another training edit's
prompt where it has none). Adam on the networks (``lr``) and on the edit rates (``lr_lr``),
gradient clipping at ``grad_clip``, ``accumulate`` edits per optimiser step.

**Editing** (``apply``): the checkpoint's networks and rates (the base weights are checked: a
checkpoint trained for other weights is refused), u and delta of the requests (a batch of
requests is one edit: the sum over all their tokens, as the paper does for batched edits), the
update written into the weights. ``checkpoint=None`` is the editor at its initialisation: no
normalisation statistics and identity blocks, i.e. one plain gradient step of size
``untrained_lr`` -- a baseline, with a warning.

**The paper's values** (the ``paper`` preset): editor lr 1e-6, lr_lr 1e-4, edit_lr_init 1e-4,
c_edit 0.1, c_loc 1.0, grad_clip 100, 10 edits per step, a hidden width of 1920 (it notes that
low-rank networks work as well), the MLP weights of the last three blocks.

**What we changed for a 135M-parameter model trained on a CPU, and why:**

* ``lr`` 1e-4 instead of 1e-6 and ``accumulate`` 4 instead of 10: the paper trains for ~100k
  steps on a GPU; a CPU run of a few hundred steps must move the zero-initialised matrices in
  minutes (Adam's step is ~lr per entry, so 1e-6 would barely move them);
* ``rank`` 64: SmolLM2-135M's (1536, 576) and (576, 1536) MLP weights give 2112-wide [u; delta]
  rows; with thousands, not hundreds of thousands, of training edits a narrow bottleneck trains
  faster and over-fits less;
* normalisation statistics per edited weight (not per shared network): the layers' input and
  gradient scales differ by orders of magnitude across depth;
* ``untrained_lr`` (ours, 1e-2): the paper's edit rate 1e-4 multiplies *normalised*
  pseudo-gradients; on the raw gradient of an untrained editor it is a negligible step (measured
  on SmolLM2-135M: a target's log-probability rises by 0.03 at 1e-4, by 1.4 at 1e-2), so the
  untrained baseline has its own step size; ``edit_lr_init`` stays the paper's 1e-4;
* ``steps`` (ours; the paper: 1): how many times the gradient is recomputed and the editor
  applied in one edit.

GPT-2 keeps its MLP weights transposed (Conv1D, (in, out)); the pseudo-gradient is transposed
for it, and separate kinds (gate, up, down) map onto its fused ones (mlp_in, mlp_out).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from medit.core.arch import ArchSpec, get_arch
from medit.core.errors import UserError
from medit.core.forward import logits_at, per_sequence_mean
from medit.core.hooks import first_tensor_arg, hooked, trainable_only, with_first_tensor_arg
from medit.core.placement import input_device
from medit.core.text import TeacherBatch, teacher_batch
from medit.editors.base import (
    Capabilities,
    Editor,
    HParamError,
    HParams,
    check_kinds,
    check_layers,
    hp,
)
from medit.editors.learned import (
    EditorTrainer,
    checkpoint_key,
    load_checkpoint,
    load_optimizer_tensors,
    optimizer_tensors,
)
from medit.editors.results import PeftExport, WeightEdit
from medit.facts.requests import EditRequest

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class MENDHParams(HParams):
    checkpoint: str | None = hp(
        None,
        "directory written by `medit train-editor mend` (its best state); none: the untrained "
        "editor (identity networks: one plain gradient step of size untrained_lr)",
    )
    layers: tuple[int, ...] = hp((), "decoder layers whose weights are edited; empty: the last 3")
    kinds: tuple[str, ...] = hp(
        ("gate", "up", "down"),
        "module kinds edited in each layer (separate kinds map onto fused ones, e.g. GPT-2's)",
    )
    rank: int = hp(64, "bottleneck width of the editor networks (the paper: 1920)")
    edit_lr_init: float = hp(
        1e-4, "initial per-weight edit rate of training (on normalised inputs)"
    )
    untrained_lr: float = hp(
        1e-2, "without a checkpoint: the size of the plain gradient step (raw gradients)"
    )
    lr: float = hp(1e-4, "Adam learning rate of the editor networks (the paper: 1e-6)")
    lr_lr: float = hp(1e-4, "Adam learning rate of the edit rates")
    c_edit: float = hp(0.1, "weight of the paraphrase NLL in the training loss")
    c_loc: float = hp(1.0, "weight of the locality KL in the training loss")
    grad_clip: float = hp(100.0, "gradient norm clip of a training step")
    batch_size: int = hp(1, "training: requests per edit (one batched edit)")
    accumulate: int = hp(4, "training: edits per optimiser step (the paper: 10)")
    max_length: int = hp(64, "tokens kept of a prompt + target (the prompt's start is cut)")
    valid_limit: int = hp(50, "validation: edits of the valid file used (their first N)")
    steps: int = hp(1, "times the gradient is recomputed and the editor applied per edit")
    seed: int = hp(0, "seed of the editor networks' initialisation")
    preset: str = hp(
        "default", "default: sized for a CPU; paper: the paper's", ("default", "paper")
    )

    #: the paper's values (Mitchell et al. 2022, appendix), pinned
    PAPER = {
        "rank": 1920,
        "edit_lr_init": 1e-4,
        "lr": 1e-6,
        "lr_lr": 1e-4,
        "c_edit": 0.1,
        "c_loc": 1.0,
        "grad_clip": 100.0,
        "accumulate": 10,
        "steps": 1,
    }
    PRESETS = {"default": {}, "paper": PAPER}
    NO_DEFAULTS = ("paper",)

    def __post_init__(self):
        super().__post_init__()
        self._at_least(1, "rank", "batch_size", "accumulate", "max_length", "valid_limit")
        self._at_least(1, "steps")
        self._at_least(0, "layers", "c_edit", "c_loc")
        self._positive("edit_lr_init", "untrained_lr", "lr", "lr_lr", "grad_clip")
        if not self.kinds:
            raise HParamError("kinds", "names no module kind: name at least one")

    def check_arch(self, arch: ArchSpec, n_layers: int | None) -> None:
        check_layers("layers", self.layers, n_layers)
        check_kinds("kinds", self.kinds, arch, fused=True)

    def resolve(self, arch: ArchSpec, n_layers: int) -> tuple[tuple[int, ...], tuple[str, ...]]:
        """(layers, kinds as the architecture names them)."""
        layers = self.layers or tuple(range(max(0, n_layers - 3), n_layers))
        check_layers("layers", layers, n_layers)
        return tuple(sorted(set(layers))), check_kinds("kinds", self.kinds, arch, fused=True)


# -- the editor networks ---------------------------------------------------------------------------
class _Block(nn.Module):
    """z + B relu(s_j * (A z + a) + o_j) + b, with B = 0 and b = 0 at initialisation."""

    def __init__(self, dim: int, rank: int, n_weights: int, gen: torch.Generator):
        super().__init__()
        self.down = nn.Linear(dim, rank)
        self.up = nn.Linear(rank, dim)
        with torch.no_grad():
            bound = 1.0 / dim**0.5
            self.down.weight.uniform_(-bound, bound, generator=gen)
            self.down.bias.zero_()
            self.up.weight.zero_()
            self.up.bias.zero_()
        self.scale = nn.Parameter(torch.ones(n_weights, rank))
        self.shift = nn.Parameter(torch.zeros(n_weights, rank))

    def forward(self, z: torch.Tensor, j: int) -> torch.Tensor:
        return z + self.up(torch.relu(self.scale[j] * self.down(z) + self.shift[j]))


class _Net(nn.Module):
    def __init__(self, dim: int, rank: int, n_weights: int, gen: torch.Generator):
        super().__init__()
        self.blocks = nn.ModuleList([_Block(dim, rank, n_weights, gen) for _ in range(2)])

    def forward(self, z: torch.Tensor, j: int) -> torch.Tensor:
        for block in self.blocks:
            z = block(z, j)
        return z


@dataclasses.dataclass(frozen=True)
class _Site:
    """One edited weight: where it is and its (d_out, d_in) in the Linear layout."""

    layer: int
    kind: str
    d_out: int
    d_in: int

    @property
    def shape_key(self) -> str:
        return f"{self.d_out}x{self.d_in}"


class MENDNetworks(nn.Module):
    """The editor networks (one per weight shape), the normalisation statistics and the edit rates
    of a set of edited weights."""

    def __init__(self, sites: Sequence[_Site], rank: int, edit_lr_init: float, seed: int):
        super().__init__()
        self.sites = list(sites)
        self.rank = rank
        gen = torch.Generator().manual_seed(seed)
        shapes: dict[str, list[int]] = {}
        for i, s in enumerate(self.sites):
            shapes.setdefault(s.shape_key, []).append(i)
        #: site index -> its row among the sites of its shape
        self.row = {i: members.index(i) for members in shapes.values() for i in members}
        self.nets = nn.ModuleDict()
        for key, members in shapes.items():
            s = self.sites[members[0]]
            self.nets[key] = _Net(s.d_in + s.d_out, rank, len(members), gen)
        self.edit_lrs = nn.Parameter(torch.full((len(self.sites),), float(edit_lr_init)))
        for i, s in enumerate(self.sites):
            dim = s.d_in + s.d_out
            self.register_buffer(f"count_{i}", torch.zeros((), dtype=torch.float64))
            self.register_buffer(f"mean_{i}", torch.zeros(dim, dtype=torch.float64))
            self.register_buffer(f"m2_{i}", torch.zeros(dim, dtype=torch.float64))

    @property
    def trained(self) -> bool:
        return any(getattr(self, f"count_{i}").item() >= 2 for i in range(len(self.sites)))

    @torch.no_grad()
    def observe(self, i: int, z: torch.Tensor) -> None:
        """Add the rows of ``z`` (tokens, d_in + d_out) to site ``i``'s running statistics
        (Chan et al.'s parallel update of Welford's)."""
        z = z.detach().double()
        count, mean, m2 = (getattr(self, f"{k}_{i}") for k in ("count", "mean", "m2"))
        n = float(z.shape[0])
        if n == 0:
            return
        b_mean = z.mean(0)
        b_m2 = ((z - b_mean) ** 2).sum(0)
        total = count + n
        diff = b_mean - mean
        mean += diff * (n / total)
        m2 += b_m2 + diff**2 * (count * n / total)
        count.fill_(total)

    def normalise(self, i: int, z: torch.Tensor) -> torch.Tensor:
        count = getattr(self, f"count_{i}")
        if count.item() < 2:  # no statistics yet: the identity
            return z
        mean = getattr(self, f"mean_{i}")
        std = (getattr(self, f"m2_{i}") / (count - 1)).sqrt().clamp_min(1e-8)
        return ((z.double() - mean) / std).to(z.dtype)

    def transform(
        self, i: int, u: torch.Tensor, delta: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(u~, delta~) of site ``i`` for token rows ``u`` (T, d_in) and ``delta`` (T, d_out)."""
        s = self.sites[i]
        z = self.normalise(i, torch.cat([u.float(), delta.float()], dim=-1))
        out = self.nets[s.shape_key](z, self.row[i])
        return out[:, : s.d_in], out[:, s.d_in :]

    def config(self) -> dict[str, Any]:
        return {
            "sites": [dataclasses.asdict(s) for s in self.sites],
            "rank": self.rank,
        }

    @classmethod
    def from_config(cls, config: dict[str, Any], edit_lr_init: float = 1e-4) -> MENDNetworks:
        sites = [_Site(**s) for s in config["sites"]]
        return cls(sites, int(config["rank"]), edit_lr_init, 0)


# -- reading u and delta, and adding the change -----------------------------------------------------
def _sites(model: Any, arch: ArchSpec, layers: Sequence[int], kinds: Sequence[str]) -> list[_Site]:
    out = []
    for layer in layers:
        for kind in kinds:
            w = arch.module(model, layer, kind).weight
            d_out, d_in = (w.shape[1], w.shape[0]) if arch.conv1d else tuple(w.shape)
            out.append(_Site(layer, kind, int(d_out), int(d_in)))
    return out


def _batch(tok: Any, pairs: Sequence[tuple[str, str]], max_length: int) -> TeacherBatch:
    """A teacher-forcing batch of (prompt, target) pairs cut to ``max_length`` tokens from the
    prompt's start."""
    return teacher_batch(tok, [p for p, _ in pairs], [t for _, t in pairs], max_length)


def _nll(model: Any, arch: ArchSpec, batch: TeacherBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """(per-sequence mean target NLL (B,), logits at the label positions (N, V))."""
    logits = logits_at(model, arch, batch).float()
    token = -torch.log_softmax(logits, -1).gather(1, batch.labels[:, None]).squeeze(1)
    return per_sequence_mean(token, batch), logits


def _token_mask(batch: TeacherBatch) -> torch.Tensor:
    """Real tokens up to each sequence's last label position (the last token predicts nothing:
    its delta is zero)."""
    mask = batch.attention_mask.bool().clone()
    last = batch.attention_mask.sum(1) - 1
    mask[torch.arange(mask.shape[0]), last] = False
    return mask


def _gradients(
    model: Any, arch: ArchSpec, sites: Sequence[_Site], batch: TeacherBatch
) -> tuple[list[torch.Tensor], list[torch.Tensor], torch.Tensor]:
    """One forward and backward of the batch's target NLL (summed over its sequences) with the
    base weights frozen: per site, u (tokens, d_in) and delta (tokens, d_out) at the batch's
    real tokens, and the per-sequence NLL. No parameter's ``.grad`` is touched."""
    low = min(s.layer for s in sites)
    inputs: dict[int, torch.Tensor] = {}
    outputs: dict[int, torch.Tensor] = {}

    def entering(_m, args, kwargs):
        h = first_tensor_arg(args, kwargs).detach().requires_grad_(True)
        return with_first_tensor_arg(args, kwargs, h)

    def seen(i: int):
        def hook(_m, args, _kwargs, output):
            inputs[i] = first_tensor_arg(args, _kwargs, "input").detach()
            outputs[i] = output

        return hook

    hooks = [(arch.layer_list(model)[low], entering, None)]
    hooks += [(arch.module(model, s.layer, s.kind), None, seen(i)) for i, s in enumerate(sites)]
    with torch.enable_grad(), trainable_only(model, []), hooked(hooks):
        nll, _ = _nll(model, arch, batch)
        outs = [outputs[i] for i in range(len(sites))]
        grads = torch.autograd.grad(nll.sum(), outs, allow_unused=True)
    mask = _token_mask(batch)
    us, deltas = [], []
    for i, g in enumerate(grads):
        out = outs[i]
        g = torch.zeros_like(out) if g is None else g
        us.append(inputs[i][mask].float())
        deltas.append(g[mask].float())
    return us, deltas, nll.detach()


def _changed_output(rate: torch.Tensor, u: torch.Tensor, d: torch.Tensor):
    """A forward hook adding -rate * (x U~^T) D~ to a module's output: what W - rate * D~^T U~
    gives (for a Linear's and a Conv1D's layout alike)."""

    def hook(_m, args, kwargs, output):
        x = first_tensor_arg(args, kwargs, "input")
        change = (x.to(u.dtype) @ u.T) @ d
        return output - (rate * change).to(output.dtype)

    return hook


class _Edit:
    """The editor's output for one edit: per site, its rate, u~ and delta~."""

    def __init__(self, nets: MENDNetworks, us, deltas):
        self.nets = nets
        self.factors = [
            (nets.edit_lrs[i], *nets.transform(i, u, d))
            for i, (u, d) in enumerate(zip(us, deltas, strict=True))
        ]

    def hooks(self, model: Any, arch: ArchSpec):
        return [
            (arch.module(model, s.layer, s.kind), None, _changed_output(*self.factors[i]))
            for i, s in enumerate(self.nets.sites)
        ]

    def weight_changes(self, conv1d: bool) -> list[torch.Tensor]:
        """Per site, the change of its weight in the module's own layout."""
        out = []
        for rate, u, d in self.factors:
            g = d.T @ u  # (d_out, d_in)
            out.append(-rate * (g.T if conv1d else g))
        return out


# -- the editor ------------------------------------------------------------------------------------
_LOADED: dict[tuple, MENDNetworks] = {}


def networks_for(model: Any, hp: MENDHParams) -> MENDNetworks:
    """The editor for ``model``: the checkpoint's (cached per checkpoint and base weights within
    the process), or, without one, the untrained editor of ``hp``'s layers and kinds."""
    arch = get_arch(model)
    layers, kinds = hp.resolve(arch, arch.n_layers(model))
    sites = _sites(model, arch, layers, kinds)
    if hp.checkpoint is None:
        log.warning(
            "mend: no checkpoint: the untrained editor (one plain gradient step of size "
            "untrained_lr=%g); train one with `medit train-editor mend`",
            hp.untrained_lr,
        )
        return MENDNetworks(sites, hp.rank, hp.untrained_lr, hp.seed)
    key = checkpoint_key(hp.checkpoint, model)
    if key not in _LOADED:
        config, tensors = load_checkpoint(hp.checkpoint, "mend", model)
        nets = MENDNetworks.from_config(config)
        nets.load_state_dict(_strip(tensors, "editor."))
        if len(_LOADED) >= 4:
            _LOADED.pop(next(iter(_LOADED)))
        _LOADED[key] = nets.eval()
    nets = _LOADED[key]
    if [(s.layer, s.kind) for s in nets.sites] != [(s.layer, s.kind) for s in sites]:
        theirs = sorted({s.layer for s in nets.sites}), sorted({s.kind for s in nets.sites})
        raise UserError(
            f"mend checkpoint {hp.checkpoint} edits layers {theirs[0]}, kinds {theirs[1]}; the "
            f"hyper-parameters ask for layers {list(layers)}, kinds {list(kinds)}: leave layers "
            "and kinds at the values it was trained with"
        )
    if [s.shape_key for s in nets.sites] != [s.shape_key for s in sites]:
        raise UserError(f"mend checkpoint {hp.checkpoint}: weight shapes differ from the model's")
    return nets


def _strip(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}


class MEND(Editor):
    name = "mend"
    hparams_class = MENDHParams
    capabilities = Capabilities(batch=True)
    summary = "a learned network maps the edit's gradient to a weight change (Mitchell et al. 2022)"

    def edited_modules(self, hp: MENDHParams, arch: ArchSpec, n_layers: int) -> tuple[str, ...]:
        layers, kinds = hp.resolve(arch, n_layers)
        return tuple(arch.layer_path(layer, kind) for layer in layers for kind in kinds)

    def _apply(
        self, model: Any, tok: Any, requests: list[EditRequest], hp: MENDHParams, prior=None
    ) -> WeightEdit:
        arch = get_arch(model)
        nets = networks_for(model, hp)
        names = [arch.weight_name(s.layer, s.kind) for s in nets.sites]
        result = WeightEdit.before(
            self.name, hp, model, names, [r.id for r in requests], peft=PeftExport(arch.conv1d)
        )
        params = [result._params[n] for n in names]
        nets.to(params[0].device)
        batch = _batch(tok, [(r.prompt, r.target_new) for r in requests], hp.max_length)
        batch = batch.to(input_device(model))
        losses, t0 = [], time.perf_counter()
        for _ in range(hp.steps):
            us, deltas, nll = _gradients(model, arch, nets.sites, batch)
            losses.append(nll.mean().item())
            with torch.no_grad():
                edit = _Edit(nets, us, deltas)
                for p, change in zip(params, edit.weight_changes(arch.conv1d), strict=True):
                    p.add_(change.to(p.dtype))
        with torch.no_grad():
            after = _nll(model, arch, batch)[0].mean().item()
        if not all(torch.isfinite(p).all() for p in params):
            result.restore()
            raise UserError("mend: the edit made a weight non-finite; the model is restored")
        result.diagnostics.append(
            {
                "requests": [r.id for r in requests],
                "layers": sorted({s.layer for s in nets.sites}),
                "kinds": sorted({s.kind for s in nets.sites}),
                "trained": nets.trained,
                "edit_loss_before": losses[0],
                "edit_loss_after": after,
                "losses": losses,
                "edit_lrs": nets.edit_lrs.detach().tolist(),
                "update_norms": {
                    n: float((p.detach().float() - result.originals[n].float()).norm())
                    for n, p in zip(names, params, strict=True)
                },
                "edit_seconds": time.perf_counter() - t0,
            }
        )
        return result

    @classmethod
    def trainer(cls, model: Any, tok: Any, hp: MENDHParams) -> MENDTrainer:
        return MENDTrainer(model, tok, hp)


# -- training --------------------------------------------------------------------------------------
class MENDTrainer(EditorTrainer):
    """Trains the editor networks and edit rates for one base model (module docstring)."""

    monitor = "score"
    higher_is_better = True

    def __init__(self, model: Any, tok: Any, hp: MENDHParams):
        self.model, self.tok, self.hp = model, tok, hp
        self.arch = get_arch(model)
        layers, kinds = hp.resolve(self.arch, self.arch.n_layers(model))
        self.nets = MENDNetworks(
            _sites(model, self.arch, layers, kinds), hp.rank, hp.edit_lr_init, hp.seed
        )
        self.device = input_device(model)
        self.nets.to(self.device)
        self.opt = self._optimizer()
        self.batch_size = hp.batch_size * hp.accumulate
        self.steps = 0
        self.spare: list[tuple[str, str]] = []

    def _optimizer(self) -> torch.optim.Optimizer:
        rates = [self.nets.edit_lrs]
        others = [p for n, p in self.nets.named_parameters() if n != "edit_lrs"]
        return torch.optim.Adam(
            [{"params": others, "lr": self.hp.lr}, {"params": rates, "lr": self.hp.lr_lr}]
        )

    def prepare(self, train: Sequence[EditRequest], progress: Any = None) -> None:
        self.spare = [(r.prompt, r.target_new) for r in train[:200]]

    # -- one edit -------------------------------------------------------------------------------
    def _edit_pairs(self, reqs: Sequence[EditRequest], k: int) -> list[tuple[str, str]]:
        """The paraphrase (the k-th, cycling; the prompt where there is none) and target."""
        out = []
        for r in reqs:
            para = r.rephrase_prompts[k % len(r.rephrase_prompts)] if r.rephrase_prompts else None
            out.append((para or r.prompt, r.target_new))
        return out

    def _locality_pairs(self, reqs: Sequence[EditRequest], k: int) -> list[tuple[str, str]]:
        out = []
        for r in reqs:
            probes = [(p, a) for _, p, a in r.locality_probes()]
            if not probes:
                others = [s for s in self.spare if s[0] != r.prompt]
                probes = [others[k % len(others)]] if others else []
            out += probes
        return out

    def _run(self, reqs: Sequence[EditRequest], k: int, train: bool) -> dict[str, Any]:
        """One edit of ``reqs``, evaluated on its paraphrases and locality probes without writing
        the weights; with ``train`` the statistics are updated and the loss is differentiable."""
        hp, model, arch, nets = self.hp, self.model, self.arch, self.nets
        edit_batch = _batch(self.tok, [(r.prompt, r.target_new) for r in reqs], hp.max_length)
        us, deltas, _ = _gradients(model, arch, nets.sites, edit_batch.to(self.device))
        if train:
            for i, (u, d) in enumerate(zip(us, deltas, strict=True)):
                nets.observe(i, torch.cat([u, d], -1))
        para = _batch(self.tok, self._edit_pairs(reqs, k), hp.max_length).to(self.device)
        loc_pairs = self._locality_pairs(reqs, k)
        loc = _batch(self.tok, loc_pairs, hp.max_length).to(self.device) if loc_pairs else None
        with torch.no_grad(), trainable_only(model, []):
            pre_para = _nll(model, arch, para)[0].mean()
            pre_loc = logits_at(model, arch, loc).float() if loc is not None else None
        with torch.set_grad_enabled(train), trainable_only(model, []):
            edit = _Edit(nets, us, deltas)
            with hooked(edit.hooks(model, arch)):
                nll, para_logits = _nll(model, arch, para)
                post_loc = logits_at(model, arch, loc).float() if loc is not None else None
            if post_loc is not None:
                kl = F.kl_div(
                    torch.log_softmax(post_loc, -1),
                    torch.log_softmax(pre_loc, -1),
                    log_target=True,
                    reduction="batchmean",
                )
            else:
                kl = torch.zeros((), device=self.device)
        return {
            "nll": nll.mean(),
            "kl": kl,
            "pre_nll": pre_para.item(),
            "para": para,
            "para_logits": para_logits.detach(),
            "loc_same": None
            if post_loc is None
            else (post_loc.argmax(-1) == pre_loc.argmax(-1)).float(),
        }

    def step(self, batch: Sequence[EditRequest]) -> dict[str, float]:
        hp = self.hp
        self.nets.train()
        self.opt.zero_grad(set_to_none=True)
        edits = [batch[i : i + hp.batch_size] for i in range(0, len(batch), hp.batch_size)]
        totals = {"loss": 0.0, "edit_nll": 0.0, "loc_kl": 0.0, "pre_nll": 0.0}
        for j, reqs in enumerate(edits):
            out = self._run(reqs, self.steps * len(edits) + j, train=True)
            loss = hp.c_edit * out["nll"] + hp.c_loc * out["kl"]
            if not torch.isfinite(loss):
                raise UserError(
                    f"mend training diverged at step {self.steps + 1}: the loss is "
                    f"{loss.item()} (edit NLL {out['nll'].item():.4g}, locality KL "
                    f"{out['kl'].item():.4g}); lower lr or lr_lr, or edit_lr_init"
                )
            (loss / len(edits)).backward()
            totals["loss"] += loss.item() / len(edits)
            totals["edit_nll"] += out["nll"].item() / len(edits)
            totals["loc_kl"] += out["kl"].item() / len(edits)
            totals["pre_nll"] += out["pre_nll"] / len(edits)
        params = [p for p in self.nets.parameters() if p.grad is not None]
        norm = torch.nn.utils.clip_grad_norm_(params, hp.grad_clip)
        if not torch.isfinite(norm):
            raise UserError(f"mend training diverged at step {self.steps + 1}: gradient is {norm}")
        self.opt.step()
        self.steps += 1
        totals["grad_norm"] = float(norm)
        totals["edit_lr"] = float(self.nets.edit_lrs.detach().mean())
        return totals

    @torch.no_grad()
    def validate(self, requests: Sequence[EditRequest]) -> dict[str, float]:
        self.nets.eval()
        reqs = list(requests)[: self.hp.valid_limit]
        success, nlls, pre, same = [], [], [], []
        for r in reqs:
            out = self._run([r], 0, train=False)
            para, logits = out["para"], out["para_logits"]
            hit = logits.argmax(-1) == para.labels
            success.append(float(hit.all()))
            nlls.append(out["nll"].item())
            pre.append(out["pre_nll"])
            if out["loc_same"] is not None:
                same += out["loc_same"].tolist()
        edit_success = sum(success) / max(1, len(success))
        locality = sum(same) / len(same) if same else 1.0
        return {
            "edit_success": edit_success,
            "locality": locality,
            "edit_nll": sum(nlls) / max(1, len(nlls)),
            "pre_edit_nll": sum(pre) / max(1, len(pre)),
            "score": (edit_success + locality) / 2,
        }

    # -- state ----------------------------------------------------------------------------------
    def state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        tensors = {f"editor.{k}": v for k, v in self.nets.state_dict().items()}
        tensors |= optimizer_tensors(self.opt)
        return tensors, {**self.nets.config(), "steps": self.steps}

    def load_state(self, tensors: dict[str, torch.Tensor], config: dict[str, Any]) -> None:
        mine = self.nets.config()
        theirs = {k: config.get(k) for k in mine}
        if theirs != mine:
            raise UserError(
                "mend: the saved state is for other edited weights or another rank "
                f"({theirs} vs {mine})"
            )
        self.nets.load_state_dict(_strip(tensors, "editor."))
        self.nets.to(self.device)
        self.opt = self._optimizer()
        load_optimizer_tensors(self.opt, tensors)
        self.steps = int(config.get("steps", 0))
