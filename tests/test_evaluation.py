import math

import pytest
import torch

from medit.core.arch import get_arch
from medit.core.text import continuation, encode_pair, teacher_batch
from medit.evaluation import (
    EvalConfig,
    aggregate,
    evaluate,
    generate,
    ngram_entropy,
    score_targets,
    states_answer,
)
from medit.facts.requests import parse_record

PAIRS = [
    ("The hormone insulin is produced by the", "pancreas"),
    ("Aspirin is used to treat", "pain and fever"),
    ("The heart has four", "chambers"),
    ("Which drug interacts with warfarin?", "Aspirin"),
]


def test_targets_continue_their_prompt_with_a_space(tokenizer):
    assert continuation("treated with", "metformin") == " metformin"
    assert continuation("treated with ", "metformin") == "metformin"
    p, t = encode_pair(tokenizer, "The heart has four", "chambers")
    assert tokenizer.decode(t) == " chambers"
    assert p + t == tokenizer("The heart has four chambers").input_ids


def test_teacher_batch_positions_predict_the_target_tokens(tokenizer):
    batch = teacher_batch(tokenizer, *zip(*PAIRS, strict=True))
    for row, col, label in zip(batch.rows, batch.cols, batch.labels, strict=True):
        assert batch.input_ids[row, col + 1] == label
    # the first target token is a label (never masked out)
    first = encode_pair(tokenizer, *PAIRS[0])[1][0]
    assert batch.labels[0] == first and batch.cols[0] == batch.prompt_last[0]


def test_batched_scores_equal_one_at_a_time(tiny):
    model, tok = tiny
    arch = get_arch(model)
    together = score_targets(model, tok, arch, PAIRS, batch_size=4)
    for pair, joint in zip(PAIRS, together, strict=True):
        alone = score_targets(model, tok, arch, [pair], batch_size=1)[0]
        assert alone.predicted == joint.predicted
        assert math.isclose(alone.logprob, joint.logprob, rel_tol=1e-4, abs_tol=1e-4)


def test_logprob_matches_a_plain_forward(tiny_llama):
    model, tok = tiny_llama
    prompt, target = PAIRS[0]
    p, t = encode_pair(tok, prompt, target)
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([p + t])).logits[0], -1)
    expected = sum(logp[len(p) - 1 + j, tid].item() for j, tid in enumerate(t))
    got = score_targets(model, tok, get_arch(model), [(prompt, target)])[0].logprob
    assert math.isclose(got, expected, rel_tol=1e-5)


def test_batched_generation_equals_one_at_a_time(tiny):
    model, tok = tiny
    prompts = [p for p, _ in PAIRS]
    together = generate(model, tok, prompts, max_new_tokens=6, batch_size=4)
    alone = [generate(model, tok, [p], max_new_tokens=6)[0] for p in prompts]
    assert together == alone


def test_answer_matching():
    assert states_answer(" Pancreas, an organ", "pancreas") == {"exact": True, "contains": True}
    assert states_answer(" the pancreas.", "Pancreas") == {"exact": False, "contains": True}
    assert states_answer(" the liver", "pancreas") == {"exact": False, "contains": False}


def test_ngram_entropy_by_hand():
    # words a b a b: bigrams ab, ba, ab -> p = 2/3, 1/3; trigrams aba, bab -> 1/2 each
    h2 = -(2 / 3 * math.log2(2 / 3) + 1 / 3 * math.log2(1 / 3))
    h3 = 1.0
    assert math.isclose(ngram_entropy("a b a b"), (2 / 3 * h2 + 4 / 3 * h3) / 2)
    assert ngram_entropy("a a a a a") == 0.0


def _req(i=1):
    return parse_record(
        {
            "prompt": "The hormone insulin is produced by the",
            "target_new": "pancreas",
            "ground_truth": "liver",
            "rephrase_prompts": ["Insulin is made by the"],
            "locality": {
                "general": [["The heart has four", "chambers"]],
                "drug": [["Aspirin is used to treat", "pain"]],
            },
        },
        "t.json",
        i,
    )


def test_unchanged_model_keeps_locality_perfectly(tiny_llama):
    model, tok = tiny_llama
    arch = get_arch(model)
    cfg = EvalConfig(fluency_tokens=8)
    pre = evaluate(model, tok, arch, [_req()], cfg)
    post = evaluate(model, tok, arch, [_req()], cfg, reference=pre)
    assert post[0]["teacher_forced"]["locality"] == {"general": 1.0, "drug": 1.0}
    assert post[0]["generation"]["locality_unchanged"] == {"general": 1.0, "drug": 1.0}
    assert "locality" not in pre[0]["teacher_forced"]  # no reference -> not computed
    assert post[0]["teacher_forced"]["target_prob"] == pytest.approx(
        pre[0]["teacher_forced"]["target_prob"], rel=1e-4
    )


def test_eval_mode_is_forced_and_restored(tiny_llama):
    model, tok = tiny_llama
    model.train()
    model.config.attention_dropout = 0.5
    arch = get_arch(model)
    a = evaluate(model, tok, arch, [_req()], EvalConfig(generation=False))
    b = evaluate(model, tok, arch, [_req()], EvalConfig(generation=False))
    assert a == b and model.training


def test_aggregate_by_hand():
    def state(eff, gen, loc, contains, unchanged):
        return {
            "teacher_forced": {
                "efficacy": eff,
                "generality": gen,
                "locality": loc,
                "locality_accuracy": {},
                "portability": {},
                "target_prob": 0.5,
            },
            "generation": {
                "efficacy_exact": contains,
                "efficacy_contains": contains,
                "generality_contains": None,
                "locality_unchanged": unchanged,
                "locality_answer_stated": {},
                "fluency": 4.0,
            },
        }

    agg = aggregate(
        [
            state(1.0, 0.5, {"a": 1.0, "b": 0.0}, True, {"a": 1.0}),
            state(0.0, 1.0, {"a": 0.5}, False, {"a": 0.0}),
        ]
    )
    tf, gen = agg["teacher_forced"], agg["generation"]
    assert tf["efficacy"] == 0.5 and tf["generality"] == 0.75
    assert tf["locality"] == {"a": 0.75, "b": 0.0} and tf["locality_mean"] == 0.375
    assert gen["efficacy_contains"] == 0.5 and gen["generality_contains"] is None
    assert gen["locality_mean"] == 0.5 and gen["fluency"] == 4.0
