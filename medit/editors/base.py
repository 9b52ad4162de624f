"""Editors and their hyper-parameters.

An editor is a class with a ``name``, a frozen :class:`HParams` dataclass (every field documented
with ``hp(default, help, choices)``; per-architecture and per-size defaults in one table,
``HParams.DEFAULTS``; named presets) and ``apply(model, tok, requests, prior)`` returning an
:class:`~medit.editors.results.EditResult` (the contract, written once in
:mod:`medit.editors.results`). The registry of methods is :mod:`medit.editors.registry`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import functools
import math
import re
import time
import types
import typing
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

from medit.core.arch import ArchSpec, get_arch, parameter_count
from medit.core.errors import UserError
from medit.core.memory import Component, Shapes, Workload, activations
from medit.core.placement import (
    check_full_precision,
    check_resident,
    has_offload,
    is_quantized,
)
from medit.editors.results import EditResult
from medit.facts.requests import EditRequest


def hp(default: Any, help: str, choices: Sequence[Any] | None = None) -> Any:  # noqa: A002
    """A hyper-parameter field with its help text (argparse's vocabulary) and, for a field that
    takes one of a few values, its ``choices`` (checked by :meth:`HParams.__post_init__`)."""
    if isinstance(default, (list, dict, set)):
        raise TypeError("use tuples for sequence defaults (hparams are frozen)")
    if choices is not None and default not in choices:
        raise TypeError(f"default {default!r} is not among the choices {choices}")
    meta = {"help": help, **({"choices": tuple(choices)} if choices is not None else {})}
    return dataclasses.field(default=default, metadata=meta)


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
class Defaults:
    """One row of an editor's defaults table: ``values`` apply to models of ``family`` ("*":
    any) with fewer than ``max_params`` parameters (None: any size); ``why`` says where the
    values come from (a paper, a measurement), shown by ``medit methods``."""

    values: dict[str, Any]
    why: str
    family: str = "*"
    max_params: float | None = None

    def applies(self, family: str, n_params: int | None) -> bool:
        small = self.max_params is None or (n_params is not None and n_params < self.max_params)
        return self.family in ("*", family) and small

    def describe(self) -> str:
        where = [] if self.family == "*" else [f"{self.family} models"]
        if self.max_params is not None:
            where.append(f"models under {self.max_params / 1e9:g}B parameters")
        values = ", ".join(f"{k}={v}" for k, v in self.values.items())
        return f"{' and '.join(where) or 'every model'}: {values} ({self.why})"


@dataclasses.dataclass(frozen=True)
class HParams:
    """Base of every editor's hyper-parameters."""

    #: the one table of per-architecture and per-size defaults, applied in order over the field
    #: defaults (and over a preset); the user's values win over all of them
    DEFAULTS: ClassVar[tuple[Defaults, ...]] = ()
    #: named sets of values (a paper's settings); a preset named in ``NO_DEFAULTS`` is taken as
    #: it is, without the DEFAULTS table (the paper's values at any model size)
    PRESETS: ClassVar[dict[str, dict[str, Any]]] = {}
    NO_DEFAULTS: ClassVar[tuple[str, ...]] = ()

    def __post_init__(self):
        for f in dataclasses.fields(self):
            choices = f.metadata.get("choices")
            if choices is not None and getattr(self, f.name) not in choices:
                raise HParamError(
                    f.name,
                    f"must be one of {', '.join(map(repr, choices))}, got {getattr(self, f.name)!r}",
                )

    @classmethod
    def for_model(
        cls, family: str, n_params: int | None, *, owner: str | None = None, **overrides: Any
    ) -> HParams:
        """The values for a model of ``family`` with ``n_params`` parameters: the field
        defaults, the preset (a field ``preset``), the DEFAULTS rows that apply, then the user's
        ``overrides`` on top."""
        preset = overrides.get("preset", getattr(cls, "preset", None))
        values: dict[str, Any] = {}
        if cls.PRESETS:
            if preset not in cls.PRESETS:
                raise HParamError(
                    "preset",
                    f"must be one of {', '.join(map(repr, cls.PRESETS))}, got {preset!r}",
                    owner,
                )
            values |= cls.PRESETS[preset]
        if preset not in cls.NO_DEFAULTS:
            for row in cls.DEFAULTS:
                if row.applies(family, n_params):
                    values |= row.values
        return cls.from_dict({**values, **overrides}, owner=owner)

    @classmethod
    def defaults_for(cls, family: str, n_params: int | None) -> list[Defaults]:
        """The DEFAULTS rows that apply to a model."""
        return [row for row in cls.DEFAULTS if row.applies(family, n_params)]

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
        out = []
        for f in dataclasses.fields(cls):
            text = f.metadata.get("help", "")
            if "choices" in f.metadata:
                text += f" [{' | '.join(map(str, f.metadata['choices']))}]"
            out.append((f.name, f.default, text))
        return out

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
    batch: bool  #: can apply many requests in one call (else single and sequential modes only)


class Editor(ABC):
    """Base class of every editing method; the contract a new editor fulfils is written once, in
    :mod:`medit.editors.results`."""

    name: ClassVar[str]
    hparams_class: ClassVar[type[HParams]]
    capabilities: ClassVar[Capabilities]
    summary: ClassVar[str] = ""

    def __init__(self, **overrides: Any):
        self.hparams_class.from_dict(overrides, owner=self.name)  # names, types, values: early
        self.overrides = overrides

    def hparams_for(self, model: Any) -> HParams:
        """The hyper-parameters for a model (``model`` may also be its config): its family's and
        size's defaults, then the user's overrides."""
        return self.hparams_class.for_model(
            get_arch(model).family, parameter_count(model), owner=self.name, **self.overrides
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

    def edited_modules(self, hp: HParams, arch: ArchSpec, n_layers: int) -> tuple[str, ...] | None:
        """Module paths whose weights this editor writes or whose modules it patches, from its
        hyper-parameters alone (before the weights load): with a device map these are kept off
        the offload (:mod:`medit.core.placement`). Where the editor picks the layer at edit time
        (by causal tracing), every candidate. None: the editor does not say, and refuses a model
        with offloaded modules."""
        return None

    def resident_modules(self, config: Any) -> tuple[str, ...] | None:
        """:meth:`edited_modules` for a model's config (what ``load_model(keep_resident=...)``
        is given)."""
        n_layers = config_layers(config)
        if n_layers is None:
            return None
        return self.edited_modules(self.hparams_for(config), get_arch(config), n_layers)

    def memory_plan(self, hp: HParams, config: Any, work: Workload) -> list[Component]:
        """What the editor holds while it edits, from the config alone (``medit plan``; the
        planner adds the weights and the evaluation). The default: a forward and backward
        through the whole model over the edit's sequences, nothing trained of its own."""
        shapes = Shapes.of(config)
        return [activations(shapes, work, work.edits, shapes.layers)]

    def check_placement(self, model: Any) -> None:
        """Right after loading: refuse a model whose modules this editor touches are offloaded
        (before any evaluation is spent on it)."""
        self._check_resident(model, self.hparams_for(model), get_arch(model))

    def _check_resident(self, model: Any, hp: HParams, arch: ArchSpec) -> None:
        """A model with offloaded modules (a --device-map with disk or CPU offload) is edited only
        where the modules this editor touches are resident: a write into an offloaded (meta)
        weight would be lost without a word. Likewise a quantised model (--quantize) only where
        they are in full precision."""
        offload, quantized = has_offload(model), is_quantized(model)
        if not (offload or quantized):
            return
        names = self.edited_modules(hp, arch, arch.n_layers(model))
        if names is None:
            what = "offloaded" if offload else "quantised (--quantize)"
            raise UserError(
                f"{self.name} cannot edit a model with {what} modules (it does not declare "
                f"which modules it edits); load it without {what.split(' ')[0]} modules"
            )
        if offload:
            check_resident(model, names, self.name)
        if quantized:
            check_full_precision(model, names, self.name)

    def apply(
        self, model: Any, tok: Any, requests: Sequence[EditRequest], prior: EditResult | None = None
    ) -> EditResult:
        """Edit ``model`` in place so that each request's prompt continues with its target.
        ``prior``: the (combined) result of this editor's earlier edits of the model in a
        sequence, whose ``editor_state`` the edit builds on."""
        if not requests:
            raise UserError("no requests to apply")
        if len(requests) > 1 and not self.capabilities.batch:
            raise UserError(
                f"{self.name} edits one request at a time; use single or sequential mode"
            )
        hp, arch = self.hparams_for(model), get_arch(model)
        self._check_arch(hp, arch, arch.n_layers(model))
        self._check_resident(model, hp, arch)
        start = time.perf_counter()
        result = self._apply(model, tok, list(requests), hp, prior)
        result.seconds = time.perf_counter() - start
        return result

    @abstractmethod
    def _apply(
        self,
        model: Any,
        tok: Any,
        requests: list[EditRequest],
        hp: HParams,
        prior: EditResult | None,
    ) -> EditResult:
        """The method itself, given resolved hyper-parameters (see :mod:`medit.editors.results`)."""

    @classmethod
    def load(cls, model: Any, tok: Any, manifest: dict, tensors: dict) -> EditResult:
        """A module or memory edit back from its artifact (``manifest`` and ``tensors``) onto
        ``model``. Weight edits need no loader of their own: :func:`medit.editors.load.load_edit`
        writes them in."""
        raise UserError(
            f"a {manifest.get('kind')!r} artifact names method {cls.name!r}, which makes weight "
            "edits: the artifact is damaged or was not written by medit"
        )
