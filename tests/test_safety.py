"""Nothing lost: medit never deletes or replaces what it did not create, refuses overlapping
outputs, checks writability before the work, repairs its stores without dropping good records,
and leaves no temporary leftovers after the next successful write."""

from __future__ import annotations

import json
import logging
import os
import stat
from pathlib import Path

import pytest
from click.testing import CliRunner

from medit.cli import main
from medit.core import fs
from tests.test_export_cli import _requests_file


def _edit(model_dir, reqs, out, *extra):
    args = [
        "-q",
        "edit",
        "--model",
        str(model_dir),
        "--requests",
        str(reqs),
        "--out",
        str(out),
        "--device",
        "cpu",
        "--hparam",
        "steps=2",
        *extra,
    ]
    return CliRunner().invoke(main, args)


def _tree(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


def _one_line_error(res) -> str:
    assert res.exit_code == 2, res.output
    assert "Traceback" not in res.output
    lines = [x for x in res.output.splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith("medit: error: "), res.output
    return lines[0]


# -- defect 1: --save-model onto the base model, or onto a folder of notes --------------------
def test_save_model_onto_the_base_model_is_refused_and_the_base_kept(tiny_model_dir, tmp_path):
    before = _tree(tiny_model_dir)
    res = _edit(
        tiny_model_dir,
        _requests_file(tmp_path),
        tmp_path / "R",
        "--mode",
        "batch",
        "--limit",
        "1",
        "--save-model",
        str(tiny_model_dir),
    )
    line = _one_line_error(res)
    assert "--save-model" in line and str(tiny_model_dir) in line
    assert _tree(tiny_model_dir) == before and not (tmp_path / "R").exists()


def test_save_model_into_a_folder_medit_did_not_create_is_refused(tiny_model_dir, tmp_path):
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "ward-round.txt").write_text("patient list")
    res = _edit(
        tiny_model_dir,
        _requests_file(tmp_path),
        tmp_path / "R",
        "--mode",
        "batch",
        "--save-model",
        str(notes),
        "--overwrite",
    )
    assert "not created by medit" in _one_line_error(res)
    assert (notes / "ward-round.txt").read_text() == "patient list"
    assert sorted(p.name for p in notes.iterdir()) == ["ward-round.txt"]


# -- defect 2: --save-model equal to or inside --out -----------------------------------------
@pytest.mark.parametrize("where", ["same", "inside", "outside-containing"])
def test_overlapping_out_and_save_model_are_refused(tiny_model_dir, tmp_path, where):
    out = tmp_path / "R"
    save = {"same": out, "inside": out / "model", "outside-containing": tmp_path}[where]
    res = _edit(
        tiny_model_dir, _requests_file(tmp_path), out, "--mode", "batch", "--save-model", str(save)
    )
    line = _one_line_error(res)
    assert "--out" in line and "--save-model" in line
    assert not out.exists()


# -- defect 3: --overwrite only replaces a medit run ------------------------------------------
def test_overwrite_refuses_a_directory_that_is_not_a_medit_run(tiny_model_dir, tmp_path):
    thesis = tmp_path / "thesis"
    thesis.mkdir()
    (thesis / "thesis.tex").write_text("\\chapter{One}")
    res = _edit(tiny_model_dir, _requests_file(tmp_path), thesis, "--overwrite")
    assert "not created by medit" in _one_line_error(res)
    assert (thesis / "thesis.tex").read_text() == "\\chapter{One}"


def test_overwrite_replaces_a_medit_run_and_its_saved_model(tiny_model_dir, tmp_path):
    reqs, out, save = _requests_file(tmp_path), tmp_path / "R", tmp_path / "M"
    for _ in range(2):
        res = _edit(
            tiny_model_dir, reqs, out, "--mode", "batch", "--save-model", str(save), "--overwrite"
        )
        assert res.exit_code == 0, res.output
    assert fs.marker_kind(out) == "edit-run" and fs.marker_kind(save) == "model"
    journal = [json.loads(x) for x in (tmp_path / "journal.jsonl").read_text().splitlines()]
    assert [e["seq"] for e in journal] == [0, 1]
    # an existing medit run of another kind is not an edit run
    fs.write_marker(out, "bench-run")
    assert "holds a medit bench-run" in _one_line_error(
        _edit(tiny_model_dir, reqs, out, "--overwrite")
    )


def test_saved_files_have_the_usual_permissions(tiny_model_dir, tmp_path):
    old = os.umask(0o022)
    try:
        res = _edit(
            tiny_model_dir,
            _requests_file(tmp_path),
            tmp_path / "R",
            "--mode",
            "batch",
            "--save-model",
            str(tmp_path / "M"),
        )
    finally:
        os.umask(old)
    assert res.exit_code == 0, res.output
    for root in (tmp_path / "M", tmp_path / "R"):
        assert stat.S_IMODE(root.stat().st_mode) == 0o755
        for p in root.rglob("*"):
            want = 0o755 if p.is_dir() else 0o644
            assert stat.S_IMODE(p.stat().st_mode) == want, p


# -- defect 7: unwritable outputs fail before the work ----------------------------------------
@pytest.mark.parametrize("kind", ["under-a-file", "proc"])
def test_unwritable_out_fails_before_the_model_loads(tiny_model_dir, tmp_path, kind, monkeypatch):
    (tmp_path / "a-file").write_text("x")
    out = {"under-a-file": tmp_path / "a-file" / "run", "proc": Path("/proc/medit-run")}[kind]
    import medit.runner

    monkeypatch.setattr(medit.runner, "load_model", lambda *a, **k: pytest.fail("model loaded"))
    line = _one_line_error(_edit(tiny_model_dir, _requests_file(tmp_path), out))
    assert "--out" in line


def test_report_and_bench_out_on_an_unwritable_path(tmp_path):
    (tmp_path / "a-file").write_text("x")
    run = tmp_path / "run"
    run.mkdir()
    (run / "results.json").write_text(json.dumps({"schema": "medit.bench/1"}))
    res = CliRunner().invoke(main, ["report", str(run), "-o", str(tmp_path / "a-file" / "r.html")])
    assert "-o" in _one_line_error(res)
    res = CliRunner().invoke(main, ["bench", "--out", "/proc/medit-bench", "--device", "cpu"])
    assert "--out" in _one_line_error(res)


# -- defect 6: temporary leftovers of crashed writes ------------------------------------------
def _dead_pid() -> int:
    pid = 2**22 - 7
    while True:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return pid
        except PermissionError:
            pass
        pid -= 1


def test_atomic_dir_removes_leftovers_of_dead_writers_only(tmp_path):
    dead, alive = _dead_pid(), os.getppid()
    for pid in (dead, alive):
        (tmp_path / f".run.tmp-{pid}-abc").mkdir()
        (tmp_path / f".run.tmp-{pid}-abc" / "model.safetensors").write_bytes(b"0" * 1000)
    (tmp_path / f".other.tmp-{dead}-x").mkdir()
    with fs.atomic_dir(tmp_path / "run", "edit-run") as tmp:
        (tmp / "results.json").write_text("{}")
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == [f".other.tmp-{dead}-x", f".run.tmp-{alive}-abc", "run"]
    assert fs.marker_kind(tmp_path / "run") == "edit-run"


def test_atomic_dir_failure_leaves_the_old_directory_and_no_temporary(tmp_path):
    with fs.atomic_dir(tmp_path / "run", "edit-run") as tmp:
        (tmp / "a").write_text("old")
    with pytest.raises(RuntimeError), fs.atomic_dir(tmp_path / "run", "edit-run") as tmp:
        (tmp / "a").write_text("new")
        raise RuntimeError("crash")
    assert (tmp_path / "run" / "a").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_legacy_run_directories_are_recognised(tmp_path):
    (tmp_path / "results.json").write_text(json.dumps({"schema": "medit.results/1"}))
    assert fs.marker_kind(tmp_path) == "edit-run"
    with pytest.raises(ValueError, match="not created by medit"):
        fs.check_replaceable(Path(__file__).parent, ["edit-run"], "--out")


# -- defects 4 and 5: bench resume settings, cases.jsonl repair -------------------------------
def _case(i: int) -> bytes:
    return json.dumps({"method": "ft-m", "case": i, "metrics": {}}).encode() + b"\n"


def test_cases_repair_keeps_every_good_line_and_quarantines_the_bad(tmp_path, caplog):
    from medit.bench.store import REJECTED_FILE, read_cases

    (tmp_path / "cases.jsonl").write_bytes(
        _case(0) + b'{"method": "ft-m", "ca\n' + _case(2) + _case(3)
    )
    with caplog.at_level(logging.WARNING):
        cases = read_cases(tmp_path, repair=True)
    assert [c["case"] for c in cases] == [0, 2, 3]
    assert "line 2: not a valid case record" in caplog.text and "incomplete last" not in caplog.text
    assert (tmp_path / REJECTED_FILE).read_bytes() == b'{"method": "ft-m", "ca\n'
    assert (tmp_path / "cases.jsonl").read_bytes() == _case(0) + _case(2) + _case(3)
    caplog.clear()
    (tmp_path / "cases.jsonl").write_bytes(_case(0) + b'{"method": "ft-m", "case": 1')
    with caplog.at_level(logging.WARNING):
        assert [c["case"] for c in read_cases(tmp_path, repair=True)] == [0]
    assert "line 2: incomplete last line" in caplog.text


def test_bench_resume_refuses_another_dtype_or_device_naming_it(tmp_path, tiny_model_dir):
    from medit.bench.runner import _check_dir, _check_resumed_model, _prepare_dir
    from medit.core.models import load_model

    identity = {"suite": "builtin", "dtype": "float32", "device": "cpu", "seed": 0}
    _check_dir(tmp_path / "b", identity, resume=False)
    _prepare_dir(tmp_path / "b")
    (tmp_path / "b" / "bench.json").write_text(json.dumps({"identity": identity}))
    (tmp_path / "b" / "cases.jsonl").write_bytes(_case(0))
    with pytest.raises(ValueError, match=r"dtype: 'float32' -> 'bfloat16'"):
        _check_dir(tmp_path / "b", {**identity, "dtype": "bfloat16"}, resume=True)
    with pytest.raises(ValueError, match="pass --resume"):
        _check_dir(tmp_path / "b", identity, resume=False)
    _check_dir(tmp_path / "b", identity, resume=True)  # the same settings continue
    lm = load_model(str(tiny_model_dir), "cpu")
    prov = {"model": {**lm.provenance(), "device": "cuda:0"}}
    (tmp_path / "b" / "bench.json").write_text(
        json.dumps({"identity": identity, "provenance": prov})
    )
    with pytest.raises(ValueError, match="model device cuda, this run has cpu"):
        _check_resumed_model(tmp_path / "b", lm)


def test_a_cut_short_checkpoint_is_dropped_only_when_medit_wrote_everything_in_it(
    tmp_path, tiny_llama, caplog
):
    """Resuming drops edit checkpoints after the first incomplete one, but only those that hold
    nothing but medit's own leftovers; a folder with a user's file in it is left in place."""
    from medit.editors.load import load_checkpoint

    model, tok = tiny_llama
    edits = tmp_path / "ckpt" / "edits"
    (edits / "000000" / ".artifact.tmp-123-abcd").mkdir(parents=True)  # interrupted write
    (edits / "000001").mkdir()
    (edits / "000001" / "notes.txt").write_text("mine")
    (edits / "000002").mkdir()  # empty
    combined, seconds = load_checkpoint(model, tok, tmp_path / "ckpt")
    assert combined is None and seconds == []
    assert not (edits / "000000").exists() and not (edits / "000002").exists()
    assert (edits / "000001" / "notes.txt").read_text() == "mine"
    assert "medit did not write" in caplog.text
