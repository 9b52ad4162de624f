"""Causal tracing (Meng et al. 2022, ROME §2.1): which hidden states carry a fact.

One prompt, one subject, one answer. The *clean* run scores the answer's first token at the last
prompt position; *corrupted* runs add Gaussian noise (std ``noise``, fixed seed, the same ``k``
draws everywhere) to the embeddings of the subject tokens; a *restoration* copies one clean state
back into the corrupted runs. The score of a restoration is the answer probability averaged over
the ``k`` noise samples; ``score - corrupted_prob`` is its indirect effect. Kinds:

* ``hidden`` — the output of decoder layer ``l`` at token ``t``;
* ``mlp`` / ``attn`` — that module's output at token ``t`` in the window of layers
  ``max(0, l - w//2) .. min(L, l + ceil(w/2)) - 1`` (ROME's ``trace_important_window``).

Only the first answer token is scored, as in ROME: later tokens are conditioned on the first and
would mix what the model recalls with how it spells it.

**Batched** (:func:`trace`): the clean run and the k corrupted runs are computed once, in one
forward pass, keeping every traced module's clean output, the corrupted hidden states entering
each layer and the corrupted attention keys/values. A restoration at token ``t`` whose window
starts at layer ``s`` changes nothing below ``s`` and (causal attention) nothing before ``t``.
So all restorations at token ``t`` run in one forward over positions ``t ..`` only, with the
corrupted keys and values of positions ``< t`` as the attention cache, on a batch that grows
layer by layer: a restoration's rows (one per noise sample) join at layer ``s``, fed with the
corrupted hidden states entering it (chunked to ``max_batch_tokens``); one forward per ``(t, s)``
does the same work in ~15x more, smaller forwards, 1.5x slower on one CPU thread. Tokens
before the subject see no noise: restoring them changes nothing, and their scores are the
corrupted probability.
:func:`trace_reference` is ROME's loop (one full forward of 1 + k rows per restoration), kept as
the definition the batched trace is tested and benchmarked against.

**Fast** (``mode="fast"``): attribution patching, the first-order estimate
``(clean_act - corrupted_act) . d score / d act`` at the corrupted run, per token and layer
(summed over the window for mlp/attn), from one forward and backward pass.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import time
from collections.abc import Sequence
from typing import Any

import torch
from tqdm.auto import tqdm

from medit.core.arch import ArchSpec
from medit.core.cache import Cache
from medit.core.errors import UserError
from medit.core.forward import cache_kwargs
from medit.core.hooks import (
    add_rows,
    edited_outputs,
    first_tensor_arg,
    frozen_prefix,
    hooked,
    output_tensor,
    put_rows,
    record,
    with_first_tensor_arg,
    with_output_tensor,
)
from medit.core.models import LoadedModel
from medit.core.placement import input_device
from medit.core.text import encode_pair
from medit.facts.requests import EditRequest
from medit.facts.subject import request_subjects, subject_tokens

log = logging.getLogger(__name__)

KINDS = ("hidden", "mlp", "attn")
MODES = ("full", "fast")
FORMAT = "medit.trace/1"


@dataclasses.dataclass(frozen=True)
class TraceConfig:
    """Causal tracing settings (ROME's defaults)."""

    kinds: tuple[str, ...] = KINDS  #: what is restored: hidden (layer output), mlp, attn
    samples: int = 10  #: noise samples k: corrupted runs averaged per restoration
    noise: float | None = None  #: noise std; None: noise_scale x std of subject embeddings
    noise_scale: float = 3.0  #: multiple of the subject embeddings' std (when noise is None)
    window: int = 10  #: layers restored together for mlp / attn
    seed: int = 0  #: seed of the noise draws
    mode: str = "full"  #: full: every restoration run; fast: attribution patching estimate
    max_batch_tokens: int = 16384  #: memory budget: batch rows x prompt tokens per forward
    subject_only: bool = False  #: restore only at subject tokens (all MedLaSA's profile reads)
    last_subject_only: bool = False  #: restore only at the last subject token (ROME's layer)

    def __post_init__(self):
        bad = [k for k in self.kinds if k not in KINDS]
        if bad or not self.kinds:
            raise UserError(f"trace kinds must be among {', '.join(KINDS)}, got {self.kinds}")
        if self.mode not in MODES:
            raise UserError(f"trace mode must be one of {', '.join(MODES)}, not {self.mode!r}")
        if self.samples < 1 or self.window < 1 or self.max_batch_tokens < 1:
            raise UserError("trace samples, window and max_batch_tokens must be >= 1")
        if self.noise is not None and not self.noise > 0:
            raise UserError(f"trace noise must be > 0, got {self.noise}")

    def settings(self, noise: float) -> dict[str, Any]:
        """What determines a trace's numbers (the batch budget does not)."""
        return {
            "kinds": list(self.kinds),
            "samples": self.samples,
            "noise": noise,
            "window": self.window,
            "seed": self.seed,
            "mode": self.mode,
            **({"subject_only": True} if self.subject_only else {}),
            **({"last_subject_only": True} if self.last_subject_only else {}),
        }


@dataclasses.dataclass
class Trace:
    """The causal trace of one prompt. ``scores[kind][t][l]``: answer probability with the state
    (token t, layer l) restored, averaged over the noise samples."""

    prompt: str
    subject: str
    answer: str  #: the traced answer (the model's prediction, or the answer given)
    answer_token: str  #: its first token, the one scored
    answer_id: int  #: that token's id
    tokens: list[str]  #: the prompt's tokens, decoded one by one
    subject_range: tuple[int, int]  #: token range [start, end) of the subject
    clean_prob: float  #: answer probability without noise
    corrupted_prob: float  #: answer probability with the subject corrupted, nothing restored
    scores: dict[str, list[list[float]]]
    settings: dict[str, Any]
    seconds: float = 0.0

    def effects(self, kind: str) -> torch.Tensor:
        """Indirect effects (tokens, layers): score - corrupted probability."""
        return torch.tensor(self.scores[kind]) - self.corrupted_prob

    def profile(self) -> dict[str, list[float]]:
        """Association profile (MedLaSA): per kind and layer, the mean indirect effect over the
        subject tokens."""
        start, end = self.subject_range
        return {k: self.effects(k)[start:end].mean(0).tolist() for k in self.scores}

    def peak_layers(self) -> dict[str, int]:
        """Per kind, the layer of the largest mean indirect effect over the subject tokens."""
        return {k: max(range(len(p)), key=p.__getitem__) for k, p in self.profile().items()}

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["subject_range"] = list(self.subject_range)
        return {"format": FORMAT, **d}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Trace:
        fields = {f.name for f in dataclasses.fields(cls)}
        out = cls(**{k: v for k, v in d.items() if k in fields})
        out.subject_range = tuple(out.subject_range)
        return out


def association_profile(traces: Sequence[Trace]) -> dict[str, list[float]]:
    """Per kind and layer, the association profile averaged over traces."""
    if not traces:
        raise ValueError("association_profile needs at least one trace")
    profiles = [t.profile() for t in traces]
    return {k: torch.tensor([p[k] for p in profiles]).mean(0).tolist() for k in profiles[0]}


# -- noise ---------------------------------------------------------------------------------------
def noise_level(
    model: Any, tok: Any, arch: ArchSpec, pairs: Sequence[tuple[str, str]], scale: float = 3.0
) -> float:
    """``scale`` x the std of the subject tokens' embeddings over (prompt, subject) pairs."""
    if not pairs:
        raise ValueError("noise_level needs at least one (prompt, subject) pair")
    emb, device = arch.embedding(model), input_device(model)
    rows = []
    with torch.no_grad():
        for prompt, subject in pairs:
            start, end = subject_tokens(tok, prompt, subject)
            ids = torch.tensor(tok(prompt).input_ids[start:end], device=device)
            rows.append(emb(ids[None])[0].float())
    return scale * torch.cat(rows).std().item()


def noise_draws(config: TraceConfig, n_tokens: int, dim: int, noise: float) -> torch.Tensor:
    """The k fixed noise draws (k, subject tokens, dim), from ``config.seed``."""
    gen = torch.Generator().manual_seed(config.seed)
    return torch.randn((config.samples, n_tokens, dim), generator=gen) * noise


def _corrupt(arch: ArchSpec, model: Any, span: tuple[int, int], draws: torch.Tensor):
    """(embedding, edit) adding draw j to the subject tokens of batch row 1 + j (row 0 clean)."""
    k, n, _ = draws.shape
    rows = torch.arange(1, k + 1).repeat_interleave(n)
    cols = torch.arange(span[0], span[1]).repeat(k)
    emb = arch.embedding(model)
    values = draws.reshape(k * n, -1).to(input_device(model))  # where the embedding computes
    return emb, functools.partial(add_rows, rows.to(values.device), cols.to(values.device), values)


def _module(arch: ArchSpec, model: Any, kind: str, layer: int):
    return arch.module(model, layer, None if kind == "hidden" else kind)


def window(kind: str, layer: int, n_layers: int, width: int) -> range:
    """Layers restored for cell (kind, layer): the layer itself for hidden, else ROME's window."""
    if kind == "hidden":
        return range(layer, layer + 1)
    return range(max(0, layer - width // 2), min(n_layers, layer - (-width // 2)))


def _last_probs(model: Any, arch: ArchSpec, input_ids: torch.Tensor) -> torch.Tensor:
    """Next-token probabilities at the last position (rows, vocab); the head runs there only."""
    hidden = arch.base_model(model)(input_ids=input_ids, use_cache=False).last_hidden_state
    return torch.softmax(arch.head(model, hidden[:, -1]).float(), dim=-1)


# -- batched tracing -----------------------------------------------------------------------------
@dataclasses.dataclass
class _States:
    ids: torch.Tensor  #: (T,) prompt token ids
    clean: dict[str, torch.Tensor]  #: kind -> (L, T, d) clean outputs
    entering: torch.Tensor  #: (L, k, T, d) corrupted hidden states entering each layer
    kv: list[tuple[torch.Tensor, torch.Tensor]]  #: per layer, corrupted keys and values
    clean_probs: torch.Tensor  #: (V,)
    corrupted_probs: torch.Tensor  #: (k, V)


def _recorders(arch: ArchSpec, model: Any, kinds, n_layers: int):
    """Stores for every traced module's output, and the edits that fill them."""
    stores = {(kind, i): [] for kind in kinds for i in range(n_layers)}
    edits = [
        (_module(arch, model, kind, i), functools.partial(record, store))
        for (kind, i), store in stores.items()
    ]
    return stores, edits


def _collect_states(model, arch, ids, span, draws, kinds) -> _States:
    """One forward of 1 + k rows: clean outputs of every traced module; the corrupted rows'
    layer inputs and attention keys/values."""
    from transformers import DynamicCache

    n_layers, k = arch.n_layers(model), draws.shape[0]
    entering: list[list[torch.Tensor]] = [[] for _ in range(n_layers)]

    def keep_input(store, _m, args, kwargs):
        store.append(first_tensor_arg(args, kwargs))

    pre = [
        (arch.module(model, i), functools.partial(keep_input, entering[i]), None)
        for i in range(n_layers)
    ]
    outs, edits = _recorders(arch, model, kinds, n_layers)
    cache = DynamicCache(config=model.config)
    with hooked(pre), edited_outputs([_corrupt(arch, model, span, draws), *edits]):
        base = arch.base_model(model)
        out = base(input_ids=ids.expand(k + 1, -1), use_cache=True, **cache_kwargs(base, cache))
    probs = torch.softmax(arch.head(model, out.last_hidden_state[:, -1]).float(), dim=-1)
    # layers may live on several devices (--device-map): the states are kept on the inputs'
    dev = ids.device
    clean = {
        kind: torch.stack([outs[kind, i][0][0].to(dev) for i in range(n_layers)]) for kind in kinds
    }
    return _States(
        ids=ids,
        clean=clean,
        entering=torch.stack([e[0][1:].to(dev) for e in entering]),
        kv=[(layer.keys[1:], layer.values[1:]) for layer in cache.layers],
        clean_probs=probs[0],
        corrupted_probs=probs[1:],
    )


def _restoring_edits(model, arch, states: _States, cells, token: int, width: int):
    """Edits putting the clean output at ``token`` (position 0 of the forward) into the rows of
    each mlp / attn cell, in every layer of its window; cell c owns rows c*k .. c*k + k - 1. (A
    hidden cell's restored state is in the rows it joins with: see :func:`_join_layer`.)"""
    k, n_layers, device = states.entering.shape[1], arch.n_layers(model), states.ids.device
    targets: dict[tuple[str, int], list[int]] = {}
    for c, (kind, _, layer) in enumerate(cells):
        if kind == "hidden":
            continue
        for m in window(kind, layer, n_layers, width):
            targets.setdefault((kind, m), []).extend(range(c * k, c * k + k))
    edits = []
    for (kind, m), rows in targets.items():
        r = torch.tensor(rows, device=device)
        values = states.clean[kind][m][token].expand(len(rows), -1)
        edit = functools.partial(put_rows, r, torch.zeros_like(r), values)
        edits.append((_module(arch, model, kind, m), edit))
    return edits


def _prefix_cache(model, states: _States, token: int, copies: list[int]):
    """The corrupted runs' keys and values of positions ``< token``, at layer m tiled for the
    ``copies[m]`` cells running there (rows of one noise draw per cell, in cell order)."""
    from transformers import DynamicCache

    if token == 0:
        return None
    layers = []
    for m, (key, value) in enumerate(states.kv):
        n = max(1, copies[m])  # a layer no cell runs is never read (one copy keeps the shapes)
        layers.append(tuple(t[:, :, :token].repeat(n, 1, 1, 1) for t in (key, value)))
    return DynamicCache(layers, config=model.config)


def _join_layer(kind: str, layer: int, n_layers: int, width: int) -> int:
    """The first layer a cell's rows run: the first its window restores (nothing below it
    changes); for a hidden cell, the layer after it, entered by its restored output."""
    return layer + 1 if kind == "hidden" else window(kind, layer, n_layers, width).start


def _joining_rows(states: _States, cell, join: int, token: int) -> torch.Tensor:
    """(k, positions from ``token``, d): the states a cell's rows enter layer ``join`` with, the
    corrupted runs' (at a hidden cell's own position, the clean output it restores)."""
    rows = states.entering[join][:, token:]
    if cell[0] == "hidden":
        rows = rows.clone()
        rows[:, 0] = states.clean["hidden"][cell[2]][token]
    return rows


def _last_position_mlp(module):
    """Hooks computing ``module`` (the last layer's MLP, position-wise) at the last position
    only: the other positions' final states are never read (the score is the last one's).
    Their output is that one row broadcast, so that restorations still write where they do."""
    length: list[int] = []

    def pre(_m, args, kwargs):
        x = first_tensor_arg(args, kwargs, "x")
        length.append(x.shape[1])
        return with_first_tensor_arg(args, kwargs, x[:, -1:], "x")

    def post(_m, _args, _kwargs, output):
        out = output_tensor(output)
        full = out.expand(out.shape[0], length.pop(), out.shape[-1])
        return with_output_tensor(output, full)

    return (module, pre, post)


def _run_cells(model, arch, states: _States, cells, token: int, answer: int, width: int):
    """Scores of restoration cells (kind, token, layer) at one token, in one forward whose batch
    grows layer by layer: a cell's rows (one per noise draw) join at :func:`_join_layer`, fed
    with the corrupted hidden states entering it (a hidden cell's own position restored), since
    nothing below it changes. Positions before ``token`` are those of the corrupted runs
    (causality) and come from their keys and values; the forward covers positions ``token ..``
    only, and the last layer's MLP the last position only.

    ``cells`` must be sorted by their join layer: then the rows running at any layer are a
    prefix of the batch, and a cell owns the same rows in every layer it runs."""
    n_layers, k = arch.n_layers(model), states.entering.shape[1]
    starts = [_join_layer(kind, layer, n_layers, width) for kind, _, layer in cells]
    joining: dict[int, list[torch.Tensor]] = {}
    for s, cell in zip(starts, cells, strict=True):
        joining.setdefault(s, []).append(_joining_rows(states, cell, s, token))
    first = starts[0]
    running, copies = 0, []
    for m in range(n_layers):
        running += len(joining.get(m, ()))
        copies.append(running)
    cache = _prefix_cache(model, states, token, copies)
    layers = arch.layer_list(model)

    def join(m: int):
        def hook(_m, args, kwargs):
            x = first_tensor_arg(args, kwargs)
            hidden = torch.cat([x, *(j.to(x.device) for j in joining[m])])
            return with_first_tensor_arg(args, kwargs, hidden)

        return hook

    hooks = [(layers[m], join(m), None) for m in sorted(joining) if m != first]
    hooks.append(_last_position_mlp(arch.module(model, n_layers - 1, "mlp")))
    edits = _restoring_edits(model, arch, states, cells, token, width)
    base = arch.base_model(model)
    entering = torch.cat(joining[first])
    with frozen_prefix(model, arch, first, entering), hooked(hooks), edited_outputs(edits):
        out = base(
            input_ids=states.ids[None, token:],  # one row: the batch is the layers' own
            use_cache=cache is not None,
            **cache_kwargs(base, cache),
        )
    probs = torch.softmax(arch.head(model, out.last_hidden_state[:, -1]).float(), dim=-1)
    return probs[:, answer].view(len(cells), k).mean(1)


def _grid(model, arch, states: _States, span, answer: int, config: TraceConfig):
    """Every kind's (T, L) score grid; the restorations of one token run in one forward (chunked
    to ``max_batch_tokens``), each from its join layer. Restoring the last layer's output needs
    no run: at the last token it is the clean run's, elsewhere it reaches no later position."""
    n_tokens, n_layers = states.ids.shape[0], arch.n_layers(model)
    corrupted = states.corrupted_probs[:, answer].mean().item()
    grids = {kind: torch.full((n_tokens, n_layers), corrupted) for kind in config.kinds}
    for token in _restored_tokens(config, span, n_tokens):
        cells = [(kind, token, layer) for kind in config.kinds for layer in range(n_layers)]
        if "hidden" in config.kinds:
            cells.remove(("hidden", token, n_layers - 1))
            if token == n_tokens - 1:
                grids["hidden"][token, n_layers - 1] = states.clean_probs[answer].item()
        cells.sort(key=lambda c: _join_layer(c[0], c[2], n_layers, config.window))
        per_chunk = max(1, config.max_batch_tokens // ((n_tokens - token) * config.samples))
        for i in range(0, len(cells), per_chunk):
            chunk = cells[i : i + per_chunk]
            scores = _run_cells(model, arch, states, chunk, token, answer, config.window)
            for (kind, _, layer), score in zip(chunk, scores.tolist(), strict=True):
                grids[kind][token, layer] = score
    return grids


def _restored_tokens(config: TraceConfig, span: tuple[int, int], n_tokens: int) -> range:
    if config.last_subject_only:
        return range(span[1] - 1, span[1])
    return range(span[0], span[1] if config.subject_only else n_tokens)


# -- fast: attribution patching ------------------------------------------------------------------
def _attribution(model, arch, ids, span, draws, config: TraceConfig, answer_of):
    """(clean probs, corrupted probs, grids): first-order restoration estimates, one backward."""
    n_layers, k = arch.n_layers(model), draws.shape[0]
    emb, corrupt = _corrupt(arch, model, span, draws)
    leaf = lambda t: corrupt(t).detach().requires_grad_(True)  # noqa: E731
    outs, edits = _recorders(arch, model, config.kinds, n_layers)
    with torch.enable_grad(), edited_outputs([(emb, leaf), *edits]):
        probs = _last_probs(model, arch, ids.expand(k + 1, -1))
        answer = answer_of(probs[0].detach())
        acts = [store[0] for store in outs.values()]
        grads = torch.autograd.grad(probs[1:, answer].mean(), acts)
    effect = {}  # (kind, layer) -> (T,) mean over samples of (clean - corrupted) . grad
    for key, act, grad in zip(outs, acts, grads, strict=True):
        act, grad = act.detach().float(), grad.float() * k  # grad of the mean -> of each row
        effect[key] = ((act[0] - act[1:]) * grad[1:]).sum(-1).mean(0).cpu()
    corrupted = probs[1:, answer].mean().item()
    grids = {}
    for kind in config.kinds:
        per_layer = torch.stack([effect[kind, i] for i in range(n_layers)], dim=1)  # (T, L)
        windows = [window(kind, i, n_layers, config.window) for i in range(n_layers)]
        summed = torch.stack([per_layer[:, w.start : w.stop].sum(1) for w in windows], dim=1)
        grids[kind] = corrupted + summed.cpu()
    return probs[0].detach(), probs[1:].detach(), answer, grids


# -- one prompt ----------------------------------------------------------------------------------
def answer_token_id(tok: Any, prompt: str, answer: str | None, clean_probs: torch.Tensor) -> int:
    """The first token of ``answer`` as it continues ``prompt``; None: the model's prediction."""
    if answer is None:
        return int(clean_probs.argmax())
    return encode_pair(tok, prompt, answer)[1][0]


def _inputs(model, tok, arch: ArchSpec, prompt: str, subject: str, config: TraceConfig, noise):
    """(prompt ids, subject token span, noise draws) of one prompt."""
    dim = arch.embedding(model).embedding_dim
    ids = torch.tensor(tok(prompt).input_ids, device=input_device(model))
    span = subject_tokens(tok, prompt, subject)
    return ids, span, noise_draws(config, span[1] - span[0], dim, noise)


def trace(
    model: Any,
    tok: Any,
    arch: ArchSpec,
    prompt: str,
    subject: str,
    answer: str | None = None,
    config: TraceConfig = TraceConfig(),
    noise: float | None = None,
) -> Trace:
    """Causal trace of ``prompt`` with ``subject`` corrupted, scoring ``answer`` (None: the
    model's own prediction). ``noise`` overrides ``config.noise``; with neither, the noise is
    ``noise_scale`` x the std of this prompt's subject embeddings."""
    t0 = time.perf_counter()
    if noise is None:
        pairs = [(prompt, subject)]
        noise = config.noise or noise_level(model, tok, arch, pairs, config.noise_scale)
    ids, span, draws = _inputs(model, tok, arch, prompt, subject, config, noise)
    answer_of = functools.partial(answer_token_id, tok, prompt, answer)
    if config.mode == "fast":
        with torch.inference_mode(False), torch.enable_grad():
            clean, corrupted, answer_id, grids = _attribution(
                model, arch, ids, span, draws, config, answer_of
            )
    else:
        with torch.no_grad():
            states = _collect_states(model, arch, ids, span, draws, config.kinds)
            clean, corrupted = states.clean_probs, states.corrupted_probs
            answer_id = answer_of(clean)
            grids = _grid(model, arch, states, span, answer_id, config)
    return Trace(
        prompt=prompt,
        subject=subject,
        answer=tok.decode([answer_id]).strip() if answer is None else answer,
        answer_token=tok.decode([answer_id]),
        answer_id=answer_id,
        tokens=[tok.decode([i]) for i in ids.tolist()],
        subject_range=span,
        clean_prob=clean[answer_id].item(),
        corrupted_prob=corrupted[:, answer_id].mean().item(),
        scores={kind: g.tolist() for kind, g in grids.items()},
        settings=config.settings(noise),
        seconds=time.perf_counter() - t0,
    )


@torch.no_grad()
def trace_reference(
    model: Any,
    tok: Any,
    arch: ArchSpec,
    prompt: str,
    subject: str,
    answer_id: int,
    config: TraceConfig,
    noise: float,
) -> dict[str, torch.Tensor]:
    """ROME's loop: one full forward of 1 + k rows per (kind, token, layer), the clean row's
    states copied into the corrupted rows. Returns kind -> (T, L) scores."""
    ids, span, draws = _inputs(model, tok, arch, prompt, subject, config, noise)
    n_tokens, n_layers, k = len(ids), arch.n_layers(model), config.samples
    rows = torch.arange(1, k + 1, device=ids.device)
    grids = {kind: torch.zeros(n_tokens, n_layers) for kind in config.kinds}
    for kind in config.kinds:
        for token in range(n_tokens):
            cols = torch.full((k,), token, device=ids.device)
            copy = lambda t, c=cols: put_rows(rows, c, t[0, c], t)  # noqa: E731
            for layer in range(n_layers):
                edits = [_corrupt(arch, model, span, draws)]
                for m in window(kind, layer, n_layers, config.window):
                    edits.append((_module(arch, model, kind, m), copy))
                with edited_outputs(edits):
                    logits = model(input_ids=ids.expand(k + 1, -1), use_cache=False).logits
                probs = torch.softmax(logits[1:, -1].float(), dim=-1)
                grids[kind][token, layer] = probs[:, answer_id].mean().item()
    return grids


# -- requests, cached on disk --------------------------------------------------------------------
ANSWERS = ("predicted", "ground_truth", "target_new")


def request_answer(req: EditRequest, answer: str) -> str | None:
    """The answer traced for a request: None (the model's prediction), or one of its fields."""
    if answer not in ANSWERS:
        raise UserError(f"trace answer must be one of {', '.join(ANSWERS)}, not {answer!r}")
    if answer == "predicted":
        return None
    value = getattr(req, answer)
    if not value:
        raise UserError(f"{req.id}: request has no {answer!r} to trace")
    return value


#: traces of the base model, keyed by its weights' hash, the inputs and the settings
TRACES = Cache("traces", version=1)


def trace_requests(
    lm: LoadedModel,
    requests: Sequence[EditRequest],
    config: TraceConfig = TraceConfig(),
    answer: str = "predicted",
    use_cache: bool = True,
    quiet: bool = False,
) -> list[Trace]:
    """Trace every request's prompt; the noise level is shared (from the whole set unless
    ``config.noise`` fixes it). Traces are cached in :data:`TRACES`."""
    answers = [request_answer(r, answer) for r in requests]
    subjects = request_subjects(requests)
    pairs = [(r.prompt, s) for r, s in zip(requests, subjects, strict=True)]
    model, tok, arch = lm.model, lm.tokenizer, lm.arch
    noise = config.noise or noise_level(model, tok, arch, pairs, config.noise_scale)
    log.info("tracing %d prompts (%s mode, noise %.4g)", len(pairs), config.mode, noise)
    traces = []
    bar = tqdm(list(zip(pairs, answers, strict=True)), desc="trace", unit="prompt", disable=quiet)
    sha = lm.weights_sha256 if use_cache else None
    for (prompt, subject), ans in bar:
        traces.append(cached_trace(model, tok, arch, prompt, subject, ans, config, noise, sha))
    return traces


def cached_trace(
    model: Any,
    tok: Any,
    arch: ArchSpec,
    prompt: str,
    subject: str,
    answer: str | None = None,
    config: TraceConfig = TraceConfig(),
    noise: float | None = None,
    weights_sha256: str | None = None,
) -> Trace:
    """:func:`trace`, kept in :data:`TRACES` when the weights' hash is given."""
    noise = (
        noise
        or config.noise
        or noise_level(model, tok, arch, [(prompt, subject)], config.noise_scale)
    )
    if weights_sha256 is None:
        return trace(model, tok, arch, prompt, subject, answer, config, noise)
    key = TRACES.key(FORMAT, weights_sha256, prompt, subject, answer, config.settings(noise))
    got = TRACES.get(key)
    if got is not None:
        return Trace.from_dict(got)
    out = trace(model, tok, arch, prompt, subject, answer, config, noise)
    TRACES.put(key, out.to_dict())
    return out
