"""-q / --quiet (global or per command) silences progress bars, library bars and warnings; without
it the long parts of a run (loading, both evaluations, the edits) show progress."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.test_export_cli import _requests_file

MEDIT = [sys.executable, "-c", "from medit.cli import main; main()"]


def _run(args, tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TQDM_DISABLE"}
    return subprocess.run(
        [*MEDIT, *map(str, args)],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=300,
    )


def _edit(tiny_model_dir, tmp_path, out):
    return [
        "edit",
        "--model",
        tiny_model_dir,
        "--requests",
        _requests_file(tmp_path),
        "--mode",
        "batch",
        "--out",
        tmp_path / out,
        "--device",
        "cpu",
        "--hparam",
        "steps=2",
    ]


@pytest.mark.parametrize("where", ["global", "per-command", "short-per-command"])
def test_quiet_prints_only_the_result_path(tiny_model_dir, tmp_path, where):
    args = _edit(tiny_model_dir, tmp_path, "R")
    args = {
        "global": ["-q", *args],
        "per-command": [*args, "--quiet"],
        "short-per-command": [*args, "-q"],
    }[where]
    res = _run(args, tmp_path)
    assert res.returncode == 0, res.stderr
    assert res.stderr.strip() == "", res.stderr
    assert res.stdout.strip() == str((tmp_path / "R").resolve())


def test_without_quiet_the_evaluations_show_progress(tiny_model_dir, tmp_path):
    res = _run(_edit(tiny_model_dir, tmp_path, "R"), tmp_path)
    assert res.returncode == 0, res.stderr
    assert "evaluating before" in res.stderr and "evaluating after" in res.stderr
    assert Path(res.stdout.strip().splitlines()[-1]) == (tmp_path / "R").resolve()
