"""kill -9 in the middle of a write, then run again: nothing lost, nothing duplicated, nothing
half-written loadable, and the temporary leftovers are gone after the next run.

Each crash is real: a child process runs the medit CLI with one writer patched to write part of
its file and then SIGKILL itself.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from click.testing import CliRunner

from medit.artifacts import journal
from medit.cli import main
from medit.core.models import load_model
from tests.test_export_cli import _requests_file

#: patched into the child: after ``DIE_AFTER`` complete calls, the next safetensors write stops
#: half-way through its file and the process is killed
_CHILD = """
import os, signal, sys
from pathlib import Path
import safetensors.torch as st
import medit.artifacts.weights, medit.editors.patching.adapters
real, calls = st.save_file, []

def dying(tensors, filename, metadata=None):
    if len(calls) == int(os.environ["DIE_AFTER"]):
        real(tensors, filename, metadata=metadata)
        data = Path(filename).read_bytes()
        Path(filename).write_bytes(data[: len(data) // 2])
        os.kill(os.getpid(), signal.SIGKILL)
    calls.append(filename)
    real(tensors, filename, metadata=metadata)

medit.artifacts.weights.save_file = dying
medit.editors.patching.adapters.save_file = dying
import transformers.modeling_utils as mu
real_save_pretrained = mu.PreTrainedModel.save_pretrained

def dying_save_pretrained(self, directory, *a, **k):
    if os.environ.get("DIE_IN") == "save_pretrained":
        real_save_pretrained(self, directory, *a, **k)
        for f in Path(directory).glob("*.safetensors"):
            f.write_bytes(f.read_bytes()[:1000])
        os.kill(os.getpid(), signal.SIGKILL)
    return real_save_pretrained(self, directory, *a, **k)

mu.PreTrainedModel.save_pretrained = dying_save_pretrained
from medit.cli import main
main(sys.argv[1:])
"""


def _killed(args: list[str], env_extra: dict[str, str], tmp_path: Path) -> None:
    import os

    env = {**os.environ, **env_extra}
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(_CHILD), "-q", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]


def _leftovers(root: Path) -> list[Path]:
    return [p for p in root.rglob(".*") if ".tmp-" in p.name or ".old-" in p.name]


def _edit_args(model_dir, reqs, ws: Path) -> list[str]:
    return [
        "edit",
        "--model",
        str(model_dir),
        "--requests",
        str(reqs),
        "--mode",
        "batch",
        "--out",
        str(ws / "run"),
        "--save-model",
        str(ws / "model"),
        "--device",
        "cpu",
        "--hparam",
        "steps=2",
    ]


@pytest.mark.parametrize("where", ["save_pretrained", "delta-file", "artifact-file"])
def test_kill_during_save_model_or_artifact_then_rerun(tiny_model_dir, tmp_path, where):
    ws = tmp_path / "ws"
    reqs = _requests_file(tmp_path)
    # save_file calls in order: the run's artifact (0), then the saved model's delta (1)
    env = {
        "save_pretrained": {"DIE_IN": "save_pretrained", "DIE_AFTER": "99"},
        "delta-file": {"DIE_AFTER": "1"},
        "artifact-file": {"DIE_AFTER": "0"},
    }[where]
    _killed(_edit_args(tiny_model_dir, reqs, ws), env, tmp_path)
    assert not (ws / "run").exists() and not (ws / "model").exists()  # nothing half-written
    assert _leftovers(ws), "the crash should have left its temporary directory"
    assert not (ws / "journal.jsonl").exists() or journal.read(ws / "journal.jsonl") == []

    res = CliRunner().invoke(main, ["-q", *_edit_args(tiny_model_dir, reqs, ws)])
    assert res.exit_code == 0, res.output
    assert _leftovers(ws) == []
    entries = journal.read(ws / "journal.jsonl")
    assert len(entries) == 1 and journal.verify(ws / "journal.jsonl") == []
    saved = load_model(str(ws / "model"), "cpu")
    assert saved.weights_sha256 == entries[0]["result_weights_sha256"]


def test_kill_during_a_sequential_checkpoint_then_resume(tiny_model_dir, tmp_path):
    out = tmp_path / "bench"
    args = [
        "bench",
        "--suite",
        "builtin",
        "--methods",
        "ft-m",
        "--mode",
        "sequential",
        "--limit",
        "3",
        "--model",
        str(tiny_model_dir),
        "--device",
        "cpu",
        "--hparam",
        "steps=2",
        "--out",
        str(out),
    ]
    _killed(args, {"DIE_AFTER": "1"}, tmp_path)  # killed writing the 2nd edit's checkpoint
    ckpt = out / "checkpoints" / "ft-m"
    assert _leftovers(ckpt)
    from medit.artifacts.weights import read_artifact

    assert len(read_artifact(ckpt)[0]["edit_seconds"]) == 1  # the 1st checkpoint is intact

    res = CliRunner().invoke(main, ["-q", *args, "--resume"])
    assert res.exit_code == 0, res.output
    assert _leftovers(out) == []
    cases = [json.loads(x) for x in (out / "cases.jsonl").read_text().splitlines()]
    assert sorted(c["case"] for c in cases) == [0, 1, 2]
    assert len(read_artifact(ckpt)[0]["edit_seconds"]) == 3
