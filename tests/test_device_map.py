"""Models across devices (--device-map), on CPU: a tiny Llama with decoder layers offloaded to
disk by accelerate gives the same edits, metrics and traces as the same model on one device.

Why bit-identical and not merely close: on a CPU-only machine every module computes on the CPU
either way; accelerate's hooks only bring an offloaded module's weights in from the (unchanged)
safetensors file before its forward and move tensors that are already on the CPU. The same
float32 kernels run on the same inputs in the same order, so any difference is a bug (a lost
weight write, an input on the wrong module, a hook that did not clean up), not rounding. Across
GPUs the kernels differ by device and the comparison would need a tolerance; no GPU was measured.
"""

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from medit.cli import main
from medit.core.errors import UserError
from medit.core.models import load_model
from medit.core.placement import is_offloaded, resolve_device_map
from medit.editors.registry import make_editor
from medit.evaluation import EvalConfig
from medit.runner import RunConfig, run_edit
from medit.tracing.run import TraceRunConfig, run_trace
from medit.tracing.trace import TraceConfig
from tests.test_editors import SUBJECT_LAST, TINY

#: layers 0-2 offloaded to disk, the rest on the CPU (the tiny Llama has 4 layers)
DISK_MAP = {
    "model.embed_tokens": "cpu",
    "model.rotary_emb": "cpu",
    "model.layers.0": "disk",
    "model.layers.1": "disk",
    "model.layers.2": "disk",
    "model.layers.3": "cpu",
    "model.norm": "cpu",
    "lm_head": "cpu",
}

#: fast settings on the tiny model; ROME and MedLaSA trace the model (ROME to pick its layer)
METHODS = {
    "ft-m": {"steps": 5},
    "rome": {**TINY["rome"], "v_steps": 5, "prefix_count": 1, "cov_samples_per_prompt": 1},
    "memit": {**TINY["memit"], "v_steps": 5, "prefix_count": 1, "cov_samples_per_prompt": 1},
    "grace": {**TINY["grace"], "steps": 5},
    "medlasa": {"steps": 5, "lr": 1e-3, "trace_mode": "fast"},
    "mend": {},  # untrained: a gradient step of the last three layers' MLP weights
    "serac": {},  # untrained scope; its counterfactual forward runs through offloaded layers
}


@pytest.fixture
def map_file(tmp_path):
    path = tmp_path / "map.json"
    path.write_text(json.dumps(DISK_MAP))
    return path


def _requests(tmp_path):
    path = tmp_path / "reqs.json"
    recs = [
        {k: v for k, v in r.to_dict().items() if k != "id"}
        | {"locality": {"general": [["The heart has", "four"]]}}
        for r in SUBJECT_LAST
    ]
    path.write_text(json.dumps(recs))
    return path


def _edit(model_dir, tmp_path, monkeypatch, name, method, **placement):
    # a cache of its own per run: traces, covariances and baselines are not shared between them
    monkeypatch.setenv("MEDIT_CACHE", str(tmp_path / f"cache-{name}"))
    cfg = RunConfig(
        out=str(tmp_path / name),
        model=str(model_dir),
        method=method,
        requests=str(_requests(tmp_path)),
        mode="sequential",
        hparams=METHODS[method],
        eval=EvalConfig(max_new_tokens=4, fluency_tokens=4),
        quiet=True,
        workspace=str(tmp_path / f"ws-{name}"),
        **placement,
    )
    return run_edit(cfg)


def _artifact_tensors(run_dir):
    return {
        f"{f.name}:{k}": v
        for f in sorted((run_dir / "artifact").rglob("*.safetensors"))
        for k, v in load_file(f).items()
    }


@pytest.mark.parametrize("method", list(METHODS))
def test_edit_with_layers_on_disk_equals_one_device(
    tiny_model_dir, tmp_path, monkeypatch, map_file, method
):
    one = _edit(tiny_model_dir, tmp_path, monkeypatch, "one", method, device="cpu")
    split = _edit(tiny_model_dir, tmp_path, monkeypatch, "split", method, device_map=str(map_file))

    placed = split["provenance"]["model"]["device_map"]
    assert placed["spec"] == str(map_file)
    assert "disk" in placed["map"].values()  # layers stayed offloaded
    for module in placed["resident"]:  # the edited modules were moved off the disk
        owner = max((k for k in placed["map"] if module.startswith(k)), key=len)
        assert placed["map"][owner] == "cpu", module
    assert "device_map" not in one["provenance"]["model"]

    assert (
        split["provenance"]["model"]["weights_sha256"]
        == one["provenance"]["model"]["weights_sha256"]
    )
    assert split["metrics"] == one["metrics"]
    assert split["edit"]["edited_weights_sha256"] == one["edit"]["edited_weights_sha256"]
    a, b = _artifact_tensors(tmp_path / "one"), _artifact_tensors(tmp_path / "split")
    assert a and a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    # the edit did something (the comparison is not between two no-ops)
    assert split["metrics"]["post"] != split["metrics"]["pre"]


def test_trace_with_layers_on_disk_equals_one_device(tiny_model_dir, tmp_path, map_file):
    docs = {}
    for name, placement in (("one", {"device": "cpu"}), ("split", {"device_map": str(map_file)})):
        docs[name] = run_trace(
            TraceRunConfig(
                out=str(tmp_path / name),
                model=str(tiny_model_dir),
                requests=str(_requests(tmp_path)),
                trace=TraceConfig(samples=3, kinds=("hidden", "mlp", "attn")),
                use_cache=False,
                quiet=True,
                **placement,
            )
        )
    assert "disk" in docs["split"]["provenance"]["model"]["device_map"]["map"].values()
    untimed = [
        [{k: v for k, v in t.items() if k != "seconds"} for t in d["traces"]] for d in docs.values()
    ]
    assert untimed[0] == untimed[1]
    scores = docs["split"]["traces"][0]["scores"]["mlp"]  # (tokens, layers): not all equal
    assert len({round(x, 6) for row in scores for x in row}) > 1
    assert docs["split"]["association_profile"] == docs["one"]["association_profile"]


def test_an_offloaded_weight_is_refused_not_silently_lost(tiny_model_dir, map_file):
    """Loaded without the editor's modules kept resident, the edited layer stays on disk: a
    write into its meta weight would vanish, so the editor refuses, naming the module."""
    lm = load_model(str(tiny_model_dir), device_map=str(map_file))
    assert is_offloaded(lm.model.get_submodule("model.layers.2.mlp.down_proj"))
    with pytest.raises(UserError, match=r"'model\.layers\.2\.mlp\.down_proj' is offloaded"):
        make_editor("ft-m", steps=1).apply(lm.model, lm.tokenizer, SUBJECT_LAST[:1])


def test_keeping_a_module_resident_splits_only_its_block(tiny_model_dir):
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    with init_empty_weights():
        meta = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(tiny_model_dir))
    placed = resolve_device_map(
        "sequential",
        meta,
        max_memory={"cpu": "1KB"},  # nothing fits: everything to disk
        keep_resident=["model.layers.2.mlp.down_proj"],
    )
    assert placed["model.layers.2.mlp.down_proj"] == "cpu"
    assert placed["model.layers.2.mlp.up_proj"] == "disk"
    assert placed["model.layers.2.self_attn"] == "disk"
    assert placed["model.layers.1"] == "disk"
    assert "model.layers.2" not in placed and "model.layers.2.mlp" not in placed


def test_sequential_with_a_memory_budget_offloads_and_keeps_the_logits(tiny_model_dir):
    plain = load_model(str(tiny_model_dir), "cpu")
    split = load_model(str(tiny_model_dir), device_map="sequential", max_memory="cpu=300KB")
    assert "disk" in split.device_map["map"].values()
    assert split.weights_sha256 == plain.weights_sha256
    ids = torch.tensor([plain.tokenizer("The heart has four chambers").input_ids])
    with torch.no_grad():
        assert torch.equal(split.model(ids).logits, plain.model(ids).logits)


def _cli(*args):
    return CliRunner().invoke(main, ["-q", *args])


def test_cli_edit_records_the_device_map(tiny_model_dir, tmp_path, map_file):
    out = tmp_path / "run"
    res = _cli(
        "edit",
        "--model",
        str(tiny_model_dir),
        "--requests",
        str(_requests(tmp_path)),
        "--method",
        "ft-m",
        "--hparam",
        "steps=2",
        "--mode",
        "batch",
        "--no-generation",
        "--device-map",
        str(map_file),
        "--out",
        str(out),
    )
    assert res.exit_code == 0, res.output
    results = json.loads((out / "results.json").read_text())
    assert results["config"]["device_map"] == str(map_file)
    placed = results["provenance"]["model"]["device_map"]
    assert placed["map"]["model.layers.2.mlp.down_proj"] == "cpu"
    assert placed["map"]["model.layers.0"] == "disk"


def test_cli_generate_with_a_device_map_equals_one_device(tiny_model_dir, map_file):
    base = ["generate", "--model", str(tiny_model_dir), "--prompt", "The heart has"]
    one = _cli(*base, "--device", "cpu", "--max-new-tokens", "6")
    split = _cli(*base, "--device-map", str(map_file), "--max-new-tokens", "6")
    assert one.exit_code == 0 and split.exit_code == 0, split.output
    assert split.stdout == one.stdout


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ({**DISK_MAP, "model.layer.9": "cpu"}, "key 'model.layer.9': LlamaForCausalLM has no such"),
        ({**DISK_MAP, "lm_head": "cuda:7"}, "key 'lm_head': device 'cuda:7' does not exist"),
        ({**DISK_MAP, "lm_head": "tpu"}, "key 'lm_head': unknown device 'tpu'"),
        ({k: v for k, v in DISK_MAP.items() if k != "model.norm"}, "no device for 'model.norm"),
        ({**DISK_MAP, "model.layers.0.mlp": "cpu"}, "'model.layers.0.mlp' lies inside"),
        (["cpu"], "expected a JSON object"),
        ("{not json", "invalid JSON at line 1"),
    ],
)
def test_cli_bad_device_map_file_exits_2_naming_file_and_key(
    tiny_model_dir, tmp_path, content, message
):
    path = tmp_path / "bad.json"
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    for command in ("generate", "edit"):
        extra = ["--prompt", "x"] if command == "generate" else ["--out", str(tmp_path / "r")]
        res = _cli(command, "--model", str(tiny_model_dir), "--device-map", str(path), *extra)
        assert res.exit_code == 2, res.output
        assert str(path) in res.stderr and message in res.stderr, res.stderr
        assert not (tmp_path / "r").exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--device", "cpu", "--device-map", "auto"], "--device and --device-map cannot be used"),
        (["--max-memory", "cpu=1GiB"], "--max-memory goes with --device-map"),
        (["--device-map", "auto", "--max-memory", "cpu"], "expected DEVICE=SIZE"),
        (["--device-map", "nowhere.json"], "nowhere.json: no such file"),
    ],
)
def test_cli_device_map_usage_errors_exit_2(tiny_model_dir, args, message):
    for command in ("generate", "trace"):
        extra = ["--prompt", "The heart has"] + (["--out", "unused"] if command == "trace" else [])
        res = _cli(command, "--model", str(tiny_model_dir), *args, *extra)
        assert res.exit_code == 2, (command, res.output)
        assert message in res.stderr, res.stderr


def test_frozen_prefix_gives_back_accelerates_forward(tiny_model_dir, map_file):
    """Skipping layers (FT, ROME's value optimisation) swaps their forward for a while; on a
    dispatched model that forward is accelerate's hook wrapper, which must come back (deleting
    it would leave the layer without its device alignment, wrong across GPUs)."""
    from medit.core.hooks import frozen_prefix

    lm = load_model(str(tiny_model_dir), device_map=str(map_file))
    layers = lm.arch.layer_list(lm.model)
    before = [layer.__dict__.get("forward") for layer in layers]
    assert before[0] is not None  # accelerate's wrapper, an instance attribute
    hidden = torch.zeros(1, 3, lm.model.config.hidden_size)
    with frozen_prefix(lm.model, lm.arch, 2, hidden):
        assert layers[0].forward is not before[0]
    assert [layer.__dict__.get("forward") for layer in layers] == before


def test_the_offload_folder_cleanup_deletes_only_medits_own_folder(tmp_path):
    from medit.core.models import _offload_folder, _remove_offload_folder

    folder = _offload_folder()
    assert Path(folder).is_dir()
    theirs = tmp_path / "user-folder"
    theirs.mkdir()
    _remove_offload_folder(str(theirs))  # not created by medit: kept
    assert theirs.is_dir()
    _remove_offload_folder(folder)
    assert not Path(folder).exists()
