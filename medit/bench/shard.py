"""A benchmark run shared by several processes (``accelerate launch`` or ``torchrun``).

Launched with more than one process (``WORLD_SIZE`` > 1 in the environment), each process is
one *shard*: it loads the model on its own device (``cuda:LOCAL_RANK`` with GPUs, the CPU
otherwise; accelerate's process group: NCCL or gloo) and edits its share of the work:

* single mode: the cases ``i`` with ``i % shards == shard``;
* batch mode: the batches (groups of ``--batch-size`` cases) ``g`` with ``g % shards == shard``;
* sequential mode: a sequence is one process's by nature (each edit builds on the ones before),
  so the shards take whole methods: method ``m`` (in ``--methods`` order) goes to shard
  ``m % shards``.

Each shard appends its finished cases (and curve points) to files of its own,
``cases.shard-N.jsonl`` and ``curve.shard-N.jsonl``, so no two processes write one file. They are
read with ``cases.jsonl`` (a resumed run skips what any shard finished, whatever the number of
processes now) and, once every shard is done, the first process moves their lines into
``cases.jsonl`` and ``curve.jsonl`` (appended and synced before a shard file is removed; a crash
in between leaves a line in both, read once) and aggregates: the directory then is the one a
one-process run leaves.
"""

from __future__ import annotations

import dataclasses
import datetime
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from medit.core.errors import UserError
from medit.core.fs import marker_kind

SHARD_GLOB = "{stem}.shard-*.jsonl"
#: how long a shard waits at a barrier for the others: the first process's pre-edit baseline
#: and a slower shard's share can take hours (torch's default, 30 minutes, would end a long run
#: with a timeout); a process that dies ends the launch through its launcher, not through this
BARRIER_TIMEOUT = datetime.timedelta(days=7)


@dataclasses.dataclass
class Shard:
    """This process's place in a launch of ``count`` processes."""

    index: int = 0
    count: int = 1
    device: str | None = None  #: the device this process edits on (None: the one asked for)
    _state: Any = None

    @property
    def main(self) -> bool:
        return self.index == 0

    def barrier(self) -> None:
        if self._state is not None:
            self._state.wait_for_everyone()

    def cases_file(self, stem: str) -> str:
        """The file this shard appends ``stem`` records to (``cases``: ``cases.shard-1.jsonl``);
        a single process writes ``stem.jsonl`` itself."""
        return f"{stem}.jsonl" if self.count == 1 else f"{stem}.shard-{self.index}.jsonl"

    def mine(self, mode: str, todo: Sequence[int], batch_size: int, method_index: int) -> list[int]:
        """This shard's part of a method's unfinished cases ``todo`` (see the module's text)."""
        if self.count == 1:
            return list(todo)
        if mode == "sequential":
            return list(todo) if method_index % self.count == self.index else []
        if mode == "batch":
            return [i for i in todo if (i // batch_size) % self.count == self.index]
        return [i for i in todo if i % self.count == self.index]


def current_shard(device: str, device_map: str | None) -> Shard:
    """The shard of this process: one of a launch's processes, or the only one."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return Shard()
    if device_map:
        raise UserError(
            "--device-map spreads one model over devices inside one process; a launch of "
            "several processes gives each its own device: use one or the other"
        )
    from accelerate import PartialState

    cpu = device == "cpu" or (device == "auto" and not torch.cuda.is_available())
    state = PartialState(cpu=cpu, timeout=BARRIER_TIMEOUT)
    if state.num_processes <= 1:  # WORLD_SIZE set, but no process group came up
        return Shard()
    placed = "cpu" if cpu else str(state.device)
    if not cpu and device not in ("auto", placed) and device.split(":")[0] != placed.split(":")[0]:
        raise UserError(f"--device {device}: this launch places each process on {placed}")
    return Shard(state.process_index, state.num_processes, placed, state)


def shard_files(out: Path, stem: str) -> list[Path]:
    """The shard files of ``stem`` records in a run directory (``stem.shard-N.jsonl``, N a
    number), in shard order."""
    found = []
    for path in Path(out).glob(SHARD_GLOB.format(stem=stem)):
        index = path.name[len(stem) + len(".shard-") : -len(".jsonl")]
        if index.isdigit():
            found.append((int(index), path))
    return [path for _, path in sorted(found)]


def merge_shards(out: Path, stem: str) -> None:
    """Move every shard file's lines into ``stem.jsonl`` (appended and synced; a line a crash
    cut short goes to ``stem.rejected.jsonl``, nothing is thrown away), then remove the shard
    file. Only in a directory medit marked as a benchmark run: the shard files there are the
    ones its processes wrote."""
    if marker_kind(out) != "bench-run":
        return
    for path in shard_files(out, stem):
        lines = path.read_bytes().splitlines(keepends=True)
        for name, part in (
            (f"{stem}.jsonl", [ln for ln in lines if ln.endswith(b"\n")]),
            (f"{stem}.rejected.jsonl", [ln + b"\n" for ln in lines if not ln.endswith(b"\n")]),
        ):
            if part:
                with open(Path(out) / name, "ab") as f:
                    f.write(b"".join(part))
                    f.flush()
                    os.fsync(f.fileno())
        path.unlink()
