"""Tokenisation shared by editors and evaluation: targets as they continue their prompts.

A target is scored and trained exactly as the model would produce it after the prompt: with the
leading space it has there ("...treated with" -> " metformin"), never as a bare word. Batches for
teacher forcing are right-padded (positions of real tokens are unchanged by padding); generation
batches are left-padded, and so are the prompts of evaluation's prefix batches, which present a
prompt to the model as generation does (a prefill, then the target on its KV cache).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import torch

from medit.core.errors import UserError


def continuation(prompt: str, target: str) -> str:
    """The target as it follows the prompt: with one separating space unless one is there."""
    if not prompt or prompt[-1].isspace() or target[:1].isspace():
        return target
    return " " + target


def encode_pair(tok: Any, prompt: str, target: str) -> tuple[list[int], list[int]]:
    """(prompt ids, target ids); target ids are the tokens the model must emit after the prompt."""
    prompt_ids = tok(prompt).input_ids
    target_ids = tok(continuation(prompt, target), add_special_tokens=False).input_ids
    if not target_ids:
        raise UserError(f"target {target!r} tokenises to nothing")
    return prompt_ids, target_ids


@dataclasses.dataclass
class TeacherBatch:
    """Right-padded prompt+target sequences and where each target token is predicted.

    ``rows[i], cols[i]`` is the position whose logits predict ``labels[i]``; ``owner[i]`` says
    which sequence the label belongs to, ``prompt_last[j]`` is the last prompt position of
    sequence ``j``.
    """

    input_ids: torch.Tensor  # (B, T)
    attention_mask: torch.Tensor  # (B, T)
    rows: torch.Tensor  # (N,)
    cols: torch.Tensor  # (N,)
    labels: torch.Tensor  # (N,)
    owner: torch.Tensor  # (N,)
    prompt_last: torch.Tensor  # (B,)
    target_lengths: list[int]

    def to(self, device: torch.device) -> TeacherBatch:
        return _tensors_to(self, device)


def teacher_batch(
    tok: Any, prompts: Sequence[str], targets: Sequence[str], max_length: int | None = None
) -> TeacherBatch:
    """Build a teacher-forcing batch of (prompt, target) pairs; with ``max_length`` each
    sequence is cut to that many tokens from the prompt's start (a target longer than that is
    a user error)."""
    pairs = [encode_pair(tok, p, t) for p, t in zip(prompts, targets, strict=True)]
    if max_length is not None:
        for (_, t), target in zip(pairs, targets, strict=True):
            if len(t) >= max_length:
                raise UserError(
                    f"target {target!r} has {len(t)} tokens: more than max_length={max_length} "
                    "allows"
                )
        pairs = [(p[max(0, len(p) + len(t) - max_length) :], t) for p, t in pairs]
    width = max(len(p) + len(t) for p, t in pairs)
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    ids = torch.full((len(pairs), width), pad, dtype=torch.long)
    mask = torch.zeros((len(pairs), width), dtype=torch.long)
    rows, cols, labels, owner, last = [], [], [], [], []
    for i, (p, t) in enumerate(pairs):
        seq = p + t
        ids[i, : len(seq)] = torch.tensor(seq)
        mask[i, : len(seq)] = 1
        for j, token in enumerate(t):
            rows.append(i)
            cols.append(len(p) - 1 + j)
            labels.append(token)
            owner.append(i)
        last.append(len(p) - 1)
    as_long = lambda xs: torch.tensor(xs, dtype=torch.long)  # noqa: E731
    return TeacherBatch(
        input_ids=ids,
        attention_mask=mask,
        rows=as_long(rows),
        cols=as_long(cols),
        labels=as_long(labels),
        owner=as_long(owner),
        prompt_last=as_long(last),
        target_lengths=[len(t) for _, t in pairs],
    )


@dataclasses.dataclass
class PrefixBatch:
    """(prompt, target) pairs as generation presents them: left-padded prompts for a prefill,
    then the targets' tokens but the last, right-padded, as a second forward on its KV cache.

    The prefill's last position predicts a target's first token; target input ``k`` predicts
    token ``k + 1``. Label ``i`` is predicted at ``rows[i], cols[i]`` of the prefill's last
    hidden state followed by the second forward's hidden states (column 0: the prefill); labels
    are ordered as :func:`teacher_batch` orders them.
    """

    prompt_ids: torch.Tensor  # (B, P), left-padded
    prompt_mask: torch.Tensor  # (B, P)
    prompt_lengths: torch.Tensor  # (B,)
    target_ids: torch.Tensor  # (B, T - 1), right-padded; T = longest target
    target_mask: torch.Tensor  # (B, T - 1)
    rows: torch.Tensor  # (N,)
    cols: torch.Tensor  # (N,)
    labels: torch.Tensor  # (N,)
    owner: torch.Tensor  # (N,)
    target_lengths: list[int]

    def to(self, device: torch.device) -> PrefixBatch:
        return _tensors_to(self, device)


def prefix_batch(tok: Any, prompts: Sequence[str], targets: Sequence[str]) -> PrefixBatch:
    """Build a prefill-then-targets batch of (prompt, target) pairs, tokenised as
    :func:`encode_pair` does (so scores match :func:`teacher_batch`'s)."""
    pairs = [encode_pair(tok, p, t) for p, t in zip(prompts, targets, strict=True)]
    for prompt, (p, _) in zip(prompts, pairs, strict=True):
        if not p:
            raise UserError(
                f"prompt {prompt!r} tokenises to nothing: no position predicts a target"
            )
    n, width = len(pairs), max(len(p) for p, _ in pairs)
    more = max(len(t) for _, t in pairs) - 1
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    prompt_ids = torch.full((n, width), pad, dtype=torch.long)
    prompt_mask = torch.zeros((n, width), dtype=torch.long)
    target_ids = torch.full((n, more), pad, dtype=torch.long)
    target_mask = torch.zeros((n, more), dtype=torch.long)
    rows, cols, labels, owner = [], [], [], []
    for i, (p, t) in enumerate(pairs):
        prompt_ids[i, width - len(p) :] = torch.tensor(p)
        prompt_mask[i, width - len(p) :] = 1
        target_ids[i, : len(t) - 1] = torch.tensor(t[:-1], dtype=torch.long)
        target_mask[i, : len(t) - 1] = 1
        rows += [i] * len(t)
        cols += range(len(t))
        labels += t
        owner += [i] * len(t)
    as_long = lambda xs: torch.tensor(xs, dtype=torch.long)  # noqa: E731
    return PrefixBatch(
        prompt_ids=prompt_ids,
        prompt_mask=prompt_mask,
        prompt_lengths=as_long([len(p) for p, _ in pairs]),
        target_ids=target_ids,
        target_mask=target_mask,
        rows=as_long(rows),
        cols=as_long(cols),
        labels=as_long(labels),
        owner=as_long(owner),
        target_lengths=[len(t) for _, t in pairs],
    )


def left_padded(tok: Any, prompts: Sequence[str], device: torch.device) -> dict[str, torch.Tensor]:
    """Left-padded prompt batch for generation."""
    side = tok.padding_side
    tok.padding_side = "left"
    try:
        enc = tok(list(prompts), return_tensors="pt", padding=True)
    finally:
        tok.padding_side = side
    return {k: v.to(device) for k, v in enc.items() if k in ("input_ids", "attention_mask")}


def normalise(text: str) -> str:
    """Lower-case, collapse whitespace, strip surrounding punctuation: for answer matching."""
    return " ".join(text.lower().split()).strip(" .,;:!?\"'")


def right_padded(tok, run):
    """``run()`` with the tokenizer padding on the right (restored afterwards)."""
    side, tok.padding_side = tok.padding_side, "right"
    try:
        return run()
    finally:
        tok.padding_side = side


def _tensors_to(batch: Any, device: torch.device) -> Any:
    """A copy of a batch dataclass with every tensor field on ``device``."""
    return dataclasses.replace(
        batch,
        **{
            f.name: getattr(batch, f.name).to(device)
            for f in dataclasses.fields(batch)
            if isinstance(getattr(batch, f.name), torch.Tensor)
        },
    )
