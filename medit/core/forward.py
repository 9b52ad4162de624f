"""Forward passes that compute logits only where they are needed (target positions)."""

from __future__ import annotations

import functools
import inspect
from typing import Any

import torch

from medit.core.arch import ArchSpec
from medit.core.text import PrefixBatch, TeacherBatch


@functools.cache
def _cache_keyword(cls: type) -> str:
    params = inspect.signature(cls.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def cache_kwargs(base: Any, cache: Any) -> dict[str, Any]:
    """``{keyword: cache}`` for a call of ``base`` (a decoder stack): transformers 5 takes the KV
    cache as ``cache`` and deprecates ``past_key_values``; earlier versions know only the latter."""
    return {_cache_keyword(type(base)): cache}


def passed_cache(kwargs: dict[str, Any]) -> Any:
    """The KV cache a forward hook sees in ``kwargs``, under either keyword."""
    cache = kwargs.get("cache")
    return cache if cache is not None else kwargs.get("past_key_values")


def keep_with_cache(cache: Any, attr: str, state: Any) -> None:
    """Keep ``state`` (an object with ``select(rows)``) on ``cache`` under ``attr`` while the
    cache lives: a decoder that reorders or drops the cache's rows (``reorder_cache``: beam
    search, medit's greedy decoder) reorders the state alike."""
    setattr(cache, attr, state)
    follows = getattr(cache, "_medit_follows", None)
    if follows is None:
        follows = cache._medit_follows = set()
        reorder = cache.reorder_cache

        def reorder_and_follow(beam_idx: torch.Tensor) -> None:
            reorder(beam_idx)
            for name in cache._medit_follows:
                kept = getattr(cache, name, None)
                if kept is not None:
                    kept.select(beam_idx)

        cache.reorder_cache = reorder_and_follow
    follows.add(attr)


def logits_at(model: Any, arch: ArchSpec, batch: TeacherBatch, at_prompt_end: bool = False):
    """Vocabulary logits at the label positions of ``batch`` (N, V), or, with ``at_prompt_end``,
    at each sequence's last prompt position (B, V). The output head runs on those rows only."""
    out = arch.base_model(model)(
        input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False
    )
    hidden = out.last_hidden_state
    if at_prompt_end:
        rows = torch.arange(hidden.shape[0], device=hidden.device)
        return arch.head(model, hidden[rows, batch.prompt_last])
    return arch.head(model, hidden[batch.rows, batch.cols])


def prefix_logits(model: Any, arch: ArchSpec, batch: PrefixBatch) -> torch.Tensor:
    """Vocabulary logits at the label positions of ``batch`` (N, V), in :func:`logits_at`'s
    order, from two forwards as generation runs them: a prefill of the prompts on a fresh KV
    cache, then the targets' tokens but the last on that cache. Input-routed edits thus see each
    prompt as the first forward of its sequence. The output head runs on the label rows only."""
    from transformers import DynamicCache

    base = arch.base_model(model)
    cache = DynamicCache(config=model.config)
    mask = batch.prompt_mask
    hidden = base(
        input_ids=batch.prompt_ids,
        attention_mask=mask,
        position_ids=(mask.cumsum(-1) - 1).clamp(min=0),
        use_cache=True,
        **cache_kwargs(base, cache),
    ).last_hidden_state[:, -1:]  # (batch, 1, d_model)
    steps = batch.target_ids.shape[1]
    if steps:  # some target has more than one token
        offsets = torch.arange(steps, device=mask.device)
        rest = base(
            input_ids=batch.target_ids,
            attention_mask=torch.cat([mask, batch.target_mask], dim=1),  # (batch, P + T - 1)
            position_ids=batch.prompt_lengths[:, None] + offsets,  # (batch, T - 1)
            use_cache=True,
            **cache_kwargs(base, cache),
        ).last_hidden_state  # (batch, T - 1, d_model)
        hidden = torch.cat([hidden, rest], dim=1)  # (batch, T, d_model)
    return arch.head(model, hidden[batch.rows, batch.cols])


def target_nll(model: Any, arch: ArchSpec, batch: TeacherBatch) -> torch.Tensor:
    """Mean over sequences of the mean negative log-likelihood of their target tokens."""
    logp = torch.log_softmax(logits_at(model, arch, batch).float(), dim=-1)
    token_nll = -logp.gather(1, batch.labels[:, None]).squeeze(1)
    return per_sequence_mean(token_nll, batch).mean()


def per_sequence_mean(values: torch.Tensor, batch: TeacherBatch) -> torch.Tensor:
    """Average per-label values within each sequence of the batch -> (B,)."""
    n = len(batch.target_lengths)
    sums = torch.zeros(n, dtype=values.dtype, device=values.device).index_add(
        0, batch.owner, values
    )
    counts = torch.tensor(batch.target_lengths, dtype=values.dtype, device=values.device)
    return sums / counts
