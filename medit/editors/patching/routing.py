"""Sequence routing: which edit's patches act on a sequence, chosen from its own first tokens.

MedLaSA's adapters are input-dependent: the adapter and its strength for a batch row depend on
the knowledge the row's *prompt* asks about. A :class:`SequenceRouter` decides that at the start
of each new sequence — a forward of the model whose KV cache is empty or absent — from the tokens
of that forward, and keeps the decision while the cache grows (decoding), following the cache's
rows when a decoder reorders or drops them (``cache.reorder_cache``). A forward without a cache
is a sequence of its own. Nothing but the model's inputs is read: ``model.generate``, a user's
loop and medit's evaluation (which presents the prompt first, then the target) route alike.

How a prompt is represented and routed (``RoutingConfig.mode``):

* ``nearest`` — the hidden states entering layer ``route_depth`` of the base model (first
  position, the attention sink, left out), standardised per dimension with token statistics of
  background prompts, mean-pooled, centred on the background prompts' mean and scaled to unit
  norm. Among the nearest edit keys (scikit-learn, cosine) the one with the highest gate wins;
  the gate is 0 at or below ``gate_off`` similarity (the base model, exactly), 1 at or above
  ``gate_on``, linear in between. An input that does not mention the edit's subject must clear
  the stricter ``gate_off_unmentioned`` / ``gate_on_unmentioned``. The coefficient of module m
  is gate · alpha_m / r.
* ``oracle`` — the MedLaSA paper's protocol: the prompt is causally traced and its own
  association scores give alpha_m (``oracle_scales``, computed on demand and cached on disk).
* ``always`` — every row uses its nearest edit's adapter at the training scales.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from importlib import resources
from typing import Any

import torch
from sklearn.neighbors import NearestNeighbors

from medit.core.errors import UserError
from medit.core.forward import keep_with_cache, passed_cache
from medit.core.hooks import capture_input
from medit.core.placement import input_device
from medit.core.text import normalise

ROUTING_MODES = ("nearest", "oracle", "always")
#: attribute of a KV cache holding the routing of the sequence it caches
_ROUTE = "_medit_route"


@dataclasses.dataclass(frozen=True)
class RoutingConfig:
    mode: str = "nearest"  #: nearest | oracle | always
    route_depth: float = 0.28  #: relative depth of the layer whose input represents a prompt
    gate_on: float = 0.75  #: cosine similarity from which an adapter is fully on
    gate_off: float = 0.65  #: cosine similarity at or below which it is off
    gate_on_unmentioned: float = 0.9  #: gate_on for inputs not mentioning the edit's subject
    gate_off_unmentioned: float = 0.8  #: gate_off for inputs not mentioning the edit's subject
    candidates: int = 8  #: nearest keys considered per input


def background_prompts() -> list[str]:
    text = resources.files("medit.data").joinpath("background_prompts.txt").read_text("utf-8")
    return [line.strip() for line in text.splitlines() if line.strip() and line[0] != "#"]


@dataclasses.dataclass
class _Route:
    """One batch's routing: per row the patch index (into the bank) and per module the
    coefficient (0: the base model)."""

    which: torch.Tensor  # (batch,) long
    coeff: dict[str, torch.Tensor]  # module -> (batch,)

    def select(self, rows: torch.Tensor) -> None:
        rows = rows.to(self.which.device)
        self.which = self.which[rows]
        self.coeff = {m: c[rows.to(c.device)] for m, c in self.coeff.items()}


class SequenceRouter:
    """Routes the bank's routed patches (MedLaSA adapters) per sequence; see the module doc.

    A patch it routes has ``prompt``, ``subject``, ``key`` (unit-norm representation, filled in
    when added), ``scale`` (module -> alpha / r) and ``rank(module)``."""

    def __init__(
        self,
        bank: Any,
        tok: Any,
        routing: RoutingConfig,
        oracle_scales: Callable[[str], dict[str, float]] | None = None,
    ):
        self.bank, self.tok, self.routing = bank, tok, routing
        self.oracle_scales = oracle_scales  #: prompt -> module -> alpha (oracle mode)
        self._center: torch.Tensor | None = None
        self._token_stats: tuple[torch.Tensor, torch.Tensor] | None = None
        self._state: _Route | None = None

    def check_compatible(self, other: SequenceRouter) -> None:
        if other.routing != self.routing:
            raise UserError(
                f"the model already carries adapters routed with {self.routing}; cannot add "
                f"adapters routed with {other.routing}"
            )
        self.oracle_scales = self.oracle_scales or other.oracle_scales

    # -- the bank's calls ------------------------------------------------------------------------
    def adding(self, patches: Sequence[Any]) -> None:
        if self.routing.mode == "nearest":
            self._fill_keys(patches)

    def rebuilt(self) -> None:
        self._state = None

    def begin_forward(self, args: tuple, kwargs: dict) -> None:
        """A forward of the model starts: keep a cached sequence's routing, or route anew."""
        ids = kwargs.get("input_ids", args[0] if args else None)
        cache = passed_cache(kwargs)
        if cache is not None and cache.get_seq_length() > 0:
            state = getattr(cache, _ROUTE, None)
            if state is not None and ids is not None and state.which.shape[0] == ids.shape[0]:
                self._state = state  # decoding: the routing of the sequence's prefill
                return
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
        self._state = self._route(rows)
        if cache is not None:
            keep_with_cache(cache, _ROUTE, self._state)

    def gate(self, index: int, module: str, batch: int) -> torch.Tensor:
        """(batch,) coefficients of patch ``index`` at ``module`` for the current forward."""
        state = self._state
        if state is None or state.which.shape[0] != batch:
            raise RuntimeError(
                f"no routing for a batch of {batch} rows (routed: {state and state.which.shape[0]})"
            )
        return torch.where(
            state.which == index, state.coeff[module], torch.zeros_like(state.coeff[module])
        )

    # -- representations -------------------------------------------------------------------------
    @torch.no_grad()
    def represent(self, rows: Sequence[Sequence[int]]) -> torch.Tensor:
        """Unit-norm representations (n, d) of token sequences, from the base model."""
        if self._center is None:
            hidden = self._hidden(self._encode(background_prompts()))
            tokens = torch.cat(hidden)
            self._token_stats = (tokens.mean(0), tokens.std(0) + 1e-6)
            self._center = self._pool(hidden).mean(0)
        reps = self._pool(self._hidden(rows)) - self._center
        return reps / reps.norm(dim=-1, keepdim=True).clamp_min(1e-12)

    def _encode(self, prompts: Sequence[str]) -> list[list[int]]:
        return [self.tok(p)["input_ids"] for p in prompts]

    def _pool(self, hiddens: list[torch.Tensor]) -> torch.Tensor:
        mean, std = self._token_stats
        return torch.stack([((h - mean) / std).mean(0) for h in hiddens])

    def _hidden(self, rows: Sequence[Sequence[int]], batch_size: int = 32) -> list[torch.Tensor]:
        """Per sequence, the hidden states (tokens after the first, d) entering the routing
        layer of the base model (every patch shut meanwhile)."""
        bank, arch = self.bank, self.bank.arch
        layer = round(self.routing.route_depth * (arch.n_layers(bank.model) - 1))
        base, device = arch.base_model(bank.model), input_device(bank.model)
        pad = self.tok.pad_token_id if self.tok.pad_token_id is not None else 0
        out = []
        with bank.disabled():
            for i in range(0, len(rows), batch_size):
                part = [list(r) for r in rows[i : i + batch_size]]
                width = max(len(r) for r in part)
                ids = torch.tensor([r + [pad] * (width - len(r)) for r in part], device=device)
                mask = torch.tensor(
                    [[1] * len(r) + [0] * (width - len(r)) for r in part], device=device
                )
                hidden = capture_input(
                    arch.module(bank.model, layer),
                    lambda i=ids, m=mask: base(input_ids=i, attention_mask=m, use_cache=False),
                )
                for h, m in zip(hidden.float(), mask.bool(), strict=True):
                    h = h[m]
                    out.append(h[1:] if len(h) > 1 else h)
        return out

    def _fill_keys(self, patches: Sequence[Any]) -> None:
        """The routing key of patches that have none (one batched pass)."""
        missing = [p for p in patches if p.key is None]
        if missing:
            reps = self.represent(self._encode([p.prompt for p in missing]))
            for p, key in zip(missing, reps, strict=True):
                p.key = key

    # -- routing ---------------------------------------------------------------------------------
    def route_prompts(self, prompts: Sequence[str]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(patch index per row, module -> coefficient per row) for prompt texts, as a forward
        over them would route (for inspection and benchmarks)."""
        route = self._route(self._encode(prompts))
        return route.which, route.coeff

    def _route(self, rows: list[list[int]]) -> _Route:
        """The routing of a batch, computed on the base model (every patch shut meanwhile)."""
        with self.bank.disabled():
            return self._route_base(rows)

    def _route_base(self, rows: list[list[int]]) -> _Route:
        patches = self.bank.patches
        device = input_device(self.bank.model)
        texts = self.tok.batch_decode(rows, skip_special_tokens=True)
        n, mode = len(rows), self.routing.mode
        which, gate = torch.zeros(n, dtype=torch.long), torch.ones(n)
        if len(patches) > 1 or mode == "nearest":
            which, gate = self._nearest(rows, texts)
            if mode != "nearest":
                gate = torch.ones(n)
        own = [self.oracle_scales(t) for t in texts] if mode == "oracle" else []
        modules = sorted({m for p in patches for m in p.modules})
        coeff = {}
        for name in modules:
            if mode == "oracle":  # the prompt's own alpha over the chosen adapter's rank
                c = [
                    s.get(name, 0.0) / patches[e].rank(name) if name in patches[e].scale else 0.0
                    for s, e in zip(own, which.tolist(), strict=True)
                ]
            else:
                c = [patches[e].scale.get(name, 0.0) for e in which.tolist()]
            coeff[name] = (gate * torch.tensor(c)).to(device)
        return _Route(which.to(device), coeff)

    def _nearest(self, rows, texts) -> tuple[torch.Tensor, torch.Tensor]:
        """Per row: the patch with the highest gate among the nearest keys, and that gate."""
        patches = self.bank.patches
        self._fill_keys(patches)  # oracle / always modes compute keys on first use
        keys = torch.stack([p.key for p in patches]).cpu()
        reps = self.represent(rows).cpu()
        k = min(self.routing.candidates, len(patches))
        nn = NearestNeighbors(n_neighbors=k, metric="cosine").fit(keys.numpy())
        dist, idx = nn.kneighbors(reps.numpy())
        r = self.routing
        which, gate = torch.zeros(len(rows), dtype=torch.long), torch.zeros(len(rows))
        for row, text in enumerate(texts):
            text = normalise(text)
            which[row] = int(idx[row][0])  # the nearest, when no gate opens (oracle, always)
            for d, e in zip(dist[row], idx[row], strict=True):
                subject = patches[e].subject
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
