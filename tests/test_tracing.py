import dataclasses
import json
import xml.etree.ElementTree as ET

import pytest
import torch
from click.testing import CliRunner

from medit.cli import main
from medit.core.arch import get_arch
from medit.core.hooks import edited_outputs, put_rows
from medit.core.models import load_model
from medit.facts.requests import EditRequest
from medit.facts.subject import subject_tokens
from medit.tracing import trace as tracing
from medit.tracing.heatmap import trace_svg
from medit.tracing.trace import (
    Trace,
    TraceConfig,
    association_profile,
    trace,
    trace_reference,
    trace_requests,
)

PROMPT, SUBJECT = "The antidote for paracetamol overdose is", "paracetamol"


def _grids(t: Trace) -> dict[str, torch.Tensor]:
    return {k: torch.tensor(v) for k, v in t.scores.items()}


def test_batched_trace_equals_the_reference_loop(tiny):
    model, tok = tiny
    arch = get_arch(model)
    # a small batch budget forces several chunks per token, each with its own first layer
    cfg = TraceConfig(samples=3, window=2, max_batch_tokens=40)
    t = trace(model, tok, arch, PROMPT, SUBJECT, "acetylcysteine", cfg, noise=0.5)
    answer_id = tok(" acetylcysteine").input_ids[0]
    ref = trace_reference(model, tok, arch, PROMPT, SUBJECT, answer_id, cfg, 0.5)
    for kind, grid in _grids(t).items():
        err = (grid - ref[kind]).abs().max().item()
        assert err < 1e-6 * t.clean_prob, kind
        assert grid.max() - grid.min() > 100 * err, kind  # the grids do vary
    start = t.subject_range[0]
    assert start > 0 and torch.all(_grids(t)["hidden"][:start] == t.corrupted_prob)


def test_restorations_that_undo_the_corruption_give_the_clean_probability(tiny):
    model, tok = tiny
    arch = get_arch(model)
    # the subject is the last token: restoring its state at any layer restores everything
    prompt, subject = "Aspirin is used to treat pain", "pain"
    start, end = subject_tokens(tok, prompt, subject)
    assert end == start + 1 == len(tok(prompt).input_ids)
    t = trace(model, tok, arch, prompt, subject, None, TraceConfig(samples=4), noise=1.0)
    hidden = _grids(t)["hidden"]
    assert t.corrupted_prob != pytest.approx(t.clean_prob, rel=1e-3)
    assert hidden[start].tolist() == pytest.approx([t.clean_prob] * 4, rel=1e-4)
    assert torch.all(hidden[:start] == t.corrupted_prob)


def test_fast_mode_is_the_first_order_estimate_of_full_tracing(tiny_llama):
    model, tok = tiny_llama
    model.double()  # the linear regime needs small effects, float64 keeps them exact
    arch = get_arch(model)
    cfg = TraceConfig(samples=4, window=1)
    # small noise: restorations act in the linear regime where the estimate is exact
    full = trace(model, tok, arch, PROMPT, SUBJECT, None, cfg, noise=5e-4)
    fast = trace(
        model, tok, arch, PROMPT, SUBJECT, None, dataclasses.replace(cfg, mode="fast"), noise=5e-4
    )
    assert fast.corrupted_prob == pytest.approx(full.corrupted_prob, rel=1e-5)
    for kind in ("hidden", "mlp", "attn"):
        a, b = full.effects(kind).flatten(), fast.effects(kind).flatten()
        assert torch.corrcoef(torch.stack([a, b]))[0, 1] > 0.99, kind
        assert (a - b).abs().max() < 0.1 * a.abs().max(), kind


def _plant_fact(model, tok, arch, layer: int, facts, steps: int = 300) -> None:
    """Train only one layer's MLP so that each subject's prompt ends with its answer."""
    model.requires_grad_(False)
    with torch.no_grad():  # random embeddings are too small for confident (tied) logits
        arch.embedding(model).weight.mul_(10)
    params = list(arch.module(model, layer, "mlp").parameters())
    for p in params:
        p.requires_grad_(True)
    enc = tok([p for p, _ in facts], return_tensors="pt", padding=True)
    assert enc.attention_mask.all(), "planted prompts must have equal lengths"
    labels = torch.tensor([tok(" " + a).input_ids[0] for _, a in facts])
    opt = torch.optim.Adam(params, lr=5e-3)
    for _ in range(steps):
        logits = model(input_ids=enc.input_ids).logits[:, -1]
        loss = torch.nn.functional.cross_entropy(logits, labels)
        if loss.item() < 0.05:
            break
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.requires_grad_(False)
    assert loss.item() < 0.05


@pytest.mark.parametrize("planted", [1, 2])
def test_mlp_restoration_peaks_at_the_layer_where_a_fact_was_planted(tiny_llama, planted):
    model, tok = tiny_llama
    arch = get_arch(model)
    facts = [
        ("The heart is treated with", "insulin"),
        ("The liver is treated with", "penicillin"),
        ("The skin is treated with", "bacteria"),
    ]
    _plant_fact(model, tok, arch, planted, facts)
    cfg = TraceConfig(samples=8, window=1, kinds=("mlp",))
    for prompt, answer in facts:
        t = trace(model, tok, arch, prompt, prompt.split()[1], None, cfg)
        assert t.answer_token == tok.decode(tok(" " + answer).input_ids[:1])
        assert t.clean_prob > 0.9 and t.clean_prob - t.corrupted_prob > 0.2
        # only that layer's MLP knows the fact: restoring it (at the position where it reads
        # the subject) recovers the answer, restoring any other MLP does not
        best = t.effects("mlp").max(0).values
        assert int(best.argmax()) == planted, best
        assert best[planted] > 0.8 * (t.clean_prob - t.corrupted_prob)
        assert best.sort().values[-2] < 0.1 * best[planted]


def test_trace_round_trips_and_profiles(tiny_llama):
    model, tok = tiny_llama
    t = trace(model, tok, get_arch(model), PROMPT, SUBJECT, None, TraceConfig(samples=2), noise=0.3)
    n_layers = 4
    assert set(t.scores) == {"hidden", "mlp", "attn"}
    assert len(t.scores["mlp"]) == len(t.tokens) and len(t.scores["mlp"][0]) == n_layers
    assert "".join(t.tokens) == PROMPT
    back = Trace.from_dict(json.loads(json.dumps(t.to_dict())))
    assert back == t
    profile = t.profile()
    assert set(profile) == {"hidden", "mlp", "attn"} and len(profile["attn"]) == n_layers
    averaged = association_profile([t, t])
    assert all(averaged[k] == pytest.approx(v) for k, v in profile.items())
    assert set(t.peak_layers().values()) <= set(range(n_layers))


def test_svg_heatmap_is_well_formed_and_escapes_text(tiny_llama):
    model, tok = tiny_llama
    prompt = "Is <aspirin> & warfarin safe? The heart"
    t = trace(
        model, tok, get_arch(model), prompt, "warfarin", None, TraceConfig(samples=2), noise=0.3
    )
    root = ET.fromstring(trace_svg(t))
    assert root.tag.endswith("svg")
    rects = [e for e in root.iter() if e.tag.endswith("rect") and e.find("{*}title") is not None]
    assert len(rects) == 3 * len(t.tokens) * 4


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"kinds": ("mlp", "resid")}, "kinds must be among"),
        ({"mode": "slow"}, "mode must be"),
        ({"samples": 0}, ">= 1"),
        ({"noise": -1.0}, "noise must be > 0"),
    ],
)
def test_bad_settings_are_clear_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        TraceConfig(**kwargs)


def test_edited_outputs_patch_tuple_and_tensor_outputs(tiny):
    model, tok = tiny
    arch = get_arch(model)
    ids = torch.tensor([tok("The heart has four chambers").input_ids] * 2)
    seen = []
    rows, cols = torch.tensor([1]), torch.tensor([2])
    edits = [
        (arch.module(model, 1, kind), lambda t: put_rows(rows, cols, torch.ones(1, t.shape[-1]), t))
        for kind in ("attn", "mlp")
    ]
    edits.append((arch.module(model, 1, "attn"), lambda t: seen.append(t) or t))
    with torch.no_grad(), edited_outputs(edits):
        model(input_ids=ids)
    assert torch.all(seen[0][1, 2] == 1) and not torch.all(seen[0][0, 2] == 1)


def test_trace_requests_caches_on_disk(tiny_model_dir, monkeypatch):
    lm = load_model(str(tiny_model_dir), "cpu")
    reqs = [
        EditRequest(prompt=PROMPT, target_new="acetylcysteine", subject=SUBJECT, id="r:1"),
        EditRequest(prompt="Aspirin is used to treat pain", target_new="fever", id="r:2"),
    ]
    cfg = TraceConfig(samples=2, kinds=("mlp",))
    first = trace_requests(lm, reqs, cfg, answer="target_new", quiet=True)
    assert first[1].subject == "Aspirin"  # detected

    def recompute(*args, **kwargs):
        raise LookupError("not cached")

    monkeypatch.setattr(tracing, "trace", recompute)
    assert trace_requests(lm, reqs, cfg, answer="target_new", quiet=True) == first
    with pytest.raises(LookupError):  # other settings, another key
        trace_requests(lm, reqs, TraceConfig(samples=3, kinds=("mlp",)), "target_new", quiet=True)
    with pytest.raises(ValueError, match="r:1: request has no 'ground_truth'"):
        trace_requests(lm, reqs, cfg, answer="ground_truth", quiet=True)


def _requests_file(tmp_path, records):
    path = tmp_path / "reqs.json"
    path.write_text(json.dumps(records))
    return str(path)


def test_cli_trace_writes_json_and_one_svg_per_prompt(tiny_model_dir, tmp_path):
    reqs = _requests_file(
        tmp_path,
        [
            {"prompt": PROMPT, "target_new": "acetylcysteine", "subject": SUBJECT},
            {"prompt": "Vitamin C deficiency causes", "target_new": "scurvy"},
        ],
    )
    out = tmp_path / "run"
    args = [
        "trace",
        "--model",
        str(tiny_model_dir),
        "--requests",
        reqs,
        "--out",
        str(out),
        "--samples",
        "2",
        "--kinds",
        "hidden,mlp",
        "--device",
        "cpu",
    ]
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 0, res.output
    doc = json.loads((out / "traces.json").read_text())
    assert doc["schema"] == "medit.traces/1" and len(doc["traces"]) == 2
    assert doc["traces"][1]["subject"] == "Vitamin C"
    assert set(doc["association_profile"]) == {"hidden", "mlp"}
    assert doc["provenance"]["model"]["weights_sha256"]
    for item in doc["traces"]:
        ET.parse(out / item["svg"])
    again = CliRunner().invoke(main, args)
    assert (
        again.exit_code == 2
        and "is not empty; choose another directory or pass --overwrite" in again.output
    )


@pytest.mark.parametrize(
    "extra, records, message",
    [
        (["--kinds", "mlp,resid"], None, "kinds must be among"),
        (["--noise", "lots"], None, "--noise must be a number"),
        (
            [],
            [{"prompt": "What is the best treatment for this?", "target_new": "rest"}],
            "no subject found",
        ),
        (["--answer", "ground_truth"], None, "no 'ground_truth'"),
    ],
)
def test_cli_trace_bad_input_exits_2(tiny_model_dir, tmp_path, extra, records, message):
    reqs = _requests_file(tmp_path, records or [{"prompt": PROMPT, "target_new": "x"}])
    args = [
        "trace",
        "--model",
        str(tiny_model_dir),
        "--requests",
        reqs,
        "--out",
        str(tmp_path / "run"),
        *extra,
    ]
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 2 and message in res.output, res.output
    assert not (tmp_path / "run").exists()


def test_subject_only_tracing_gives_the_same_profile(tiny_llama):
    """MedLaSA reads the profile over subject tokens only: running just those cells changes
    nothing it reads."""
    model, tok = tiny_llama
    arch = get_arch(model)
    full = trace(model, tok, arch, PROMPT, SUBJECT, None, TraceConfig(samples=2), noise=0.3)
    part = trace(
        model,
        tok,
        arch,
        PROMPT,
        SUBJECT,
        None,
        TraceConfig(samples=2, subject_only=True),
        noise=0.3,
    )
    for kind, values in full.profile().items():
        assert part.profile()[kind] == pytest.approx(values, abs=1e-6)
    start, end = full.subject_range
    assert end < len(full.tokens)  # there are cells after the subject that were skipped
    assert part.settings["subject_only"] and "subject_only" not in full.settings
