"""The edit journal: every edit, apply and revert, in an append-only, hash-chained JSON-lines file.

One workspace holds one ``journal.jsonl``. Each line is one entry: who changed which model, why,
with which method, hyper-parameters and requests, the sha256 of the weights before and after, of
every artifact written, and the evaluation's headline figures. Each entry carries its position
(``seq``), the sha256 of the entry before it (``prev``; :data:`GENESIS` for the first) and its own
sha256 over its canonical JSON (sorted keys, no spaces, UTF-8). An edited entry no longer matches
its hash; a removed, reordered or inserted one breaks ``seq`` or ``prev``; removing entries at the
end is seen by :func:`verify` given the head hash a reviewer wrote down (``--head``).

Appends take a lock beside the file, refuse a journal that fails verification, drop the incomplete
last line of an interrupted write (with a warning), and write the entry as one fsynced line.
JSON lines rather than SQLite: readable with any tool, diffable, one ``write`` per entry; the
figures are in ``benchmarks/bench_journal.py``.
"""

from __future__ import annotations

import getpass
import hashlib
import json
import os
import platform
import warnings
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from filelock import FileLock

from medit.core.errors import UserError
from medit.core.results import medit_version

JOURNAL_FILE = "journal.jsonl"
SCHEMA = "medit.journal/1"
#: ``prev`` of the first entry
GENESIS = "0" * 64
ACTIONS = ("edit", "apply", "revert")
_CHAIN_KEYS = ("seq", "prev", "sha256")


class JournalError(UserError):
    """A journal that cannot be read or must not be appended to (a user-facing error)."""


def journal_path(workspace: str | Path) -> Path:
    return Path(workspace) / JOURNAL_FILE


def canonical(entry: dict[str, Any]) -> bytes:
    """The bytes an entry's sha256 covers: all its fields but ``sha256``, canonical JSON."""
    body = {k: v for k, v in entry.items() if k != "sha256"}
    return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def entry_sha256(entry: dict[str, Any]) -> str:
    return hashlib.sha256(canonical(entry)).hexdigest()


def _user() -> str:
    try:
        return getpass.getuser()
    except (OSError, KeyError):  # no login name (containers without a passwd entry)
        return "unknown"


def make_entry(
    *,
    action: str,
    author: str | None = None,
    reason: str | None = None,
    method: str | None,
    hparams: dict[str, Any] | None,
    requests: Sequence[dict[str, Any]] | None,
    base_weights_sha256: str | None,
    result_weights_sha256: str | None,
    artifacts: dict[str, str],
    evaluation: dict[str, Any] | None,
    run_dir: str | None = None,
    model: str | None = None,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The body of a journal entry (``seq``, ``prev`` and ``sha256`` are added by :func:`append`)."""
    if action not in ACTIONS:
        raise ValueError(f"journal action must be one of {', '.join(ACTIONS)}, not {action!r}")
    entry = {
        "schema": SCHEMA,
        "time": datetime.now(timezone.utc)
        .isoformat(timespec="milliseconds")
        .replace("+00:00", "Z"),
        "action": action,
        "author": author or _user(),
        "reason": reason,
        "host": platform.node(),
        "medit_version": medit_version(),
        "model": model,
        "method": method,
        "hparams": hparams,
        "requests": list(requests) if requests is not None else None,
        "base_weights_sha256": base_weights_sha256,
        "result_weights_sha256": result_weights_sha256,
        "artifacts": dict(sorted(artifacts.items())),
        "evaluation": evaluation,
        "run_dir": run_dir,
    }
    if extra:
        clash = set(extra) & (set(entry) | set(_CHAIN_KEYS))
        if clash:
            raise ValueError(f"journal extra fields clash with entry fields: {sorted(clash)}")
        entry.update(extra)
    json.dumps(entry, allow_nan=False)  # fail here, not half-way through an append
    return entry


# -- reading -------------------------------------------------------------------------------------
def _split(data: bytes) -> tuple[list[bytes], bytes]:
    """Complete lines and the incomplete tail (bytes after the last newline)."""
    cut = data.rfind(b"\n") + 1
    return data[:cut].splitlines(), data[cut:]


def _parse(path: Path, lines: list[bytes]) -> list[tuple[int, dict[str, Any]]]:
    out = []
    for n, raw in enumerate(lines, 1):
        if not raw.strip():
            continue
        try:
            entry = json.loads(raw.decode("utf-8"))
        except UnicodeDecodeError:
            raise JournalError(f"{path}: line {n}: not UTF-8 text") from None
        except json.JSONDecodeError as exc:
            raise JournalError(f"{path}: line {n}: invalid JSON ({exc.msg})") from None
        if not isinstance(entry, dict):
            raise JournalError(f"{path}: line {n}: not a journal entry (a JSON object)")
        missing = [k for k in _CHAIN_KEYS if k not in entry]
        if missing:
            raise JournalError(f"{path}: line {n}: not a journal entry (no {', '.join(missing)})")
        out.append((n, entry))
    return out


def _load(path: Path) -> tuple[list[tuple[int, dict[str, Any]]], bytes]:
    path = Path(path)
    if not path.exists():
        return [], b""
    if path.is_dir():
        raise JournalError(f"{path}: is a directory, not a journal file")
    lines, tail = _split(path.read_bytes())
    return _parse(path, lines), tail


def read(path: str | Path) -> list[dict[str, Any]]:
    """The entries, oldest first ([] when there is no journal). An incomplete last line (an
    interrupted write) is not an entry; an invalid complete line is an error naming its line."""
    return [e for _, e in _load(Path(path))[0]]


def head(path: str | Path) -> str:
    """The sha256 of the last entry (:data:`GENESIS` for an empty journal)."""
    entries = read(path)
    return entries[-1]["sha256"] if entries else GENESIS


def _problems(entries: list[tuple[int, dict[str, Any]]], expected_head: str | None) -> list[str]:
    problems: list[str] = []
    prev, want = GENESIS, 0
    by_sha: dict[str, Any] = {}
    for k, (line, e) in enumerate(entries):
        seq, where = e.get("seq"), f"seq {e.get('seq')} at line {line}"
        if e["sha256"] != entry_sha256(e):
            problems.append(f"{where} was edited: its content no longer matches its sha256")
        if not isinstance(seq, int) or isinstance(seq, bool):
            problems.append(f"line {line}: seq {seq!r} is not an entry number")
        elif e["sha256"] in by_sha:
            problems.append(f"{where}: a second copy of an earlier entry was inserted")
        elif seq > want:
            later = {x.get("seq") for _, x in entries[k + 1 :]}
            if any(s in later for s in range(want, seq)):
                problems.append(
                    f"{where}: out of order (expected seq {want}): entries were reordered"
                )
            else:
                gone = f"seq {want}" if seq == want + 1 else f"seq {want}-{seq - 1}"
                problems.append(f"{where}: entries before it were removed ({gone} missing)")
        elif seq < want:
            problems.append(
                f"{where}: out of order (expected seq {want}): entries were reordered or inserted"
            )
        elif e["prev"] != prev:
            problems.append(
                f"{where}: its prev is not the sha256 of the entry before it: an "
                f"entry was replaced, reordered or inserted"
            )
        by_sha[e["sha256"]] = seq
        prev = e["sha256"]
        want = (seq + 1) if isinstance(seq, int) and not isinstance(seq, bool) else want + 1
    if expected_head is not None and expected_head != prev:
        if expected_head in by_sha:
            pass  # entries were appended after the head the caller holds: not a problem
        elif expected_head == GENESIS:
            pass
        else:
            problems.append(
                f"the head you hold ({expected_head[:16]}...) is not in the journal: "
                f"entries at its end were removed or it was rewritten"
            )
    return problems


def verify(path: str | Path, expected_head: str | None = None) -> list[str]:
    """What is wrong with the journal's chain ([] when intact). Each problem names the entry
    (``seq N at line L``) and says whether it was edited, removed, reordered or inserted. With
    ``expected_head`` (a head hash recorded earlier) removed or rewritten tails are seen too."""
    path = Path(path)
    try:
        entries, _ = _load(path)
    except JournalError as exc:
        return [str(exc)]
    return [f"{path}: {p}" for p in _problems(entries, expected_head)]


def entries_for_run(path: str | Path, run_dir: str | Path) -> list[dict[str, Any]]:
    """The entries written by (or into) one run or model directory."""
    want = os.path.realpath(run_dir)

    def names(e: dict[str, Any]) -> set[str]:
        found = {e.get("run_dir"), e.get("out"), e.get("saved_model")}
        return {os.path.realpath(p) for p in found if isinstance(p, str)}

    return [e for e in read(path) if want in names(e)]


def format_entries(entries: Sequence[dict[str, Any]]) -> str:
    """The entries as a plain-text table, one line each."""
    if not entries:
        return "(the journal has no entries)"
    rows = [("seq", "time", "action", "author", "method", "edits", "weights", "verdict", "reason")]
    for e in entries:
        base, result = e.get("base_weights_sha256") or "?", e.get("result_weights_sha256") or "?"
        ev = e.get("evaluation") or {}
        rows.append(
            (
                str(e.get("seq")),
                str(e.get("time", ""))[:19].replace("T", " "),
                str(e.get("action", "")),
                str(e.get("author", "")),
                str(e.get("method") or "-"),
                str(len(e.get("requests") or [])),
                f"{base[:8]}->{result[:8]}",
                str(ev.get("verdict", "-")),
                str(e.get("reason") or ""),
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    return "\n".join(
        "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=False)) + "  " + r[-1] for r in rows
    ).rstrip()


# -- appending -----------------------------------------------------------------------------------
def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # not possible on every platform
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def append(path: str | Path, entry: dict[str, Any], *, timeout: float = 60.0) -> dict[str, Any]:
    """Add ``entry`` (from :func:`make_entry`) as the next link of the chain; the stored entry.

    Safe across processes (a lock file beside the journal). Refuses a journal that fails
    verification, so a tampered chain is never extended and hidden."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(path) + ".lock", timeout=timeout):
        created = not path.exists()
        data = b"" if created else path.read_bytes()
        lines, tail = _split(data)
        if tail:
            warnings.warn(
                f"{path}: dropping an incomplete last line ({len(tail)} bytes) left by "
                f"an interrupted write",
                stacklevel=2,
            )
            with open(path, "r+b") as f:
                f.truncate(len(data) - len(tail))
                f.flush()
                os.fsync(f.fileno())
        entries = _parse(path, lines)
        problems = _problems(entries, None)
        if problems:
            raise JournalError(
                f"refusing to append to {path}: it fails verification ("
                f"{problems[0]}{'; ...' if len(problems) > 1 else ''}); see "
                f"`medit journal verify`"
            )
        stored = {k: v for k, v in entry.items() if k not in _CHAIN_KEYS}
        stored["seq"] = entries[-1][1]["seq"] + 1 if entries else 0
        stored["prev"] = entries[-1][1]["sha256"] if entries else GENESIS
        stored["sha256"] = entry_sha256(stored)
        line = json.dumps(stored, ensure_ascii=False, allow_nan=False).encode() + b"\n"
        with open(path, "ab") as f:
            f.write(line)
            f.flush()
            os.fsync(f.fileno())
        if created:
            _fsync_dir(path.parent)
    return stored
