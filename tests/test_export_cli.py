import json

import pytest
import torch
from click.testing import CliRunner
from transformers import AutoModelForCausalLM

from medit.artifacts.weights import apply_artifact, save_edited_model
from medit.cli import main
from medit.core.models import load_model
from medit.core.results import read_results
from medit.editors.registry import make_editor
from tests.test_editors import REQS


def test_artifact_applies_onto_a_fresh_base_and_reverts(tiny_model_dir, tmp_path):
    lm = load_model(str(tiny_model_dir), "cpu")
    ids = torch.tensor([lm.tokenizer(REQS[0].prompt).input_ids])
    base_logits = lm.model(ids).logits.detach()
    result = make_editor("ft-m").apply(lm.model, lm.tokenizer, REQS)
    edited_logits = lm.model(ids).logits.detach()
    result.export(tmp_path / "run", base_weights_sha256=lm.weights_sha256)

    fresh = load_model(str(tiny_model_dir), "cpu")
    manifest = apply_artifact(fresh.model, tmp_path / "run")
    assert manifest["method"] == "ft-m"
    assert torch.equal(fresh.model(ids).logits.detach(), edited_logits)
    with pytest.raises(ValueError, match="differs from the artifact's base weights"):
        apply_artifact(fresh.model, tmp_path / "run")  # already applied
    apply_artifact(fresh.model, tmp_path / "run", revert=True)
    assert torch.equal(fresh.model(ids).logits.detach(), base_logits)


def test_saved_model_loads_with_transformers(tiny_model_dir, tmp_path):
    lm = load_model(str(tiny_model_dir), "cpu")
    result = make_editor("ft-m").apply(lm.model, lm.tokenizer, REQS)
    out = save_edited_model(
        lm.model,
        lm.tokenizer,
        tmp_path / "edited",
        delta=dict(
            method="ft-m", hparams={}, edited=result.merged_weights()[0], originals=result.originals
        ),
    )
    assert (out / "medit-delta.safetensors").is_file() and any(out.glob("*.safetensors"))
    reloaded = AutoModelForCausalLM.from_pretrained(out, use_safetensors=True)
    for name, p in reloaded.named_parameters():
        assert torch.equal(p, dict(lm.model.named_parameters())[name]), name


def _requests_file(tmp_path):
    path = tmp_path / "reqs.json"
    path.write_text(
        json.dumps(
            [
                {k: v for k, v in r.to_dict().items() if k != "id"}
                | {"locality": {"general": [["The heart has", "four"]]}}
                for r in REQS
            ]
        )
    )
    return path


@pytest.mark.parametrize("mode", ["single", "batch", "sequential"])
def test_cli_edit_writes_a_complete_run_directory(tiny_model_dir, tmp_path, mode):
    out = tmp_path / "run"
    res = CliRunner().invoke(
        main,
        [
            "-q",
            "edit",
            "--model",
            str(tiny_model_dir),
            "--requests",
            str(_requests_file(tmp_path)),
            "--mode",
            mode,
            "--out",
            str(out),
            "--device",
            "cpu",
            "--hparam",
            "lr=0.005",
        ],
    )
    assert res.exit_code == 0, res.output
    results = read_results(out)
    assert results["schema"] == "medit.results/1"
    prov = results["provenance"]
    assert len(prov["model"]["weights_sha256"]) == 64 and prov["libraries"]["torch"]
    assert results["config"]["hparams"]["lr"] == 0.005
    post, pre = results["metrics"]["post"], results["metrics"]["pre"]
    assert post["teacher_forced"]["target_prob"] > pre["teacher_forced"]["target_prob"]
    assert set(post) >= {"teacher_forced", "generation"}
    samples = [json.loads(x) for x in (out / "samples.jsonl").read_text().splitlines()]
    assert [s["id"] for s in samples] == ["reqs.json:1", "reqs.json:2"]
    assert "text" in samples[0]["post"]["generation"]["prompt"]
    assert (out / "artifact" / "edit.safetensors").exists() == (mode != "single")
    if mode != "single":
        assert results["edit"]["edited_weights_sha256"] != prov["model"]["weights_sha256"]


@pytest.mark.parametrize(
    "method, hparams",
    [
        ("ft-m", ["lr=0.01"]),
        ("grace", ["key=last", "layer=3", "radius=fixed", "eps=0.001", "steps=30"]),  # a codebook
        ("tpatcher", ["steps=100", "memory_texts=20"]),  # extra neurons
    ],
)
def test_cli_generate_with_artifact_reproduces_the_edited_model(
    tiny_model_dir, tmp_path, method, hparams
):
    out = tmp_path / "run"
    runner = CliRunner()
    res = runner.invoke(
        main,
        [
            "-q",
            "edit",
            "--model",
            str(tiny_model_dir),
            "--method",
            method,
            "--requests",
            str(_requests_file(tmp_path)),
            "--mode",
            "batch",
            "--out",
            str(out),
            "--device",
            "cpu",
            *[x for h in hparams for x in ("--hparam", h)],
        ],
    )
    assert res.exit_code == 0, res.output
    samples = [json.loads(x) for x in (out / "samples.jsonl").read_text().splitlines()]
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(s["request"]["prompt"] for s in samples) + "\n")
    args = [
        "generate",
        "--model",
        str(tiny_model_dir),
        "--prompts",
        str(prompts),
        "--max-new-tokens",
        "6",
        "--device",
        "cpu",
    ]
    base = [json.loads(x) for x in runner.invoke(main, args).stdout.splitlines()]
    edited = [
        json.loads(x)
        for x in runner.invoke(main, [*args, "--artifact", str(out)]).stdout.splitlines()
    ]
    assert [e["prompt"] for e in edited] == [s["request"]["prompt"] for s in samples]
    for e, s in zip(edited, samples, strict=True):
        assert s["post"]["generation"]["prompt"]["text"].startswith(e["completion"])
    assert base != edited


def test_bad_requests_exit_2_and_write_nothing(tiny_model_dir, tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(
        json.dumps(
            [
                {"prompt": "The heart has", "target_new": "four"},
                {"prompt": "Insulin is", "target_new": ""},
            ]
        )
    )
    out = tmp_path / "run"
    res = CliRunner().invoke(
        main, ["edit", "--model", str(tiny_model_dir), "--requests", str(bad), "--out", str(out)]
    )
    assert res.exit_code == 2
    assert "bad.json: record 2, field 'target_new': empty" in res.output
    assert not out.exists()


def test_bad_options_exit_2(tiny_model_dir, tmp_path):
    runner = CliRunner()
    cases = [
        (["edit", "--method", "rome2", "--out", str(tmp_path / "a")], "unknown method 'rome2'"),
        (
            ["edit", "--model", str(tmp_path / "nope"), "--out", str(tmp_path / "b")],
            "does not exist",
        ),
        (
            [
                "edit",
                "--model",
                str(tiny_model_dir),
                "--save-model",
                str(tmp_path / "m"),
                "--out",
                str(tmp_path / "c"),
            ],
            "--save-model needs --mode batch",
        ),
        (
            [
                "edit",
                "--model",
                str(tiny_model_dir),
                "--device",
                "cuda:7",
                "--out",
                str(tmp_path / "d"),
            ],
            "cuda",
        ),
        (["generate", "--model", str(tiny_model_dir)], "give --prompt"),
    ]
    for args, message in cases:
        res = runner.invoke(main, args)
        assert res.exit_code == 2, (args, res.output)
        assert message in res.output, (args, res.output)


def test_pickle_weights_need_an_explicit_flag(tiny_model_dir, tmp_path):
    from medit.core.models import load_model as load

    pickled = tmp_path / "pickled"
    pickled.mkdir()
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    model.config.save_pretrained(pickled)
    torch.save(model.state_dict(), pickled / "pytorch_model.bin")
    with pytest.raises(ValueError, match="only pickle weights.*--allow-pickle"):
        load(str(pickled))


def test_methods_and_models_commands(monkeypatch):
    runner = CliRunner()
    res = runner.invoke(main, ["methods"])
    assert res.exit_code == 0 and "ft-m" in res.output and "norm_constraint" in res.output
    res = runner.invoke(main, ["models"])
    assert res.exit_code == 0 and "builtin:smollm2" in res.output


def test_save_model_refuses_an_edit_that_is_no_weight_change(tiny_model_dir, tmp_path):
    """A codebook cannot be written into the weights: exit 2 with the reason, nothing written."""
    out, saved = tmp_path / "run", tmp_path / "saved"
    res = CliRunner().invoke(
        main,
        [
            "-q",
            "edit",
            "--model",
            str(tiny_model_dir),
            "--method",
            "grace",
            "--requests",
            str(_requests_file(tmp_path)),
            "--mode",
            "batch",
            "--out",
            str(out),
            "--save-model",
            str(saved),
            "--device",
            "cpu",
            "--hparam",
            "radius=fixed",
            "--hparam",
            "steps=3",
        ],
    )
    assert res.exit_code == 2, res.output
    assert "cannot be merged into the weights" in res.output
    assert "Traceback" not in res.output
    assert not out.exists() and not saved.exists()
