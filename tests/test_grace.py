"""GRACE (medit/editors/grace.py): the codebook rules on hand-built keys, gating that leaves
every other input bit-identical, exact per-edit removal, and the radius learned from text."""

from __future__ import annotations

import pytest
import torch

from medit.core.arch import get_arch, get_module
from medit.editors.grace import GraceEntry, place, window_queries
from medit.editors.patching.bank import bank_of
from medit.editors.patching.negatives import CorpusSample, corpus_inputs
from medit.editors.registry import make_editor
from medit.facts.requests import parse_record

M = "model.layers.1.mlp.down_proj"


def _entry(edit_id, key, radius, label=(1,), value=0.0):
    return GraceEntry(edit_id, M, torch.tensor(key), torch.full((2,), value), radius, 1, label)


def _arranged(*entries):
    GraceEntry.arrange(list(entries), M)
    return list(entries)


def test_a_far_key_is_a_new_entry_with_the_initial_radius():
    a = _entry("a", [0.0, 0.0], 1.0)
    b = _entry("b", [3.0, 0.0], 1.0)  # d* = 3 > r0 + r = 2
    assert place(b, _arranged(a)) == ("new", None) and b.radius == 1.0 and not b.shrinks


def test_a_near_key_with_another_answer_splits_both_radii_at_half_the_distance():
    a = _entry("a", [0.0, 0.0], 1.0, label=(1,))
    b = _entry("b", [1.5, 0.0], 1.0, label=(2,))  # d* = 1.5 <= 2: conflict
    rule, _ = place(b, _arranged(a))
    assert rule == "split" and b.radius == pytest.approx(0.75)
    GraceEntry.arrange([a, b], M)
    assert a.effective_radius == pytest.approx(0.75 - 1e-5) and a.radius == 1.0  # a unchanged
    # the midpoint's side decides: a query just right of it goes to b, just left to a
    x = torch.tensor([[[0.74, 0.0], [0.76, 0.0], [5.0, 0.0]]])
    gates = GraceEntry.gates([a, b], M, x)
    assert gates[:, 0].tolist() == [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]
    GraceEntry.arrange([a], M)  # b removed: a's radius is its own again
    assert a.effective_radius == 1.0


def test_a_near_key_with_the_same_answer_grows_the_neighbours_radius():
    a = _entry("a", [0.0, 0.0], 1.0, label=(7,), value=3.0)
    b = _entry("b", [1.6, 0.0], 1.0, label=(7,))  # same answer, outside a's radius
    rule, start = place(b, _arranged(a))
    assert rule == "expand" and torch.equal(start, a.value)  # a's value trains on
    assert torch.equal(b.key, a.key) and b.radius == pytest.approx(1.6) and b.replaces == ("a",)
    b.value = torch.full((2,), 4.0)
    assert GraceEntry.visible(_arranged(a, b)) == [b]  # b took a over
    x = torch.tensor([[[1.5, 0.0], [1.7, 0.0]]])
    assert GraceEntry.gates([a, b], M, x)[:, 0].tolist() == [[0.0, 0.0], [1.0, 0.0]]
    assert GraceEntry.visible(_arranged(a)) == [a]  # b removed: a as it was
    c = _entry("c", [0.5, 0.0], 1.0, label=(7,))  # already covered: a's radius stays
    place(c, GraceEntry.visible(_arranged(a, b)))
    assert c.radius == pytest.approx(1.6) and c.replaces == ("a", "b")


def test_an_entry_acts_at_its_nearest_position_only():
    """Windows overlapping the matching one lie near its key too; only the nearest acts."""
    e = GraceEntry("e", M, torch.tensor([0.5, 0.0]), torch.zeros(2), 1.0, 2, (1,))
    x = torch.tensor([[[0.0, 0.0], [1.0, 0.0], [1.0, 0.0]], [[0.0, 0.0], [1.0, 0.0], [0.0, 0.0]]])
    # windows of row 0: (0,1) -> 0.5 (d 0), (1,1) -> 1.0 (d 0.5): both within the radius
    assert GraceEntry.gates(_arranged(e), M, x)[0].tolist() == [[0, 1, 0], [0, 1, 0]]


def test_window_queries_are_means_over_the_window():
    x = torch.arange(12.0).reshape(1, 6, 2)
    q = window_queries(x, 3)
    assert q.shape == (1, 4, 2) and torch.equal(q[0, 0], x[0, :3].mean(0))
    assert torch.equal(window_queries(x, 1), x)


REQS = [
    parse_record(
        {"prompt": "The pancreas produces insulin", "target_new": "liver", "subject": "insulin"},
        "t.json",
        1,
    ),
    parse_record(
        {
            "prompt": "A drug used to treat pain is Aspirin",
            "target_new": "scurvy",
            "subject": "Aspirin",
        },
        "t.json",
        2,
    ),
]
FAR = "Water boils at one hundred degrees"


def _logits(model, tok, text):
    with torch.no_grad():
        return model(**tok([text], return_tensors="pt")).logits


def _target_logprob(model, tok, req):
    ids = tok(req.prompt + " " + req.target_new, return_tensors="pt").input_ids
    n = len(tok(req.prompt).input_ids)
    with torch.no_grad():
        logp = torch.log_softmax(model(ids).logits[0, n - 1 : -1].float(), -1)
    return logp.gather(1, ids[0, n:, None]).sum().item()


@pytest.mark.parametrize("key", ["subject", "last"])
def test_an_edit_fires_on_its_prompt_and_leaves_far_inputs_bit_identical(tiny_llama, key):
    model, tok = tiny_llama
    base_far = _logits(model, tok, FAR)
    before = [_target_logprob(model, tok, r) for r in REQS]
    base_first = _logits(model, tok, REQS[0].prompt)
    result = make_editor("grace", radius="fixed", eps=1e-3, key=key, steps=100).apply(
        model, tok, REQS
    )
    assert [d["rule"] for d in result.diagnostics] == ["new", "new"]
    after = [_target_logprob(model, tok, r) for r in REQS]
    # a tiny random model is near-uniform: +0.5 nats is most of what one position can add
    assert all(a > b + 0.5 for a, b in zip(after, before, strict=True)), (before, after)
    assert torch.equal(_logits(model, tok, FAR), base_far)
    # replaced at one position only: the subject's last token, or the prompt's last
    seen = []
    module = get_module(model, result.patches[0].module)
    handle = module.register_forward_hook(lambda _m, _a, o: seen.append(o.detach()))
    with torch.no_grad():
        ids = tok([REQS[0].prompt], return_tensors="pt").input_ids
        model(ids)
        with bank_of(model).disabled():
            model(ids)
    handle.remove()
    changed = (seen[0] != seen[1]).any(-1)[0].nonzero().squeeze(1).tolist()
    assert changed == [ids.shape[1] - 1]  # both prompts end with their subject / last token
    result.remove(REQS[0].id)  # exactly that edit undone, the other kept
    assert torch.equal(_logits(model, tok, REQS[0].prompt), base_first)
    assert _target_logprob(model, tok, REQS[1]) == pytest.approx(after[1])
    result.restore()
    assert bank_of(model) is None


def test_an_edit_on_the_same_answer_expands_and_its_removal_restores_the_neighbour(tiny_llama):
    model, tok = tiny_llama
    first = REQS[0]
    again = parse_record(
        {"prompt": "The pancreas produces insulin", "target_new": "liver", "subject": "insulin"},
        "t.json",
        3,
    )
    grace = make_editor("grace", radius="fixed", eps=1e-3, steps=20)
    a = grace.apply(model, tok, [first])
    entry_a = a.patches[0]
    logits_a = _logits(model, tok, first.prompt)
    b = grace.apply(model, tok, [again])
    assert b.diagnostics[0]["rule"] == "expand" and b.patches[0].replaces == (first.id,)
    assert GraceEntry.visible(bank_of(model).patches) == [b.patches[0]]
    b.restore()
    assert GraceEntry.visible(bank_of(model).patches) == [entry_a]
    assert torch.equal(_logits(model, tok, first.prompt), logits_a)
    a.restore()


def test_the_learned_radius_keeps_every_corpus_query_outside(tiny_llama, monkeypatch):
    from medit.editors import grace as grace_module

    model, tok = tiny_llama
    sample = CorpusSample(texts=12, samples_per_prompt=1, new_tokens=8)
    monkeypatch.setattr(grace_module, "CorpusSample", lambda texts: sample)
    result = make_editor("grace", radius="corpus", radius_alpha=0.5, key="last", steps=5).apply(
        model, tok, REQS[:1]
    )
    entry = result.patches[0]
    negatives = corpus_inputs(model, tok, entry.module, sample)
    nearest = min(float((x.float() - entry.key).norm(dim=-1).min()) for x in negatives)
    assert entry.radius == pytest.approx(0.5 * nearest, rel=1e-4)
    arch = get_arch(model)
    assert entry.module == arch.layer_path(round(0.4 * 3), "mlp_out")
    for x in negatives:  # no corpus position opens the gate
        assert not GraceEntry.gates([entry], entry.module, x.float()[None]).any()
