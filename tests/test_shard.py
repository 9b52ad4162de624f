"""A benchmark sharded over processes (a real two-process gloo launch on CPU, as a user runs
it) leaves the run directory, the cases and the aggregate of a one-process run; shard files
resume."""

import json
import os
import shutil
import subprocess
import sys

import pytest

from medit.bench.runner import BenchConfig, run_bench
from medit.bench.shard import BARRIER_TIMEOUT, Shard, current_shard
from medit.bench.store import read_cases
from tests.test_bench import _slice


def _strip(methods):
    drop = ("seconds_per_edit", "peak_memory_mb")
    return {m: {k: v for k, v in row.items() if k not in drop} for m, row in methods.items()}


def _common(tmp_path, tiny_model_dir, mode, methods):
    data = _slice(tmp_path, "MedCF/test.json", 5)
    hparams = {"ft-m": {"steps": 2}, "ft-l": {"steps": 1}}
    return dict(
        suite="medcf",
        data=str(data),
        model=str(tiny_model_dir),
        mode=mode,
        methods=methods,
        batch_size=2,
        device="cpu",
        quiet=True,
        hparams={m: hparams[m] for m in methods},
        curve_every=2,
        curve_sample=2,
    )


@pytest.mark.parametrize(
    "mode, methods",
    [("single", ("ft-m",)), ("batch", ("ft-m",)), ("sequential", ("ft-m", "ft-l"))],
)
def test_a_two_process_launch_gives_the_one_process_run(tmp_path, tiny_model_dir, mode, methods):
    """Launched as the README says (``torchrun -m medit bench``): fresh processes, never forked
    from this one (a fork after OpenMP has started its threads can hang the child)."""
    common = _common(tmp_path, tiny_model_dir, mode, methods)
    whole = run_bench(BenchConfig(out=str(tmp_path / "one"), **common))
    cli = ["--suite", "medcf", "--data", common["data"], "--model", common["model"]]
    cli += ["--mode", mode, "--methods", ",".join(methods), "--batch-size", "2", "--device", "cpu"]
    cli += ["--curve-every", "2", "--curve-sample", "2", "--quiet", "--out", str(tmp_path / "two")]
    for method, values in common["hparams"].items():
        cli += [a for k, v in values.items() for a in ("--hparam", f"{method}:{k}={v}")]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"]
    done = subprocess.run(
        [*launch, "-m", "medit", "bench", *cli],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    two = tmp_path / "two"
    assert not list(two.glob("*.shard-*")), "shard files are merged into the run's own"
    merged = json.loads((two / "results.json").read_text())
    assert _strip(merged["methods"]) == _strip(whole["methods"])
    cases = read_cases(two)
    assert sorted((c["method"], c["case"]) for c in cases) == sorted(
        (m, i) for m in methods for i in range(5)
    )
    if mode == "sequential":
        curve = lambda d: sorted(  # noqa: E731
            (p["method"], p["edits"], json.dumps({k: v for k, v in p.items() if "second" not in k}))
            for p in map(json.loads, open(d / "curve.jsonl"))
        )
        assert curve(two) == curve(tmp_path / "one")


def test_a_run_resumes_from_the_shard_files_of_an_interrupted_launch(
    tmp_path, tiny_model_dir, monkeypatch
):
    """Cases a killed launch's shards finished (one in cases.jsonl, two in a shard file, the
    last line cut short) are not edited again; the resumed run merges and aggregates them."""
    from medit.editors.base import Editor

    common = _common(tmp_path, tiny_model_dir, "single", ("ft-m",))
    whole = run_bench(BenchConfig(out=str(tmp_path / "one"), **common))
    crashed = tmp_path / "crashed"
    shutil.copytree(tmp_path / "one", crashed)
    lines = (crashed / "cases.jsonl").read_text().splitlines(keepends=True)
    (crashed / "cases.jsonl").write_text(lines[0])
    (crashed / "cases.shard-1.jsonl").write_text(lines[1] + lines[3] + lines[4][:40])
    calls = []
    real_apply = Editor.apply

    def counting_apply(self, model, tok, requests, prior=None):
        calls.append(requests[0].id)
        return real_apply(self, model, tok, requests, prior)

    monkeypatch.setattr(Editor, "apply", counting_apply)
    resumed = run_bench(BenchConfig(out=str(crashed), resume=True, **common))
    assert sorted(calls) == sorted(json.loads(lines[i])["id"] for i in (2, 4))
    assert not (crashed / "cases.shard-1.jsonl").exists()
    assert (crashed / "cases.rejected.jsonl").read_text() == lines[4][:40] + "\n"  # kept aside
    assert _strip(resumed["methods"]) == _strip(whole["methods"])
    assert len((crashed / "cases.jsonl").read_text().splitlines()) == 5


def test_shares_cover_the_work_once():
    todo = list(range(10))
    for mode in ("single", "batch"):
        parts = [Shard(r, 3).mine(mode, todo, 4, 0) for r in range(3)]
        assert sorted(i for p in parts for i in p) == todo
    assert Shard(1, 3).mine("batch", todo, 4, 0) == [4, 5, 6, 7]  # whole batches
    assert [bool(Shard(r, 2).mine("sequential", todo, 1, 3)) for r in range(2)] == [False, True]


def test_a_shard_waits_for_the_others_longer_than_torchs_half_hour(monkeypatch):
    """The process group is made with a barrier timeout of days: the first shard's baseline or
    a slower shard's cases must not end a long run at torch's default 30 minutes."""
    import accelerate

    made = {}

    class FakeState:
        num_processes, process_index, device = 2, 1, "cpu"

        def __init__(self, cpu=False, **kwargs):
            made.update(kwargs, cpu=cpu)

    monkeypatch.setattr(accelerate, "PartialState", FakeState)
    monkeypatch.setenv("WORLD_SIZE", "2")
    shard = current_shard("cpu", None)
    assert (shard.index, shard.count, made["cpu"]) == (1, 2, True)
    assert made["timeout"] == BARRIER_TIMEOUT
    assert made["timeout"].total_seconds() >= 24 * 3600


def test_a_launch_refuses_a_device_map(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ValueError, match="one or the other"):
        current_shard("cpu", "auto")
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert current_shard("cpu", "auto").count == 1


def test_merge_touches_only_a_marked_run_and_keeps_torn_lines(tmp_path):
    from medit.bench.shard import merge_shards
    from medit.core.fs import write_marker

    line = b'{"method": "ft-m", "case": 0, "metrics": {}}\n'
    (tmp_path / "cases.shard-1.jsonl").write_bytes(line + b'{"method": "ft')
    (tmp_path / "cases.shard-x.jsonl").write_bytes(b"a user's file")
    merge_shards(tmp_path, "cases")  # no medit marker: nothing merged, nothing removed
    assert (tmp_path / "cases.shard-1.jsonl").exists() and not (tmp_path / "cases.jsonl").exists()
    write_marker(tmp_path, "bench-run")
    merge_shards(tmp_path, "cases")
    assert (tmp_path / "cases.jsonl").read_bytes() == line
    assert (tmp_path / "cases.rejected.jsonl").read_bytes() == b'{"method": "ft\n'
    assert not (tmp_path / "cases.shard-1.jsonl").exists()
    assert (tmp_path / "cases.shard-x.jsonl").read_bytes() == b"a user's file"  # not a shard
