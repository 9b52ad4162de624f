"""A small memory editor, written as a new editor would be: this file plus one registry line
(``METHODS["lookup"] = "tests.editors.lookup:Lookup"``, set by the tests).

The memory keeps one entry per edit: the prompt's token ids and the target's first token id.
It is consulted at inference, beside the unchanged weights: when a new sequence starts with an
entry's prompt (after any left padding), the logits at the prompt's last position get ``bias``
added to the target token. Everything else (other prompts, the continuation of a cached
generation) is the base model's output, bit for bit. A SERAC-like toy that proves the memory
kind of the edit contract: export, load, remove, restore and combine.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from medit.artifacts.modules import write_module_artifact
from medit.core.arch import get_arch
from medit.core.forward import passed_cache
from medit.editors.base import Capabilities, Editor, HParams, hp
from medit.editors.results import MemoryEdit

_ATTR = "_medit_test_memory"


@dataclasses.dataclass(frozen=True)
class LookupHParams(HParams):
    bias: float = hp(50.0, "logit added to the target's first token after a stored prompt")


@dataclasses.dataclass(eq=False)
class Entry:
    edit_id: str
    prompt_ids: tuple[int, ...]
    target_id: int
    bias: float


class Memory:
    """The explicit memory of one model: its entries and the two hooks that consult it."""

    def __init__(self, model: Any):
        self.model = model
        self.entries: list[Entry] = []
        self._rows: list[tuple[int, int, Entry]] = []  # (row, position, entry) of this forward
        self._length = 0  # its sequence length
        self._handles = [
            # the base model (below the LM head): every forward goes through it, medit's own
            # decoder included, so every path is consulted the same way
            get_arch(model)
            .base_model(model)
            .register_forward_pre_hook(self._read_inputs, with_kwargs=True),
            model.get_output_embeddings().register_forward_hook(self._bias_logits),
        ]
        setattr(model, _ATTR, self)

    @classmethod
    def of(cls, model: Any) -> Memory:
        return getattr(model, _ATTR, None) or cls(model)

    def add(self, *entries: Entry) -> None:
        self.entries += entries

    def remove(self, *entries: Entry) -> None:
        gone = {id(e) for e in entries}
        self.entries = [e for e in self.entries if id(e) not in gone]
        if not self.entries:  # nothing left to consult: the model is the base model again
            for h in self._handles:
                h.remove()
            delattr(self.model, _ATTR)

    def export(self, directory, result: MemoryEdit, **provenance):
        tensors = {f"{i}::prompt": torch.tensor(e.prompt_ids) for i, e in enumerate(result.entries)}
        edits = [{"id": e.edit_id, "target": e.target_id} for e in result.entries]
        hparams = result.hparams.to_dict()
        return write_module_artifact(
            directory, "memory", result.method, hparams, edits, tensors, **provenance
        )

    def _read_inputs(self, _model, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        past = passed_cache(kwargs)
        self._rows, self._length = [], 0 if ids is None else ids.shape[1]
        if ids is None or (past is not None and past.get_seq_length() > 0):
            return  # a continuation step: its sequence was consulted when it started
        mask = kwargs.get("attention_mask")
        for row in range(ids.shape[0]):
            start = int(mask[row].argmax()) if mask is not None else 0  # after left padding
            seq = tuple(ids[row, start:].tolist())
            for e in self.entries:
                n = len(e.prompt_ids)
                if seq[:n] == e.prompt_ids:
                    self._rows.append((row, start + n - 1, e))

    def _bias_logits(self, _module, args, logits):
        if not self._rows:
            return None
        flat = logits.dim() == 2  # (batch, vocab): the head applied to the last position only
        logits = logits.clone()
        view = logits[:, None] if flat else logits
        skipped = self._length - view.shape[1]  # logits of the last positions only (generate)
        for row, pos, e in self._rows:
            if pos - skipped >= 0:
                view[row, pos - skipped, e.target_id] += e.bias
        return logits


class Lookup(Editor):
    name = "lookup"
    hparams_class = LookupHParams
    capabilities = Capabilities(batch=True)
    summary = "test memory: stored prompts answered with their target's first token"

    def _apply(self, model: Any, tok: Any, requests, hp: LookupHParams, prior=None):
        memory = Memory.of(model)
        entries = [
            Entry(r.id, tuple(tok(r.prompt).input_ids), _first_target_id(tok, r), hp.bias)
            for r in requests
        ]
        memory.add(*entries)
        return MemoryEdit(self.name, hp, memory, entries)

    @classmethod
    def load(cls, model, tok, manifest, tensors):
        memory = Memory.of(model)
        hparams = cls.hparams_class(**manifest["hparams"])
        entries = [
            Entry(e["id"], tuple(tensors[f"{i}::prompt"].tolist()), e["target"], hparams.bias)
            for i, e in enumerate(manifest["edits"])
        ]
        memory.add(*entries)
        return MemoryEdit(manifest["method"], hparams, memory, entries)


def _first_target_id(tok, req) -> int:
    text = req.target_new if req.target_new.startswith(" ") else " " + req.target_new
    return tok(text, add_special_tokens=False).input_ids[0]
