"""Models across devices: ``--device-map`` resolved with Hugging Face accelerate, and the questions
medit's code asks of a model whose modules live on several devices.

Placement is accelerate's, never medit's own: ``auto`` / ``balanced`` / ``sequential`` are
accelerate's ``infer_auto_device_map`` (over ``get_balanced_memory`` or ``get_max_memory``) on an
empty (meta) copy of the model, exactly as ``from_pretrained(device_map=...)`` computes it; a
``FILE.json`` is a module name -> device mapping the user wrote. The resulting mapping is handed to
``from_pretrained(device_map=..., offload_folder=...)``, which dispatches the model with
accelerate's hooks.

Offloaded modules. A module on ``"disk"`` (and, where the map also names a GPU, on ``"cpu"``) keeps
``meta`` weights; an accelerate ``AlignDevicesHook`` brings them in for each forward and drops them
again. Reading such a weight gives a meta tensor and *writing one is silently lost*, so:

* every module an editor edits or patches is kept **resident** (:func:`pin_resident`): before the
  weights load, the editor names its modules from its hyper-parameters (``Editor.edited_modules``)
  and the map is amended so that those modules sit on the map's main device (an offloaded block
  holding one is split into its children, the others staying offloaded). Editors that choose a
  layer at edit time (ROME by causal tracing, MedLaSA in every layer) name every candidate;
* :func:`check_resident` refuses, naming the module, any edit of a weight that is still offloaded
  (a map built without pinning, an artifact applied to an offloaded model);
* tensors go to the device of the module that uses them (:func:`module_device`, which reads the
  execution device of a module's accelerate hook), input ids to the embedding's
  (:func:`input_device`); nothing asks for one ``model.device``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from medit.core.errors import UserError

log = logging.getLogger(__name__)

#: the placement strategies accelerate computes (``balanced`` is what transformers' ``auto`` does)
STRATEGIES = ("auto", "balanced", "sequential")
#: devices a map may name besides GPUs: ``disk`` is offload to the offload folder
_NAMED = ("cpu", "disk", "mps")
_CUDA = re.compile(r"(?:cuda:)?(\d+)")
_SIZE = re.compile(r"\d+(\.\d+)?\s*([KMGT]i?B|B)?", re.IGNORECASE)

Device = int | str  #: a device as accelerate's maps write it: a GPU index, "cpu", "mps", "disk"


# -- parsing what the user gave ------------------------------------------------------------------
def parse_max_memory(text: str | None) -> dict[Device, str] | None:
    """``--max-memory 0=20GiB,1=20GiB,cpu=64GiB`` as accelerate's ``max_memory`` mapping."""
    if not text:
        return None
    out: dict[Device, str] = {}
    for item in text.split(","):
        key, sep, size = (s.strip() for s in item.partition("="))
        if not sep or not _SIZE.fullmatch(size):
            raise UserError(
                f"--max-memory {item.strip()!r}: expected DEVICE=SIZE (e.g. 0=20GiB, cpu=64GiB)"
            )
        out[_device(key, f"--max-memory {key!r}")] = size.replace(" ", "")
    return out


def _device(value: Any, where: str) -> Device:
    """A device name of a map or --max-memory, checked against this machine."""
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise UserError(f"{where}: expected a device (cpu, disk, mps, N or cuda:N), got {value!r}")
    text = str(value).strip()
    match = _CUDA.fullmatch(text)
    if match:
        index, count = int(match.group(1)), torch.cuda.device_count()
        if index >= count:
            have = f"only {count} GPU(s)" if count else "no GPU"
            raise UserError(f"{where}: device {value!r} does not exist (this machine has {have})")
        return index
    if text not in _NAMED:
        raise UserError(f"{where}: unknown device {value!r}; use cpu, disk, mps, N or cuda:N")
    if text == "mps" and not (
        getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()
    ):
        raise UserError(f"{where}: device 'mps' does not exist on this machine")
    return text


def read_map_file(path: str | Path, model: nn.Module) -> dict[str, Device]:
    """A FILE.json device map checked against the (meta) model: a JSON object of module name ->
    device, every name a module of the model, every device present, no name inside another, every
    weight covered. Errors name the file and the key."""
    file = Path(path)
    try:
        doc = json.loads(file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(
            f"--device-map {file}: no such file (or use auto, balanced, sequential)"
        ) from None
    except UnicodeDecodeError:
        raise UserError(f"{file}: not UTF-8 text") from None
    except json.JSONDecodeError as exc:
        raise UserError(
            f"{file}: invalid JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}"
        ) from None
    if not isinstance(doc, dict) or not doc:
        raise UserError(f"{file}: expected a JSON object of module name -> device")
    modules = dict(model.named_modules())
    out: dict[str, Device] = {}
    for key, value in doc.items():
        if key not in modules:
            import difflib

            close = difflib.get_close_matches(key, modules, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise UserError(f"{file}: key {key!r}: {type(model).__name__} has no such module{hint}")
        out[key] = _device(value, f"{file}: key {key!r}")
    for a in out:
        for b in out:
            if a != b and _inside(b, a):
                raise UserError(f"{file}: key {b!r} lies inside key {a!r}; name each module once")
    missing = [n for n, _ in _tensors(model) if not any(_inside(n, k) for k in out)]
    if missing:
        raise UserError(
            f"{file}: no device for {missing[0]!r}"
            + (f" and {len(missing) - 1} more tensors" if len(missing) > 1 else "")
            + "; every weight needs one (a key '' covers the whole model)"
        )
    return out


def _inside(name: str, prefix: str) -> bool:
    """True when module / tensor ``name`` is ``prefix`` or lies inside it ('' holds everything)."""
    return prefix == "" or name == prefix or name.startswith(prefix + ".")


def _tensors(model: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    yield from model.named_parameters()
    yield from model.named_buffers()


# -- resolving a map -----------------------------------------------------------------------------
def resolve_device_map(
    spec: str,
    meta_model: nn.Module,
    *,
    max_memory: Mapping[Device, str] | None = None,
    keep_resident: Iterable[str] = (),
) -> dict[str, Device]:
    """The module -> device mapping of ``spec`` (a strategy or a FILE.json) for an empty model
    (built under ``accelerate.init_empty_weights``), with the ``keep_resident`` modules moved off
    the offload (:func:`pin_resident`)."""
    keep = tuple(keep_resident)
    if spec in STRATEGIES:
        from accelerate import infer_auto_device_map
        from accelerate.utils import get_balanced_memory, get_max_memory

        no_split = list(getattr(meta_model, "_no_split_modules", None) or [])
        if spec == "sequential":
            budget = get_max_memory(dict(max_memory) if max_memory else None)
        else:
            budget = get_balanced_memory(
                meta_model,
                max_memory=dict(max_memory) if max_memory else None,
                no_split_module_classes=no_split,
            )
        budget = _reserve(budget, module_bytes(meta_model, keep))
        device_map = infer_auto_device_map(
            meta_model, max_memory=budget, no_split_module_classes=no_split
        )
    else:
        if max_memory:
            raise UserError("--max-memory applies to auto, balanced and sequential maps only")
        device_map = read_map_file(spec, meta_model)
    return pin_resident(device_map, meta_model, keep)


def _reserve(budget: dict[Device, int], pinned: int) -> dict[Device, int]:
    """Room kept on the main device for the modules pinned there."""
    main = main_device(budget)
    if pinned and main in budget:
        budget = {**budget, main: max(0, int(budget[main]) - pinned)}
    return budget


def module_bytes(model: nn.Module, names: Iterable[str]) -> int:
    total = 0
    for name in dict.fromkeys(names):
        with contextlib.suppress(AttributeError):
            total += sum(
                p.numel() * p.element_size() for p in model.get_submodule(name).parameters()
            )
    return total


def main_device(device_map: Mapping[Any, Device] | Iterable[Device]) -> Device:
    """Where accelerate runs offloaded modules: the first GPU (or mps) the map names, else cpu."""
    values = device_map.values() if isinstance(device_map, Mapping) else device_map
    for d in values:
        if d not in ("cpu", "disk"):
            return d
    return "cpu"


def offloaded_devices(device_map: Mapping[str, Device]) -> tuple[Device, ...]:
    """The map's devices whose modules keep meta weights: disk, and cpu next to a GPU."""
    return ("disk",) if main_device(device_map) == "cpu" else ("disk", "cpu")


def pin_resident(
    device_map: Mapping[str, Device], model: nn.Module, keep: Iterable[str]
) -> dict[str, Device]:
    """``device_map`` with every module in ``keep`` on a device where its weights live (the
    map's main device): an offloaded entry holding one is split into its children, each keeping
    the entry's device, down to the kept module. Logged, since it changes the user's map."""
    out = dict(device_map)
    offloaded, main = offloaded_devices(out), main_device(out)
    for name in dict.fromkeys(keep):
        owner = next((k for k in out if _inside(name, k)), None)
        if owner is None or out[owner] not in offloaded:
            continue  # resident already (or inside nothing: accelerate will say)
        device = out.pop(owner)
        while owner != name:
            module = model.get_submodule(owner)
            if any(True for _ in module.parameters(recurse=False)) or any(
                True for _ in module.buffers(recurse=False)
            ):
                break  # weights of its own beside its children: keep the whole module resident
            child = next(c for c, _ in module.named_children() if _inside(name, _join(owner, c)))
            for c, _ in module.named_children():
                out[_join(owner, c)] = device
            owner = _join(owner, child)
            out.pop(owner)
        out[owner] = main
        log.info("device map: %s kept on %s (edited, so not offloaded)", owner, main)
    return out


def _join(prefix: str, child: str) -> str:
    return f"{prefix}.{child}" if prefix else child


# -- questions about a dispatched model ----------------------------------------------------------
def module_device(module: nn.Module) -> torch.device:
    """The device a module computes on: its accelerate hook's execution device where it has one
    (an offloaded module's weights are meta), else the device of its first weight (cpu if none)."""
    hook = getattr(module, "_hf_hook", None)
    device = getattr(hook, "execution_device", None)
    if device is None:  # a SequentialHook holds several
        device = next(
            (
                h.execution_device
                for h in getattr(hook, "hooks", ())
                if getattr(h, "execution_device", None) is not None
            ),
            None,
        )
    if device is not None:
        return torch.device(device if not isinstance(device, int) else f"cuda:{device}")
    for t in module.parameters():
        return t.device
    for t in module.buffers():
        return t.device
    return torch.device("cpu")


def input_device(model: nn.Module) -> torch.device:
    """Where input ids go: the device of the model's input embedding."""
    return module_device(model.get_input_embeddings())


def is_offloaded(module: nn.Module) -> bool:
    """True when any weight of the module (or of its children) is offloaded (meta)."""
    return any(t.device.type == "meta" for _, t in _tensors(module))


def check_resident(model: nn.Module, names: Iterable[str], who: str) -> None:
    """Refuse, naming the module, to edit or patch a module whose weights are offloaded."""
    for name in names:
        module = model.get_submodule(name)
        if is_offloaded(module):
            raise UserError(
                f"{who}: module {name!r} is offloaded (its weights are on disk or CPU behind "
                "accelerate's offload, not in memory), so it cannot be edited there; load the "
                "model with the editor's modules resident (medit edit / bench do: --device-map "
                "keeps them off the offload) or without that offload"
            )


#: bitsandbytes' quantised linear layers (``load_model(quantize=...)``)
QUANTIZED_LAYERS = ("Linear8bitLt", "Linear4bit")


def is_quantized(module: nn.Module) -> bool:
    """True when the module (or a child) is a bitsandbytes 8-bit / 4-bit layer."""
    return any(type(m).__name__ in QUANTIZED_LAYERS for m in module.modules())


def check_full_precision(model: nn.Module, names: Iterable[str], who: str) -> None:
    """Refuse, naming the module, to edit or patch a module whose weights are quantised."""
    for name in names:
        if is_quantized(model.get_submodule(name)):
            raise UserError(
                f"{who}: module {name!r} is quantised (bitsandbytes), so its weights cannot be "
                "edited in place; load the model with the editor's modules in full precision "
                "(medit edit / bench do: --quantize keeps them unquantised) or without --quantize"
            )


def has_offload(model: nn.Module) -> bool:
    """True when some module of the model is offloaded by accelerate."""
    return any(t.device.type == "meta" for _, t in _tensors(model))


def device_map_of(model: nn.Module) -> dict[str, str] | None:
    """The model's device map as JSON-ready strings (None: loaded onto one device)."""
    dm = getattr(model, "hf_device_map", None)
    return {k: str(v) for k, v in dm.items()} if dm else None


@contextlib.contextmanager
def _resident(module: nn.Module) -> Iterator[None]:
    """Inside the block an offloaded module's weights are in CPU memory (accelerate's own
    ``align_module_device``); a resident module is left as it is."""
    if not is_offloaded(module):
        yield
        return
    from accelerate.utils import align_module_device

    with align_module_device(module, torch.device("cpu")):
        yield


def state_tensors(model: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """``model.state_dict()``'s (name, tensor) pairs in name order, offloaded weights read from
    their offload (one module at a time in memory): a dispatched model hashes like the same
    weights on one device."""
    state = model.state_dict()
    for name in sorted(state):
        t = state[name]
        if t.device.type != "meta":
            yield name, t
            continue
        owner, _, leaf = name.rpartition(".")
        module = model.get_submodule(owner)
        with _resident(module):
            yield name, getattr(module, leaf).detach()
