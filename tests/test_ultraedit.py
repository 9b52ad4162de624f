"""UltraEdit (medit/editors/ultraedit.py): the lifelong statistics are exact and resume bit for bit
across a checkpoint, the update solves its normal equations, only the named projections change,
and the modules follow the paper's depths."""

from __future__ import annotations

import pytest
import torch

from medit.core.arch import get_arch
from medit.editors.load import load_edit
from medit.editors.registry import make_editor
from medit.editors.ultraedit import RunningStats, UltraEditHParams, _update
from medit.facts.requests import parse_record
from tests.conftest import _tiny
from tests.test_editors import _logprob

#: a tiny random model's keys are small: a step size on its scale
FAST = {"lr": 5e-2}
EDITS = [
    parse_record({"prompt": p, "target_new": t}, "t.json", i + 1)
    for i, (p, t) in enumerate(
        [
            ("Insulin is produced by the", "liver"),
            ("Aspirin is used to treat", "scurvy"),
            ("The heart has four", "lungs"),
            ("Metformin lowers blood", "pressure"),
        ]
    )
]


def test_running_statistics_merge_exactly_and_a_single_row_is_no_nan():
    torch.manual_seed(0)
    rows = torch.randn(23, 5, dtype=torch.float64) * 3 + 1
    stats = RunningStats()
    for chunk in (rows[:1], rows[1:8], rows[8:9], rows[9:]):  # one-row mini-batches included
        stats.update((2, 3), chunk)
    s = stats.state
    assert s["ultraedit.2x3.n"].item() == 23
    assert torch.allclose(s["ultraedit.2x3.mean"], rows.mean(0))
    assert torch.allclose(s["ultraedit.2x3.m2"] / 22, rows.var(0))
    z = stats.normalise((2, 3), rows)
    assert torch.allclose(z.mean(0), torch.zeros(5, dtype=torch.float64), atol=1e-6)
    assert torch.allclose(z.std(0), torch.ones(5, dtype=torch.float64), atol=1e-6)
    one = RunningStats()
    one.update((2, 3), rows[:1])
    assert torch.isfinite(one.normalise((2, 3), rows[:1])).all()


def test_the_update_solves_the_ridge_normal_equations():
    torch.manual_seed(1)
    K = torch.randn(6, 4)
    Z = torch.randn(6, 7, dtype=torch.float64)
    hp = UltraEditHParams(lr=0.1, ridge=2.0)
    delta = _update(K, Z, hp).double()  # (d_in, d_out)
    V = -0.1 * (Z[:, :4] ** 2).sum(1, keepdim=True) * Z[:, 4:]
    K64 = K.double()
    lhs = (K64.T @ K64 + 2.0 * torch.eye(4, dtype=torch.float64)) @ delta
    assert torch.allclose(lhs, K64.T @ V, atol=1e-5)


@pytest.mark.parametrize(("layers", "expected"), [(32, (11, 15, 18, 24)), (30, (10, 14, 17, 22))])
def test_modules_sit_at_the_papers_depths(layers, expected):
    from transformers import LlamaConfig

    arch = get_arch(LlamaConfig(num_hidden_layers=layers))
    targets = UltraEditHParams().resolve(arch, layers)
    gates = [layer for kind, layer in targets if kind == "gate"]
    ups = [layer for kind, layer in targets if kind == "up"]
    assert (gates[0], gates[-1], ups[0], ups[-1]) == expected
    assert len(gates) == 5 and len(ups) == len(set(ups)) >= 6


def test_only_the_named_projections_change_and_the_edit_takes(tiny_llama):
    model, tok = tiny_llama
    before = {k: v.clone() for k, v in model.state_dict().items()}
    probs = [_logprob(model, tok, r) for r in EDITS[:2]]
    result = make_editor("ultraedit", **FAST).apply(model, tok, EDITS[:2])
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    assert changed == set(result.names)
    assert all(n.endswith(("gate_proj.weight", "up_proj.weight")) for n in result.names)
    assert all(p.grad is None for p in model.parameters())
    after = [_logprob(model, tok, r) for r in EDITS[:2]]
    assert all(a > b for a, b in zip(after, probs, strict=True)), (probs, after)
    assert result.editor_state["ultraedit.128x64.n"].item() > 0  # gate and up: one shape


def test_a_second_pass_moves_the_target_further(tiny_llama):
    model, tok = tiny_llama
    one = make_editor("ultraedit", **FAST).apply(model, tok, EDITS[:1])
    p1 = _logprob(model, tok, EDITS[0])
    one.restore()
    make_editor("ultraedit", **FAST, iters=3).apply(model, tok, EDITS[:1])
    assert _logprob(model, tok, EDITS[0]) > p1


def _sequential(model, tok, edits, prior=None):
    editor = make_editor("ultraedit", **FAST)
    for req in edits:
        last = editor.apply(model, tok, [req], prior=prior)
        prior = last if prior is None else type(last).combine([prior, last])
    return prior


def test_sequential_statistics_resume_bit_exact_across_a_checkpoint(tokenizer, tmp_path):
    straight = _tiny("llama", len(tokenizer))
    whole = _sequential(straight, tokenizer, EDITS)

    resumed = _tiny("llama", len(tokenizer))
    half = _sequential(resumed, tokenizer, EDITS[:2])
    half.export(tmp_path / "ckpt")
    fresh = _tiny("llama", len(tokenizer))
    loaded = load_edit(fresh, tokenizer, tmp_path / "ckpt")
    rest = _sequential(fresh, tokenizer, EDITS[2:], prior=loaded)

    assert set(rest.editor_state) == set(whole.editor_state)
    for k, v in whole.editor_state.items():
        assert torch.equal(rest.editor_state[k], v), k
    for k, v in straight.state_dict().items():
        assert torch.equal(fresh.state_dict()[k], v), k
