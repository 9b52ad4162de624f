"""The edit journal's storage: hash-chained JSON lines (medit.artifacts.journal) vs an SQLite table.

    python benchmarks/bench_journal.py [--n 1000] [--requests 4] [--out FILE]

Both stores keep the same entries (realistic size: the requests, hyper-parameters, hashes and
evaluation of an edit run) with the same chain (seq, prev, sha256 over canonical JSON), each
append durable (fsync / SQLite's synchronous=FULL) and checked before it is written. Printed: ms
per append at the start and at the end of N appends, the time to verify the whole chain, bytes on
disk. The physical floor of an append is one fsync, measured alone.
"""

from __future__ import annotations

import argparse
import json
import os
import sqlite3
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from medit.artifacts import journal  # noqa: E402


def _entry(i: int, n_requests: int) -> dict:
    reqs = [
        {
            "prompt": f"The first-line treatment of condition {i}-{k} is",
            "target_new": "drug",
            "subject": f"condition {i}-{k}",
            "rephrase_prompts": [f"Condition {i}-{k} is treated with"],
            "locality_prompts": ["The capital of France is"],
            "locality_answers": ["Paris"],
        }
        for k in range(n_requests)
    ]
    return journal.make_entry(
        action="edit",
        author="bench",
        reason=f"correction {i}",
        method="ft-m",
        hparams={"steps": 25, "lr": 5e-4, "layers": [4]},
        requests=reqs,
        base_weights_sha256="a" * 64,
        result_weights_sha256="b" * 64,
        artifacts={"edit.safetensors": "c" * 64, "results.json": "d" * 64},
        evaluation={
            "n": n_requests,
            "verdict": "PASS",
            "pre": {"efficacy": 0.0},
            "post": {"efficacy": 1.0},
        },
    )


class SqliteJournal:
    """The same chain in one SQLite table, verified before each append like the JSONL one."""

    def __init__(self, path: Path):
        self.db = sqlite3.connect(path, isolation_level=None)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=FULL")
        self.db.execute(
            "CREATE TABLE IF NOT EXISTS j (seq INTEGER PRIMARY KEY, body TEXT NOT NULL)"
        )

    def verify(self) -> list[str]:
        prev, problems = journal.GENESIS, []
        for seq, body in self.db.execute("SELECT seq, body FROM j ORDER BY seq"):
            e = json.loads(body)
            if e["sha256"] != journal.entry_sha256(e) or e["prev"] != prev or e["seq"] != seq:
                problems.append(f"seq {seq}")
            prev = e["sha256"]
        return problems

    def append(self, entry: dict) -> None:
        self.db.execute("BEGIN IMMEDIATE")
        assert not self.verify()
        row = self.db.execute("SELECT body FROM j ORDER BY seq DESC LIMIT 1").fetchone()
        last = json.loads(row[0]) if row else None
        stored = {
            **entry,
            "seq": last["seq"] + 1 if last else 0,
            "prev": last["sha256"] if last else journal.GENESIS,
        }
        stored["sha256"] = journal.entry_sha256(stored)
        self.db.execute("INSERT INTO j VALUES (?, ?)", (stored["seq"], json.dumps(stored)))
        self.db.execute("COMMIT")


def _fsync_floor(directory: Path, n: int = 50) -> float:
    p = directory / "fsync.bin"
    with open(p, "ab") as f:
        t = time.perf_counter()
        for _ in range(n):
            f.write(b"x" * 2048)
            f.flush()
            os.fsync(f.fileno())
        return (time.perf_counter() - t) / n


def _timed_appends(append, entries) -> list[float]:
    times = []
    for e in entries:
        t = time.perf_counter()
        append(e)
        times.append(time.perf_counter() - t)
    return times


def _ms(xs: list[float]) -> str:
    return f"{1000 * sum(xs) / len(xs):7.2f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--requests", type=int, default=4, help="requests per entry")
    ap.add_argument("--out", help="also write the figures as JSON here")
    args = ap.parse_args()
    entries = [_entry(i, args.requests) for i in range(args.n)]
    with tempfile.TemporaryDirectory(dir=Path.cwd()) as tmp:
        d = Path(tmp)
        floor = _fsync_floor(d)
        jpath = d / journal.JOURNAL_FILE
        jt = _timed_appends(lambda e: journal.append(jpath, e), entries)
        t = time.perf_counter()
        assert journal.verify(jpath) == []
        jverify = time.perf_counter() - t
        store = SqliteJournal(d / "journal.sqlite")
        st = _timed_appends(store.append, entries)
        t = time.perf_counter()
        assert store.verify() == []
        sverify = time.perf_counter() - t
        store.db.close()
        jbytes = jpath.stat().st_size
        sbytes = sum(p.stat().st_size for p in d.glob("journal.sqlite*"))
    k = min(100, args.n // 2)
    print(
        f"{args.n} appends, {args.requests} requests per entry; fsync floor "
        f"{1000 * floor:.2f} ms per append"
    )
    print(
        f"{'store':8} {'first ' + str(k) + ' ms':>12} {'last ' + str(k) + ' ms':>12} "
        f"{'verify ms':>10} {'bytes':>10}"
    )
    print(f"{'jsonl':8} {_ms(jt[:k]):>12} {_ms(jt[-k:]):>12} {1000 * jverify:10.1f} {jbytes:10d}")
    print(f"{'sqlite':8} {_ms(st[:k]):>12} {_ms(st[-k:]):>12} {1000 * sverify:10.1f} {sbytes:10d}")
    if args.out:
        Path(args.out).write_text(
            json.dumps(
                {
                    "n": args.n,
                    "requests": args.requests,
                    "fsync_floor_ms": 1000 * floor,
                    "jsonl": {
                        "first_ms": 1000 * sum(jt[:k]) / k,
                        "last_ms": 1000 * sum(jt[-k:]) / k,
                        "verify_ms": 1000 * jverify,
                        "bytes": jbytes,
                    },
                    "sqlite": {
                        "first_ms": 1000 * sum(st[:k]) / k,
                        "last_ms": 1000 * sum(st[-k:]) / k,
                        "verify_ms": 1000 * sverify,
                        "bytes": sbytes,
                    },
                },
                indent=2,
            )
            + "\n"
        )


if __name__ == "__main__":
    main()
