"""``medit plan``: memory plans from a config alone, checked against measured peaks, and the
refusal of ``medit edit`` when the plan does not fit."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from medit import plan as plan_mod
from medit.cli import main
from medit.facts.requests import parse_record
from medit.plan import measure_edit, plan_memory, workload
from tests.conftest import CORPUS

REQUEST = parse_record(
    {
        "prompt": "The hormone insulin is produced by the",
        "target_new": "liver",
        "subject": "insulin",
        "rephrase_prompts": ["Insulin is a hormone made by the"],
        "locality": {"neighborhood": [["Aspirin is used to treat", "pain"]]},
    },
    "t.json",
    1,
)
#: settings on the tiny random model's scale (as tests/test_editors.py's TINY table)
TINY = {
    "ft-m": {},
    "memit": {"clamp_norm_factor": 200.0, "v_weight_decay": 0.0},
    "grace": {"radius": "fixed", "eps": 1e-3},
}


@pytest.fixture
def config_only(tmp_path, tiny_llama):
    """A model directory with config.json and nothing else: no weights to read."""
    model, _ = tiny_llama
    model.config.save_pretrained(tmp_path / "cfg")
    return tmp_path / "cfg", model


def test_plan_reads_only_the_config(config_only):
    directory, model = config_only
    assert [f.name for f in directory.iterdir()] == ["config.json"]
    mem = plan_memory(str(directory), "ft-m", device="cpu")
    weights = [c for c in mem.components if c.phase == "weights"]
    expected = sum(p.numel() * p.element_size() for p in model.parameters())
    expected += sum(b.numel() * b.element_size() for b in model.buffers())
    assert [c.device for c in weights] == ["cpu"]
    assert weights[0].bytes == expected  # every tensor counted once (tied embeddings too)
    names = " ".join(c.name for c in mem.components)
    assert "Adam moments of 1 x mlp_out" in names and "activations" in names
    assert mem.peaks()["cpu"] > expected


def test_plan_cli_json_and_table(config_only):
    directory, _ = config_only
    args = ["plan", "--model", str(directory), "--method", "memit", "--device", "cpu"]
    res = CliRunner().invoke(main, [*args, "--json", "--hparam", "n_edit_layers=2"])
    assert res.exit_code == 0, res.output
    doc = json.loads(res.output)
    assert doc["method"] == "memit" and doc["hparams"]["n_edit_layers"] == 2
    assert doc["peak_bytes"]["cpu"] > 0
    assert any(c["name"].startswith("covariance C of 2 layer") for c in doc["components"])
    table = CliRunner().invoke(main, args)
    assert table.exit_code == 0 and "planned peak memory (memit): cpu:" in table.output


def test_plan_with_a_device_map_places_weights_per_device(config_only, tmp_path):
    directory, model = config_only
    dmap = tmp_path / "map.json"
    dmap.write_text(json.dumps({"model.embed_tokens": "cpu", "model.layers": "disk", "": "cpu"}))
    # a map naming "" covers the rest; the edited module is pinned off the disk
    dmap.write_text(
        json.dumps(
            {
                "model.embed_tokens": "cpu",
                "model.layers": "disk",
                "model.norm": "cpu",
                "model.rotary_emb": "cpu",
                "lm_head": "cpu",
            }
        )
    )
    mem = plan_memory(str(directory), "ft-m", device_map=str(dmap))
    peaks = mem.peaks()
    assert set(peaks) == {"cpu", "disk"} and mem.compute_device == "cpu"
    total = sum(c.bytes for c in mem.components if c.phase == "weights")
    assert total == plan_memory(str(directory), "ft-m", device="cpu").components[0].bytes


@pytest.mark.parametrize("method", sorted(TINY))
def test_plan_is_within_20_percent_of_the_measured_peak(tiny_llama, method, tmp_path, monkeypatch):
    monkeypatch.setenv("MEDIT_CACHE", str(tmp_path / "cache"))  # C computed, not read from disk
    model, tok = tiny_llama
    hp = dict(TINY[method])
    if method == "memit":  # C over a corpus of full windows (a random model's generated text
        # re-tokenises to about twice its length, which no plan can know from the config)
        (tmp_path / "corpus.txt").write_text(" ".join(CORPUS * 60))
        hp["cov_corpus"] = str(tmp_path / "corpus.txt")
    work = workload([REQUEST], "single", 32, lambda t: len(tok(t).input_ids))
    mem = plan_memory("tiny", method, hparams=hp, config=model.config, work=work)
    planned = mem.peaks()["cpu"]
    got = measure_edit(model, tok, method, [REQUEST], hp)
    assert got["edit"] > 0 and got["eval"] > 0
    assert 0.8 <= planned / got["peak"] <= 1.2, (planned, got)


def _edit_args(model_dir, tmp_path):
    reqs = tmp_path / "reqs.json"
    reqs.write_text(json.dumps([{k: v for k, v in REQUEST.to_dict().items() if k != "id"}]))
    out = ["edit", "--model", str(model_dir), "--requests", str(reqs), "--device", "cpu"]
    return [*out, "--method", "ft-m", "--hparam", "steps=2", "--no-generation"]


def test_edit_refuses_when_the_plan_does_not_fit(tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(plan_mod, "available_bytes", lambda device: 1000)
    args = _edit_args(tiny_model_dir, tmp_path)
    res = CliRunner().invoke(main, [*args, "--out", str(tmp_path / "run")])
    assert res.exit_code == 2, res.output
    assert "not expected to fit: cpu needs" in res.output and "memory plan: ft-m" in res.output
    assert not (tmp_path / "run").exists()
    forced = CliRunner().invoke(main, [*args, "--out", str(tmp_path / "run"), "--force", "-q"])
    assert forced.exit_code == 0, forced.output
    assert (tmp_path / "run" / "results.json").is_file()


def test_unknown_free_memory_never_refuses(config_only, monkeypatch):
    directory, _ = config_only
    mem = plan_memory(str(directory), "ft-m", device="cpu")
    monkeypatch.setattr(plan_mod, "available_bytes", lambda device: None)
    assert plan_mod.too_big(mem) == []
    plan_mod.check_fits(mem)
    monkeypatch.setattr(plan_mod, "available_bytes", lambda device: 10**15)
    plan_mod.check_fits(mem)
