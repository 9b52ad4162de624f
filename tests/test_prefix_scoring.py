"""Prefill-then-targets scoring equals a single teacher-forced forward over prompt + target."""

import math

import torch

from medit.core.arch import get_arch
from medit.core.forward import logits_at, prefix_logits
from medit.core.text import encode_pair, prefix_batch, teacher_batch
from medit.evaluation import score_targets

# prompts and targets of different lengths; a one-token target and multi-token ones
PAIRS = [
    ("The hormone insulin is produced by the", "pancreas"),
    ("Aspirin is used to treat", "pain and fever"),
    ("The heart has four", "chambers"),
    ("Which drug interacts with warfarin?", "Aspirin is involved in a drug-drug interaction"),
    ("Vitamin C deficiency causes", "the"),
]


def _lengths_differ(tok) -> None:
    lengths = [len(encode_pair(tok, p, t)[1]) for p, t in PAIRS]
    assert min(lengths) == 1 and max(lengths) > 3
    assert len({len(encode_pair(tok, p, t)[0]) for p, t in PAIRS}) > 1


def test_prefix_batch_labels_match_teacher_batch(tokenizer):
    _lengths_differ(tokenizer)
    prompts, targets = zip(*PAIRS, strict=True)
    prefix, teacher = (
        prefix_batch(tokenizer, prompts, targets),
        teacher_batch(tokenizer, prompts, targets),
    )
    assert torch.equal(prefix.labels, teacher.labels)
    assert torch.equal(prefix.owner, teacher.owner)
    assert prefix.target_lengths == teacher.target_lengths


def test_prefix_logits_equal_one_teacher_forced_forward(tiny):
    model, tok = tiny
    arch = get_arch(model)
    prompts, targets = zip(*PAIRS, strict=True)
    with torch.inference_mode():
        new = torch.log_softmax(prefix_logits(model, arch, prefix_batch(tok, prompts, targets)), -1)
        old = torch.log_softmax(logits_at(model, arch, teacher_batch(tok, prompts, targets)), -1)
    assert new.shape == old.shape  # (N, V)
    assert (new - old).abs().max().item() < 1e-4
    assert torch.equal(new.argmax(-1), old.argmax(-1))


def test_prefix_logits_of_one_token_targets_need_one_forward(tiny):
    model, tok = tiny
    arch = get_arch(model)
    pairs = [("The heart has four", "the"), ("Which drug interacts with warfarin?", "drug")]
    batch = prefix_batch(tok, *zip(*pairs, strict=True))
    assert batch.target_ids.shape[1] == 0
    with torch.inference_mode():
        new = prefix_logits(model, arch, batch)
        old = logits_at(model, arch, teacher_batch(tok, *zip(*pairs, strict=True)))
    assert (new - old).abs().max().item() < 1e-4


def test_batched_scores_equal_one_pair_at_a_time(tiny):
    model, tok = tiny
    arch = get_arch(model)
    together = score_targets(model, tok, arch, PAIRS, batch_size=len(PAIRS))
    for pair, joint in zip(PAIRS, together, strict=True):
        alone = score_targets(model, tok, arch, [pair], batch_size=1)[0]
        assert alone.correct == joint.correct
        assert alone.predicted == joint.predicted
        assert math.isclose(alone.logprob, joint.logprob, rel_tol=0, abs_tol=1e-4)
