"""``medit apply`` / ``medit revert``, the journal they and ``medit edit`` keep, the model card of
saved models, and the report's journal section."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner
from safetensors.torch import save_file

from medit.artifacts import journal
from medit.cli import main
from medit.core.models import load_model
from tests.conftest import _tiny
from tests.test_export_cli import _requests_file


def _cli(*args):
    return CliRunner().invoke(main, ["-q", *map(str, args)])


@pytest.fixture
def edit_run(tiny_model_dir, tmp_path):
    out = tmp_path / "ws" / "run"
    res = _cli(
        "edit",
        "--model",
        tiny_model_dir,
        "--requests",
        _requests_file(tmp_path),
        "--mode",
        "batch",
        "--out",
        out,
        "--device",
        "cpu",
        "--hparam",
        "steps=3",
        "--author",
        "dr.house",
        "--reason",
        "insulin source was wrong",
    )
    assert res.exit_code == 0, res.output
    return out


@pytest.mark.parametrize("method", ["ft-m", "medlasa"])
def test_apply_then_revert_gives_the_base_back_bit_exactly(tiny_model_dir, tmp_path, method):
    ws = tmp_path / "ws"
    hp = ["--hparam", "steps=3"] + (["--hparam", "trace_mode=fast"] if method == "medlasa" else [])
    res = _cli(
        "edit",
        "--model",
        tiny_model_dir,
        "--requests",
        _requests_file(tmp_path),
        "--mode",
        "batch",
        "--method",
        method,
        "--out",
        ws / "run",
        "--device",
        "cpu",
        *hp,
    )
    assert res.exit_code == 0, res.output
    results = json.loads((ws / "run" / "results.json").read_text())
    base_sha = results["provenance"]["model"]["weights_sha256"]

    res = _cli(
        "apply",
        ws / "run",
        "--model",
        tiny_model_dir,
        "--out",
        ws / "edited",
        "--device",
        "cpu",
        "--reason",
        "deploy",
    )
    assert res.exit_code == 0, res.output
    edited = load_model(str(ws / "edited"), "cpu")
    assert edited.weights_sha256 != base_sha
    # the applied model is exactly the edited one (adapter edits: merged, as --save-model writes)
    assert edited.weights_sha256 == results["edit"]["edited_weights_sha256"]
    card = (ws / "edited" / "README.md").read_text()
    assert (
        card.startswith("---\n")
        and 'library_name: "transformers"' in card
        and "\nbase_model:" not in card  # a local path is no hub id: the hub would refuse it
    )
    config = json.loads((ws / "edited" / "config.json").read_text())
    assert config["medit_edit"]["edited_weights_sha256"] == edited.weights_sha256

    res = _cli("revert", ws / "edited", "--out", ws / "base", "--device", "cpu")
    assert res.exit_code == 0, res.output
    assert load_model(str(ws / "base"), "cpu").weights_sha256 == base_sha
    assert "medit_edit" not in json.loads((ws / "base" / "config.json").read_text())

    entries = journal.read(ws / "journal.jsonl")
    assert [e["action"] for e in entries] == ["edit", "apply", "revert"]
    assert entries[1]["base_weights_sha256"] == base_sha == entries[2]["result_weights_sha256"]
    assert entries[2]["base_weights_sha256"] == edited.weights_sha256
    assert journal.verify(ws / "journal.jsonl") == []


def test_apply_refuses_a_base_with_other_weights(edit_run, tokenizer, tmp_path):
    other = tmp_path / "other"
    _tiny("llama", len(tokenizer), seed=1).save_pretrained(other, safe_serialization=True)
    tokenizer.save_pretrained(other)
    res = _cli("apply", edit_run, "--model", other, "--out", tmp_path / "m", "--device", "cpu")
    assert res.exit_code == 2 and "refusing to apply it to another model" in res.output
    assert not (tmp_path / "m").exists()


def test_generate_refuses_an_artifact_of_another_shape(edit_run, tiny_model_dir, tmp_path):
    """An artifact whose tensors have other shapes than the model's is named as such."""
    from medit.artifacts.weights import read_artifact, write_weights_artifact

    manifest, edited, originals = read_artifact(edit_run)
    name = next(iter(edited))
    write_weights_artifact(
        tmp_path / "bad",
        method="ft-m",
        hparams={},
        edited={name: edited[name][:, :3]},
        originals={name: originals[name][:, :3]},
    )
    res = _cli(
        "generate",
        "--model",
        tiny_model_dir,
        "--artifact",
        tmp_path / "bad",
        "--prompt",
        "x",
        "--device",
        "cpu",
    )
    assert res.exit_code == 2 and "has shape" in res.output and "another model" in res.output


def test_edit_journal_records_who_why_and_the_hashes(edit_run):
    entries = journal.read(edit_run.parent / "journal.jsonl")
    assert len(entries) == 1
    e = entries[0]
    assert e["author"] == "dr.house" and e["reason"] == "insulin source was wrong"
    assert e["method"] == "ft-m" and len(e["requests"]) == 2 and e["prev"] == journal.GENESIS
    results = json.loads((edit_run / "results.json").read_text())
    assert e["result_weights_sha256"] == results["edit"]["edited_weights_sha256"]
    assert e["artifacts"] and all(len(v) == 64 for v in e["artifacts"].values())
    assert e["evaluation"]["verdict"] in ("PASS", "FAIL")
    assert json.loads((edit_run / "journal-entry.json").read_text()) == e


def test_journal_verify_names_an_edited_entry_and_exits_3(edit_run, tiny_model_dir, tmp_path):
    ws = edit_run.parent
    res = _cli(
        "edit",
        "--model",
        tiny_model_dir,
        "--requests",
        _requests_file(tmp_path),
        "--mode",
        "batch",
        "--out",
        ws / "run2",
        "--device",
        "cpu",
        "--hparam",
        "steps=2",
    )
    assert res.exit_code == 0, res.output
    assert _cli("journal", "verify", ws).exit_code == 0
    shown = _cli("journal", "show", ws)
    assert shown.exit_code == 0 and "dr.house" in shown.output
    lines = (ws / "journal.jsonl").read_text().splitlines()
    lines[0] = lines[0].replace("dr.house", "dr.wilson")
    (ws / "journal.jsonl").write_text("\n".join(lines) + "\n")
    res = _cli("journal", "verify", ws)
    assert res.exit_code == 3 and "seq 0" in res.output
    res = _cli("report", edit_run)
    assert res.exit_code == 0, res.output
    html = (edit_run / "report.html").read_text()
    assert "journal FAILS verification" in html


def test_the_report_shows_the_journal_entry(edit_run):
    res = _cli("report", edit_run)
    assert res.exit_code == 0, res.output
    html = (edit_run / "report.html").read_text()
    assert 'id="journal"' in html and "dr.house" in html and "journal verified intact" in html


def test_a_weights_file_without_a_manifest_is_not_an_artifact(tmp_path, tiny_model_dir):
    import torch

    save_file({"x": torch.zeros(2)}, str(tmp_path / "edit.safetensors"))
    res = _cli(
        "generate",
        "--model",
        tiny_model_dir,
        "--artifact",
        tmp_path / "edit.safetensors",
        "--prompt",
        "x",
        "--device",
        "cpu",
    )
    assert res.exit_code == 2 and "no manifest" in res.output


def test_a_resumed_weight_edit_keeps_exporting_its_peft_adapter(tokenizer):
    """A sequence resumed from its checkpoint combines the loaded result (which carries no
    export settings) with new edits: the combination exports the adapter as a fresh run does."""
    import torch

    from medit.editors.results import PeftExport, WeightEdit

    model = _tiny("llama", len(tokenizer))
    name = "model.layers.1.mlp.down_proj.weight"
    loaded = WeightEdit.before("memit", None, model, [name], ["a"])
    fresh = WeightEdit.before("memit", None, model, [name], ["b"], peft=PeftExport(pad=8))
    with torch.no_grad():
        dict(model.named_parameters())[name].add_(1.0)
    assert WeightEdit.combine([loaded, fresh]).peft == PeftExport(pad=8)
    assert WeightEdit.combine([loaded, fresh]).originals[name] is loaded.originals[name]
