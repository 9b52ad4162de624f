"""The edit contract: what every editor's ``apply`` returns.

An edit is one of three kinds behind the one :class:`EditResult` interface:

* :class:`WeightEdit` — the edit is written into the model's weights (FT, LoRA merged, ROME,
  MEMIT, AlphaEdit, MEND). It keeps copies of only the touched tensors, taken before the edit.
* :class:`ModuleEdit` — the edit is a set of patches installed beside the weights at modules the
  ArchSpec names (MedLaSA's adapters, GRACE's codebook, T-Patcher's neurons; SCEN, WISE
  next). The base weights are never written; a shut gate leaves the module's output
  bit-identical (:mod:`medit.editors.patching`).
* :class:`MemoryEdit` — the edit is an entry in an explicit memory that the model consults at
  inference (SERAC).

A new editor defines:

* ``name``, ``summary``, ``hparams_class`` (a frozen :class:`~medit.editors.base.HParams`), and
  ``capabilities``;
* ``_apply(model, tok, requests, hp, prior)`` -> an ``EditResult`` of its kind. ``prior`` is the
  result of the edits made before on this model in a sequence (None for the first); an editor
  that needs their state (AlphaEdit's keys) reads ``prior.editor_state`` and returns the state
  after its own edit in ``editor_state``. No editor keeps state on the model object.
* for a module or memory edit, ``load(model, tok, manifest, tensors)``: the result back from its
  artifact (weight edits inherit the default).

Invariants every kind keeps (tests/test_contract.py checks them for every editor):

* the model is edited in place and *stays edited*; ``restore()`` puts it back bit for bit;
* ``combine(results)`` is the one result of edits applied one after another: its ``restore()``
  undoes them all, its ``editor_state`` is the last one's;
* ``export(dir)`` writes an artifact that :func:`medit.editors.load.load_edit` installs on a
  fresh copy of the base model with identical outputs;
* ``remove(edit_id)`` undoes one request's edit and keeps the others (exact for module and memory
  edits; a weight edit can remove only the whole of itself);
* ``merged()`` is a context in which the model's weights hold the edit (what ``--save-model``
  writes); outside it the model is as it was. An edit that is no weight change (a codebook,
  neurons open only where their pre-activation is positive, a memory) says so: ``mergeable``
  is False and ``merged_weights`` refuses with the reason.
"""

from __future__ import annotations

import contextlib
import dataclasses
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, ClassVar

import torch

from medit.artifacts import peft as peft_export
from medit.artifacts.weights import write_weights_artifact
from medit.core.errors import UserError


class EditResult(ABC):
    """What an edit changed, how it went, and how to undo it (see the module docstring)."""

    #: "weights", "modules" or "memory": the artifact kind and how the edit lives in the model
    kind: ClassVar[str]

    def __init__(
        self,
        method: str,
        hparams: Any,
        edit_ids: Sequence[str],
        editor_state: dict[str, torch.Tensor] | None = None,
    ):
        self.method = method
        self.hparams = hparams
        self.edit_ids = list(edit_ids)  #: request ids, in the order they were edited
        self.editor_state = dict(editor_state or {})  #: what later edits of the editor read
        self.diagnostics: list[dict[str, Any]] = []  #: per call: losses, steps and seconds
        self.manifest: dict[str, Any] | None = None  #: the artifact's, when loaded from one
        self.state = "edited"  #: "edited" or "restored"
        self.seconds = 0.0

    # -- what every kind defines -----------------------------------------------------------------
    @property
    @abstractmethod
    def names(self) -> list[str]:
        """The tensors (weight edits) or modules (module edits) the edit touches."""

    @abstractmethod
    def restore(self) -> None:
        """Undo the edit, bit for bit."""

    @abstractmethod
    def remove(self, edit_id: str) -> None:
        """Undo one request's edit, keeping the others."""

    @classmethod
    @abstractmethod
    def combine(cls, results: Sequence[EditResult]) -> EditResult:
        """One result for edits applied one after another (sequential editing)."""

    @abstractmethod
    def export(self, directory: str | Path, **provenance: Any) -> Path:
        """Write ``directory/artifact/`` (a manifest naming this kind and method, and tensors)."""

    @abstractmethod
    def merged_weights(self) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """(edited, original) values of the weights the edit amounts to when written into them."""

    @property
    def mergeable(self) -> bool:
        """Whether the edit amounts to a change of the weights (``merged_weights``, ``merged``,
        ``--save-model``); a codebook, extra neurons or a memory do not."""
        return True

    @contextlib.contextmanager
    def merged(self) -> Iterator[None]:
        """Inside the block the model's weights hold the edit (a weight edit already does)."""
        yield

    def checkpoint(self, directory: Path, last: EditResult, index: int, **provenance) -> None:
        """Record a sequence's progress after its ``index``-th edit (``last``), so that
        :func:`medit.editors.load.load_checkpoint` continues from there. The default writes the
        whole combined edit (a weight edit's size does not grow with the edits)."""
        self.export(directory, **provenance)

    # -- shared ----------------------------------------------------------------------------------
    def _fold(self, results: Sequence[EditResult]) -> None:
        for r in results:
            self.diagnostics += r.diagnostics
            self.seconds += r.seconds
        self.editor_state = dict(results[-1].editor_state)

    @torch.no_grad()
    def update_norms(self) -> dict[str, dict[str, float]]:
        """Frobenius norm of each weight's change, absolute and relative to the original (for a
        module edit: of its patches merged in; none for an edit that is no weight change)."""
        if not self.mergeable:
            return {}
        edited, originals = self.merged_weights()
        out = {}
        for n, t in edited.items():
            base = originals[n].float()
            delta = (t.float() - base).norm().item()
            norm = base.norm().item()
            out[n] = {"delta_norm": delta, "relative": delta / norm if norm else float("inf")}
        return out


# -- weight edits --------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class PeftExport:
    """How a weight edit is also exported as a PEFT LoRA adapter (``artifact/peft``): each
    module's change factorised exactly by SVD, at most ``max_rank`` (0: exact) and zero-padded to
    ``pad`` for serving engines; ``conv1d``: GPT-2's transposed weight layout."""

    conv1d: bool = False
    max_rank: int = 0
    pad: int = 1


class WeightEdit(EditResult):
    """An edit written into the weights; ``originals`` holds copies of the touched tensors."""

    kind = "weights"

    def __init__(
        self,
        method: str,
        hparams: Any,
        params: dict[str, torch.nn.Parameter],
        originals: dict[str, torch.Tensor],
        edit_ids: Sequence[str],
        *,
        editor_state: dict[str, torch.Tensor] | None = None,
        peft: PeftExport | None = None,
    ):
        """``params``: the touched parameters of the model, by name; ``originals``: their values
        before the edit. Editors build one with :meth:`before` ahead of writing the weights."""
        super().__init__(method, hparams, edit_ids, editor_state)
        if set(params) != set(originals):
            raise KeyError(f"originals of {sorted(set(params) ^ set(originals))} missing")
        self._params, self.originals, self.peft = dict(params), dict(originals), peft

    @classmethod
    def before(
        cls,
        method: str,
        hparams: Any,
        model: torch.nn.Module,
        names: Sequence[str],
        edit_ids: Sequence[str],
        **kwargs: Any,
    ) -> WeightEdit:
        """A result that holds copies of the tensors ``names`` taken now, before the edit."""
        params = dict(model.named_parameters())
        missing = [n for n in names if n not in params]
        if missing:
            raise KeyError(f"{type(model).__name__} has no parameter(s) {missing}")
        touched = {n: params[n] for n in names}
        originals = {n: p.detach().clone() for n, p in touched.items()}
        return cls(method, hparams, touched, originals, edit_ids, **kwargs)

    @property
    def names(self) -> list[str]:
        return list(self._params)

    @torch.no_grad()
    def restore(self) -> None:
        for name, p in self._params.items():
            p.copy_(self.originals[name].to(p.device))
        self.state = "restored"

    def remove(self, edit_id: str) -> None:
        if self.edit_ids != [edit_id]:
            raise UserError(
                f"{self.method} writes its edits into shared weights: one of several edits "
                f"({len(self.edit_ids)}) cannot be removed alone; restore() undoes them all"
            )
        self.restore()

    @classmethod
    def combine(cls, results: Sequence[EditResult]) -> WeightEdit:
        """The union of the results' tensors; the originals are the weights before the first
        edit that touched each."""
        if not all(isinstance(r, WeightEdit) for r in results):
            raise TypeError("only weight edits combine with weight edits")
        params: dict[str, torch.nn.Parameter] = {}
        originals: dict[str, torch.Tensor] = {}
        for r in results:
            for name, p in r._params.items():
                if name not in params:
                    params[name], originals[name] = p, r.originals[name]
        first = results[0]
        ids = [i for r in results for i in r.edit_ids]
        # a result loaded from a checkpoint carries no export settings: the editor's own do
        peft = next((r.peft for r in results if r.peft is not None), None)
        out = cls(first.method, first.hparams, params, originals, ids, peft=peft)
        out._fold(results)
        return out

    def edited_tensors(self) -> dict[str, torch.Tensor]:
        """Current values of the touched tensors."""
        return {n: p.detach() for n, p in self._params.items()}

    def merged_weights(self):
        return self.edited_tensors(), self.originals

    def export(self, directory: str | Path, peft: bool = True, **provenance: Any) -> Path:
        target = write_weights_artifact(
            directory,
            method=self.method,
            hparams=self.hparams.to_dict(),
            edited=self.edited_tensors(),
            originals=self.originals,
            state=self.editor_state or None,
            edit_ids=self.edit_ids,
            **provenance,
        )
        if peft and self.peft is not None:
            deltas = {
                n.removesuffix(".weight"): p.detach().float() - self.originals[n].float()
                for n, p in self._params.items()
            }
            peft_export.write_lowrank_peft(
                target / "peft",
                deltas,
                self.peft.conv1d,
                self.peft.max_rank,
                self.peft.pad,
                base_model=provenance.get("base_model"),
            )
        return target


# -- module edits --------------------------------------------------------------------------------
class ModuleEdit(EditResult):
    """Patches installed in a :class:`~medit.editors.patching.PatchBank` (no weight written)."""

    kind = "modules"

    def __init__(self, method: str, hparams: Any, bank: Any, patches: Sequence[Any]):
        super().__init__(method, hparams, [p.edit_id for p in patches])
        self.bank = bank
        self.patches = list(patches)

    @classmethod
    def one_by_one(cls, method: str, hparams: Any, bank: Any, items: Sequence, make) -> ModuleEdit:
        """Edits made in turn: ``make(item)`` -> (patch, diagnostics) for each of ``items`` (a
        request, or a request with what it needs), each patch installed before the next is made
        (a later edit sees the earlier ones)."""
        made, diagnostics = [], []
        for item in items:
            patch, info = make(item)
            bank.add(patch)
            made.append(patch)
            diagnostics.append(info)
        result = cls(method, hparams, bank, made)
        result.diagnostics = diagnostics
        return result

    @classmethod
    def loaded(cls, editor: Any, bank: Any, manifest: dict, patches: Sequence[Any]) -> ModuleEdit:
        """A module editor's edit back from its artifact: ``patches`` (read from it) installed in
        ``bank``, with the manifest's method and the editor's hyper-parameters."""
        bank.add(*patches)
        hparams = editor.hparams_class.from_dict(manifest["hparams"])
        return cls(manifest["method"], hparams, bank, list(patches))

    @property
    def names(self) -> list[str]:
        return sorted({m for p in self.patches for m in p.modules})

    def restore(self) -> None:
        """Take this edit's patches out; the model is then bit-identical to before."""
        self.bank.remove(*self.patches)
        self.state = "restored"

    def remove(self, edit_id: str) -> None:
        gone = [p for p in self.patches if p.edit_id == edit_id]
        if not gone:
            raise UserError(f"no edit {edit_id!r} in this {self.method} edit")
        self.bank.remove(*gone)
        self.patches = [p for p in self.patches if p.edit_id != edit_id]
        self.edit_ids = [p.edit_id for p in self.patches]

    @classmethod
    def combine(cls, results: Sequence[EditResult]) -> ModuleEdit:
        first = results[0]
        if not all(isinstance(r, ModuleEdit) and r.bank is first.bank for r in results):
            raise TypeError("only module edits of one patch bank combine")
        out = cls(first.method, first.hparams, first.bank, [p for r in results for p in r.patches])
        out._fold(results)
        return out

    @property
    def mergeable(self) -> bool:
        return all(type(p).mergeable for p in self.patches)

    def merged_weights(self):
        """Each patch fully on, merged into the weights it sits beside (routing is lost); a
        patch that cannot be merged (a codebook, an extra neuron) is refused."""
        params = dict(self.bank.model.named_parameters())
        deltas: dict[str, torch.Tensor] = {}
        for p in self.patches:
            for name, d in p.weight_deltas(self.bank.arch).items():
                deltas[name] = deltas.get(name, 0) + d
        originals = {n: params[n].detach().clone() for n in deltas}
        edited = {
            n: (params[n].detach().float() + d.to(params[n].device)).to(params[n].dtype)
            for n, d in deltas.items()
        }
        return edited, originals

    @contextlib.contextmanager
    def merged(self) -> Iterator[None]:
        params = dict(self.bank.model.named_parameters())
        edited, originals = self.merged_weights()
        with self.bank.disabled(), torch.no_grad():
            try:
                for n, t in edited.items():
                    params[n].copy_(t)
                yield
            finally:
                for n, t in originals.items():
                    params[n].copy_(t)

    def export(self, directory: str | Path, peft: bool = True, **provenance: Any) -> Path:
        return self.bank.export(directory, self, peft=peft, **provenance)

    def checkpoint(self, directory: Path, last: EditResult, index: int, **provenance) -> None:
        """One directory per edit (``edits/NNNNNN``), written once: O(1) per edit."""
        provenance["edit_seconds"] = provenance.get("edit_seconds", [0.0])[-1:]
        last.export(directory / "edits" / f"{index:06d}", peft=False, **provenance)


# -- memory edits --------------------------------------------------------------------------------
class MemoryEdit(EditResult):
    """Entries in an explicit memory consulted at inference. ``memory`` keeps its entries and
    defines ``add(*entries)``, ``remove(*entries)``, ``export(directory, result, **provenance)``
    and ``model``; every entry has an ``edit_id``. ``tests/editors/lookup.py`` is a small
    memory editor written against this contract."""

    kind = "memory"

    def __init__(self, method: str, hparams: Any, memory: Any, entries: Sequence[Any]):
        super().__init__(method, hparams, [e.edit_id for e in entries])
        self.memory = memory
        self.entries = list(entries)

    @property
    def names(self) -> list[str]:
        return [f"memory:{e.edit_id}" for e in self.entries]

    def restore(self) -> None:
        self.memory.remove(*self.entries)
        self.state = "restored"

    def remove(self, edit_id: str) -> None:
        gone = [e for e in self.entries if e.edit_id == edit_id]
        if not gone:
            raise UserError(f"no edit {edit_id!r} in this {self.method} edit")
        self.memory.remove(*gone)
        self.entries = [e for e in self.entries if e.edit_id != edit_id]
        self.edit_ids = [e.edit_id for e in self.entries]

    @classmethod
    def combine(cls, results: Sequence[EditResult]) -> MemoryEdit:
        first = results[0]
        if not all(isinstance(r, MemoryEdit) and r.memory is first.memory for r in results):
            raise TypeError("only memory edits of one memory combine")
        out = cls(
            first.method, first.hparams, first.memory, [e for r in results for e in r.entries]
        )
        out._fold(results)
        return out

    @property
    def mergeable(self) -> bool:
        return False

    def merged_weights(self):
        raise UserError(
            f"a {self.method} edit lives in an explicit memory beside the model: it cannot be "
            "written into the weights; use the run's artifact (medit generate --artifact)"
        )

    @contextlib.contextmanager
    def merged(self) -> Iterator[None]:
        self.merged_weights()
        yield

    def export(self, directory: str | Path, **provenance: Any) -> Path:
        provenance.pop("peft", None)
        return self.memory.export(directory, self, **provenance)

    def checkpoint(self, directory: Path, last: EditResult, index: int, **provenance) -> None:
        """One directory per edit (``edits/NNNNNN``), written once; ``sequence_index`` tells the
        memory which edit of the sequence this is (what every edit of one memory shares, e.g. a
        trained scope classifier, may be stored with the first one only)."""
        provenance["edit_seconds"] = provenance.get("edit_seconds", [0.0])[-1:]
        last.export(directory / "edits" / f"{index:06d}", sequence_index=index, **provenance)
