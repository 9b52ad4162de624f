"""SERAC (Mitchell et al., "Memory-Based Model Editing at Scale", ICML 2022): edits kept as text in
an explicit memory, a scope classifier, and a counterfactual model.

* **Memory.** Each edit is an entry: its prompt and new answer as text, and the prompt's scope
  key. Removing an edit deletes its entry; with no entry left the model is the base model.
* **Scope classifier.** A text is embedded by the base model itself: the residual stream
  entering decoder layer ``layer_depth`` x depth, averaged over the text's tokens, minus the
  training texts' mean, through a learned projection (``dim`` wide), unit length. An input is in
  an edit's scope when the cosine of its embedding with the edit's key is above ``threshold``;
  the entry with the highest cosine is the one retrieved. The projection is trained by ``medit
  train-editor serac`` (a logistic loss on the cosine: a training edit's paraphrases are
  positives; its locality probes, which MedCF builds from the same template with another
  subject, and the other edits of the batch are negatives), and the threshold is the one that
  separates paraphrases from locality probes best on the validation split. The paper trains a
  separate encoder (DistilBERT) as a cross-encoder or embedding classifier; the base model's own
  states need no second model, and cost a partial forward of the prompt that the model runs
  anyway (measured against a cross-encoder: not done, see the README).
* **Counterfactual model.** The paper fine-tunes a small seq2seq model to answer an input given
  the edit. Here it is the base model itself with the edit written before the input
  (``context``: by default the prompt and its new answer, twice, each followed by a blank line):
  in-context editing, no training.
* **Routing inside the forward.** The prompt's first forward (the prefill) decides, per row,
  from the pooled states it computes anyway; a row in scope gets, at every position of that
  forward and of the decoding forwards on its KV cache, the final hidden states the base model
  computes for the edit's context followed by the row's tokens so far. Rows out of scope are
  untouched: the base model's output, bit for bit. So ``model.generate``, medit's decoder and
  its teacher-forced scoring (prefill, then the target on the cache) all see the same edit.
  The counterfactual keeps a KV cache per in-scope row (the edit's context and the row's tokens),
  so a decoding step runs the new token only, as the base model's own decoding does.

``checkpoint=None`` gives the untrained classifier (the identity projection, no mean removed,
threshold 0.95): exact repeats of a prompt are in scope, little else is reliably separated.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
import random
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

from medit.artifacts.modules import write_module_artifact
from medit.core.arch import ArchSpec, get_arch
from medit.core.errors import UserError
from medit.core.forward import cache_kwargs, keep_with_cache, passed_cache
from medit.core.hooks import capture_input, first_tensor_arg
from medit.core.placement import input_device
from medit.editors.base import Capabilities, Editor, HParams, hp
from medit.editors.learned import (
    EditorTrainer,
    checkpoint_key,
    load_checkpoint,
    load_optimizer_tensors,
    optimizer_tensors,
)
from medit.editors.results import MemoryEdit
from medit.facts.requests import EditRequest

log = logging.getLogger(__name__)

_ATTR = "_medit_serac_memory"
#: scope classifiers of checkpoints loaded in this process (see ``learned.checkpoint_key``)
_LOADED: dict[tuple, tuple[Any, float]] = {}
_SEQ = "_medit_serac_sequences"
UNTRAINED_THRESHOLD = 0.95


@dataclasses.dataclass(frozen=True)
class SERACHParams(HParams):
    checkpoint: str | None = hp(
        None,
        "directory written by `medit train-editor serac` (its best state); none: the "
        "untrained scope classifier",
    )
    threshold: float | None = hp(
        None, "cosine above which an input is in an edit's scope; none: the checkpoint's"
    )
    context: str = hp(
        "{prompt} {target}\n\n{prompt} {target}\n\n",
        "the edit as the counterfactual model reads it before an in-scope input (twice: chosen "
        "on MedCF valid, see the README)",
    )
    layer_depth: float = hp(0.5, "relative depth of the decoder layer whose input embeds a text")
    dim: int = hp(256, "width of the learned scope projection")
    lr: float = hp(1e-3, "training: Adam learning rate of the projection")
    batch: int = hp(32, "training: edits per step")
    max_length: int = hp(64, "tokens kept of a text embedded for the scope classifier")
    valid_limit: int = hp(300, "validation: edits of the valid file used (their first N)")
    seed: int = hp(0, "training: seed of the projection's initialisation")

    def __post_init__(self):
        super().__post_init__()
        self._at_least(1, "dim", "batch", "max_length", "valid_limit")
        self._within("layer_depth", 0.0, 1.0)
        self._positive("lr")
        if "{prompt}" not in self.context or "{target}" not in self.context:
            raise UserError("hyper-parameter 'context' of serac must contain {prompt} and {target}")


# -- the scope classifier --------------------------------------------------------------------------
class Scope(torch.nn.Module):
    """Embedding of pooled states -> unit scope vector: ``normalize((h - mean) @ proj)``."""

    def __init__(self, d_model: int, dim: int, seed: int = 0, trained: bool = False):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        if trained or dim != d_model:
            init = torch.randn(d_model, dim, generator=g) / math.sqrt(d_model)
        else:
            init = torch.eye(d_model)
        self.proj = torch.nn.Parameter(init)
        self.register_buffer("mean", torch.zeros(d_model))
        self.scale = torch.nn.Parameter(torch.tensor(10.0))  # logistic loss: a * cos + b
        self.bias = torch.nn.Parameter(torch.tensor(-5.0))

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        x = (pooled.float() - self.mean) @ self.proj
        return F.normalize(x, dim=-1)


def scope_layer(model: Any, hp: SERACHParams) -> int:
    n = get_arch(model).n_layers(model)
    return min(n - 1, max(0, round(hp.layer_depth * (n - 1))))


@torch.no_grad()
def embed_texts(
    model: Any, tok: Any, texts: Sequence[str], layer: int, max_length: int, batch: int = 64
) -> torch.Tensor:
    """(len(texts), d_model) float32: the residual stream entering ``layer``, averaged over each
    text's tokens (tokenised as the model's prompts are; positions as without padding)."""
    arch = get_arch(model)
    base, module = arch.base_model(model), arch.layer_list(model)[layer]
    out = []
    side = tok.padding_side
    tok.padding_side = "left"
    try:
        for s in range(0, len(texts), batch):
            enc = tok(
                list(texts[s : s + batch]),
                return_tensors="pt",
                padding=True,
                truncation=True,
                max_length=max_length,
            ).to(input_device(model))
            mask = enc.attention_mask
            pos = (mask.cumsum(-1) - 1).clamp(min=0)
            hidden = capture_input(
                module,
                lambda enc=enc, mask=mask, pos=pos: base(
                    input_ids=enc.input_ids, attention_mask=mask, position_ids=pos, use_cache=False
                ),
            )
            out.append(_pool(hidden, mask.bool()).cpu())  # the scope classifier runs on CPU
    finally:
        tok.padding_side = side
    return torch.cat(out) if out else torch.zeros(0, model.config.hidden_size)


def _pool(hidden: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
    w = real.to(hidden.dtype)[..., None]
    return ((hidden * w).sum(1) / w.sum(1).clamp(min=1)).float()


# -- the memory ------------------------------------------------------------------------------------
@dataclasses.dataclass(eq=False)
class Entry:
    edit_id: str
    prompt: str
    target: str
    context_ids: tuple[int, ...]
    key: torch.Tensor  #: (dim,) unit scope vector of the prompt


class _Sequences:
    """Per row of a batch: its tokens so far, its retrieved entry (None: out of scope) and the
    counterfactual's KV cache over the entry's context and those tokens (None: not run yet)."""

    def __init__(self, tokens: list[list[int]], entries: list[Entry | None]):
        self.tokens, self.entries, self.batch = tokens, entries, len(tokens)
        self.caches: list[Any] = [None] * len(tokens)

    def select(self, rows: torch.Tensor) -> None:
        idx = rows.tolist()
        self.tokens = [list(self.tokens[i]) for i in idx]
        self.entries = [self.entries[i] for i in idx]
        seen: set[int] = set()
        caches = []
        for i in idx:  # a row kept twice (beam search) grows two caches from here
            cache = self.caches[i]
            caches.append(copy.deepcopy(cache) if i in seen and cache is not None else cache)
            seen.add(i)
        self.caches = caches
        self.batch = len(idx)


class Memory:
    """SERAC's memory on one model: entries, the scope classifier and the hooks that route."""

    def __init__(self, model: Any, tok: Any, scope: Scope, threshold: float, layer: int):
        self.model, self.tok = model, tok
        self.scope, self.threshold, self.layer = scope, threshold, layer
        self.entries: list[Entry] = []
        self._busy = self._pending = False
        self._seq: _Sequences | None = None
        self._real: list[list[int]] = []  # per row: columns of this forward holding real tokens
        arch = get_arch(model)
        base = arch.base_model(model)
        self._handles = [
            base.register_forward_pre_hook(self._begin, with_kwargs=True),
            arch.layer_list(model)[layer].register_forward_pre_hook(self._decide, with_kwargs=True),
            base.register_forward_hook(self._answer, with_kwargs=True),
        ]
        setattr(model, _ATTR, self)

    @classmethod
    def of(cls, model: Any, tok: Any, scope: Scope, threshold: float, layer: int) -> Memory:
        memory = getattr(model, _ATTR, None)
        if memory is None:
            return cls(model, tok, scope, threshold, layer)
        if memory.layer != layer or not _same_scope(memory.scope, scope):
            raise UserError(
                "this model already carries SERAC edits made with another scope classifier; "
                "restore them first or edit with the same checkpoint"
            )
        memory.threshold = threshold
        return memory

    def add(self, *entries: Entry) -> None:
        self.entries += entries

    def remove(self, *entries: Entry) -> None:
        gone = {id(e) for e in entries}
        self.entries = [e for e in self.entries if id(e) not in gone]
        if not self.entries:  # nothing left to consult: the base model again
            for h in self._handles:
                h.remove()
            if getattr(self.model, _ATTR, None) is self:
                delattr(self.model, _ATTR)

    def export(self, directory, result: MemoryEdit, **provenance):
        """The entries of ``result`` and the scope classifier; a sequence's checkpoint of an edit
        after the first (``sequence_index`` > 0) leaves the classifier to the first one's."""
        tensors = {}
        if provenance.get("sequence_index", 0) == 0:
            tensors = {
                "scope.proj": self.scope.proj.detach(),
                "scope.mean": self.scope.mean,
                "scope.scale": self.scope.scale.detach(),
                "scope.bias": self.scope.bias.detach(),
            }
        edits = []
        for i, e in enumerate(result.entries):
            tensors[f"{i}::key"] = e.key
            tensors[f"{i}::context"] = torch.tensor(e.context_ids, dtype=torch.long)
            edits.append({"id": e.edit_id, "prompt": e.prompt, "target": e.target})
        hparams = {**result.hparams.to_dict(), "threshold": self.threshold}
        provenance["scope_layer"] = self.layer
        return write_module_artifact(
            directory, "memory", result.method, hparams, edits, tensors, **provenance
        )

    # -- routing ---------------------------------------------------------------------------------
    def _begin(self, _module, args, kwargs):
        """A forward starts: a new sequence (no cache, or an empty one) is decided at the scope
        layer; a decoding step continues its sequence's decision."""
        if self._busy:
            return  # the counterfactual's own forward
        self._seq, self._real, self._pending = None, [], False
        if not self.entries:
            return
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is None:
            return  # embeddings passed in: no tokens to route on (the base model answers)
        width = ids.shape[1]
        mask = kwargs.get("attention_mask")
        real = (
            torch.ones(ids.shape, dtype=torch.bool)
            if mask is None
            else mask[:, -width:].bool().cpu()
        )
        self._real = [torch.nonzero(real[r]).flatten().tolist() for r in range(ids.shape[0])]
        rows = ids.cpu().tolist()
        new = [[rows[r][c] for c in self._real[r]] for r in range(ids.shape[0])]
        cache = passed_cache(kwargs)
        kept = getattr(cache, _SEQ, None) if cache is not None else None
        if cache is not None and cache.get_seq_length() > 0:
            if kept is None or kept.batch != ids.shape[0]:
                return  # a sequence opened before this memory existed: the base model's
            for r, toks in enumerate(new):
                kept.tokens[r] += toks
            self._seq = kept
            return
        self._seq = _Sequences(new, [None] * len(new))
        self._pending = True
        if cache is not None:
            keep_with_cache(cache, _SEQ, self._seq)

    def _decide(self, _module, args, kwargs):
        """The prefill reaches the scope layer: retrieve each row's entry from its pooled input."""
        if self._busy or self._seq is None or not self._pending:
            return
        self._pending = False
        hidden = first_tensor_arg(args, kwargs)
        real = torch.zeros(hidden.shape[:2], dtype=torch.bool)
        for r, cols in enumerate(self._real):
            real[r, cols] = True
        with torch.no_grad():
            q = self.scope(_pool(hidden.detach(), real.to(hidden.device)).cpu())
            keys = torch.stack([e.key for e in self.entries])
            cos = q @ keys.T  # (batch, entries)
            best, which = cos.max(dim=1)
        for r in range(len(self._seq.entries)):
            if best[r] > self.threshold and self._real[r]:
                self._seq.entries[r] = self.entries[int(which[r])]

    def _answer(self, module, args, kwargs, output):
        """In-scope rows get the counterfactual's final states at this forward's real tokens."""
        seq = self._seq
        if self._busy or seq is None:
            return None
        cache = getattr(output, "past_key_values", None)
        if cache is not None and getattr(cache, _SEQ, None) is None:
            keep_with_cache(cache, _SEQ, seq)  # a cache the model made itself
        rows = [r for r, e in enumerate(seq.entries) if e is not None and self._real[r]]
        if not rows:
            return None
        hidden = output.last_hidden_state
        states = self._counterfactual(module, [seq.entries[r] for r in rows], rows, seq)
        hidden = hidden.clone()
        for r, h in zip(rows, states, strict=True):
            cols = torch.tensor(self._real[r], device=hidden.device)
            hidden[r, cols] = h.to(hidden.dtype)
        output.last_hidden_state = hidden
        return output

    @torch.no_grad()
    def _counterfactual(self, base, entries, rows, seq) -> list[torch.Tensor]:
        """The base model's final states for each entry's context followed by its row's tokens;
        per row, the states at the row's newest tokens (those of this forward). A row's first
        forward runs its context and tokens (rows together, left-padded) and keeps the KV cache
        of its own positions; later forwards (decoding steps, a target scored on the cache) run
        only the new tokens on it."""
        fresh = [(e, r) for e, r in zip(entries, rows, strict=True) if seq.caches[r] is None]
        states = {}
        if fresh:
            states = dict(zip([r for _, r in fresh], self._prefill(base, fresh, seq), strict=True))
        device = input_device(self.model)
        self._busy = True
        try:
            for r in rows:
                if r in states:
                    continue
                cache, n = seq.caches[r], len(self._real[r])
                ids = torch.tensor([seq.tokens[r][-n:]], device=device)
                past = cache.get_seq_length()
                pos = torch.arange(past, past + n, device=device)[None]
                out = base(
                    input_ids=ids, position_ids=pos, use_cache=True, **cache_kwargs(base, cache)
                )
                states[r] = out.last_hidden_state[0]
        finally:
            self._busy = False
        return [states[r] for r in rows]

    def _prefill(self, base, fresh, seq) -> list[torch.Tensor]:
        """Context + tokens of rows run for the first time, in one left-padded forward; each
        row's cache is its own positions' keys and values."""
        from transformers import DynamicCache

        seqs = [list(e.context_ids) + _drop_bos(self.tok, seq.tokens[r]) for e, r in fresh]
        width = max(map(len, seqs))
        device = input_device(self.model)
        ids = torch.full((len(seqs), width), _pad_id(self.tok), dtype=torch.long)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        for i, s in enumerate(seqs):
            ids[i, width - len(s) :] = torch.tensor(s)
            mask[i, width - len(s) :] = 1
        ids, mask = ids.to(device), mask.to(device)
        cache = DynamicCache(config=self.model.config)
        self._busy = True
        try:
            out = base(
                input_ids=ids,
                attention_mask=mask,
                position_ids=(mask.cumsum(-1) - 1).clamp(min=0),
                use_cache=True,
                **cache_kwargs(base, cache),
            ).last_hidden_state
        finally:
            self._busy = False
        for i, ((_, r), s) in enumerate(zip(fresh, seqs, strict=True)):
            own = [
                tuple(t[i : i + 1, :, width - len(s) :].clone() for t in (layer.keys, layer.values))
                for layer in cache.layers
            ]
            seq.caches[r] = DynamicCache(own, config=self.model.config)
        return [out[i, width - len(self._real[r]) :] for i, (_, r) in enumerate(fresh)]


def _drop_bos(tok: Any, tokens: list[int]) -> list[int]:
    bos = getattr(tok, "bos_token_id", None)
    return tokens[1:] if bos is not None and tokens and tokens[0] == bos else tokens


def _pad_id(tok: Any) -> int:
    for t in (tok.pad_token_id, tok.eos_token_id, 0):
        if t is not None:
            return int(t)
    return 0


def _same_scope(a: Scope, b: Scope) -> bool:
    return a.proj.shape == b.proj.shape and all(
        torch.equal(x, y)
        for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True)
    )


# -- the editor ------------------------------------------------------------------------------------
class SERAC(Editor):
    name = "serac"
    hparams_class = SERACHParams
    capabilities = Capabilities(batch=True)
    summary = (
        "memory of edits as text, a scope classifier on the base model's states, the base "
        "model with the edit in context answering in scope (Mitchell et al. 2022)"
    )

    def edited_modules(self, hp: SERACHParams, arch: ArchSpec, n_layers: int) -> tuple[str, ...]:
        return ()  # no weight is written or patched: hooks read the model's own states

    @staticmethod
    def scope_for(model: Any, hp: SERACHParams) -> tuple[Scope, float]:
        """The scope classifier and threshold: the checkpoint's, or the untrained one."""
        d = model.config.hidden_size
        if hp.checkpoint is None:
            log.warning("serac: no checkpoint: the untrained scope classifier (exact repeats only)")
            scope = Scope(d, d)
            threshold = UNTRAINED_THRESHOLD
        else:
            key = checkpoint_key(hp.checkpoint, model)
            if key not in _LOADED:  # read once per process, not at every edit
                config, tensors = load_checkpoint(hp.checkpoint, "serac", model)
                scope = Scope(d, config["dim"], trained=True)
                scope.load_state_dict(
                    {
                        k.removeprefix("scope."): v
                        for k, v in tensors.items()
                        if k.startswith("scope.")
                    }
                )
                if len(_LOADED) >= 4:
                    _LOADED.pop(next(iter(_LOADED)))
                _LOADED[key] = scope, config["threshold"]
            scope, threshold = _LOADED[key]
        return scope, threshold if hp.threshold is None else hp.threshold

    def _apply(self, model, tok, requests, hp: SERACHParams, prior=None):
        scope, threshold = self.scope_for(model, hp)
        layer = scope_layer(model, hp)
        memory = Memory.of(model, tok, scope, threshold, layer)
        entries = _entries(memory, requests, hp)
        memory.add(*entries)
        result = MemoryEdit(self.name, hp, memory, entries)
        result.diagnostics = [{"entries": len(memory.entries)} for _ in entries]
        return result

    @classmethod
    def load(cls, model, tok, manifest, tensors):
        hparams = cls.hparams_class.from_dict(manifest["hparams"])
        if "scope.proj" in tensors:
            scope = Scope(model.config.hidden_size, tensors["scope.proj"].shape[1], trained=True)
            scope.load_state_dict(
                {k.removeprefix("scope."): v for k, v in tensors.items() if k.startswith("scope.")}
            )
            layer = manifest.get("scope_layer", scope_layer(model, hparams))
            memory = Memory.of(model, tok, scope, hparams.threshold, layer)
        else:  # edit N > 0 of a sequence's checkpoint: the memory its first edit made
            memory = getattr(model, _ATTR, None)
            if memory is None:
                raise UserError(
                    f"this serac edit is edit {manifest.get('sequence_index')} of a sequence; its "
                    "scope classifier is stored with the sequence's first edit (edits/000000): "
                    "load the sequence's checkpoint directory, not this edit alone"
                )
        entries = [
            Entry(
                e["id"],
                e["prompt"],
                e["target"],
                tuple(tensors[f"{i}::context"].tolist()),
                tensors[f"{i}::key"],
            )
            for i, e in enumerate(manifest["edits"])
        ]
        memory.add(*entries)
        return MemoryEdit(manifest["method"], hparams, memory, entries)

    @classmethod
    def trainer(cls, model: Any, tok: Any, hp: SERACHParams) -> SERACTrainer:
        return SERACTrainer(model, tok, hp)


def _entries(memory: Memory, requests: Sequence[EditRequest], hp: SERACHParams) -> list[Entry]:
    prompts = [r.prompt for r in requests]
    pooled = embed_texts(memory.model, memory.tok, prompts, memory.layer, hp.max_length)
    with torch.no_grad():
        keys = memory.scope(pooled)
    out = []
    for r, key in zip(requests, keys, strict=True):
        target = r.target_new.strip()
        text = hp.context.format(prompt=r.prompt, target=target)
        ids = tuple(memory.tok(text).input_ids)
        out.append(Entry(r.id, r.prompt, target, ids, key.clone()))
    return out


# -- training the scope classifier -----------------------------------------------------------------
class SERACTrainer(EditorTrainer):
    """Trains the scope projection on pooled states computed once (``prepare``)."""

    monitor = "score"
    higher_is_better = True

    def __init__(self, model: Any, tok: Any, hp: SERACHParams):
        self.model, self.tok, self.hp = model, tok, hp
        self.layer = scope_layer(model, hp)
        self.batch_size = hp.batch
        self.scope = Scope(model.config.hidden_size, hp.dim, seed=hp.seed, trained=True)
        self.opt = torch.optim.Adam(self.scope.parameters(), lr=hp.lr)
        self.threshold = 0.5
        self._emb: dict[str, torch.Tensor] = {}
        self._rng = random.Random(hp.seed)

    def _embed(self, texts: Sequence[str], progress: Any = None) -> None:
        todo = sorted({t for t in texts if t not in self._emb})
        step = 256
        for s in range(0, len(todo), step):
            chunk = todo[s : s + step]
            for t, e in zip(
                chunk,
                embed_texts(self.model, self.tok, chunk, self.layer, self.hp.max_length),
                strict=True,
            ):
                self._emb[t] = e
            if progress is not None:
                log.info("serac: embedded %d of %d texts", min(s + step, len(todo)), len(todo))

    @staticmethod
    def _texts(r: EditRequest) -> tuple[list[str], list[str]]:
        """(positives, hard negatives) of an edit: its paraphrases; its locality probes."""
        return list(r.rephrase_prompts), [p for _, p, _ in r.locality_probes()]

    def prepare(self, train, progress=None) -> None:
        texts = []
        for r in train:
            pos, neg = self._texts(r)
            texts += [r.prompt, *pos, *neg]
        self._embed(texts, progress)
        # the training texts' mean: the component every text shares says nothing of scope
        self.scope.mean.copy_(torch.stack([self._emb[t] for t in sorted(set(texts))]).mean(0))

    def _pairs(self, batch: Sequence[EditRequest]):
        """(anchors, others, labels): every edit prompt against every positive and negative of
        the batch; a pair is positive only for an edit's own paraphrase."""
        anchors = [r.prompt for r in batch]
        others: list[str] = []
        labels = []  # per other text: the anchor it is a positive of, or -1
        for i, r in enumerate(batch):
            pos, neg = self._texts(r)
            others += pos + neg
            labels += [i] * len(pos) + [-1] * len(neg)
        n = len(anchors)
        y = torch.zeros(n, len(others) + n)
        for j, i in enumerate(labels):
            if i >= 0:
                y[i, j] = 1.0
        # the other edits' prompts are negatives too (the memory holds many edits)
        return anchors, others + anchors, y, n

    def loss(self, batch: Sequence[EditRequest]) -> torch.Tensor:
        """The scope loss of ``batch``: logistic on the scaled cosine of each edit prompt with
        every text of the batch, positives (own paraphrases) weighted up to the negatives."""
        self._embed([t for r in batch for t in [r.prompt, *sum(self._texts(r), [])]])
        anchors, others, labels, n = self._pairs(batch)
        a = self.scope(torch.stack([self._emb[t] for t in anchors]))
        o = self.scope(torch.stack([self._emb[t] for t in others]))
        cos = a @ o.T  # (n, m)
        # an anchor against itself (the last n columns' diagonal) is no training signal
        keep = torch.ones_like(cos, dtype=torch.bool)
        keep[:, -n:] = ~torch.eye(n, dtype=torch.bool)
        logits = self.scope.scale * cos + self.scope.bias
        ratio = float((labels == 0).sum() / labels.sum().clamp(min=1))
        weight = torch.where(labels > 0, max(1.0, ratio), 1.0)
        return F.binary_cross_entropy_with_logits(logits[keep], labels[keep], weight=weight[keep])

    def step(self, batch):
        loss = self.loss(batch)
        if not math.isfinite(loss.item()):
            raise RuntimeError("serac: the scope loss is not finite")
        self.opt.zero_grad()
        loss.backward()
        self.opt.step()
        return {"loss": loss.item()}

    @torch.no_grad()
    def scores(self, requests: Sequence[EditRequest]) -> tuple[torch.Tensor, torch.Tensor]:
        """(positive scores, negative scores) against a memory of all ``requests``: for each
        paraphrase, its cosine with its own edit's key when that is the best match (else
        -inf); for each locality probe, its best cosine over all keys."""
        self._embed([t for r in requests for t in [r.prompt, *sum(self._texts(r), [])]])
        keys = self.scope(torch.stack([self._emb[r.prompt] for r in requests]))
        pos, neg = [], []
        for i, r in enumerate(requests):
            p, n = self._texts(r)
            for t in p:
                c = self.scope(self._emb[t][None]) @ keys.T
                best, which = c.max(1)
                pos.append(float(best) if int(which) == i else -math.inf)
            for t in n:
                neg.append(float((self.scope(self._emb[t][None]) @ keys.T).max()))
        return torch.tensor(pos), torch.tensor(neg)

    def validate(self, requests):
        reqs = list(requests)[: self.hp.valid_limit]
        pos, neg = self.scores(reqs)
        best = (-1.0, 0.5, 0.0, 0.0)
        for t in torch.linspace(-1, 1, 401).tolist():
            recall = float((pos > t).float().mean()) if len(pos) else 0.0
            reject = float((neg <= t).float().mean()) if len(neg) else 1.0
            if (recall + reject) / 2 > best[0]:
                best = ((recall + reject) / 2, t, recall, reject)
        self.threshold = best[1]
        return {
            "score": best[0],
            "in_scope": best[2],
            "out_of_scope": best[3],
            "threshold": best[1],
        }

    def state(self):
        tensors = {f"scope.{k}": v.detach() for k, v in self.scope.state_dict().items()}
        tensors |= optimizer_tensors(self.opt)
        return tensors, {"dim": self.hp.dim, "layer": self.layer, "threshold": self.threshold}

    def load_state(self, tensors, config):
        self.scope.load_state_dict(
            {k.removeprefix("scope."): v for k, v in tensors.items() if k.startswith("scope.")}
        )
        load_optimizer_tensors(self.opt, tensors)
        self.threshold = config["threshold"]
