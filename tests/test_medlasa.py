"""MedLaSA: the scale formulae, per-row routing, switching off far from every edit, exports."""

import json

import pytest
import torch

from medit.core.arch import get_arch
from medit.core.cache import base_weights_sha256
from medit.editors.load import load_edit
from medit.editors.medlasa import (
    layer_alphas,
    layer_ranks,
    module_plan,
    normalise_profile,
)
from medit.editors.patching.bank import bank_of
from medit.editors.registry import make_editor
from medit.evaluation import score_targets
from medit.facts.requests import parse_record

REQS = [
    parse_record(
        {
            "prompt": "The hormone insulin is produced by the",
            "target_new": "liver",
            "subject": "insulin",
        },
        "t.json",
        1,
    ),
    parse_record(
        {"prompt": "Aspirin is used to treat", "target_new": "scurvy", "subject": "Aspirin"},
        "t.json",
        2,
    ),
]
FAR = "Vitamin C deficiency causes scurvy."


def test_scales_follow_the_paper_formulae():
    s = normalise_profile([0.0, 1.0, 3.0, 4.0])  # min-max
    assert s == pytest.approx([0.0, 0.25, 0.75, 1.0])
    # alpha = clip(s * 32, 16, 64)
    assert layer_alphas(s, 32.0) == pytest.approx([16.0, 16.0, 24.0, 32.0])
    # rank = clip(ceil(s * 24), 12, 48)
    assert layer_ranks(s, 24) == [12, 12, 18, 24]
    assert layer_ranks([2.5], 24) == [48]  # upper clip
    z = normalise_profile([1.0, 3.0], "meanstd")  # mean 2, std 1 -> 1 -/+ 0.5
    assert z == pytest.approx([0.5, 1.5])
    assert normalise_profile([2.0, 2.0]) == [1.0, 1.0]  # flat profile: every layer at alpha0


def test_module_plan_maps_attention_and_mlp_profiles(tiny_llama):
    model, _ = tiny_llama
    arch = get_arch(model)
    hp = make_editor("medlasa").hparams_for(model)
    scores = {"attn": [0.0, 0.5, 1.0, 1.0], "mlp": [1.0, 0.0, 0.0, 0.0]}
    plan = module_plan(arch, 4, ("q", "down"), scores, scores, hp)
    assert plan[arch.layer_path(2, "q")] == (32.0, 24)
    assert plan[arch.layer_path(0, "q")] == (16.0, 12)
    assert plan[arch.layer_path(0, "down")] == (32.0, 24)
    assert plan[arch.layer_path(3, "down")] == (16.0, 12)


def _edit(model, tok, reqs=REQS, **hp):
    return make_editor("medlasa", lr=5e-3, steps=20, **hp).apply(model, tok, reqs)


def _logits(model, tok, prompts):
    enc = tok(prompts, return_tensors="pt", padding=True)
    return model(**enc).logits, enc["attention_mask"].bool()


def test_per_row_routing_in_a_batch_equals_each_row_alone(tiny_llama):
    model, tok = tiny_llama
    _edit(model, tok)
    bank = bank_of(model).router
    prompts = [REQS[1].prompt, FAR, REQS[0].prompt]
    which, coeff = bank.route_prompts(prompts)
    assert which[0] == 1 and which[2] == 0  # each edit prompt routes to its own adapter
    batched, mask = _logits(model, tok, prompts)
    for i, p in enumerate(prompts):
        alone, _ = _logits(model, tok, [p])
        n = int(mask[i].sum())
        torch.testing.assert_close(batched[i, :n], alone[0, :n], rtol=1e-4, atol=1e-5)
    pairs = [(r.prompt, r.target_new) for r in REQS]
    together = score_targets(model, tok, get_arch(model), pairs)
    apart = [score_targets(model, tok, get_arch(model), [p])[0] for p in pairs]
    assert [t.predicted for t in together] == [a.predicted for a in apart]


def test_an_input_far_from_every_edit_sees_the_base_model(tiny_llama):
    model, tok = tiny_llama
    base, _ = _logits(model, tok, [FAR])
    result = _edit(
        model,
        tok,
        gate_on=0.999,
        gate_off=0.99,
        gate_on_unmentioned=0.9999,
        gate_off_unmentioned=0.999,
    )
    bank = bank_of(model).router
    _, coeff = bank.route_prompts([FAR, REQS[0].prompt])
    assert all(c[0] == 0 for c in coeff.values()) and all(c[1] > 0 for c in coeff.values())
    edited, _ = _logits(model, tok, [FAR])
    assert torch.equal(edited, base)
    on, _ = _logits(model, tok, [REQS[0].prompt])
    result.restore()
    off, _ = _logits(model, tok, [REQS[0].prompt])
    assert not torch.equal(on, off)


def test_unrouted_callers_route_by_their_own_input(tiny_llama):
    """model.generate knows nothing of routing: the bank reads each sequence's prompt itself."""
    model, tok = tiny_llama
    _edit(model, tok)
    enc = tok([REQS[0].prompt], return_tensors="pt")
    direct = model(**enc).logits
    routed, _ = _logits(model, tok, [REQS[0].prompt])
    torch.testing.assert_close(direct, routed)
    bank = bank_of(model).router
    calls = []
    real = bank._route
    bank._route = lambda rows: calls.append(tok.batch_decode(rows)) or real(rows)
    try:
        out = model.generate(**enc, max_new_tokens=3, do_sample=False, pad_token_id=0)
    finally:
        del bank._route
    assert out.shape[1] == enc["input_ids"].shape[1] + 3
    # decoding steps keep the routing of the prompt (whatever the KV cache keyword is called)
    assert calls == [[REQS[0].prompt]]


def test_oracle_mode_scales_each_input_by_its_own_trace(tiny_llama):
    model, tok = tiny_llama
    _edit(model, tok, reqs=REQS[:1], routing="oracle")
    bank = bank_of(model).router
    _, coeff = bank.route_prompts([REQS[0].prompt, FAR])
    name = get_arch(model).layer_path(0, "q")
    rank = bank_of(model).patches[0].A[name].shape[0]
    alphas = {float(c[0] * rank) for c in coeff.values()}
    assert alphas <= {16.0, 16.0 + 8.0, 24.0, 32.0} | {a for a in alphas if 16 <= a <= 32}
    assert all(c[1] > 0 for c in coeff.values())  # the oracle never switches an adapter off


def test_shared_adapter_is_one_pair_scaled_and_masked_per_edit(tiny_llama, tmp_path):
    model, tok = tiny_llama
    arch = get_arch(model)
    pairs = [(r.prompt, r.target_new) for r in REQS]
    before = [t.logprob for t in score_targets(model, tok, arch, pairs)]
    profiles = ([0.0, 1.0, 0.5, 0.25], [1.0, 0.0, 0.0, 0.5])  # hand-made: the ranks differ
    doc = {
        "provenance": {"model": {"weights_sha256": base_weights_sha256(model)}},
        "traces": [
            {"prompt": r.prompt, "subject": r.subject, "profile": {"mlp": p, "attn": p}}
            for r, p in zip(REQS, profiles, strict=True)
        ],
    }
    (tmp_path / "traces.json").write_text(json.dumps(doc))
    result = _edit(
        model,
        tok,
        adapters="shared",
        routing="always",
        rank_mode="knowledge",
        traces=str(tmp_path / "traces.json"),
    )
    first, second = result.patches
    assert len(result.diagnostics) == 1  # one training run for the whole call
    ranks_differ = False
    for n in first.A:
        for x, y in ((first.A[n], second.A[n]), (first.B[n], second.B[n])):
            assert x.untyped_storage().data_ptr() == y.untyped_storage().data_ptr()
        for a in (first, second):  # own alpha/r, own rank: a view of the first r_i dimensions
            alpha, rank = a.info["alpha_rank"][n]
            assert a.scale[n] == pytest.approx(alpha / rank) and a.A[n].shape[0] == rank
            assert a.B[n].shape[1] == rank
        ranks_differ |= first.A[n].shape[0] != second.A[n].shape[0]
    assert ranks_differ  # rank_mode=knowledge: the mask is exercised
    after = [t.logprob for t in score_targets(model, tok, arch, pairs)]
    assert all(x > y + 1.0 for x, y in zip(after, before, strict=True))
    edited, _ = _logits(model, tok, [r.prompt for r in REQS])
    result.export(tmp_path / "run")  # views of shared tensors are saved as copies
    result.restore()
    assert [t.logprob for t in score_targets(model, tok, arch, pairs)] == before
    loaded = load_edit(model, tok, tmp_path / "run")
    again, _ = _logits(model, tok, [r.prompt for r in REQS])
    torch.testing.assert_close(again, edited)
    loaded.restore()


def test_exported_peft_adapter_reproduces_the_edit(tiny_llama, tmp_path):
    from peft import PeftModel

    model, tok = tiny_llama
    result = _edit(model, tok, reqs=REQS[:1])
    edited, _ = _logits(model, tok, [REQS[0].prompt])
    result.export(tmp_path, base_model="builtin:smollm2")
    result.restore()
    config = json.loads(
        (tmp_path / "artifact" / "peft" / "edit-0" / "adapter_config.json").read_text()
    )
    assert config["base_model_name_or_path"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    peft_model = PeftModel.from_pretrained(model, tmp_path / "artifact" / "peft" / "edit-0")
    enc = tok([REQS[0].prompt], return_tensors="pt")
    torch.testing.assert_close(peft_model(**enc).logits, edited, rtol=1e-4, atol=1e-4)


def test_lora_peft_export_reproduces_the_merged_edit(tiny_llama, tmp_path):
    from peft import PeftModel

    model, tok = tiny_llama
    result = make_editor("lora", steps=10).apply(model, tok, REQS[:1])
    enc = tok([REQS[0].prompt], return_tensors="pt")
    edited = model(**enc).logits
    result.export(tmp_path, base_model=str(tmp_path))
    result.restore()
    config = json.loads((tmp_path / "artifact" / "peft" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(tmp_path.resolve())
    peft_model = PeftModel.from_pretrained(model, tmp_path / "artifact" / "peft")
    torch.testing.assert_close(peft_model(**enc).logits, edited, rtol=1e-4, atol=1e-4)


def test_scales_come_from_a_medit_trace_run_directory(tiny_llama, tmp_path):
    """`--hparam traces=RUN_DIR`: profiles of a `medit trace` run are used, not recomputed."""
    from medit.editors.medlasa import MedLaSA, MedLaSAHParams

    model, tok = tiny_llama
    mlp, attn = [0.0, 1.0, 0.5, 0.25], [1.0, 0.0, 0.0, 0.5]
    doc = {
        "provenance": {"model": {"weights_sha256": base_weights_sha256(model)}},
        "traces": [
            {
                "prompt": REQS[0].prompt,
                "subject": REQS[0].subject,
                "profile": {"mlp": mlp, "attn": attn, "hidden": mlp},
            }
        ],
    }
    (tmp_path / "traces.json").write_text(json.dumps(doc))
    hp = MedLaSAHParams(traces=str(tmp_path))
    scores = MedLaSA()._scores(model, tok, get_arch(model), REQS[0], hp)
    assert scores == {"attn": attn, "mlp": mlp}  # already min-max normalised
    doc["provenance"]["model"]["weights_sha256"] = "0" * 64
    (tmp_path / "traces.json").write_text(json.dumps(doc))
    with pytest.raises(ValueError, match="made for other weights"):
        MedLaSA()._scores(model, tok, get_arch(model), REQS[0], hp)
