"""The edit contract (medit.editors.results) over every registered editor and the test patch
(tests/editors/codebook.py) and the test memory (tests/editors/lookup.py), each one file plus
one registry line: export -> load onto a fresh base
gives identical logits (MedLaSA in every routing mode), restore and remove are bit-exact,
sequential edits combine, and a plain ``model.generate`` decodes what medit's decoder does."""

from __future__ import annotations

import pytest
import torch

from medit.core.arch import get_arch
from medit.core.cache import base_weights_sha256
from medit.editors import registry
from medit.editors.load import load_edit
from medit.editors.patching.bank import bank_of
from medit.evaluation import generate_ids
from tests.conftest import _tiny
from tests.test_editors import REQS, _make, _reqs

CASES = [(m, {}) for m in registry.METHODS] + [
    ("medlasa", {"routing": "oracle"}),
    ("medlasa", {"routing": "always"}),
    ("wise", {"routing_fn": "silu"}),  # decides on the module's own output too
    ("codebook", {}),
    ("lookup", {}),
]
IDS = [m + "".join(f"-{v}" for v in hp.values()) for m, hp in CASES]
PROBES = ["The hormone insulin is produced by the", "Aspirin is used to treat", "Water boils at"]


@pytest.fixture(autouse=True)
def _test_editors_registered(monkeypatch):
    monkeypatch.setitem(registry.METHODS, "codebook", "tests.editors.codebook:Codebook")
    monkeypatch.setitem(registry.METHODS, "lookup", "tests.editors.lookup:Lookup")


def _logits(model, tok, prompts=PROBES):
    out = []
    with torch.no_grad():
        for p in prompts:  # one at a time: no padding, every routing sees its own prompt
            out.append(model(**tok([p], return_tensors="pt")).logits)
    return out


def _equal(a, b) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


@pytest.mark.parametrize(("method", "hp"), CASES, ids=IDS)
@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_export_then_load_on_a_fresh_base_gives_identical_logits(
    kind, method, hp, tokenizer, tmp_path
):
    model, tok = _tiny(kind, len(tokenizer)), tokenizer
    result = _make(method, **hp).apply(model, tok, _reqs(method))
    edited = _logits(model, tok)
    result.export(tmp_path, base_weights_sha256=base_weights_sha256(model))
    fresh = _tiny(kind, len(tokenizer))
    base = _logits(fresh, tok)
    loaded = load_edit(fresh, tok, tmp_path)
    assert loaded.kind == result.kind and loaded.edit_ids == result.edit_ids
    assert _equal(_logits(fresh, tok), edited)
    loaded.restore()
    assert _equal(_logits(fresh, tok), base) and bank_of(fresh) is None


@pytest.mark.parametrize(("method", "hp"), CASES, ids=IDS)
def test_remove_one_edit_keeps_the_others_and_restore_is_bit_exact(method, hp, tiny):
    model, tok = tiny
    base_state = {k: v.clone() for k, v in model.state_dict().items()}
    base = _logits(model, tok)
    first, second = _reqs(method)
    a = _make(method, **hp).apply(model, tok, [first])
    only_a = _logits(model, tok)
    b = _make(method, **hp).apply(model, tok, [second], prior=a)
    both = type(a).combine([a, b])
    assert both.edit_ids == [first.id, second.id]
    if both.kind == "weights":  # shared weights: one of several cannot come out alone
        with pytest.raises(ValueError, match="cannot be removed alone"):
            both.remove(first.id)
    else:
        both.remove(second.id)
        assert _equal(_logits(model, tok), only_a)  # exactly the first edit's behaviour
        assert both.edit_ids == [first.id]
    both.restore()
    assert all(torch.equal(v, base_state[k]) for k, v in model.state_dict().items())
    assert _equal(_logits(model, tok), base) and bank_of(model) is None


@pytest.mark.parametrize(("method", "hp"), CASES, ids=IDS)
def test_plain_generate_decodes_what_medits_decoder_does(method, hp, tiny_llama):
    model, tok = tiny_llama
    _make(method, **hp).apply(model, tok, _reqs(method))
    prompts = [r.prompt for r in _reqs(method)] + [PROBES[2]]
    ours = generate_ids(model, tok, prompts, max_new_tokens=6)
    for prompt, row in zip(prompts, ours, strict=True):
        enc = tok([prompt], return_tensors="pt")
        out = model.generate(**enc, max_new_tokens=6, do_sample=False, pad_token_id=0)
        theirs = out[0, enc["input_ids"].shape[1] :].tolist()
        stop = next((i for i, t in enumerate(theirs) if t == 0), len(theirs))
        assert theirs[:stop] == row[:stop], (method, prompt)


def test_the_test_patch_leaves_far_inputs_bit_identical_and_edits_its_prompt(tiny_llama):
    model, tok = tiny_llama
    base = _logits(model, tok)
    req = REQS[0]
    result = _make("codebook").apply(model, tok, [req])
    after = _logits(model, tok)
    assert _equal(after[1:], base[1:])  # other prompts: the base model, bit for bit
    target = tok(" " + req.target_new, add_special_tokens=False).input_ids[0]
    lp = [torch.log_softmax(x[0, -1], -1)[target] for x in (base[0], after[0])]
    assert lp[1] > lp[0] + 1.0
    result.restore()
    assert _equal(_logits(model, tok), base)


def test_the_test_memory_answers_its_prompt_and_leaves_the_model_as_it_was(tiny_llama):
    model, tok = tiny_llama
    base = _logits(model, tok)
    base_model, head = get_arch(model).base_model(model), model.get_output_embeddings()
    hooks = (len(base_model._forward_pre_hooks), len(head._forward_hooks))
    req = REQS[0]
    result = _make("lookup").apply(model, tok, [req])
    assert result.kind == "memory"
    prompt_row = _logits(model, tok, [req.prompt])[0]
    target = tok(" " + req.target_new, add_special_tokens=False).input_ids[0]
    assert int(prompt_row[0, -1].argmax()) == target
    assert PROBES[0] == req.prompt
    assert _equal(_logits(model, tok)[1:], base[1:])  # other prompts: the base model, bit for bit
    with pytest.raises(ValueError, match="cannot be written into the weights"):
        result.merged_weights()
    result.restore()
    after = (len(base_model._forward_pre_hooks), len(head._forward_hooks))
    assert after == hooks and not hasattr(model, "_medit_test_memory")
    assert _equal(_logits(model, tok), base)
