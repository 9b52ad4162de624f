"""SERAC (medit.editors.serac) and the training loop of learned editors (medit.train), on tiny
random models: in scope the model answers exactly as the base model does after the edit's text,
out of scope bit for bit as the base model; removal; the scope classifier's training, its
checkpoint (refused for other weights) and a resumed training run."""

from __future__ import annotations

import json

import pytest
import torch

from medit.core.errors import UserError
from medit.editors.learned import load_checkpoint, save_checkpoint
from medit.editors.registry import make_editor
from medit.editors.serac import SERAC, SERACHParams
from medit.facts.requests import parse_record
from medit.train import TrainConfig, train_editor
from tests.conftest import _tiny

DRUGS = ["aspirin", "insulin", "heparin", "warfarin", "morphine", "penicillin", "atropine"]
DRUGS += ["digoxin", "lithium", "codeine", "ibuprofen", "naloxone"]
OTHER = "The capital of France is"


def _req(i: int, drug: str):
    other = DRUGS[(i + 1) % len(DRUGS)]
    return parse_record(
        {
            "prompt": f"The drug {drug} is used to treat",
            "target_new": "gout",
            "rephrase_prompt": f"{drug} is a drug given to treat",
            "locality_target_prompt": f"The drug {other} is used to treat",
            "locality_target_ground_truth": "pain",
            "locality_mapping_prompt": f"The weather in {drug} city is",
            "locality_mapping_ground_truth": "fine",
        },
        "t.json",
        i + 1,
    )


REQS = [_req(i, d) for i, d in enumerate(DRUGS)]


def _last_logits(model, tok, text):
    with torch.no_grad():
        return model(**tok([text], return_tensors="pt")).logits[0, -1]


def test_in_scope_the_model_answers_as_the_base_model_after_the_edit_text(tiny, tokenizer):
    model, tok = tiny
    req = REQS[0]
    context = SERACHParams().context.format(prompt=req.prompt, target="gout")
    expected = _last_logits(model, tok, context + req.prompt)
    far = _last_logits(model, tok, OTHER)
    result = make_editor("serac").apply(model, tok, [req])
    got = _last_logits(model, tok, req.prompt)
    assert torch.allclose(got, expected, atol=1e-4), (got - expected).abs().max()
    assert not torch.allclose(got, _last_logits(model.__class__(model.config), tok, req.prompt))
    assert torch.equal(_last_logits(model, tok, OTHER), far)  # out of scope: bit for bit
    # generation decodes the counterfactual's continuation, step after step on the KV cache
    ids = tok([req.prompt], return_tensors="pt")
    out = model.generate(**ids, max_new_tokens=4, do_sample=False, pad_token_id=tok.eos_token_id)
    result.restore()
    ctx = tok([context + req.prompt], return_tensors="pt")
    ref = model.generate(**ctx, max_new_tokens=4, do_sample=False, pad_token_id=tok.eos_token_id)
    assert out[0, ids.input_ids.shape[1] :].tolist() == ref[0, ctx.input_ids.shape[1] :].tolist()


def test_batched_rows_are_routed_each_on_its_own(tiny_llama):
    model, tok = tiny_llama
    texts = [REQS[0].prompt, OTHER, REQS[1].prompt]
    tok.padding_side = "left"
    enc = tok(texts, return_tensors="pt", padding=True)
    with torch.no_grad():
        base = model(**enc).logits[:, -1]
    make_editor("serac").apply(model, tok, REQS[:2])
    with torch.no_grad():
        edited = model(**enc).logits[:, -1]
    for i, t in enumerate(texts):
        alone = _last_logits(model, tok, t)
        assert torch.allclose(edited[i], alone, atol=1e-4)
    assert torch.equal(edited[1], base[1])  # the row out of scope is untouched in the batch
    assert not torch.allclose(edited[0], base[0])


@pytest.mark.parametrize("beams", [1, 2])
def test_batched_decoding_on_the_counterfactual_cache_equals_the_context_run(tiny_llama, beams):
    """Rows of different lengths decoded together (greedy, and beam search, which reorders and
    duplicates rows): each in-scope row continues as the base model does after its edit's text
    (the counterfactual decodes on a KV cache of its own per row), the row out of scope as the
    base model."""
    model, tok = tiny_llama
    tok.padding_side = "left"
    reqs = [REQS[0], REQS[3]]
    texts = [reqs[0].prompt, OTHER, "Tell me: " + reqs[1].prompt]
    gen = dict(max_new_tokens=5, do_sample=False, num_beams=beams, pad_token_id=tok.eos_token_id)

    def continuations(inputs):
        """Per input: its continuation and (greedy) the logits of every decoding step."""
        enc = tok(inputs, return_tensors="pt", padding=True)
        out = model.generate(**enc, **gen, output_logits=True, return_dict_in_generate=True)
        steps = torch.stack(out.logits, 1) if beams == 1 else None
        return [
            (tok.decode(o[enc.input_ids.shape[1] :]), None if steps is None else steps[i])
            for i, o in enumerate(out.sequences)
        ]

    def same(a, b):
        close = a[1] is None or torch.allclose(a[1], b[1], atol=1e-4)
        return a[0] == b[0] and close

    context = SERACHParams().context
    alone = [
        continuations([context.format(prompt=reqs[0].prompt, target="gout") + texts[0]])[0],
        continuations([OTHER])[0],
    ]
    result = make_editor("serac").apply(model, tok, reqs)
    routed = [_scope_of(model, t) for t in texts]
    got = continuations(texts)
    result.restore()
    assert routed[1] is None and routed[0] == reqs[0].id
    assert same(got[0], alone[0]) and same(got[1], alone[1])
    if routed[2] is not None:  # the prefixed prompt is in scope of its edit: its own context
        third = context.format(prompt=reqs[1].prompt, target="gout") + texts[2]
        assert same(got[2], continuations([third])[0])


def _scope_of(model, text):
    """The edit id the memory retrieves for ``text`` (None: out of scope)."""
    memory = model._medit_serac_memory
    tok = memory.tok
    with torch.no_grad():
        model(**tok([text], return_tensors="pt"))
    entry = memory._seq.entries[0]
    return None if entry is None else entry.edit_id


def test_removing_an_entry_restores_the_base_answer_for_it_only(tiny_llama):
    model, tok = tiny_llama
    a, b = REQS[0], REQS[1]
    base_a = _last_logits(model, tok, a.prompt)
    result = make_editor("serac").apply(model, tok, [a, b])
    with_b = _last_logits(model, tok, b.prompt)
    result.remove(a.id)
    assert torch.equal(_last_logits(model, tok, a.prompt), base_a)
    assert torch.equal(_last_logits(model, tok, b.prompt), with_b)
    result.restore()
    assert not hasattr(model, "_medit_serac_memory")


def _train(tmp_path, model, tok, steps=6, resume=False, eval_every=3, **hp):
    cfg = TrainConfig(
        "serac",
        {"dim": 16, "batch": 4, "lr": 1e-2, **hp},
        steps=steps,
        eval_every=eval_every,
        resume=resume,
        quiet=True,
    )
    return train_editor(cfg, model, tok, REQS[:8], REQS[8:], tmp_path / "run")


def test_training_lowers_the_scope_loss_and_separates_held_out_edits(tiny_llama, tmp_path):
    model, tok = tiny_llama
    trainer = SERAC.trainer(model, tok, SERACHParams(dim=64, batch=8, lr=1e-3))
    trainer.prepare(REQS[:8])
    held_out = REQS[8:]
    with torch.no_grad():
        before = trainer.loss(held_out).item(), trainer.validate(REQS[:8])["score"]
    losses = [trainer.step(REQS[:8])["loss"] for _ in range(25)]
    with torch.no_grad():
        mid = trainer.loss(held_out).item()
    losses += [trainer.step(REQS[:8])["loss"] for _ in range(125)]
    assert losses[-1] < 0.5 * losses[0]
    # held-out edits: the scope loss falls (on 8 training edits of a random model it then
    # overfits: validation and early stopping are there for that)
    assert mid < 0.7 * before[0]
    # the training edits' paraphrases and probes separate
    assert trainer.validate(REQS[:8])["score"] > before[1] + 0.2


def test_a_resumed_training_continues_from_its_step(tiny_llama, tmp_path):
    model, tok = tiny_llama
    full = _train(tmp_path / "a", model, tok, steps=6)
    _train(tmp_path / "b", model, tok, steps=3)
    resumed = _train(tmp_path / "b", model, tok, steps=6, resume=True)
    assert [r["step"] for r in resumed["train"]] == [1, 2, 3, 4, 5, 6]
    assert [r["loss"] for r in resumed["train"]] == pytest.approx(
        [r["loss"] for r in full["train"]]
    )
    _, ta = load_checkpoint(tmp_path / "a" / "run" / "checkpoint", "serac", model)
    _, tb = load_checkpoint(tmp_path / "b" / "run" / "checkpoint", "serac", model)
    assert all(torch.equal(ta[k], tb[k]) for k in ta)
    log = (tmp_path / "b" / "run" / "train_log.jsonl").read_text().splitlines()
    assert sum("valid" in json.loads(x) for x in log) == 2  # at steps 3 and 6, once each
    with pytest.raises(UserError, match="not empty; pass --resume"):
        _train(tmp_path / "b", model, tok, steps=6)
    with pytest.raises(UserError, match="other settings"):
        _train(tmp_path / "b", model, tok, steps=6, resume=True, dim=8)


def test_an_edit_loads_the_trained_checkpoint_and_refuses_other_weights(
    tiny_llama, tokenizer, tmp_path
):
    model, tok = tiny_llama
    _train(tmp_path, model, tok, steps=3)
    run = tmp_path / "run"
    config, _ = load_checkpoint(run, "serac", model)
    result = make_editor("serac", checkpoint=str(run)).apply(model, tok, REQS[:1])
    assert result.memory.threshold == config["threshold"]
    assert result.memory.scope.proj.shape == (model.config.hidden_size, 16)
    result.restore()
    again = make_editor("serac", checkpoint=str(run)).apply(model, tok, REQS[:1])
    assert again.memory.scope is result.memory.scope  # read once, not at every edit
    again.restore()
    _train(tmp_path, model, tok, steps=6, resume=True)  # the checkpoint is rewritten: read again
    third = make_editor("serac", checkpoint=str(run)).apply(model, tok, REQS[:1])
    assert third.memory.scope is not result.memory.scope
    third.restore()
    other = _tiny("llama", len(tokenizer), seed=1)
    with pytest.raises(UserError, match="trained for other base weights"):
        make_editor("serac", checkpoint=str(run)).apply(other, tok, REQS[:1])
    with pytest.raises(UserError, match="not of 'serac'"):
        save_checkpoint(tmp_path / "m", "mend", model, {"x": torch.zeros(1)}, {})
        load_checkpoint(tmp_path / "m", "serac", model)
    with pytest.raises(UserError, match="no serac editor checkpoint"):
        make_editor("serac", checkpoint=str(tmp_path / "nowhere")).apply(model, tok, REQS[:1])


def _write(path, reqs):
    rows = []
    for r in reqs:
        row = {
            "prompt": r.prompt,
            "target_new": r.target_new,
            "rephrase_prompt": r.rephrase_prompts[0],
        }
        for name, p, a in r.locality_probes():
            row[f"locality_{name}_prompt"], row[f"locality_{name}_ground_truth"] = p, a
        rows.append(row)
    path.write_text(json.dumps(rows))
    return path


def test_train_editor_cli_trains_reports_and_the_edit_uses_it(tiny_model_dir, tmp_path):
    from click.testing import CliRunner

    from medit.cli import main

    data = tmp_path / "data"
    data.mkdir()
    _write(data / "train.json", REQS[:8])
    _write(data / "valid.json", REQS[8:])
    out = tmp_path / "serac"
    args = ["-q", "train-editor", "serac", "--model", str(tiny_model_dir), "--data", str(data)]
    args += ["--out", str(out), "--steps", "4", "--eval-every", "2", "--hparam", "dim=16"]
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 0, res.output
    assert res.output.strip().endswith("best")
    results = json.loads((out / "results.json").read_text())
    assert results["steps"] == 4 and [v["step"] for v in results["valid"]] == [2, 4]
    html = (out / "report.html").read_text()
    assert "Training a serac editor" in html and "<svg" in html
    res = CliRunner().invoke(main, args)  # the same --out again, without --resume
    assert res.exit_code == 2 and "pass --resume" in res.output
    res = CliRunner().invoke(main, [*args[:-4], "--steps", "6", "--resume", "--hparam", "dim=16"])
    assert res.exit_code == 0, res.output
    assert json.loads((out / "results.json").read_text())["steps"] == 6
    run = tmp_path / "edit"
    res = CliRunner().invoke(
        main,
        [
            "-q",
            "edit",
            "--model",
            str(tiny_model_dir),
            "--method",
            "serac",
            "--requests",
            str(data / "valid.json"),
            "--out",
            str(run),
            "--hparam",
            f"checkpoint={out}",
            "--no-generation",
            "--mode",
            "sequential",
        ],
    )
    assert res.exit_code == 0, res.output
    manifest = json.loads((run / "artifact" / "manifest.json").read_text())
    assert manifest["kind"] == "memory" and len(manifest["edits"]) == len(REQS[8:])


def test_train_editor_cli_bad_input_is_a_clear_error(tiny_model_dir, tmp_path):
    from click.testing import CliRunner

    from medit.cli import main

    bad = tmp_path / "train.json"
    bad.write_text(json.dumps([{"prompt": "x", "target_new": "y"}]))
    base = ["train-editor", "serac", "--model", str(tiny_model_dir), "--out", str(tmp_path / "o")]
    res = CliRunner().invoke(main, [*base, "--train", str(bad), "--valid", str(bad)])
    assert res.exit_code == 2 and "no record has a paraphrase" in res.output
    assert not (tmp_path / "o").exists()  # nothing written
    res = CliRunner().invoke(main, [*base, "--data", str(tmp_path)])
    assert res.exit_code == 2 and "no valid.json" in res.output
    broken = tmp_path / "broken.json"
    broken.write_text('[{"prompt": "x", "target_new": }]')
    res = CliRunner().invoke(main, [*base, "--train", str(broken), "--valid", str(bad)])
    assert res.exit_code == 2 and "broken.json" in res.output and "Traceback" not in res.output
