"""The contract every editor passes, run over a table of (method, architecture) cases, plus
method-specific checks."""

import contextlib

import pytest
import torch

from medit.core.arch import get_arch
from medit.editors.patching.bank import bank_of
from medit.editors.registry import METHODS, get_editor_class, make_editor
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


#: per-method settings for tiny random models (see tests/test_locate.py: their near-uniform
#: outputs need values far beyond the norm of their small MLP outputs)
_STRONG = {"clamp_norm_factor": 200.0, "v_weight_decay": 0.0}
TINY = {
    "rome": _STRONG,
    "memit": _STRONG,
    "alphaedit": {**_STRONG, "L2": 1e-4},
    # a codebook radius on the tiny model's scale (its own prompt is at distance ~0)
    "grace": {"radius": "fixed", "eps": 1e-3},
    "tpatcher": {"steps": 100, "memory_texts": 20},
    # a step size on the tiny model's scale (its keys and gradients are small)
    "ultraedit": {"lr": 5e-2},
    # margins, step and box on the tiny model's scale (its MLP outputs are small); a memory per
    # edit: in its 64 x 128 side memory a second edit's training overwrites the first's routing
    "wise": {
        "alpha": 0.05,
        "beta": 1.0,
        "gamma": 0.5,
        "lr": 30.0,
        "norm_constraint": 10.0,
        "shard_size": 1,
        "merge_every": 0,
    },
}
#: editors whose edit is the base model reading the edit in its context (SERAC): a random model
#: does not copy from its context, so their target need not rise on one; tests/test_serac.py
#: checks that in scope the model answers exactly as the base model does after the edit's text
IN_CONTEXT = {"serac"}
#: locate-then-edit methods change one token's state; a random tiny model's attention barely
#: carries it to later positions, so their contract requests end with the subject
SUBJECT_LAST = [
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


def _reqs(method):
    return SUBJECT_LAST if method in TINY else REQS


def _make(method, **overrides):
    return make_editor(method, **{**TINY.get(method, {}), **overrides})


def _logprob(model, tok, req):
    return score_targets(model, tok, get_arch(model), [(req.prompt, req.target_new)])[0].logprob


def _edit_tensors(result) -> dict[str, torch.Tensor]:
    """What an edit produced: the edited weights, or (a codebook, extra neurons) the tensors of
    its patches."""
    if result.mergeable:
        return {k: v.detach().clone() for k, v in result.merged_weights()[0].items()}
    if result.kind == "memory":  # an explicit memory: its entries' tensors
        return {
            f"{i}:{k}": v.detach().clone()
            for i, e in enumerate(result.entries)
            for k, v in vars(e).items()
            if isinstance(v, torch.Tensor)
        }
    return {
        f"{i}:{k}": v.detach().clone()
        for i, p in enumerate(result.patches)
        for k, v in vars(p).items()
        if isinstance(v, torch.Tensor)
    }


def _snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("method", list(METHODS))
class TestEditorContract:
    def test_target_probability_rises_and_model_stays_edited(self, method, tiny):
        if method in IN_CONTEXT:
            pytest.skip("in-context edit: a random model does not copy (see IN_CONTEXT)")
        model, tok = tiny
        reqs = _reqs(method)
        before = [_logprob(model, tok, r) for r in reqs]
        result = _make(method).apply(model, tok, reqs)
        after = [_logprob(model, tok, r) for r in reqs]
        assert all(a > b + 1e-3 for a, b in zip(after, before, strict=True)), (before, after)
        assert result.state == "edited"
        assert all(v["delta_norm"] > 0 for v in result.update_norms().values())
        assert result.update_norms() or not result.mergeable

    def test_restore_is_bit_exact(self, method, tiny):
        model, tok = tiny
        original = _snapshot(model)
        ids = tok([REQS[0].prompt, REQS[1].prompt], return_tensors="pt", padding=True)
        logits = model(**ids).logits
        result = _make(method).apply(model, tok, REQS[:1])
        changed = [k for k, v in model.state_dict().items() if not torch.equal(v, original[k])]
        if result.kind == "modules":  # patches beside the weights, none written
            assert not changed and bank_of(model) is not None
        elif result.kind == "memory":  # entries in a memory beside the weights, none written
            assert not changed and result.memory.entries
        else:
            assert changed and set(changed) <= set(result.names)
        assert not torch.equal(model(**ids).logits, logits)
        result.restore()
        assert result.state == "restored"
        assert all(torch.equal(v, original[k]) for k, v in model.state_dict().items())
        assert torch.equal(model(**ids).logits, logits) and bank_of(model) is None
        assert result.kind != "memory" or not result.memory.entries
        assert all(not p.requires_grad or p.grad is None for p in model.parameters())
        assert not any("lora" in n for n, _ in model.named_modules())  # no peft layer left

    def test_same_seed_same_edit(self, method, tiny):
        model, tok = tiny
        original = _snapshot(model)
        edits = []
        for _ in range(2):
            torch.manual_seed(0)
            result = _make(method).apply(model, tok, REQS[:1])
            edits.append(_edit_tensors(result))
            result.restore()
        assert all(torch.equal(edits[0][k], edits[1][k]) for k in edits[0])
        assert all(torch.equal(v, original[k]) for k, v in model.state_dict().items())

    def test_hparams_round_trip_and_bad_input(self, method, tiny):
        model, tok = tiny
        cls = get_editor_class(method)
        hp = _make(method).hparams_for(model)
        assert cls.hparams_class.from_dict(hp.to_dict()) == hp
        steps = next(
            k for k in ("steps", "v_steps", "iters", "expert_steps", "batch") if k in hp.to_dict()
        )
        typo = steps[:-3] + steps[-2] + steps[-3] + steps[-1]  # "steps" -> "stpes"
        with pytest.raises(ValueError, match=f"did you mean '{steps}'"):
            make_editor(method, **{typo: 3})
        with pytest.raises(ValueError, match="no requests"):
            _make(method).apply(model, tok, [])

    def test_sequential_edits_combine_and_restore_to_the_base(self, method, tiny):
        model, tok = tiny
        original = _snapshot(model)
        ids = tok([REQS[0].prompt], return_tensors="pt")
        logits = model(**ids).logits
        results = [_make(method).apply(model, tok, [r]) for r in REQS]
        combined = type(results[0]).combine(results)
        if combined.mergeable:
            originals = combined.merged_weights()[1]
            assert all(torch.equal(originals[k], original[k]) for k in originals)
        else:
            with pytest.raises(ValueError, match="cannot be (merged|written) into the weights"):
                combined.merged_weights()
        combined.restore()
        assert all(torch.equal(v, original[k]) for k, v in model.state_dict().items())
        assert torch.equal(model(**ids).logits, logits)


def test_unknown_method_suggests_a_name():
    with pytest.raises(ValueError, match="did you mean 'ft-m'"):
        make_editor("ftm")


def test_ft_m_trains_the_first_target_token(tiny_llama):
    model, tok = tiny_llama
    req = parse_record({"prompt": "The heart has four", "target_new": "the"}, "t.json", 1)
    assert len(tok(" the", add_special_tokens=False).input_ids) == 1  # one-token target
    before = _logprob(model, tok, req)
    make_editor("ft-m", lr=5e-3).apply(model, tok, [req])  # masking token 1 would leave no loss
    assert _logprob(model, tok, req) > before + 1.0


def test_ft_l_respects_its_norm_constraint(tiny_llama):
    model, tok = tiny_llama
    result = make_editor("ft-l", norm_constraint=1e-3, lr=1e-2).apply(model, tok, REQS)
    for name, value in result.merged_weights()[0].items():
        assert (value - result.originals[name]).abs().max() <= 1e-3 + 1e-7


def test_layers_out_of_range_is_a_clear_error(tiny_llama):
    model, tok = tiny_llama
    with pytest.raises(ValueError, match=r"layers \[9\] out of range: the model has 4 layers"):
        make_editor("ft-m", layers=[9]).apply(model, tok, REQS)


def test_frozen_prefix_training_equals_full_forward_training(tiny, monkeypatch):
    """The speed-up (run only layers >= L per step) must not change the result."""
    import medit.editors.ft as ft

    model, tok = tiny
    fast = make_editor("ft-m", steps=5).apply(model, tok, REQS)
    fast_w = {k: v.clone() for k, v in fast.merged_weights()[0].items()}
    fast.restore()
    monkeypatch.setattr(ft, "frozen_prefix", lambda *a, **k: contextlib.nullcontext())
    slow = make_editor("ft-m", steps=5).apply(model, tok, REQS)
    for k, v in slow.merged_weights()[0].items():
        assert torch.allclose(v, fast_w[k], atol=1e-6), k
