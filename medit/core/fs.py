"""Safe writes: atomic files and directories, ownership markers, and checks before any work.

Rules every medit writer follows:

* A file or directory is written under a temporary name beside its target and renamed into
  place, so a crash never leaves a half-written target. Temporary names carry the writer's pid
  (``.NAME.tmp-PID-XXXX``); the next write to the same target removes the ones whose writer is
  dead, so a crash (kill -9) leaves nothing behind for long.
* medit never deletes or replaces a directory it did not create: every directory it writes holds
  a marker file (:data:`MARKER`) saying what it is. Replacing an existing non-empty directory
  needs that marker (and, where the caller says so, the right kind).
* Paths are checked before the work starts: an output that cannot be written, or outputs that
  overlap each other or the base model, are user errors raised before a model is loaded.

Files get the usual permissions (0666 & ~umask, directories 0777 & ~umask), not the 0600 that
``tempfile`` gives.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

from medit.core.errors import UserError

log = logging.getLogger(__name__)

#: marker file in every directory medit creates: {"created_by": "medit", "kind": ...}
MARKER = ".medit"
_TMP = re.compile(r"^\.(?P<name>.+)\.(?:tmp|old)-(?P<pid>\d+)-")


def umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _tmp_prefix(name: str) -> str:
    return f".{name}.tmp-{os.getpid()}-"


# -- ownership -----------------------------------------------------------------------------------
def marker_kind(directory: str | Path) -> str | None:
    """The kind recorded in a directory's medit marker, or None when medit did not create it.

    Directories written before markers existed are recognised by their medit files."""
    directory = Path(directory)
    data = _read_json(directory / MARKER)
    if isinstance(data, dict) and data.get("created_by") == "medit":
        return data.get("kind")
    return _legacy_kind(directory)


_LEGACY = (
    ("results.json", "schema", "medit.results/", "edit-run"),
    ("results.json", "schema", "medit.bench/", "bench-run"),
    ("bench.json", "schema", "medit.bench/", "bench-run"),
    ("traces.json", "schema", "medit.traces/", "trace-run"),
    ("manifest.json", "format", "medit.", "artifact"),
)


def _legacy_kind(directory: Path) -> str | None:
    for file, key, prefix, kind in _LEGACY:
        data = _read_json(directory / file)
        if isinstance(data, dict) and str(data.get(key, "")).startswith(prefix):
            return kind
    if (directory / "medit-delta.safetensors").is_file():
        return "model"
    return None


def _read_json(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def write_marker(directory: str | Path, kind: str) -> None:
    atomic_write_text(Path(directory) / MARKER, json.dumps({"created_by": "medit", "kind": kind}))


def is_empty_dir(path: Path) -> bool:
    return path.is_dir() and not any(path.iterdir())


def check_replaceable(target: str | Path, kinds: Iterable[str], what: str) -> None:
    """Refuse to replace ``target`` unless it is absent, empty, or a directory medit created as
    one of ``kinds`` (``what`` names the option in the message)."""
    target = Path(target)
    if not target.exists() or is_empty_dir(target):
        return
    if not target.is_dir():
        raise UserError(f"{what} {target} exists and is not a directory")
    kind = marker_kind(target)
    kinds = tuple(kinds)
    if kind is None:
        raise UserError(
            f"{what} {target} is not empty and was not created by medit (no {MARKER} marker): "
            "medit never replaces a directory it did not create; choose another directory"
        )
    if kind not in kinds:
        raise UserError(
            f"{what} {target} holds a medit {kind}, not a {' or '.join(kinds)}; "
            "choose another directory"
        )


# -- checks before the work ----------------------------------------------------------------------
def check_out(out: str | Path, overwrite: bool, kind: str, what: str = "--out") -> Path:
    """The checks of a run directory before any work: not a file, empty unless ``overwrite``,
    replaceable only when medit made it as ``kind``, and writable."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UserError(f"{what} {out} exists and is not a directory")
    if out.exists() and not is_empty_dir(out):
        if not overwrite:
            raise UserError(
                f"{what} {out} is not empty; choose another directory or pass --overwrite"
            )
        check_replaceable(out, (kind,), what)
    check_writable(out, what)
    return out


def check_writable(path: str | Path, what: str) -> None:
    """Fail now, not after the work, when ``path`` (a file or directory to create) cannot be
    written: its nearest existing ancestor must be a directory where a file can be created."""
    path = Path(path).absolute()
    probe_dir = path.parent  # files and directories are written beside their target, renamed in
    while not probe_dir.exists():
        probe_dir = probe_dir.parent
    if not probe_dir.is_dir():
        raise UserError(f"{what} {path}: {probe_dir} is not a directory")
    try:
        fd, probe = tempfile.mkstemp(prefix=_tmp_prefix("write-check"), dir=probe_dir)
    except OSError as exc:
        reason = os.strerror(exc.errno) if exc.errno else str(exc)
        raise UserError(f"{what} {path}: cannot write in {probe_dir} ({reason})") from None
    os.close(fd)
    os.unlink(probe)


def _inside(a: Path, b: Path) -> bool:
    """``a`` is ``b`` or lies under it."""
    return a == b or b in a.parents


def check_disjoint(paths: dict[str, str | Path | None]) -> None:
    """Refuse outputs (and the base model) that are the same directory or nested in each other:
    one write would replace the other. ``paths``: option name -> path (None: not given)."""
    given = [(k, Path(v).expanduser().resolve()) for k, v in paths.items() if v]
    for i, (name_a, a) in enumerate(given):
        for name_b, b in given[i + 1 :]:
            if _inside(a, b) or _inside(b, a):
                relation = "is the same directory as" if a == b else "overlaps"
                raise UserError(
                    f"{name_a} {a} {relation} {name_b} {b}: one write would replace the other; "
                    "use separate directories"
                )


# -- temporary leftovers -------------------------------------------------------------------------
def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clean_stale(parent: str | Path, name: str | None = None) -> int:
    """Remove temporary files and directories of dead writers in ``parent`` (for target ``name``
    only, or all); return how many were removed."""
    parent = Path(parent)
    removed = 0
    with contextlib.suppress(FileNotFoundError, NotADirectoryError):
        for entry in parent.iterdir():
            m = _TMP.match(entry.name)
            if not m or (name is not None and m["name"] != name) or _alive(int(m["pid"])):
                continue
            log.info("removing %s, left by an interrupted write", entry)
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                with contextlib.suppress(FileNotFoundError):
                    entry.unlink()
            removed += 1
    return removed


# -- hashes --------------------------------------------------------------------------------------
def file_sha256(path: str | Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def tree_sha256(root: str | Path, skip: Iterable[str] = (MARKER,)) -> dict[str, str]:
    """sha256 of every file under ``root``, keyed by its path relative to ``root``."""
    root = Path(root)
    skip = set(skip)
    return {
        p.relative_to(root).as_posix(): file_sha256(p)
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.name not in skip
    }


# -- atomic writes -------------------------------------------------------------------------------
def fix_permissions(root: str | Path) -> None:
    """Give a tree the usual permissions (files 0666 & ~umask, directories 0777 & ~umask)."""
    root = Path(root)
    mask = umask()
    os.chmod(root, (0o777 if root.is_dir() else 0o666) & ~mask)
    if root.is_dir():
        for dirpath, dirnames, filenames in os.walk(root):
            for d in dirnames:
                os.chmod(os.path.join(dirpath, d), 0o777 & ~mask)
            for f in filenames:
                os.chmod(os.path.join(dirpath, f), 0o666 & ~mask)


def fsync_file(path: str | Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


@contextlib.contextmanager
def atomic_file(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; it is renamed into place when the block succeeds
    (written by any library: ``safetensors.save_file(..., str(tmp))``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    clean_stale(path.parent, path.name)
    fd, tmp = tempfile.mkstemp(prefix=_tmp_prefix(path.name), dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        fsync_file(tmp)
        os.chmod(tmp, 0o666 & ~umask())
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write a text file under a temporary name, then rename it into place."""
    with atomic_file(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    with atomic_file(path) as tmp:
        tmp.write_bytes(data)


def append_line(path: str | Path, line: str) -> None:
    """Append one line with a single write, flushed to disk."""
    with open(path, "a", encoding="utf-8") as f:
        f.write(line if line.endswith("\n") else line + "\n")
        f.flush()
        os.fsync(f.fileno())


@contextlib.contextmanager
def atomic_dir(target: str | Path, kind: str, replace: Iterable[str] | None = None):
    """Yield a temporary directory that becomes ``target`` only if the block succeeds.

    The directory gets medit's marker of ``kind``. An existing ``target`` is replaced only when
    it is empty or medit created it as one of ``replace`` (default: ``kind``); anything else is
    refused before the block runs, and the old directory is removed only after the new one is in
    place.
    """
    target = Path(target)
    allowed = tuple(replace) if replace is not None else (kind,)
    check_replaceable(target, allowed, "refusing to replace")
    target.parent.mkdir(parents=True, exist_ok=True)
    clean_stale(target.parent, target.name)
    tmp = Path(tempfile.mkdtemp(prefix=_tmp_prefix(target.name), dir=target.parent))
    try:
        yield tmp
        write_marker(tmp, kind)
        fix_permissions(tmp)
        check_replaceable(target, allowed, "refusing to replace")  # it may have changed since
        if target.exists():
            old = Path(
                tempfile.mkdtemp(prefix=f".{target.name}.old-{os.getpid()}-", dir=target.parent)
            )
            os.rmdir(old)
            os.replace(target, old)
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            try:
                os.replace(tmp, target)
            except OSError as exc:  # created meanwhile by someone else: never replaced blindly
                if exc.errno in (errno.ENOTEMPTY, errno.EEXIST):
                    raise UserError(f"{target} appeared while medit was writing it") from None
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
