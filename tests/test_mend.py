"""MEND on tiny random models: training lowers the post-edit NLL of held-out edits, an edit
touches only its configured weights and restores bit for bit, a checkpoint round-trips (and a
resumed training continues identically), a checkpoint of other base weights is refused, and the
untrained editor is exactly a gradient step."""

from __future__ import annotations

import pytest
import torch

from medit.core.arch import get_arch
from medit.core.errors import UserError
from medit.core.forward import target_nll
from medit.editors.learned import load_checkpoint, save_checkpoint
from medit.editors.mend import MEND, _batch
from medit.editors.registry import make_editor
from medit.evaluation import score_targets
from medit.facts.requests import parse_record
from tests.conftest import _tiny

FACTS = [
    ("The hormone insulin is produced by the", "Insulin is made in the", "liver"),
    ("Aspirin is used to treat", "Aspirin treats", "scurvy"),
    ("Metformin is a treatment for", "Metformin treats", "fever"),
    ("The heart has four", "The heart contains four", "kidneys"),
    ("Vitamin C deficiency causes", "Lack of vitamin C causes", "diabetes"),
    ("The antidote for paracetamol overdose is", "Paracetamol overdose is treated with", "insulin"),
    ("Penicillin is an antibiotic that kills", "Penicillin kills", "the skin"),
    ("The largest organ of the human body is the", "The body's largest organ is the", "heart"),
    ("The liver produces", "Bile is made by the", "pain"),
    ("The kidney filters", "Blood is filtered by the", "bacteria"),
]
LOCALITY = {"nearby": [["The heart has four", "chambers"], ["Water boils at", "100"]]}
REQS = [
    parse_record(
        {"prompt": p, "target_new": t, "rephrase_prompts": [para], "locality": LOCALITY},
        "t.json",
        i,
    )
    for i, (p, para, t) in enumerate(FACTS, 1)
]
TRAIN, VALID = REQS[:7], REQS[7:]


def _trainer(model, tok, **overrides):
    hp = MEND(**overrides).hparams_for(model)
    trainer = MEND.trainer(model, tok, hp)
    trainer.prepare(TRAIN)
    return trainer


def _train(trainer, steps: int, start: int = 0) -> list[dict]:
    """``steps`` steps on the training edits, in a fixed order (step k's batch depends on k)."""
    logs = []
    for k in range(start, start + steps):
        n = trainer.batch_size
        logs.append(trainer.step([TRAIN[(k * n + j) % len(TRAIN)] for j in range(n)]))
    return logs


def _snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _logprob(model, tok, req):
    return score_targets(model, tok, get_arch(model), [(req.prompt, req.target_new)])[0].logprob


def _save(trainer, model, directory):
    tensors, config = trainer.state()
    return save_checkpoint(directory, "mend", model, tensors, config, step=trainer.steps)


def test_training_lowers_the_post_edit_nll_of_held_out_edits(tiny_llama):
    model, tok = tiny_llama
    trainer = _trainer(model, tok, lr=1e-3, accumulate=2)
    before = trainer.validate(VALID)
    assert {"edit_success", "locality", "edit_nll", "score"} <= set(before)
    assert trainer.monitor in before and trainer.higher_is_better
    # the untrained editor (no statistics, rate 1e-4 on raw gradients) barely moves the model
    assert before["edit_nll"] == pytest.approx(before["pre_edit_nll"], abs=0.05)
    logs = _train(trainer, 20)
    assert all(torch.isfinite(torch.tensor(log["loss"])) for log in logs)
    after = trainer.validate(VALID)
    assert after["edit_nll"] < before["edit_nll"] - 0.3, (before, after)
    assert after["pre_edit_nll"] == before["pre_edit_nll"]  # the base model is untouched
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("default", [True, False])
def test_an_edit_changes_only_its_weights_and_restores_bit_exact(tiny, default):
    model, tok = tiny
    arch = get_arch(model)
    original = _snapshot(model)
    overrides = {} if default else {"layers": [1], "kinds": ["down"]}
    result = make_editor("mend", **overrides).apply(model, tok, REQS[:2])
    if default:  # the MLP weights of the last three layers
        kinds = arch.resolve_kinds(("gate", "up", "down"))
        expected = {arch.weight_name(layer, k) for layer in (1, 2, 3) for k in kinds}
    else:
        expected = {arch.weight_name(1, arch.resolve_kinds(("down",))[0])}
    assert set(result.names) == expected
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, original[k])}
    assert changed == expected
    info = result.diagnostics[0]
    assert info["trained"] is False and set(info["update_norms"]) == expected
    assert all(v > 0 for v in info["update_norms"].values())
    result.restore()
    assert all(torch.equal(v, original[k]) for k, v in model.state_dict().items())


def test_the_untrained_editor_is_one_gradient_step_and_raises_the_target(tiny):
    model, tok = tiny
    arch = get_arch(model)
    req = REQS[0]
    name = arch.weight_name(2, arch.resolve_kinds(("down",))[0])
    # the gradient of the target's NLL, by autograd on the weight itself
    weight = dict(model.named_parameters())[name]
    batch = _batch(tok, [(req.prompt, req.target_new)], 64)
    grad = torch.autograd.grad(target_nll(model, arch, batch), weight)[0]
    before = _logprob(model, tok, req)
    result = make_editor("mend", layers=[2], kinds=["down"], untrained_lr=0.05).apply(
        model, tok, [req]
    )
    change = weight.detach() - result.originals[name]
    assert torch.allclose(change, -0.05 * grad, atol=1e-7, rtol=1e-4)
    assert _logprob(model, tok, req) > before + 1e-3
    info = result.diagnostics[0]
    assert info["edit_loss_after"] < info["edit_loss_before"]


def test_checkpoint_round_trip_gives_identical_edits_and_resumes_identically(tiny_llama, tmp_path):
    model, tok = tiny_llama
    trainer = _trainer(model, tok, lr=1e-3, accumulate=2)
    _train(trainer, 3)
    _save(trainer, model, tmp_path / "a")
    continued = _train(trainer, 2, start=3)

    # a resumed trainer: same state, and the next steps are the same
    config, tensors = load_checkpoint(tmp_path / "a", "mend", model)
    resumed = _trainer(model, tok, lr=1e-3, accumulate=2)
    resumed.load_state(tensors, config)
    assert resumed.steps == 3
    _save(resumed, model, tmp_path / "b")
    again = _train(resumed, 2, start=3)
    assert again == continued
    mine, theirs = trainer.state()[0], resumed.state()[0]
    assert mine.keys() == theirs.keys()
    assert all(torch.equal(mine[k], theirs[k]) for k in mine)

    # editing with the saved state and with the reloaded-and-saved state: the same weights
    original = _snapshot(model)
    edits = []
    for directory in ("a", "b"):
        result = make_editor("mend", checkpoint=str(tmp_path / directory)).apply(
            model, tok, VALID[:1]
        )
        assert result.diagnostics[0]["trained"] is True
        edits.append({k: v.clone() for k, v in result.edited_tensors().items()})
        result.restore()
    assert edits[0].keys() == edits[1].keys()
    assert all(torch.equal(edits[0][k], edits[1][k]) for k in edits[0])
    assert any(not torch.equal(edits[0][k], original[k]) for k in edits[0])
    assert all(torch.equal(v, original[k]) for k, v in model.state_dict().items())


def test_the_edit_training_sees_is_the_edit_apply_writes(tiny, tmp_path):
    """Training adds the change through hooks without writing weights; apply writes it (in
    GPT-2's transposed layout too): the post-edit paraphrase NLL is the same either way."""
    model, tok = tiny
    arch = get_arch(model)
    trainer = _trainer(model, tok, lr=1e-3, accumulate=2)
    _train(trainer, 3)
    _save(trainer, model, tmp_path)
    req = VALID[0]
    with torch.no_grad():
        hooked = trainer._run([req], 0, train=False)["nll"].item()
    result = make_editor("mend", checkpoint=str(tmp_path)).apply(model, tok, [req])
    para = _batch(tok, [(req.rephrase_prompts[0], req.target_new)], 64)
    with torch.no_grad():
        written = target_nll(model, arch, para).item()
    assert written == pytest.approx(hooked, abs=1e-4)
    assert abs(written - result.diagnostics[0]["edit_loss_before"]) > 1e-3  # an edit happened


def test_a_checkpoint_for_other_base_weights_is_refused(tiny_llama, tokenizer, tmp_path):
    model, tok = tiny_llama
    trainer = _trainer(model, tok, accumulate=1)
    _train(trainer, 1)
    _save(trainer, model, tmp_path / "ckpt")
    other = _tiny("llama", len(tokenizer), seed=1)  # same architecture, other weights
    original = _snapshot(other)
    with pytest.raises(UserError, match="trained for other base weights"):
        make_editor("mend", checkpoint=str(tmp_path / "ckpt")).apply(other, tok, VALID[:1])
    assert all(torch.equal(v, original[k]) for k, v in other.state_dict().items())
    # other edited weights than it was trained for: refused too, naming them
    with pytest.raises(UserError, match=r"edits layers \[1, 2, 3\]"):
        make_editor("mend", checkpoint=str(tmp_path / "ckpt"), layers=[0]).apply(
            model, tok, VALID[:1]
        )


def test_a_diverged_training_step_fails_loudly(tiny_llama):
    model, tok = tiny_llama
    trainer = _trainer(model, tok, accumulate=1)
    with torch.no_grad():
        trainer.nets.edit_lrs.fill_(float("nan"))
    with pytest.raises(UserError, match="diverged"):
        _train(trainer, 1)


def test_the_paper_preset_pins_the_paper_values(tiny_llama):
    model, _ = tiny_llama
    hp = make_editor("mend", preset="paper").hparams_for(model)
    assert (hp.lr, hp.lr_lr, hp.edit_lr_init, hp.c_edit, hp.c_loc) == (1e-6, 1e-4, 1e-4, 0.1, 1.0)
    assert (hp.rank, hp.accumulate, hp.grad_clip) == (1920, 10, 100.0)
