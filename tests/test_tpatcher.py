"""Transformer-Patcher (medit/editors/tpatcher.py): only the new neurons train, a patch that
does not fire leaves the output bit-identical, and removing one edit keeps the others."""

from __future__ import annotations

import pytest
import torch

from medit.editors.patching.bank import bank_of
from medit.editors.patching.negatives import CorpusSample, corpus_inputs
from medit.editors.registry import make_editor
from medit.editors.tpatcher import Neurons
from tests.test_grace import FAR, REQS, _logits, _target_logprob

FAST = {"steps": 100, "memory_texts": 20}


def test_a_neuron_adds_nothing_where_its_pre_activation_is_not_positive():
    keys = torch.tensor([[1.0, 0.0]])
    p = Neurons("e", "m", keys, torch.tensor([-0.5]), None, torch.tensor([[2.0, 3.0]]), None)
    p.act_fn = torch.nn.functional.gelu
    x = torch.tensor([[[0.4, 9.0], [0.6, 0.0]]])  # s = -0.1 (shut), 0.1 (open)
    assert p.gate("m", x).tolist() == [[0.0, 1.0]]
    out = torch.randn(1, 2, 2)
    new = Neurons.act([p], "m", x, out, p.gate("m", x))
    assert torch.equal(new[0, 0], out[0, 0])  # bit for bit
    expected = out[0, 1] + torch.nn.functional.gelu(torch.tensor(0.1)) * torch.tensor([2.0, 3.0])
    assert torch.allclose(new[0, 1], expected)


def test_only_the_neurons_train_and_the_shapes_follow_the_mlp(tiny):
    model, tok = tiny
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = make_editor("tpatcher", **FAST).apply(model, tok, REQS)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())
    gated = type(model).__name__.startswith("Llama")
    for patch, info in zip(result.patches, result.diagnostics, strict=True):
        n = info["neurons"]
        assert 1 <= n <= 5 and patch.keys.shape == (n, 64) and patch.values.shape == (n, 64)
        assert (patch.ups is not None) == gated  # SwiGLU: a gate row and an up row per neuron
        assert patch.values.abs().sum() > 0  # trained from 0
        assert patch.memory.dtype == torch.float16 and len(patch.memory) > 1


def test_a_patch_fires_on_its_edit_stays_shut_on_memory_and_removes_exactly(tiny_llama):
    model, tok = tiny_llama
    base_far = _logits(model, tok, FAR)
    base_first = _logits(model, tok, REQS[0].prompt)
    before = [_target_logprob(model, tok, r) for r in REQS]
    result = make_editor("tpatcher", **FAST).apply(model, tok, REQS)
    assert all(d["converged"] for d in result.diagnostics), result.diagnostics
    after = [_target_logprob(model, tok, r) for r in REQS]
    assert all(a > b + 1.0 for a, b in zip(after, before, strict=True)), (before, after)
    first, second = result.patches
    assert (first.pre(first.memory.float()).max(0).values > 0).all()  # fires on its positions
    negatives = corpus_inputs(model, tok, first.module, CorpusSample(texts=20))
    for patch in result.patches:  # trained silent on the memory: the corpus ...
        assert all(not patch.gate(patch.module, x.float()).any() for x in negatives)
    assert not second.gate(second.module, first.memory.float()).any()  # ... and earlier edits
    assert torch.equal(_logits(model, tok, FAR), base_far)  # an unrelated input: shut
    result.remove(REQS[0].id)
    assert torch.equal(_logits(model, tok, REQS[0].prompt), base_first)
    assert _target_logprob(model, tok, REQS[1]) == pytest.approx(after[1])
    result.restore()
    assert bank_of(model) is None and torch.equal(_logits(model, tok, FAR), base_far)
