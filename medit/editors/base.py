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
import functools
import importlib
import math
import re
import time
import types
import typing
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

import torch

from medit.core.arch import ArchSpec, get_arch
from medit.core.errors import UserError
from medit.facts.requests import EditRequest


def hp(default: Any, help: str) -> Any:  # noqa: A002 - mirrors argparse's vocabulary
    """A hyper-parameter field with its help text."""
    if isinstance(default, (list, dict, set)):
        raise TypeError("use tuples for sequence defaults (hparams are frozen)")
    return dataclasses.field(default=default, metadata={"help": help})


class HParamError(UserError):
    """A hyper-parameter of the wrong type or value: the message names it, and its method where
    known ("hyper-parameter 'steps' of ft-m expects an integer, got 2.5")."""

    def __init__(self, field: str, problem: str, owner: str | None = None):
        of = f" of {owner}" if owner else ""
        sep = "" if problem.startswith(":") else " "
        super().__init__(f"hyper-parameter {field!r}{of}{sep}{problem}")
        self.field, self.problem, self.owner = field, problem, owner

    def of(self, owner: str | None) -> HParamError:
        """The same error naming its method (once)."""
        return self if self.owner or not owner else HParamError(self.field, self.problem, owner)


#: module kinds that name a whole block (no single weight): not trainable or adaptable as one
BLOCK_KINDS = ("mlp", "attn")


@dataclasses.dataclass(frozen=True)
class HParams:
    """Base of every editor's hyper-parameters."""

    #: family -> field overrides; the one table of per-architecture defaults
    FAMILY_DEFAULTS: ClassVar[dict[str, dict[str, Any]]] = {}

    @classmethod
    def for_family(cls, family: str, *, owner: str | None = None, **overrides: Any) -> HParams:
        """Defaults for an architecture family, then the user's overrides on top."""
        return cls.from_dict({**cls.FAMILY_DEFAULTS.get(family, {}), **overrides}, owner=owner)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any], owner: str | None = None) -> HParams:
        """Hyper-parameters from JSON / CLI values, each converted to its field's declared type
        (see :func:`convert`); ``owner`` (the method's name) is named in errors."""
        if not isinstance(values, Mapping):
            raise UserError(f"hyper-parameters must be a mapping, not {type(values).__name__}")
        names = {f.name: f for f in dataclasses.fields(cls)}
        for key in values:
            if key not in names:
                close = difflib.get_close_matches(str(key), names, n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                raise UserError(
                    f"unknown hyper-parameter {key!r} for {owner or cls.__name__}{hint}"
                )
        types = _field_types(cls)
        try:
            return cls(**{k: convert(k, types[k], v) for k, v in values.items()})
        except HParamError as exc:
            raise exc.of(owner) from None

    def to_dict(self) -> dict[str, Any]:
        return {
            k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()
        }

    @classmethod
    def describe(cls) -> list[tuple[str, Any, str]]:
        """(name, default, help) of every field, for ``medit methods``."""
        return [(f.name, f.default, f.metadata.get("help", "")) for f in dataclasses.fields(cls)]

    def check_arch(self, arch: ArchSpec, n_layers: int | None) -> None:
        """Checks that need only the model's architecture and depth (``n_layers``; None where
        unknown), made before its weights load. Raises :class:`HParamError`."""

    # -- helpers for __post_init__ and check_arch: each raises HParamError naming the field ----
    def _at_least(self, low: float, *fields: str) -> None:
        for name in fields:
            for value in _values(getattr(self, name)):
                if value < low:
                    raise HParamError(name, f"must be >= {low}, got {value!r}")

    def _positive(self, *fields: str) -> None:
        for name in fields:
            if not getattr(self, name) > 0:
                raise HParamError(name, f"must be > 0, got {getattr(self, name)!r}")

    def _within(self, name: str, low: float, high: float, *, open_high: bool = False) -> None:
        value = getattr(self, name)
        if not (low <= value < high if open_high else low <= value <= high):
            raise HParamError(
                name, f"must lie in [{low:g}, {high:g}{')' if open_high else ']'}, got {value!r}"
            )

    def _one_of(self, name: str, choices: Sequence[str]) -> None:
        value = getattr(self, name)
        if value not in choices:
            raise HParamError(
                name, f"must be one of {', '.join(map(repr, choices))}, got {value!r}"
            )


def _values(value: Any) -> tuple:
    return value if isinstance(value, tuple) else (value,)


def check_layers(name: str, layers: int | Sequence[int], n_layers: int | None) -> None:
    """Every layer index lies in [0, n_layers); ``layers``: one index or several. The message
    reads as the editors' own range checks do ("layers [9] out of range: the model has ...")."""
    several = not isinstance(layers, int)
    bad = [x for x in (layers if several else [layers]) if n_layers and not 0 <= x < n_layers]
    if bad:
        what = f"layers {bad}" if several else f"layer {bad[0]}"
        raise HParamError(
            name, f": {what} out of range: the model has {n_layers} layers (0-{n_layers - 1})"
        )


def check_kinds(name: str, kinds: Sequence[str], arch: ArchSpec, *, fused: bool) -> tuple[str, ...]:
    """Module kinds of a hyper-parameter that the architecture has, each a projection with a
    weight (not a whole block); ``fused``: separate projections map onto fused ones
    (``ArchSpec.resolve_kinds``). Returns the kinds as the architecture names them."""
    try:
        resolved = arch.resolve_kinds(kinds) if fused else tuple(kinds)
        for kind in resolved:
            arch.layer_path(0, kind)
    except ValueError as exc:
        raise HParamError(name, f": {exc}") from None
    for kind in resolved:
        if kind in BLOCK_KINDS:
            usable = sorted(k for k in arch.kinds if k not in BLOCK_KINDS)
            raise HParamError(
                name,
                f": {kind!r} is a whole block, not a projection with a "
                f"weight; use one of {', '.join(usable)}",
            )
    return resolved


def config_layers(config: Any) -> int | None:
    """The number of decoder layers a model config declares (None where it declares none)."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    n = getattr(text, "num_hidden_layers", None)
    return n if isinstance(n, int) and not isinstance(n, bool) and n > 0 else None


# -- converting JSON / CLI values to the declared types ------------------------------------------
@functools.cache
def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)  # the annotations are strings (__future__ annotations)


_INTEGER = re.compile(r"[+-]?\d+")
_NONE = ("none", "null")
_BOOL = {"true": True, "false": False}


def convert(name: str, tp: Any, value: Any) -> Any:
    """One JSON / CLI value as the type ``tp`` declares, or :class:`HParamError`.

    int: ints, integral floats and strings ("40"), never bools; float: numbers and numeric
    strings, finite; bool: true / false (JSON or strings); str: strings (and ints, as the CLI
    reads ``traces=2024`` as a number); ``X | None``: also None, "none", "null"; ``Literal``: its
    choices; ``tuple[X, ...]``: a list, one value, or the CLI shorthand "4,5,6", each element X.
    """
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        options = [a for a in args if a is not type(None)]
        none = isinstance(value, str) and value.strip().lower() in _NONE
        if len(options) < len(args) and (value is None or none):
            return None
        for option in options[:-1]:
            with contextlib.suppress(HParamError):
                return convert(name, option, value)
        return convert(name, options[-1], value)
    if origin is typing.Literal:
        for choice in args:
            if value == choice and type(value) is type(choice) or str(choice) == value:
                return choice
        raise HParamError(name, f"must be one of {', '.join(map(repr, args))}, got {value!r}")
    if origin is tuple:
        element = args[0] if args else Any
        if isinstance(value, (list, tuple)):
            items = list(value)
        elif isinstance(value, str):  # CLI shorthand: layers=4,5,6  or  cov_corpus=a.txt,b.jsonl
            items = [x.strip() for x in value.split(",") if x.strip()]
        elif isinstance(value, (int, float)):
            items = [value]
        else:
            raise HParamError(
                name, f"expects {_NAMES.get(element, ('', 'values'))[1]}, got {value!r}"
            )
        return tuple(_scalar(name, element, x, plural=True) for x in items)
    return _scalar(name, tp, value)


#: type -> (what one value is, what several are), for messages
_NAMES = {
    int: ("an integer", "integers"),
    float: ("a number", "numbers"),
    str: ("a string", "strings"),
    bool: ("true or false", "true or false values"),
}


def _scalar(name: str, tp: Any, value: Any, plural: bool = False) -> Any:
    if tp not in _NAMES:
        return value  # a type medit does not declare for hyper-parameters: passed through
    out = _as(tp, value)
    if out is None:
        raise HParamError(name, f"expects {_NAMES[tp][plural]}, got {value!r}")
    if tp is float and not math.isfinite(out):
        raise HParamError(name, f"expects a finite number, got {value!r}")
    return out


def _as(tp: type, value: Any) -> Any:
    """``value`` as ``tp``, or None where it is not one."""
    if tp is bool:
        if isinstance(value, bool):
            return value
        return _BOOL.get(value.strip().lower()) if isinstance(value, str) else None
    if isinstance(value, bool):
        return None  # True is an int to Python, never to medit
    if tp is int:
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        return int(value) if isinstance(value, str) and _INTEGER.fullmatch(value.strip()) else None
    if tp is float:
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            with contextlib.suppress(ValueError):
                return float(value)
        return None
    if isinstance(value, str):
        return value
    return str(value) if isinstance(value, int) else None


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
        """Write the edit artifact (see ``medit.artifacts.weights``) into ``directory``."""
        from medit.artifacts.weights import write_weights_artifact

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
        self.hparams_class.from_dict(overrides, owner=self.name)  # names, types, values: early
        self.overrides = overrides

    def hparams_for(self, model: Any) -> HParams:
        """The hyper-parameters for a model's family (``model`` may also be its config)."""
        return self.hparams_class.for_family(
            get_arch(model).family, owner=self.name, **self.overrides
        )

    def check_config(self, config: Any) -> None:
        """Check the hyper-parameters against a model's config, before its weights load: the
        architecture is supported, layers lie within its depth, module kinds exist there."""
        self._check_arch(self.hparams_for(config), get_arch(config), config_layers(config))

    def _check_arch(self, hp: HParams, arch: ArchSpec, n_layers: int | None) -> None:
        try:
            hp.check_arch(arch, n_layers)
        except HParamError as exc:
            raise exc.of(self.name) from None

    def apply(self, model: Any, tok: Any, requests: Sequence[EditRequest]) -> EditResult:
        """Edit ``model`` in place so that each request's prompt continues with its target."""
        if not requests:
            raise UserError("no requests to apply")
        if len(requests) > 1 and not self.capabilities.batch:
            raise UserError(
                f"{self.name} edits one request at a time; use single or sequential mode"
            )
        hp, arch = self.hparams_for(model), get_arch(model)
        self._check_arch(hp, arch, arch.n_layers(model))
        start = time.perf_counter()
        result = self._apply(model, tok, list(requests), hp)
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
        raise UserError(f"unknown method {name!r}{hint} (available: {', '.join(METHODS)})")
    module, cls = METHODS[name].split(":")
    return getattr(importlib.import_module(module), cls)


def make_editor(name: str, **overrides: Any) -> Editor:
    return get_editor_class(name)(**overrides)
