"""The module-patch mechanism: side computations beside a model's modules, gated per batch row.

A :class:`Patch` is one edit's change at one or more modules that the ArchSpec names (a
projection, an MLP, a decoder layer). A :class:`PatchBank` (one per model) installs the patches
of every module edit with a forward hook per patched module; the base weights are never written,
so a module whose patches are all shut returns exactly the base model's output, and removing the
last patch removes the hooks.

Which patch acts on which row is decided from the activations of the same forward pass, so an
edited model is an ordinary transformers model (``model.generate``, a user's own loop and medit's
batched evaluation all route the same way):

* **input-gated** patches (GRACE, T-Patcher, SCEN, WISE, the test patch) score the patched
  module's own input: ``gate(module, x)`` gives (batch, pos) gates in [0, 1], 0 shut;
* **sequence-gated** patches (SCEN, WISE: ``sequence = True``) are gated like input-gated ones,
  but once per sequence: ``sequence_gates`` reads the module's input in the sequence's first
  forward (the prompt's prefill: a forward whose KV cache is empty or absent; by default at each
  row's last real token, WISE at all of them), and the decision holds for every position of that
  forward and of the decoding forwards on its cache (it is kept on the cache and follows
  ``reorder_cache``). A forward without a cache is a sequence of its own;
* **sequence-routed** patches (MedLaSA) leave the choice to the bank's ``router`` (e.g.
  :class:`~medit.editors.patching.routing.SequenceRouter`), which reads each new sequence's
  tokens at the start of the model's forward and keeps its choice while the KV cache grows.

Per module and row the open patch with the highest gate acts (``policy="max"``: an expert, an
adapter), or every open patch in turn (``policy="sum"``: extra FFN neurons; a codebook whose
gates pick at most one entry per position). A class computes the gates of all its patches at a
module in one call (``Patch.gates``) and may derive their effective state from the order they
were added in (``Patch.arrange``: later entries that amend earlier ones).
Patches of one class act on their rows together (``Patch.act``, batched over patches).
"""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from typing import Any, ClassVar

import torch

from medit.artifacts.modules import write_module_artifact
from medit.core.arch import ArchSpec, get_arch, get_module
from medit.core.errors import UserError
from medit.core.forward import keep_with_cache, passed_cache

#: the model attribute holding its bank while it carries patches (private to this package)
BANK = "_medit_patch_bank"
#: attribute of a KV cache holding the sequence-gated decisions of the sequence it caches
_DECIDED = "_medit_sequence_gates"


class _Decisions:
    """Sequence-gated decisions of one batch: (module, class) -> (E, batch, 1) gates."""

    def __init__(self, batch: int):
        self.batch, self.gates = batch, {}

    def select(self, rows: torch.Tensor) -> None:
        self.gates = {k: g[:, rows.to(g.device)] for k, g in self.gates.items()}
        self.batch = len(rows)


class Patch(ABC):
    """One edit's side computation. A subclass sets ``edit_id`` and ``modules`` and defines
    ``act``; an input-gated patch (``routed = False``) also defines
    ``gate(module, x) -> (batch, pos)`` gates in [0, 1] from the module's input ``x``
    (batch, pos, d_in); a routed one leaves the choice of rows to the bank's router."""

    edit_id: str
    #: names of the modules it patches
    modules: Sequence[str]
    #: "max": the open patch with the highest gate acts per row; "sum": every open patch acts
    policy: ClassVar[str] = "max"
    #: True: the bank's router chooses rows (sequence routing); False: ``gate`` does
    routed: ClassVar[bool] = False
    #: False: no change of the weights has the patch's effect (``weight_deltas`` refuses)
    mergeable: ClassVar[bool] = True
    #: True: ``sequence_gates`` is asked once per sequence, on the input of the forward that
    #: opens it (the prompt's prefill); its (E, batch, 1) decision holds for the whole sequence
    sequence: ClassVar[bool] = False

    @classmethod
    @abstractmethod
    def act(
        cls,
        patches: Sequence[Patch],
        module: str,
        x: torch.Tensor,
        out: torch.Tensor,
        gate: torch.Tensor,
    ) -> torch.Tensor:
        """The patched output of rows where ``patches[i]`` acts on row i: ``x`` (n, pos, d_in),
        ``out`` the base output (n, pos, d_out), ``gate`` (n, pos) or (n, 1), > 0 where open.
        Positions whose gate is 0 must keep ``out`` exactly."""

    def gate(self, module: str, x: torch.Tensor) -> torch.Tensor:
        """(batch, pos) gates in [0, 1] from the module's input (input-gated patches)."""
        raise TypeError(f"{type(self).__name__} defines neither gate nor gates")

    @classmethod
    def gates(cls, patches: Sequence[Patch], module: str, x: torch.Tensor) -> torch.Tensor:
        """(len(patches), batch, pos) gates of several input-gated patches of this class at one
        module, in one call (a codebook compares a position with all its keys at once). The
        default stacks each patch's ``gate``."""
        return torch.stack([p.gate(module, x) for p in patches])

    @classmethod
    def sequence_gates(
        cls,
        patches: Sequence[Patch],
        module: str,
        x: torch.Tensor,
        real: torch.Tensor,
        out: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """(len(patches), batch, 1) decisions of sequence-gated patches from the prefill's input
        ``x`` (batch, pos, d_in) and its real (not padding) positions ``real`` (batch, pos);
        ``out`` is the module's own output (batch, pos, d_out), for a decision that compares
        with it (WISE's activation after the SiLU). The default asks ``gates`` with the input at
        each row's last real token (batch, 1, d_in); a class that reads the whole prompt (WISE's
        mean activation) overrides it."""
        width = x.shape[1]
        last = width - 1 - real.to(torch.long).flip(1).argmax(1)
        rows = torch.arange(x.shape[0], device=x.device)
        return cls.gates(patches, module, x[rows, last.to(x.device)][:, None])

    @classmethod
    def arrange(cls, patches: Sequence[Patch], module: str) -> None:
        """Called whenever the bank's membership changes, with this class's patches at
        ``module`` in the order they were added: a class whose later patches amend earlier ones
        (GRACE's radius splits) derives the effective state here. The default does nothing."""
        return None

    @staticmethod
    def write_edits(directory: Any, result: Any, edits: list, tensors: dict, **provenance) -> Any:
        """Write ``result``'s module artifact: one manifest record per patch (``edits``) and the
        named ``tensors`` (a ``write_artifact`` helper)."""
        return write_module_artifact(
            directory,
            "modules",
            result.method,
            result.hparams.to_dict(),
            edits,
            tensors,
            **provenance,
        )

    def weight_deltas(self, arch: ArchSpec) -> dict[str, torch.Tensor]:
        """The change of each weight that has the same effect fully on (for merging into a saved
        model); patches that are not a weight change refuse."""
        raise UserError(
            f"a {type(self).__name__} patch is not a weight change: it cannot be merged into the "
            "weights (--save-model); use the run's artifact (medit generate --artifact)"
        )


class PatchBank:
    """The patches installed on one model, with a hook per patched module."""

    def __init__(self, model: Any, arch: ArchSpec, router: Any = None):
        self.model, self.arch, self.router = model, arch, router
        self.patches: list[Patch] = []
        self.enabled = True
        self._handles: list[Any] = []
        self._by_module: dict[str, list[int]] = {}
        #: the current forward's sequence-gated decisions, and its real (not padding) positions
        #: (None when the forward continues a cached sequence)
        self._decided: _Decisions | None = None
        self._real: torch.Tensor | None = None

    @classmethod
    def of(cls, model: Any, arch: ArchSpec, make_router: Any = None) -> PatchBank:
        """The model's bank (created when it has none); ``make_router(bank)`` builds a router
        for a new bank. A bank routes one way: a second router of another kind is refused by it
        (``router.compatible``)."""
        bank = getattr(model, BANK, None)
        if bank is None:
            bank = cls(model, arch)
            bank.router = make_router(bank) if make_router else None
        elif make_router is not None:
            bank.router.check_compatible(make_router(bank))
        return bank

    # -- membership ------------------------------------------------------------------------------
    def add(self, *patches: Patch) -> None:
        if self.router is not None:
            self.router.adding(patches)
        self.patches.extend(patches)
        self._rebuild()

    def remove(self, *patches: Patch) -> None:
        gone = {id(p) for p in patches}
        self.patches = [p for p in self.patches if id(p) not in gone]
        self._rebuild()

    @contextlib.contextmanager
    def disabled(self) -> Iterator[None]:
        """Inside the block every patch is shut: the model computes as its base."""
        was, self.enabled = self.enabled, False
        try:
            yield
        finally:
            self.enabled = was

    def _rebuild(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles, self._by_module = [], {}
        if self.router is not None:
            self.router.rebuilt()
        if not self.patches:
            if getattr(self.model, BANK, None) is self:
                delattr(self.model, BANK)
            return
        setattr(self.model, BANK, self)
        for i, p in enumerate(self.patches):
            for m in p.modules:
                self._by_module.setdefault(m, []).append(i)
        for m, own in self._by_module.items():
            for cls, members in self._by_class(own).items():
                cls.arrange(members, m)
        for name in sorted(self._by_module):
            module = get_module(self.model, name)
            self._handles.append(module.register_forward_hook(self._hook(name)))
        if self.router is not None or any(type(p).sequence for p in self.patches):
            base = self.arch.base_model(self.model)
            self._handles.append(base.register_forward_pre_hook(self._begin, with_kwargs=True))
            self._handles.append(base.register_forward_hook(self._end))

    def _end(self, _module, _args, output):
        """A cache the model made itself (``use_cache=True`` without one) keeps the decisions
        of the forward that filled it."""
        cache = getattr(output, "past_key_values", None)
        if self.enabled and self._decided is not None and cache is not None:
            if getattr(cache, _DECIDED, None) is None:
                keep_with_cache(cache, _DECIDED, self._decided)

    def _begin(self, _module, args, kwargs):
        """A forward of the model starts: route it (the router), and find whether it opens a
        sequence (sequence-gated patches decide on it) or continues a cached one."""
        if not self.enabled:
            return
        if self.router is not None:
            self.router.begin_forward(args, kwargs)
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is None:
            ids = kwargs.get("inputs_embeds")
        cache = passed_cache(kwargs)
        kept = getattr(cache, _DECIDED, None) if cache is not None else None
        if (
            cache is not None
            and cache.get_seq_length() > 0
            and kept is not None
            and kept.batch == ids.shape[0]
        ):
            self._decided, self._real = kept, None  # decoding: the prefill's decisions
            return
        self._decided = _Decisions(ids.shape[0])
        mask = kwargs.get("attention_mask")
        width = ids.shape[1]
        self._real = (
            torch.ones(ids.shape[:2], dtype=torch.bool, device=ids.device)
            if mask is None
            else mask[:, -width:].to(device=ids.device, dtype=torch.bool)
        )
        if cache is not None:
            keep_with_cache(cache, _DECIDED, self._decided)

    def _sequence_gates(
        self, cls: type, patches: list[Patch], name: str, x: torch.Tensor, out: torch.Tensor
    ):
        """(E, batch, 1) decisions of a sequence-gated class: made on the forward that opens
        the sequence (``sequence_gates`` on its input), then kept."""
        decided, key = self._decided, (name, cls.__qualname__)
        if decided is None or decided.batch != x.shape[0]:
            raise RuntimeError(f"no sequence decisions for a batch of {x.shape[0]} rows")
        if key not in decided.gates or self._real is not None:
            if self._real is None:
                raise RuntimeError(f"{name}: a cached sequence without {cls.__name__} decisions")
            real = self._real.to(x.device)
            decided.gates[key] = cls.sequence_gates(patches, name, x, real, out=out)
        return decided.gates[key]

    # -- the patched forward ---------------------------------------------------------------------
    def _by_class(self, own: Sequence[int]) -> dict[type, list[Patch]]:
        groups: dict[type, list[Patch]] = {}
        for i in own:
            groups.setdefault(type(self.patches[i]), []).append(self.patches[i])
        return groups

    def _gates(self, name: str, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """(E_m, batch, pos or 1) gates of the module's patches for this forward: routed
        patches ask the router, input-gated ones their class's ``gates`` (one call a class)."""
        own = self._by_module[name]
        rows: list[torch.Tensor | None] = [None] * len(own)
        gated: dict[type, list[int]] = {}
        for j, i in enumerate(own):
            p = self.patches[i]
            if p.routed:
                rows[j] = self.router.gate(i, name, x.shape[0])
            else:
                gated.setdefault(type(p), []).append(j)
        for cls, js in gated.items():
            members = [self.patches[own[j]] for j in js]
            found = (
                self._sequence_gates(cls, members, name, x, out)
                if cls.sequence
                else cls.gates(members, name, x)
            )
            for j, g in zip(js, found, strict=True):
                rows[j] = g
        rows = [g if g.dim() == 2 else g[:, None] for g in rows]
        width = max(g.shape[1] for g in rows)
        return torch.stack([g.expand(-1, width) for g in rows]).to(x.device)

    def _hook(self, name: str):
        def hook(_module, args, output):
            if not self.enabled:
                return None
            x = args[0]
            gates = self._gates(name, x, output)  # (E_m, batch, pos or 1)
            if not bool((gates > 0).any()):
                return None  # every patch shut: the base output, untouched
            own = self._by_module[name]
            if self.patches[own[0]].policy == "sum":
                for e in (gates > 0).flatten(1).any(dim=1).nonzero().squeeze(1).tolist():
                    output = self._act(name, x, output, [e] * x.shape[0], gates[e], own)
                return output
            best, which = gates.max(dim=0)  # (batch, pos or 1); a row keeps one patch
            chosen = which[:, 0] if which.shape[1] == 1 else which.mode(dim=1).values
            gate = torch.where(which == chosen[:, None], best, torch.zeros_like(best))
            return self._act(name, x, output, chosen.tolist(), gate, own)

        return hook

    def _act(self, name, x, output, local: list[int], gate: torch.Tensor, own: list[int]):
        """``output`` with patch ``own[local[b]]`` acting on row b where ``gate[b] > 0``."""
        open_rows = (gate > 0).any(dim=1)
        out = output
        by_class: dict[type, list[int]] = {}
        for b in open_rows.nonzero().squeeze(1).tolist():
            by_class.setdefault(type(self.patches[own[local[b]]]), []).append(b)
        for cls, rows in by_class.items():
            idx = torch.tensor(rows, device=x.device)
            patches = [self.patches[own[local[b]]] for b in rows]
            every = len(rows) == x.shape[0]
            xs, base = (x, out) if every else (x[idx], out[idx])
            new = cls.act(patches, name, xs, base, gate[idx])
            out = new if every else out.index_copy(0, idx, new)
        return out

    # -- artifacts -------------------------------------------------------------------------------
    def export(self, directory: Any, result: Any, **kwargs: Any) -> Any:
        """Write a module edit's artifact with the writer of its patches' class."""
        cls = type(result.patches[0])
        return cls.write_artifact(directory, result, self, **kwargs)


def patch_site(model: Any, hp: Any, kind: str = "mlp_out") -> tuple[ArchSpec, int, str, PatchBank]:
    """(arch, layer, module name, bank) of an editor that patches the ``kind`` module of the
    layer its hyper-parameters resolve (``hp.resolve_layer(n_layers)``)."""
    arch = get_arch(model)
    layer = hp.resolve_layer(arch.n_layers(model))
    return arch, layer, arch.layer_path(layer, kind), PatchBank.of(model, arch)


def bank_of(model: Any) -> PatchBank | None:
    """The patch bank a model carries, if any."""
    return getattr(model, BANK, None)
