"""Forward passes that compute logits only where they are needed (target positions)."""

from __future__ import annotations

import functools
import inspect
from typing import Any

import torch

from medit.core.arch import ArchSpec
from medit.core.text import TeacherBatch


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
