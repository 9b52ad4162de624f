"""ROME, MEMIT and AlphaEdit on tiny models: the linear algebra each paper promises, the shared
key/value/covariance steps, exports and the artifacts' editor state."""

import json

import pytest
import torch
from click.testing import CliRunner

from medit.artifacts.peft import low_rank_approx
from medit.cli import main
from medit.core.arch import get_arch
from medit.core.cache import clear_memory, mark_base_weights
from medit.editors.load import load_edit
from medit.editors.locate import covariance as covariance_module
from medit.editors.locate import keys as _keys
from medit.editors.locate.common import second_moments
from medit.editors.locate.covariance import covariance
from medit.editors.locate.keys import template_keys
from medit.editors.locate.values import optimise_values
from medit.editors.registry import make_editor
from medit.editors.rome import rank_one_update
from medit.evaluation import score_targets
from medit.facts.corpus import Corpus, file_corpus
from medit.facts.requests import parse_record
from tests.conftest import CORPUS
from tests.test_editors import REQS

#: tiny random models have near-uniform outputs: δ must be allowed to grow well beyond the
#: norm of their small MLP outputs for any target to become likely (and their keys are small
#: against AlphaEdit's ridge L2 = 10, which the tests lower)
STRONG = {"clamp_norm_factor": 200.0, "v_weight_decay": 0.0, "v_lr": 0.5}
LAYER = 1


def _weight(model, layer=LAYER):
    arch = get_arch(model)
    W = arch.module(model, layer, "mlp_out").weight.detach().clone()
    return W.T if arch.conv1d else W  # (d_out, d_in)


def test_rome_maps_the_key_to_the_new_value_and_leaves_c_orthogonal_keys(tiny):
    model, tok = tiny
    arch = get_arch(model)
    req = REQS[0]
    hp = make_editor("rome", layer=LAYER, **STRONG).hparams_for(model)
    templates = hp.templates(model, tok)
    keys = template_keys(model, tok, arch, [LAYER], [req], [req.subject], templates)[LAYER][0]
    k_star, k_mean = keys[0], keys.mean(0)
    delta, _ = optimise_values(
        model, tok, arch, LAYER, [req], [req.subject], templates, hp.values()
    )
    C = second_moments(model, tok, arch, [LAYER], hp, [req])[LAYER]
    W = _weight(model)
    result = make_editor("rome", layer=LAYER, **STRONG).apply(model, tok, [req])
    dW = _weight(model) - W
    torch.testing.assert_close(dW, rank_one_update(k_star, delta[0], C, k_mean))
    assert torch.linalg.matrix_rank(dW.double(), rtol=1e-6) == 1
    # W'k* = v* = W k* + δ
    torch.testing.assert_close(
        _weight(model) @ k_star, W @ k_star + delta[0], rtol=1e-4, atol=1e-4 * delta.norm().item()
    )
    # a key k with (C⁻¹k̄)ᵀk = 0 is mapped as before
    u = torch.linalg.solve(C, k_mean.double())
    k = torch.randn(k_mean.shape[0], dtype=torch.float64)
    k = k - (u @ k) / (u @ u) * u
    assert (dW.double() @ k).norm() < 1e-4 * dW.double().norm() * k.norm()
    assert result.diagnostics[0]["layer"] == LAYER


def test_memit_with_one_request_at_one_layer_points_where_rome_does(tiny_llama):
    model, tok = tiny_llama
    same = {
        **STRONG,
        "clamp_norm_factor": 1e6,
        "prefix_lengths": (10,),
        "prefix_count": 5,
        "v_steps": 20,
    }  # the same δ for both: no clamp (their v0 differ), no weight decay
    W = _weight(model)
    rome = make_editor("rome", layer=LAYER, **same).apply(model, tok, REQS[:1])
    d_rome = (_weight(model) - W).flatten().double()
    rome.restore()
    memit = make_editor("memit", layers=(LAYER,), **same).apply(model, tok, REQS[:1])
    d_memit = (_weight(model) - W).flatten().double()
    memit.restore()
    cos = (d_rome @ d_memit) / (d_rome.norm() * d_memit.norm())
    assert cos > 0.999, cos


def test_alphaedit_leaves_the_preserved_keys_outputs_unchanged(tiny_llama, tmp_path):
    model, tok = tiny_llama
    arch = get_arch(model)
    corpus = tmp_path / "preserved.txt"
    corpus.write_text("\n\n".join(CORPUS[3:7]))  # ~40 tokens: C has a null space (d_in 128)
    editor = make_editor(
        "alphaedit",
        layers=(0, 1, 2),
        cov_corpus=(str(corpus),),
        nullspace_threshold=1e-9,
        L2=1e-4,
        **STRONG,
    )
    K0 = {
        layer: _corpus_keys(model, tok, arch, layer, file_corpus([corpus])) for layer in (0, 1, 2)
    }
    before = {layer: _weight(model, layer) for layer in (0, 1, 2)}
    before_lp = score_targets(model, tok, arch, [(REQS[0].prompt, REQS[0].target_new)])[0].logprob
    result = editor.apply(model, tok, REQS[:1])
    after_lp = score_targets(model, tok, arch, [(REQS[0].prompt, REQS[0].target_new)])[0].logprob
    assert after_lp > before_lp + 0.1
    for layer in (0, 1, 2):
        dW = _weight(model, layer) - before[layer]
        assert dW.norm() > 0
        assert (dW @ K0[layer].T).norm() < 1e-4 * dW.norm() * K0[layer].norm()
    dims = result.diagnostics[0]["null_space_dims"]
    assert all(0 < d < 128 for d in dims)
    # sequential: the keys of this edit travel with the result (not on the model) ...
    state = result.editor_state
    assert set(state) == {f"alphaedit.KKt.{layer}" for layer in (0, 1, 2)}
    assert not hasattr(model, "medit_state")
    # ... and the next edit of the sequence builds on them: its state holds both edits' keys
    second = editor.apply(model, tok, REQS[1:2], prior=result)
    for name, kk in second.editor_state.items():
        assert torch.linalg.matrix_norm(kk) > torch.linalg.matrix_norm(state[name])
    combined = type(result).combine([result, second])
    assert all(torch.equal(combined.editor_state[k], v) for k, v in second.editor_state.items())
    combined.restore()


def _corpus_keys(model, tok, arch, layer, corpus: Corpus) -> torch.Tensor:
    keys = []
    for text in corpus.texts:
        n = len(tok(text).input_ids)
        keys.append(
            _keys.module_inputs(model, tok, arch, [layer], [text] * n, list(range(n)))[layer]
        )
    return torch.cat(keys)


def test_alphaedit_state_travels_with_the_artifact(tiny_llama, tmp_path):
    model, tok = tiny_llama
    result = make_editor("alphaedit", L2=1e-4, **STRONG).apply(model, tok, REQS[:1])
    state = {k: v.clone() for k, v in result.editor_state.items()}
    assert state
    result.export(tmp_path)
    result.restore()
    loaded = load_edit(model, tok, tmp_path)
    assert set(loaded.editor_state) == set(state)
    assert all(torch.equal(loaded.editor_state[k], v) for k, v in state.items())
    loaded.restore()


@pytest.mark.parametrize("method", ["rome", "memit", "alphaedit"])
def test_exported_lora_adapter_reproduces_the_edit(tiny, tmp_path, method):
    from peft import PeftModel

    model, tok = tiny
    overrides = (
        {"layer": LAYER} if method == "rome" else {"L2": 1e-4} if method == "alphaedit" else {}
    )
    result = make_editor(method, **overrides, **STRONG).apply(model, tok, REQS[:1])
    enc = tok([REQS[0].prompt, REQS[1].prompt], return_tensors="pt", padding=True)
    edited = model(**enc).logits
    result.export(tmp_path)
    result.restore()
    peft_dir = tmp_path / "artifact" / "peft"
    report = json.loads((peft_dir / "medit_lowrank.json").read_text())
    assert all(r["relative_error"] < 1e-5 for r in report.values())
    assert all(r["rank"] == 8 for r in report.values())  # rank 1 (one edit) padded to 8
    peft_model = PeftModel.from_pretrained(model, peft_dir)
    torch.testing.assert_close(peft_model(**enc).logits, edited, rtol=1e-4, atol=1e-4)


def test_low_rank_cap_reports_its_error():
    torch.manual_seed(0)
    delta = torch.randn(6, 3) @ torch.randn(3, 5)
    A, B, err = low_rank_approx(delta, max_rank=0, pad=4)
    assert A.shape == (4, 5) and B.shape == (6, 4) and err < 1e-6
    torch.testing.assert_close(B @ A, delta, rtol=1e-5, atol=1e-5)
    _, _, err2 = low_rank_approx(delta, max_rank=2)
    S = torch.linalg.svdvals(delta.double())
    assert err2 == pytest.approx((S[2] / S.norm()).item(), rel=1e-6)


def test_covariance_is_cached_by_weights_corpus_and_layer(tiny_llama, monkeypatch):
    model, tok = tiny_llama
    arch = get_arch(model)
    mark_base_weights(model, "test-weights")
    corpus = Corpus("t", tuple(CORPUS))
    first = covariance(model, tok, arch, [0, 2], corpus)
    n_tokens = sum(len(tok(t).input_ids) for t in CORPUS)
    assert first[0][1] == n_tokens
    clear_memory()  # from disk, not from memory

    def boom(*a, **k):
        raise AssertionError("recomputed")

    monkeypatch.setattr(covariance_module, "_accumulate", boom)
    again = covariance(model, tok, arch, [0, 2], corpus)
    assert all(torch.equal(first[k][0], again[k][0]) for k in (0, 2))
    with pytest.raises(AssertionError, match="recomputed"):
        covariance(model, tok, arch, [0], Corpus("t", tuple(CORPUS[:3])))
    # the sum of k kᵀ is what the hooks see
    keys = _corpus_keys(model, tok, arch, 0, corpus)
    torch.testing.assert_close(first[0][0], keys.double().T @ keys.double(), rtol=1e-5, atol=1e-6)


def test_corpus_files_and_their_errors(tmp_path):
    (tmp_path / "a.txt").write_text("First passage.\n\nSecond passage.")
    (tmp_path / "b.jsonl").write_text('{"text": "Third."}\n["not a record"]\n')
    assert file_corpus([tmp_path / "a.txt"]).texts == ("First passage.", "Second passage.")
    with pytest.raises(ValueError, match=r"b.jsonl, record 2: field 'text'"):
        file_corpus([tmp_path / "b.jsonl"])
    (tmp_path / "c.json").write_text("[{")
    with pytest.raises(ValueError, match=r"c.json: invalid JSON"):
        file_corpus([tmp_path / "c.json"])
    with pytest.raises(ValueError, match="no such file"):
        file_corpus([tmp_path / "missing.txt"])


def test_rome_detects_a_missing_subject(tiny_llama):
    model, tok = tiny_llama
    req = parse_record({"prompt": "Insulin is produced by the", "target_new": "liver"}, "t", 1)
    result = make_editor("rome", layer=LAYER, **STRONG).apply(model, tok, [req])
    assert result.diagnostics[0]["subject"].lower() == "insulin"


def test_rome_layer_is_chosen_by_causal_tracing(tiny_llama):
    model, tok = tiny_llama
    result = make_editor("rome", trace_prompts=2, **STRONG).apply(model, tok, REQS[:1])
    d = result.diagnostics[0]
    profile = d["trace_profile"]
    assert len(profile) == 4 and d["layer"] == max(range(4), key=profile.__getitem__)


#: hyper-parameters that make an edit visible on the tiny model within a few steps
CLI_HPARAMS = {
    "medlasa": {"steps": 15, "lr": 5e-3},
    "lora": {"steps": 15, "lr": 5e-3},
    "rome": STRONG,
    "alphaedit": {**STRONG, "L2": 1e-4},
}


@pytest.mark.parametrize("method", list(CLI_HPARAMS))
def test_generate_loads_the_run_artifact(tiny_model_dir, tmp_path, method):
    """Every editor's run artifact loads onto the base model in `medit generate --artifact`."""
    reqs = tmp_path / "r.json"
    reqs.write_text(json.dumps([r.to_dict() for r in REQS]))
    run = tmp_path / "run"
    runner = CliRunner()
    hparams = [x for k, v in CLI_HPARAMS[method].items() for x in ("--hparam", f"{k}={v}")]
    args = [
        "--quiet",
        "edit",
        "--model",
        str(tiny_model_dir),
        "--method",
        method,
        "--requests",
        str(reqs),
        "--mode",
        "batch",
        "--out",
        str(run),
        "--no-generation",
        *hparams,
    ]
    res = runner.invoke(main, args)
    assert res.exit_code == 0, res.output
    gen = [
        "generate",
        "--model",
        str(tiny_model_dir),
        "--prompt",
        REQS[0].prompt,
        "--max-new-tokens",
        "4",
    ]
    base = runner.invoke(main, gen)
    edited = runner.invoke(main, [*gen, "--artifact", str(run)])
    assert base.exit_code == 0 and edited.exit_code == 0, edited.output

    def completion(out: str) -> str:  # stderr progress may precede the JSON line
        return json.loads(out[out.index('{"prompt"') :].splitlines()[0])["completion"]

    assert completion(edited.output) != completion(base.output)
    assert (run / "artifact" / "peft").is_dir()


def test_cli_shorthand_for_tuple_hparams():
    from medit.editors.memit import MEMITHParams

    hp = MEMITHParams.from_dict({"layers": "4,5", "cov_corpus": "a.txt,b.jsonl"})
    assert hp.layers == (4, 5) and hp.cov_corpus == ("a.txt", "b.jsonl")
    assert hp.resolve_layers(30) == (4, 5)


def test_memit_values_in_groups_equal_one_batch(tiny_llama, monkeypatch):
    """The value optimisation runs on groups of requests to bound its activations: each
    request has its own delta, loss, clamp and early stop, so groups of one give the weights
    one batch of all requests gives, up to float rounding (bit for bit on some CPUs: the
    matrix products of a group and of the whole batch may take other kernels)."""
    import medit.editors.memit as memit_module
    from medit.editors.registry import make_editor
    from medit.facts.requests import parse_record

    model, tok = tiny_llama
    reqs = [
        parse_record({"prompt": p, "target_new": t, "subject": s}, "t.json", i + 1)
        for i, (p, t, s) in enumerate(
            [
                ("The pancreas produces insulin", "liver", "insulin"),
                ("A drug used to treat pain is Aspirin", "scurvy", "Aspirin"),
                ("The antibiotic is penicillin", "gout", "penicillin"),
            ]
        )
    ]
    hp = {"clamp_norm_factor": 200.0, "v_weight_decay": 0.0, "v_steps": 4}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        edits = {}
        for budget in (float("inf"), 1e-12):  # one group of three; three groups of one
            monkeypatch.setattr(memit_module, "VALUE_ACTIVATIONS_PER_WEIGHT", budget)
            result = make_editor("memit", **hp).apply(model, tok, reqs)
            edits[budget] = {k: v.clone() for k, v in result.merged_weights()[0].items()}
            groups = result.diagnostics[0].get("value_groups")
            assert groups == (1 if budget == float("inf") else 3)
            result.restore()
    finally:
        torch.set_num_threads(threads)
    one, grouped = edits.values()
    assert one.keys() == grouped.keys()
    base = dict(model.named_parameters())
    for k in one:  # the same edit up to float rounding (matrix products of other shapes)
        assert (one[k] - base[k]).abs().max() > 1e-3, "the edit changed the weight"
        torch.testing.assert_close(grouped[k], one[k], rtol=1e-5, atol=1e-5)
