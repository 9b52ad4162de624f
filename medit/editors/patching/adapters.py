"""Low-rank adapters kept beside the base weights, gated per batch row (MedLaSA's runtime).

Each edited piece of knowledge owns one :class:`Adapter`: for every adapted linear module ``m``
a pair ``A_m (r, in)``, ``B_m (out, r)`` and a scale ``alpha_m / r``, plus a *key*, the base
model's representation of its prompt. An :class:`AdapterBank` installs the adapters on a model
through forward hooks (the base weights are never written, so removing the hooks restores the
model bit for bit) and adds, for batch row b,

    y_b += c_m[b] · B_{e(b),m} A_{e(b),m} x_b

where e(b) is the adapter chosen for the row and c_m[b] its coefficient. How rows are routed
(``RoutingConfig.mode``):

* ``nearest`` — the row's prompt is represented like the keys: the base model's hidden states
  entering layer ``route_depth`` (first position, the attention sink, left out), standardised per
  dimension with token statistics of background prompts, mean-pooled, centred on the background
  prompts' mean and scaled to unit norm. Among the nearest keys (scikit-learn, cosine) the one with
  the highest gate wins; the gate is 0 at or below ``gate_off`` similarity (the base model,
  exactly), 1 at or above ``gate_on``, linear in between. An input that does not mention the
  edit's subject must clear the stricter ``gate_off_unmentioned`` / ``gate_on_unmentioned``.
  c_m[b] = gate · alpha_m / r.
* ``oracle`` — the MedLaSA paper's protocol: each prompt is causally traced and its own
  association scores give alpha_m (the paper looks the scores up in traces precomputed for every
  test prompt; here they are computed on demand, cached on disk).
* ``always`` — every row uses the adapter at its training scales (what merging it would give).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from importlib import resources
from typing import Any

import torch

from medit.core.arch import ArchSpec, get_module
from medit.core.errors import UserError
from medit.core.forward import passed_cache
from medit.core.hooks import capture_input
from medit.editors.patching.routing import ROUTER

ROUTING_MODES = ("nearest", "oracle", "always")


@dataclasses.dataclass(frozen=True)
class RoutingConfig:
    mode: str = "nearest"  #: nearest | oracle | always
    route_depth: float = 0.28  #: relative depth of the layer whose input represents a prompt
    gate_on: float = 0.75  #: cosine similarity from which an adapter is fully on
    gate_off: float = 0.65  #: cosine similarity at or below which it is off
    gate_on_unmentioned: float = 0.9  #: gate_on for inputs not mentioning the edit's subject
    gate_off_unmentioned: float = 0.8  #: gate_off for inputs not mentioning the edit's subject
    candidates: int = 8  #: nearest keys considered per input

    def __post_init__(self):
        if self.mode not in ROUTING_MODES:
            raise UserError(f"routing must be one of {', '.join(ROUTING_MODES)}, not {self.mode!r}")
        for off, on in (
            (self.gate_off, self.gate_on),
            (self.gate_off_unmentioned, self.gate_on_unmentioned),
        ):
            if not -1.0 <= off < on <= 1.0:
                raise UserError("need -1 <= gate_off < gate_on <= 1 (both pairs)")
        if not 0.0 <= self.route_depth <= 1.0:
            raise UserError("route_depth must lie in [0, 1]")


@dataclasses.dataclass
class Adapter:
    """The adapter of one edited piece of knowledge."""

    request_id: str
    prompt: str
    A: dict[str, torch.Tensor]  #: module name -> (r, in)
    B: dict[str, torch.Tensor]  #: module name -> (out, r)
    scale: dict[str, float]  #: module name -> alpha / r used in training
    key: torch.Tensor | None = None  #: routing representation of the prompt (unit norm)
    subject: str = ""  #: the edit's subject ("" when unknown: no lexical evidence asked)
    info: dict[str, Any] = dataclasses.field(default_factory=dict)  #: alphas, ranks, profile


def background_prompts() -> list[str]:
    text = resources.files("medit.data").joinpath("background_prompts.txt").read_text("utf-8")
    return [line.strip() for line in text.splitlines() if line.strip() and line[0] != "#"]


class AdapterBank:
    """Adapters installed on a model, routed per batch row. One bank per model, at
    ``model.medit_router`` while it holds adapters."""

    def __init__(
        self,
        model: Any,
        tok: Any,
        arch: ArchSpec,
        routing: RoutingConfig,
        oracle_scales: Callable[[str], dict[str, float]] | None = None,
    ):
        self.model, self.tok, self.arch, self.routing = model, tok, arch, routing
        self.oracle_scales = oracle_scales  #: prompt -> module -> alpha (oracle mode)
        self.adapters: list[Adapter] = []
        self.enabled = True
        self._handles: list[Any] = []
        self._stacks: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self._center: torch.Tensor | None = None
        self._token_stats: tuple[torch.Tensor, torch.Tensor] | None = None
        self._state: tuple[torch.Tensor, dict[str, torch.Tensor]] | None = None
        self._explicit = False

    # -- membership ------------------------------------------------------------------------------
    @classmethod
    def of(cls, model: Any, tok: Any, arch: ArchSpec, routing: RoutingConfig, **kw) -> AdapterBank:
        """The model's bank, created (and installed) when it has none."""
        bank = getattr(model, ROUTER, None)
        if bank is None:
            bank = cls(model, tok, arch, routing, **kw)
        elif bank.routing != routing:
            raise UserError(
                f"the model already carries adapters routed with {bank.routing}; "
                f"cannot add adapters routed with {routing}"
            )
        return bank

    def add(self, *adapters: Adapter) -> None:
        if self.routing.mode == "nearest":
            self._fill_keys(adapters)
        self.adapters.extend(adapters)
        self._rebuild()

    def remove(self, *adapters: Adapter) -> None:
        gone = {id(a) for a in adapters}
        self.adapters = [a for a in self.adapters if id(a) not in gone]
        self._rebuild()

    def _fill_keys(self, adapters: Sequence[Adapter]) -> None:
        """Compute the routing key of adapters that have none (one batched pass)."""
        missing = [a for a in adapters if a.key is None]
        if missing:
            for a, key in zip(missing, self.represent([a.prompt for a in missing]), strict=True):
                a.key = key

    def _rebuild(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles, self._stacks, self._state = [], {}, None
        if not self.adapters:
            if getattr(self.model, ROUTER, None) is self:
                delattr(self.model, ROUTER)
            return
        setattr(self.model, ROUTER, self)
        names = sorted({m for a in self.adapters for m in a.A})
        for name in names:
            self._stacks[name] = self._stack(name)
            module = get_module(self.model, name)
            self._handles.append(module.register_forward_hook(self._hook(name)))
        base = self.arch.base_model(self.model)
        self._handles.append(base.register_forward_pre_hook(self._fallback, with_kwargs=True))

    def _stack(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(E, r_max, in) and (E, out, r_max) over the adapters, zero-padded (exact)."""
        ref = next(a for a in self.adapters if name in a.A)
        r_max = max(a.A[name].shape[0] for a in self.adapters if name in a.A)
        n_in, n_out = ref.A[name].shape[1], ref.B[name].shape[0]
        A = ref.A[name].new_zeros(len(self.adapters), r_max, n_in)
        B = ref.B[name].new_zeros(len(self.adapters), n_out, r_max)
        for e, a in enumerate(self.adapters):
            if name in a.A:
                r = a.A[name].shape[0]
                A[e, :r], B[e, :, :r] = a.A[name], a.B[name]
        return A, B

    # -- routing ---------------------------------------------------------------------------------
    @torch.no_grad()
    def represent(self, prompts: Sequence[str]) -> torch.Tensor:
        """Unit-norm prompt representations (n, d) from the base model (see module docstring)."""
        if self._center is None:
            hidden = self._hidden(background_prompts())
            tokens = torch.cat(hidden)
            self._token_stats = (tokens.mean(0), tokens.std(0) + 1e-6)
            self._center = self._pool(hidden).mean(0)
        reps = self._pool(self._hidden(prompts)) - self._center
        return reps / reps.norm(dim=-1, keepdim=True).clamp_min(1e-12)

    def _pool(self, hiddens: list[torch.Tensor]) -> torch.Tensor:
        mean, std = self._token_stats
        return torch.stack([((h - mean) / std).mean(0) for h in hiddens])

    def _hidden(self, prompts: Sequence[str], batch_size: int = 32) -> list[torch.Tensor]:
        """Per prompt, the hidden states (tokens after the first, d) entering the routing layer."""
        layer = round(self.routing.route_depth * (self.arch.n_layers(self.model) - 1))
        base, device = (
            self.arch.base_model(self.model),
            self.arch.embedding(self.model).weight.device,
        )
        out = []
        was, self.enabled = self.enabled, False
        try:
            for i in range(0, len(prompts), batch_size):
                enc = self.tok(
                    list(prompts[i : i + batch_size]), return_tensors="pt", padding=True
                ).to(device)
                hidden = capture_input(
                    self.arch.module(self.model, layer),
                    lambda e=enc: base(
                        input_ids=e["input_ids"],
                        attention_mask=e["attention_mask"],
                        use_cache=False,
                    ),
                )
                for h, m in zip(hidden.float(), enc["attention_mask"].bool(), strict=True):
                    h = h[m]
                    out.append(h[1:] if len(h) > 1 else h)
        finally:
            self.enabled = was
        return out

    def _coefficients(self, prompts: Sequence[str]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Per row: the adapter index, and per module the coefficient c_m (0: unchanged).
        Computed on the base model (the adapters are off meanwhile)."""
        was, self.enabled = self.enabled, False
        try:
            return self._coefficients_base(prompts)
        finally:
            self.enabled = was

    def _coefficients_base(self, prompts: Sequence[str]):
        device = self.arch.embedding(self.model).weight.device
        n, mode = len(prompts), self.routing.mode
        which = torch.zeros(n, dtype=torch.long)
        gate = torch.ones(n)
        if len(self.adapters) > 1 or mode == "nearest":
            which, gate = self._nearest(prompts)
            if mode != "nearest":
                gate = torch.ones(n)
        coeff = {}
        own = [self.oracle_scales(p) for p in prompts] if mode == "oracle" else []  # type: ignore[misc]
        for name in self._stacks:
            if mode == "oracle":  # the prompt's own alpha over the chosen adapter's rank
                c = torch.tensor(
                    [
                        s.get(name, 0.0) / self.adapters[e].A[name].shape[0]
                        if name in self.adapters[e].A
                        else 0.0
                        for s, e in zip(own, which.tolist(), strict=True)
                    ]
                )
            else:
                c = torch.tensor([self.adapters[e].scale.get(name, 0.0) for e in which.tolist()])
            coeff[name] = (gate * c).to(device)
        return which.to(device), coeff

    def _nearest(self, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Per prompt: the adapter with the highest gate among the nearest keys, and that gate."""
        from sklearn.neighbors import NearestNeighbors

        from medit.core.text import normalise

        self._fill_keys(self.adapters)  # oracle / always modes compute keys on first use
        keys = torch.stack([a.key for a in self.adapters]).cpu()
        reps = self.represent(prompts).cpu()
        k = min(self.routing.candidates, len(self.adapters))
        dist, idx = (
            NearestNeighbors(n_neighbors=k, metric="cosine")
            .fit(keys.numpy())
            .kneighbors(reps.numpy())
        )
        r = self.routing
        which, gate = torch.zeros(len(prompts), dtype=torch.long), torch.zeros(len(prompts))
        for row, prompt in enumerate(prompts):
            text = normalise(prompt)
            which[row] = int(idx[row][0])  # the nearest, when no gate opens (oracle, always)
            for d, e in zip(dist[row], idx[row], strict=True):
                subject = self.adapters[e].subject
                mentioned = not subject or normalise(subject) in text
                off, on = (
                    (r.gate_off, r.gate_on)
                    if mentioned
                    else (r.gate_off_unmentioned, r.gate_on_unmentioned)
                )
                g = min(max((1.0 - float(d) - off) / (on - off), 0.0), 1.0)
                if g > gate[row]:
                    which[row], gate[row] = int(e), g
        return which, gate

    def route(self, prompts: Sequence[str]) -> None:
        self._state, self._explicit = self._coefficients(prompts), True

    def select_rows(self, keep: torch.Tensor) -> None:
        if self._state is not None:
            which, coeff = self._state
            self._state = which[keep], {m: c[keep] for m, c in coeff.items()}

    def clear(self) -> None:
        self._state, self._explicit = None, False

    def _fallback(self, _module, args, kwargs):
        """A forward nobody routed: route each new sequence by its own (unpadded) text."""
        if not self.enabled or self._explicit:
            return None
        ids = kwargs.get("input_ids", args[0] if args else None)
        past = passed_cache(kwargs)
        if (
            past is not None
            and past.get_seq_length() > 0
            and self._state is not None
            and ids is not None
            and self._state[0].shape[0] == ids.shape[0]
        ):
            return None  # decoding: keep the routing of the sequence's prefill
        # a new sequence (or a cache this bank did not see filled: route by the tokens given)
        if ids is None:
            raise UserError("medlasa routing needs input_ids (got only inputs_embeds)")
        mask = kwargs.get("attention_mask")
        rows = (
            ids.tolist()
            if mask is None
            else [
                [t for t, m in zip(r, mr, strict=True) if m]
                for r, mr in zip(ids.tolist(), mask.tolist(), strict=True)
            ]
        )
        self._state = self._coefficients(self.tok.batch_decode(rows, skip_special_tokens=True))
        return None

    # -- the adapted forward ---------------------------------------------------------------------
    def _hook(self, name: str):
        def hook(_module, args, output):
            if not self.enabled or self._state is None:
                return None
            which, coeff = self._state
            c = coeff[name]
            x = args[0]
            if c.shape[0] != x.shape[0]:
                raise RuntimeError(f"routing holds {c.shape[0]} rows, the batch has {x.shape[0]}")
            active = (c != 0).nonzero().squeeze(1)
            if active.numel() == 0:
                return None  # the base model's output, untouched
            A, B = self._stacks[name]
            e = which[active]
            every = active.numel() == x.shape[0]
            xs = (x if every else x[active]).to(A.dtype)
            if bool((e == e[0]).all()):  # one adapter for all active rows: plain matmuls
                y = (xs @ A[e[0]].T) @ B[e[0]].T
            else:
                y = torch.einsum("ntr,nor->nto", torch.einsum("nti,nri->ntr", xs, A[e]), B[e])
            y = (y * c[active, None, None].to(A.dtype)).to(output.dtype)
            return output + y if every else output.index_add(0, active, y)

        return hook


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
