"""WISE (medit/editors/wise.py): side memories trained in masked shards, routed once per sequence
by their activation over the prompt, TIES-merged; the base model runs bit for bit where no memory
opens, and removing an edit takes exactly its change out."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from medit.core.arch import get_arch
from medit.editors.patching.bank import bank_of
from medit.editors.registry import make_editor
from medit.editors.wise import WiseEdit, WiseHParams, activation, shard_mask, ties_merge
from medit.evaluation import score_targets
from tests.test_grace import FAR, REQS

#: the tiny model's activations are small: margins on its scale
FAST = {
    "steps": 40,
    "alpha": 0.05,
    "beta": 1.0,
    "gamma": 0.5,
    "templates": 1,
    "norm_constraint": 10.0,
    "lr": 30.0,
}


def _logprob(model, tok, req):
    return score_targets(model, tok, get_arch(model), [(req.prompt, req.target_new)])[0].logprob


def _logits(model, tok, text):
    with torch.no_grad():
        return model(**tok([text], return_tensors="pt")).logits


# -- merging (hand-made shards) ------------------------------------------------------------------
def test_ties_keeps_disjoint_changes_and_averages_agreeing_ones():
    a = torch.tensor([[1.0, 0.0, 2.0, -1.0]])
    b = torch.tensor([[0.0, 3.0, 4.0, 1.0]])
    merged = ties_merge([a, b], density=1.0)
    # disjoint entries kept as they are; agreeing ones averaged; a conflict goes to the sign of
    # the sum (here a tie, -1 + 1 = 0 counts as +: b's)
    assert torch.equal(merged, torch.tensor([[1.0, 3.0, 3.0, 1.0]]))
    # trimming keeps each vector's largest entries only
    trimmed = ties_merge([torch.tensor([[0.1, 5.0]]), torch.tensor([[0.0, 0.0]])], density=0.5)
    assert torch.equal(trimmed, torch.tensor([[0.0, 5.0]]))


def _hand_edit(edit_id, shard, change, act, merged=(), ratio=1.0):
    """A WISE edit that sets its shard's change to ``change`` (mask ratio 1: every entry)."""
    idx = shard_mask(shard, change.numel(), ratio)
    return WiseEdit(
        edit_id,
        "m",
        tuple(change.shape),
        shard,
        shard,
        ratio,
        change.flatten()[idx].clone(),
        act,
        1.0,
        merged,
        1.0,
    )


def test_a_merge_keeps_the_merged_shards_edits_and_removing_it_undoes_it():
    """Two hand-made shards with disjoint supports: after the merge both edits' inputs still
    open the merged memory and get their own change; removing the merging edit splits them."""
    first = torch.zeros(2, 4)
    first[0, 0] = 3.0  # reads input 0
    second = torch.zeros(2, 4)
    second[1, 2] = 3.0  # reads input 2
    a = _hand_edit("a", 0, first, act=2.0)
    b = _hand_edit("b", 1, second, act=2.0, merged=(0, 1))
    WiseEdit.arrange([a, b], "m")
    mem = a._memories
    assert len(mem.changes) == 1 and torch.equal(mem.changes[0], first + second)
    assert mem.owner == [1] and float(mem.thresholds[0]) == 2.0
    real = torch.ones(3, 1, dtype=torch.bool)
    x = torch.tensor([[[1.0, 0, 0, 0]], [[0, 0, 1.0, 0]], [[0, 1.0, 0, 0]]])  # a's, b's, far
    gates = WiseEdit.sequence_gates([a, b], "m", x, real)
    assert gates[1, :2, 0].tolist() == [3.0, 3.0] and gates[1, 2, 0] == 0 and not gates[0].any()
    out = torch.zeros(2, 1, 2)
    acted = WiseEdit.act([b, b], "m", x[:2], out, gates[1, :2])
    assert acted[0, 0].tolist() == [3.0, 0.0] and acted[1, 0].tolist() == [0.0, 3.0]
    WiseEdit.arrange([a], "m")  # b (and its merge) removed: a's shard alone
    assert torch.equal(a._memories.changes[0], first)


def test_gates_open_above_threshold_and_the_largest_activation_wins():
    x = torch.tensor([[[1.0, 0.0], [0.0, 0.0]], [[0.0, 1.0], [0.0, 1.0]]])  # 2 rows, 2 positions
    real = torch.tensor([[True, False], [True, True]])  # row 0: its second position is padding
    one, two = torch.tensor([[2.0, 0.0]]), torch.tensor([[0.0, 1.0]])
    assert activation(x, one, real).tolist() == [2.0, 0.0]  # padding does not dilute row 0
    a, b = _hand_edit("a", 0, one, act=1.5), _hand_edit("b", 1, two, act=0.5)
    gates = WiseEdit.sequence_gates([a, b], "m", x, real)
    assert gates[:, 0, 0].tolist() == [2.0, 0.0]  # row 0: a's memory only
    assert gates[:, 1, 0].tolist() == [0.0, 1.0]  # row 1: b's (a's activation 0 < 1.5)


def test_merge_every_must_be_a_multiple_of_the_shard_size():
    with pytest.raises(ValueError, match="multiple of shard_size"):
        WiseHParams(shard_size=3, merge_every=4)


# -- on a tiny model -----------------------------------------------------------------------------
def test_edits_rise_far_inputs_stay_bit_identical_and_removal_is_exact(tiny_llama):
    model, tok = tiny_llama
    base_far = _logits(model, tok, FAR)
    before = [_logprob(model, tok, r) for r in REQS]
    hp = {**FAST, "shard_size": 1, "merge_every": 0}  # a memory each
    first = make_editor("wise", **hp).apply(model, tok, REQS[:1])
    only_first = _logits(model, tok, REQS[0].prompt)
    second = make_editor("wise", **hp).apply(model, tok, REQS[1:], prior=first)
    after = [_logprob(model, tok, r) for r in REQS]
    assert all(a > b + 1.0 for a, b in zip(after, before, strict=True)), (before, after)
    assert torch.equal(_logits(model, tok, FAR), base_far)  # no memory opens: bit for bit
    for d in first.diagnostics + second.diagnostics:
        assert d["act_in"] > d["act_out"] and d["bytes"] > 0, d
    both = type(first).combine([first, second])
    both.remove(REQS[1].id)
    assert torch.equal(_logits(model, tok, REQS[0].prompt), only_first)
    both.restore()
    assert bank_of(model) is None and torch.equal(_logits(model, tok, FAR), base_far)


def test_a_shard_trains_on_from_its_earlier_edits_at_its_mask_only(tiny_llama):
    model, tok = tiny_llama
    result = make_editor("wise", **FAST).apply(model, tok, REQS)  # shard_size 500: one shard
    a, b = result.patches
    assert (a.shard, b.shard, a.seed, b.seed) == (0, 0, 0, 0)
    mem = a._memories
    numel = mem.changes[0].numel()
    idx = shard_mask(0, numel, 0.2)
    assert len(mem.changes) == 1 and a.values.numel() == b.values.numel() == len(idx)
    expected = torch.zeros(numel).index_add(0, idx, a.values).index_add(0, idx, b.values)
    assert torch.equal(mem.changes[0].flatten(), expected)
    outside = torch.ones(numel, dtype=torch.bool)
    outside[idx] = False
    assert not mem.changes[0].flatten()[outside].any()  # untrained entries stay W's
    # every entry of W' within the box around W
    assert float(mem.changes[0].abs().max()) <= FAST["norm_constraint"] + 1e-5
    result.restore()


def test_merging_two_shards_keeps_both_edits(tiny_llama):
    model, tok = tiny_llama
    plain = [_logprob(model, tok, r) for r in REQS]
    result = make_editor("wise", **FAST, shard_size=1, merge_every=2).apply(model, tok, REQS)
    a, b = result.patches
    assert (a.shard, b.shard, b.merged) == (0, 1, (0, 1)) and a.seed != b.seed
    assert len(a._memories.changes) == 1  # merged into one memory
    merged = [_logprob(model, tok, r) for r in REQS]
    assert all(m > p + 1.0 for m, p in zip(merged, plain, strict=True)), (plain, merged)
    result.remove(REQS[1].id)  # the merging edit: shard 0 alone again
    assert len(a._memories.changes) == 1 and not a._memories.thresholds.isnan().any()
    result.restore()
    assert bank_of(model) is None


def test_swapped_subject_prompts_train_the_memory_to_stay_shut_on_them(tiny_llama):
    """``negative_swaps``: the edit's question about other medical terms is a routing negative;
    after training, such a question opens no memory (the base model answers, bit for bit)."""
    from medit.editors.patching.negatives import swapped_prompts

    model, tok = tiny_llama
    req = REQS[1]
    swaps = swapped_prompts(req.prompt, req.subject, 6, 2)  # the editor's seed: hp.seed + 2
    assert len(swaps) == 6 and all(req.subject not in s for s in swaps)
    base = [_logits(model, tok, s) for s in swaps]
    before = _logprob(model, tok, req)
    # (without the swaps as negatives, 5 of these 6 prompts open the memory)
    hp = {**FAST, "steps": 150, "negative_swaps": 6, "irrelevant": 0}
    result = make_editor("wise", **hp).apply(model, tok, [req])
    assert _logprob(model, tok, req) > before + 1.0
    assert all(torch.equal(_logits(model, tok, s), b) for s, b in zip(swaps, base, strict=True))
    result.restore()


def test_the_reference_codes_routing_activation_compares_after_the_silu():
    """routing_fn=silu: |silu(out + x change^T) - silu(out)| per position, averaged over the real
    positions (EasyEdit's WISE); the default is the paper's |x change^T|."""
    x = torch.tensor([[[1.0, 0.0], [0.0, 2.0]]])  # (1, 2 positions, d_in 2)
    change = torch.tensor([[1.0, 0.0], [0.0, 1.0]])  # identity: delta = x
    real = torch.tensor([[True, True]])
    out = torch.tensor([[[-10.0, -10.0], [0.0, 0.0]]])  # first position deep in the SiLU's tail
    linear = activation(x, change, real)
    silu = activation(x, change, real, base=out)
    expected_first = (F.silu(out[0, 0] + x[0, 0]) - F.silu(out[0, 0])).norm()
    expected_second = (F.silu(out[0, 1] + x[0, 1]) - F.silu(out[0, 1])).norm()
    assert torch.allclose(linear, torch.tensor([1.5]))
    assert torch.allclose(silu, ((expected_first + expected_second) / 2)[None])
    assert expected_first < 1e-3  # a shift in the tail barely registers: bounded activations
