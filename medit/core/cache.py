"""One content-keyed cache for every piece of work medit keeps between runs.

Each cache is a :class:`Cache` with a name (its folder under :func:`cache_dir`), a format version
and a storage kind:

* ``json``: a JSON value per key (traces, corpora, context templates, baselines);
* ``tensors``: a dict of tensors per key, as safetensors (second moments);
* ``memory``: in-process only (values that are cheap to recompute but needed many times in a
  process: ROME's traced layer, AlphaEdit's projectors);
* ``dir``: a directory per key that its owner writes (materialised models).

A key is the sha256 of the cache's name and version and the caller's parts (content hashes and
settings), so changing a format means raising its version, and stale entries are never read.
Files are written atomically (:func:`medit.core.fs.atomic_file`); ``json`` and ``tensors`` values
are also kept in memory when the cache says ``memory=True``.

Work on the base model is keyed by the base weights' hash, read in one place:
:func:`base_weights_sha256` (set at load by :func:`mark_base_weights`). A model with no hash
(one built in a test or by a user's own code) is not cached.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from medit.core.fs import atomic_file, atomic_write_text

_ATTR = "medit_weights_sha256"
_KINDS = ("json", "tensors", "memory", "dir")
_ALL: list[Cache] = []


def cache_dir() -> Path:
    """Root of medit's on-disk cache (``$MEDIT_CACHE`` or the user cache directory)."""
    env = os.environ.get("MEDIT_CACHE")
    if env:
        return Path(env).expanduser()
    import platformdirs

    return Path(platformdirs.user_cache_dir("medit"))


def mark_base_weights(model: Any, sha256: str) -> None:
    """Record the hash of the weights ``model`` was loaded with (see :func:`base_weights_sha256`)."""
    setattr(model, _ATTR, sha256)


def base_weights_sha256(model: Any) -> str | None:
    """The hash of the weights the model was loaded with, or None when medit did not load it.

    Edits do not change it: caches keyed by it hold work on the base model (its traces, corpus,
    second moments), which is what sequential editing reuses."""
    return getattr(model, _ATTR, None)


class Cache:
    """A content-keyed store of one kind of value (see the module docstring)."""

    def __init__(self, name: str, version: int, kind: str = "json", memory: bool = False):
        if kind not in _KINDS:
            raise ValueError(f"cache kind {kind!r} is not one of {_KINDS}")
        self.name, self.version, self.kind = name, version, kind
        self.memory = memory or kind == "memory"
        self._memory: dict[str, Any] = {}
        _ALL.append(self)

    def key(self, *parts: Any) -> str:
        """sha256 over the cache's name, version and ``parts`` (JSON-encoded, keys sorted)."""
        blob = json.dumps([f"medit.{self.name}/{self.version}", *parts], sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()

    @property
    def root(self) -> Path:
        """The cache's folder."""
        return cache_dir() / self.name

    def path(self, key: str, label: str = "") -> Path:
        """Where the value of ``key`` lives on disk (``label`` prefixes a ``dir`` entry's name)."""
        suffix = {"json": ".json", "tensors": ".safetensors", "dir": ""}[self.kind]
        name = f"{label}-{key[:16]}" if label else key[:32]
        return self.root / f"{name}{suffix}"

    def get(self, key: str) -> Any | None:
        """The stored value, or None when there is none (or it cannot be read)."""
        if key in self._memory:
            return self._memory[key]
        if self.kind in ("memory", "dir"):
            return None
        path = self.path(key)
        if not path.is_file():
            return None
        try:
            if self.kind == "json":
                value = json.loads(path.read_text(encoding="utf-8"))
            else:
                from safetensors.torch import load_file

                value = load_file(str(path))
        except (OSError, ValueError):  # truncated by a full disk or edited by hand: recompute
            return None
        if self.memory:
            self._memory[key] = value
        return value

    def put(self, key: str, value: Any) -> Any:
        """Store ``value`` under ``key`` (atomically on disk); return it."""
        if self.kind == "json":
            atomic_write_text(self.path(key), json.dumps(value))
        elif self.kind == "tensors":
            from safetensors.torch import save_file

            with atomic_file(self.path(key)) as tmp:
                save_file({k: v.contiguous() for k, v in value.items()}, str(tmp))
        elif self.kind == "dir":
            raise TypeError("a dir cache entry is written by its owner at cache.path(key)")
        if self.memory:
            self._memory[key] = value
        return value

    def get_or_compute(self, key: str | None, compute: Callable[[], Any]) -> Any:
        """The stored value of ``key``, else ``compute()`` stored under it. ``key=None`` (the
        content is unknown, so it cannot be keyed) computes without storing."""
        if key is None:
            return compute()
        value = self.get(key)
        return value if value is not None else self.put(key, compute())

    def clear_memory(self) -> None:
        self._memory.clear()


def clear_memory() -> None:
    """Drop every cache's in-process values (the disk is untouched)."""
    for cache in _ALL:
        cache.clear_memory()
