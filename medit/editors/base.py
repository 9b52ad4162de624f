"""The Editor contract: hyper-parameters, results that can restore and export, and the registry.

An editor is a class with a ``name``, a frozen :class:`HParams` dataclass (every field documented,
per-family defaults in one table keyed by ``ArchSpec.family``) and ``apply(model, tok, requests)``
returning an :class:`EditResult`. The model is edited in place and *stays edited*; only
``EditResult.restore()`` puts the original weights back, bit for bit.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import importlib
import time
from abc import ABC, abstractmethod
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

import torch

from medit.arch import get_arch
from medit.requests import EditRequest


def hp(default: Any, help: str) -> Any:  # noqa: A002 - mirrors argparse's vocabulary
    """A hyper-parameter field with its help text."""
    if isinstance(default, (list, dict, set)):
        raise TypeError("use tuples for sequence defaults (hparams are frozen)")
    return dataclasses.field(default=default, metadata={"help": help})


@dataclasses.dataclass(frozen=True)
class HParams:
    """Base of every editor's hyper-parameters."""

    #: family -> field overrides; the one table of per-architecture defaults
    FAMILY_DEFAULTS: ClassVar[dict[str, dict[str, Any]]] = {}

    @classmethod
    def for_family(cls, family: str, **overrides: Any) -> HParams:
        """Defaults for an architecture family, then the user's overrides on top."""
        return cls.from_dict({**cls.FAMILY_DEFAULTS.get(family, {}), **overrides})

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> HParams:
        names = {f.name: f for f in dataclasses.fields(cls)}
        for key in values:
            if key not in names:
                close = difflib.get_close_matches(key, names, n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                raise ValueError(f"unknown hyper-parameter {key!r} for {cls.__name__}{hint}")
        coerced = {k: _coerce(names[k], v) for k, v in values.items()}
        return cls(**coerced)

    def to_dict(self) -> dict[str, Any]:
        return {
            k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()
        }

    @classmethod
    def describe(cls) -> list[tuple[str, Any, str]]:
        """(name, default, help) of every field, for ``medit methods``."""
        return [(f.name, f.default, f.metadata.get("help", "")) for f in dataclasses.fields(cls)]


def _coerce(field: dataclasses.Field, value: Any) -> Any:
    """JSON/CLI values to the field's type: lists become tuples, strings become numbers."""
    if isinstance(value, list):
        return tuple(value)
    default = field.default
    if isinstance(default, tuple) and isinstance(value, (str, int, float)):
        # CLI shorthand: --hparam layers=4,5,6  or  --hparam cov_corpus=a.txt,b.jsonl
        return tuple(_number(x.strip()) for x in str(value).split(",") if x.strip())
    if (
        isinstance(value, str)
        and isinstance(default, (int, float))
        and not isinstance(default, bool)
    ):
        try:
            return type(default)(value)
        except ValueError:
            raise ValueError(
                f"hyper-parameter {field.name!r} expects a number, got {value!r}"
            ) from None
    return value


def _number(text: str) -> Any:
    for kind in (int, float):
        with contextlib.suppress(ValueError):
            return kind(text)
    return text


@dataclasses.dataclass(frozen=True)
class Capabilities:
    batch: bool  #: can apply many requests in one call
    sequential: bool  #: successive apply() calls accumulate edits
    needs_training: bool  #: needs a training phase before editing (MEND, SERAC)


class EditResult:
    """What an edit changed, how it went, and how to undo it.

    ``originals`` holds copies of only the touched tensors, taken before the edit; ``restore()``
    copies them back (bit-exact). ``state`` says whether the model is currently "edited" or
    "restored".
    """

    def __init__(self, method: str, hparams: HParams, model: torch.nn.Module, names: Sequence[str]):
        self.method = method
        self.hparams = hparams
        params = dict(model.named_parameters())
        missing = [n for n in names if n not in params]
        if missing:
            raise ValueError(f"{type(model).__name__} has no parameter(s) {missing}")
        self._params = {n: params[n] for n in names}
        self.originals = {n: p.detach().clone() for n, p in self._params.items()}
        self.diagnostics: list[dict[str, Any]] = []
        self.state = "edited"
        self.seconds = 0.0

    @property
    def names(self) -> list[str]:
        return list(self._params)

    @torch.no_grad()
    def restore(self) -> None:
        """Put the original weights back, bit for bit."""
        for name, p in self._params.items():
            p.copy_(self.originals[name])
        self.state = "restored"

    def edited_tensors(self) -> dict[str, torch.Tensor]:
        """Current values of the touched tensors (the edit, for FT-style editors)."""
        return {n: p.detach() for n, p in self._params.items()}

    @torch.no_grad()
    def update_norms(self) -> dict[str, dict[str, float]]:
        """Frobenius norm of each tensor's change, absolute and relative to the original."""
        out = {}
        for n, p in self._params.items():
            delta = (p.detach().float() - self.originals[n].float()).norm().item()
            base = self.originals[n].float().norm().item()
            out[n] = {"delta_norm": delta, "relative": delta / base if base else float("inf")}
        return out

    @classmethod
    def combine(cls, results: Sequence[EditResult]) -> EditResult:
        """One result for edits applied one after another (sequential editing): it touches the
        union of their tensors, and its originals are the weights before the first edit."""
        first = results[0]
        combined = cls.__new__(cls)
        combined.method, combined.hparams, combined.state = first.method, first.hparams, "edited"
        combined._params, combined.originals, combined.diagnostics = {}, {}, []
        combined.seconds = 0.0
        for r in results:
            for name, p in r._params.items():
                if name not in combined._params:
                    combined._params[name] = p
                    combined.originals[name] = r.originals[name]
            combined.diagnostics += r.diagnostics
            combined.seconds += r.seconds
        return combined

    def export(self, directory: str | Path, **provenance: Any) -> Path:
        """Write the edit artifact (see ``medit.export``) into ``directory``."""
        from medit.export import write_weights_artifact

        return write_weights_artifact(
            directory,
            method=self.method,
            hparams=self.hparams.to_dict(),
            edited=self.edited_tensors(),
            originals=self.originals,
            **provenance,
        )


class Editor(ABC):
    """Base class of every editing method."""

    name: ClassVar[str]
    hparams_class: ClassVar[type[HParams]]
    capabilities: ClassVar[Capabilities]
    summary: ClassVar[str] = ""

    def __init__(self, **overrides: Any):
        self.hparams_class.from_dict(overrides)  # validate names and types early
        self.overrides = overrides

    def hparams_for(self, model: torch.nn.Module) -> HParams:
        return self.hparams_class.for_family(get_arch(model).family, **self.overrides)

    def apply(self, model: Any, tok: Any, requests: Sequence[EditRequest]) -> EditResult:
        """Edit ``model`` in place so that each request's prompt continues with its target."""
        if not requests:
            raise ValueError("no requests to apply")
        if len(requests) > 1 and not self.capabilities.batch:
            raise ValueError(
                f"{self.name} edits one request at a time; use single or sequential mode"
            )
        start = time.perf_counter()
        result = self._apply(model, tok, list(requests), self.hparams_for(model))
        result.seconds = time.perf_counter() - start
        return result

    @abstractmethod
    def _apply(self, model: Any, tok: Any, requests: list[EditRequest], hp: HParams) -> EditResult:
        """The method itself, given resolved hyper-parameters."""


# -- registry ------------------------------------------------------------------------------------
#: method name -> "module:Class", imported lazily so that ``medit --help`` stays fast
METHODS: dict[str, str] = {
    "ft-l": "medit.editors.ft:FTL",
    "ft-m": "medit.editors.ft:FTM",
    "lora": "medit.editors.lora:LoRA",
    "adalora": "medit.editors.lora:AdaLoRA",
    "medlasa": "medit.editors.medlasa:MedLaSA",
    "rome": "medit.editors.rome:ROME",
    "memit": "medit.editors.memit:MEMIT",
    "alphaedit": "medit.editors.alphaedit:AlphaEdit",
}


def get_editor_class(name: str) -> type[Editor]:
    if name not in METHODS:
        close = difflib.get_close_matches(name, METHODS, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ValueError(f"unknown method {name!r}{hint} (available: {', '.join(METHODS)})")
    module, cls = METHODS[name].split(":")
    return getattr(importlib.import_module(module), cls)


def make_editor(name: str, **overrides: Any) -> Editor:
    return get_editor_class(name)(**overrides)
