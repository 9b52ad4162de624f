"""SCEN (medit/editors/scen.py) and the bank's sequence-gated patches: an expert acts for a whole
sequence when its neuron fires on the prompt's last token, the base model runs bit for bit
otherwise, and removing one edit restores exactly that edit's behaviour."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

from medit.core.arch import get_arch
from medit.editors.patching.bank import PatchBank, bank_of
from medit.editors.registry import make_editor
from medit.editors.scen import Expert
from medit.evaluation import score_targets
from tests.test_grace import FAR, REQS

FAST = {"expert_steps": 60, "negative_texts": 20}


def _logprob(model, tok, req):
    return score_targets(model, tok, get_arch(model), [(req.prompt, req.target_new)])[0].logprob


def _logits(model, tok, text):
    with torch.no_grad():
        return model(**tok([text], return_tensors="pt")).logits


def _hand_made(model, arch, layer, neuron, up_scale=1.0):
    """An expert at ``layer``'s mlp_out that adds a constant-free low-rank change."""
    name = arch.layer_path(layer, "mlp_out")
    d_in, d_out = model.config.intermediate_size, model.config.hidden_size
    down = torch.ones(1, d_in) / d_in
    up = torch.full((d_out, 1), up_scale)
    return Expert("e", name, neuron, 0.0, 0.65, False, None, down, up, torch.zeros(d_in).half())


def test_gates_open_above_theta_and_the_highest_score_wins():
    x = torch.tensor([[[1.0, 0.0]], [[0.0, 1.0]], [[0.1, 0.1]]])  # 3 rows, last token
    a = Expert("a", "m", torch.tensor([4.0, 0.0]), 0.0, 0.65, False, None, None, None, None)
    b = Expert("b", "m", torch.tensor([0.0, 2.0]), 0.0, 0.65, False, None, None, None, None)
    g = Expert.gates([a, b], "m", x)  # (2, 3, 1)
    s = torch.sigmoid(torch.tensor([4.0, 2.0]))
    assert torch.allclose(g[:, 0, 0], torch.tensor([s[0], 0.0]))  # sigmoid(0) = 0.5: shut
    assert torch.allclose(g[:, 1, 0], torch.tensor([0.0, s[1]]))
    assert torch.equal(g[:, 2], torch.zeros(2, 1))  # both near 0.5 < theta


def test_a_sequence_keeps_its_prefill_decision_while_decoding(tiny_llama):
    """The neuron fires on one prompt's last token; the expert then acts on every position of
    that sequence, decoding included, and on no position of the other row."""
    model, tok = tiny_llama
    arch = get_arch(model)
    layer = 2
    enc = tok(["The pancreas produces insulin", FAR], return_tensors="pt", padding=True)
    name = arch.layer_path(layer, "mlp_out")
    seen = []
    handle = model.get_submodule(name).register_forward_hook(lambda m, a, o: seen.append(a[0]))
    with torch.no_grad():
        base = model(**enc).logits
    handle.remove()
    mask = enc.attention_mask
    last = mask.sum(1) - 1  # right padding
    h = seen[0][0, last[0]]
    neuron = 50 * (h - seen[0][1, last[1]])  # fires on row 0's last token only
    bank = PatchBank.of(model, arch)
    bank.add(_hand_made(model, arch, layer, neuron))
    try:
        with torch.no_grad():
            edited = model(**enc).logits
            assert not torch.allclose(edited[0, : last[0] + 1], base[0, : last[0] + 1])
            assert torch.equal(edited[1], base[1])  # its neuron is shut: bit for bit
            # decoding on the cache: the step's own input would not open the expert, the
            # prefill's decision does
            cache = DynamicCache(config=model.config)
            ids = tok(["The pancreas produces insulin"], return_tensors="pt").input_ids
            model(input_ids=ids, past_key_values=cache, use_cache=True)
            step = tok([" and"], return_tensors="pt").input_ids[:, :1]
            kept = model(input_ids=step, past_key_values=cache, use_cache=True).logits
            with bank.disabled():
                alone = model(torch.cat([ids, step], 1)).logits[:, -1:]
            assert not torch.allclose(kept, alone)
            # a forward without a cache is a sequence of its own: the decision is its last token
            fresh = model(input_ids=step).logits
            with bank.disabled():
                assert torch.equal(fresh, model(input_ids=step).logits)
            # generation follows the same decision as a reordering decoder's rows
            out = model.generate(
                **tok(
                    ["The pancreas produces insulin", FAR],
                    return_tensors="pt",
                    padding=True,
                    padding_side="left",
                ),
                max_new_tokens=3,
                do_sample=False,
                num_beams=2,
            )
            assert out.shape[0] == 2
    finally:
        bank.remove(*bank.patches)
    assert bank_of(model) is None


def test_edits_rise_far_inputs_stay_bit_identical_and_removal_is_exact(tiny_llama):
    model, tok = tiny_llama
    base_far = _logits(model, tok, FAR)
    base_first = _logits(model, tok, REQS[0].prompt)
    before = [_logprob(model, tok, r) for r in REQS]
    result = make_editor("scen", **FAST).apply(model, tok, REQS)
    info = result.diagnostics
    assert all(d["score"] > 0.75 for d in info), info  # each neuron clears theta + margin
    after = [_logprob(model, tok, r) for r in REQS]
    assert all(a > b + 1.0 for a, b in zip(after, before, strict=True)), (before, after)
    assert torch.equal(_logits(model, tok, FAR), base_far)  # shut: bit for bit
    first, second = result.patches
    assert first.down.shape == (8, model.config.intermediate_size) and first.delta is None
    d_in, d_out = model.config.intermediate_size, model.config.hidden_size
    assert info[0]["bytes"] == 4 * (8 * (d_out + d_in) + d_in) + 2 * d_in  # B, A, w; key
    result.remove(REQS[0].id)
    assert torch.equal(_logits(model, tok, REQS[0].prompt), base_first)
    assert _logprob(model, tok, REQS[1]) == pytest.approx(after[1])
    result.restore()
    assert bank_of(model) is None and torch.equal(_logits(model, tok, FAR), base_far)


def test_a_later_neuron_is_trained_silent_on_earlier_edits(tiny_llama):
    model, tok = tiny_llama
    result = make_editor("scen", **FAST).apply(model, tok, REQS)
    first, second = result.patches
    score = Expert.scores([second], first.key.float()[None, None])  # second neuron on first key
    assert float(score) < 0.65 - 0.1 + 1e-6, float(score)


def test_the_paper_preset_trains_a_full_copy(tiny_llama):
    model, tok = tiny_llama
    before = _logprob(model, tok, REQS[0])
    result = make_editor(
        "scen", preset="paper", expert_steps=30, expert_lr=1e-2, neuron_steps=200, neuron_lr=1e-1
    ).apply(model, tok, REQS[:1])
    patch = result.patches[0]
    d_out, d_in = model.config.hidden_size, model.config.intermediate_size
    assert patch.delta.shape == (d_out, d_in) and patch.down is None and not patch.normalise
    assert patch.bias == 0.0  # the paper's neurons have no bias
    assert _logprob(model, tok, REQS[0]) > before + 1.0


def test_a_mean_reading_neuron_reads_the_prompt_over_its_real_tokens():
    x = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [-9.0, 0.0]]])  # the last position is padding
    real = torch.tensor([[True, True, False]])
    w = torch.tensor([4.0, -1.0])
    mean = Expert("a", "m", w, 0.0, 0.65, False, None, None, None, None, "mean")
    last = Expert("b", "m", w, 0.0, 0.65, False, None, None, None, None, "last")
    g = Expert.sequence_gates([mean, last], "m", x, real)
    # mean of the real tokens (0.5, 0.5): logit 1.5, open; the last real token (0, 1): shut
    assert torch.allclose(g[0, 0, 0], torch.sigmoid(torch.tensor(1.5))) and g[1, 0, 0] == 0


def test_mean_reading_edits_rise_and_far_inputs_stay_bit_identical(tiny_llama):
    model, tok = tiny_llama
    base_far = _logits(model, tok, FAR)
    before = [_logprob(model, tok, r) for r in REQS]
    result = make_editor("scen", **FAST, reads="mean").apply(model, tok, REQS)
    assert all(p.reads == "mean" for p in result.patches)
    after = [_logprob(model, tok, r) for r in REQS]
    assert all(a > b + 1.0 for a, b in zip(after, before, strict=True)), (before, after)
    assert torch.equal(_logits(model, tok, FAR), base_far)
    result.restore()
