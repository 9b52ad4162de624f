"""Activations of unrelated text at one module: the inputs an input-gated patch must stay shut on.

GRACE sizes an entry's radius from the distance between its key and the nearest of them, and
T-Patcher's memory loss keeps a new neuron's pre-activation below its margin on them. The text
is the model's own generated corpus (:func:`medit.facts.corpus.generated_corpus`, the corpus
ROME, MEMIT and AlphaEdit estimate their statistics on, cached on disk); the activations are kept
in memory per (weights, module, corpus, count), as float16 on the CPU (200 texts of ~110 tokens
at a 1536-wide input: 68 MB).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from medit.core.arch import get_arch, get_module
from medit.core.cache import Cache, base_weights_sha256
from medit.core.hooks import capture_input
from medit.core.placement import input_device
from medit.core.text import right_padded
from medit.facts.corpus import GenerationSettings, generated_corpus
from medit.facts.subject import medical_terms

#: the inputs of a module over the first texts of the generated corpus
NEGATIVES = Cache("negatives", version=1, kind="memory")


@dataclasses.dataclass(frozen=True)
class CorpusSample:
    """Which text: the first ``texts`` continuations of the generated corpus's settings."""

    texts: int = 200
    samples_per_prompt: int = 4  #: as ROME/MEMIT's default corpus, so the text is shared
    new_tokens: int = 96
    max_length: int = 128  #: tokens kept of each text


def corpus_inputs(model: Any, tok: Any, module: str, sample: CorpusSample) -> list[torch.Tensor]:
    """The input of ``module`` at every position of each sampled text: (seq, d_in) float16."""
    sha = base_weights_sha256(model)
    key = NEGATIVES.key(sha, module, dataclasses.asdict(sample)) if sha else None
    return NEGATIVES.get_or_compute(key, lambda: _inputs(model, tok, module, sample, sha))


@torch.no_grad()
def _inputs(model, tok, module, sample: CorpusSample, sha) -> list[torch.Tensor]:
    settings = GenerationSettings(
        samples_per_prompt=sample.samples_per_prompt, new_tokens=sample.new_tokens
    )
    texts = list(generated_corpus(model, tok, settings, weights_sha256=sha).texts)[: sample.texts]
    out: list[torch.Tensor] = []
    for i in range(0, len(texts), 16):
        x, real = text_inputs(model, tok, module, texts[i : i + 16], sample.max_length)
        for row, n in enumerate(real.sum(1).tolist()):
            out.append(x[row, :n].to("cpu", torch.float16))
    return out


@torch.no_grad()
def text_inputs(
    model: Any, tok: Any, module: str, texts: list[str], max_length: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The input of ``module`` at every position of ``texts`` (one right-padded forward, the
    rest of the model skipped): x (n, pos, d_in) and which positions are real (n, pos)."""
    device = input_device(model)
    kw = {"truncation": True, "max_length": max_length} if max_length else {}
    enc = right_padded(tok, lambda: tok(texts, return_tensors="pt", padding=True, **kw))
    ids, mask = enc.input_ids.to(device), enc.attention_mask.to(device)
    base = get_arch(model).base_model(model)
    x = capture_input(
        get_module(model, module),
        lambda: base(input_ids=ids, attention_mask=mask, use_cache=False),
    )
    return x, mask.bool()


def swapped_prompts(prompt: str, subject: str | None, n: int, seed: int) -> list[str]:
    """``prompt`` with its subject replaced by ``n`` medical terms (a seeded sample): the same
    question about other things, the hard negatives of an input-gated patch. Empty where the
    subject is unknown or not in the prompt."""
    found = prompt.lower().find(subject.lower()) if subject else -1
    if found < 0 or n <= 0:
        return []
    terms = [t for t in medical_terms() if t.lower() != subject.lower()]
    g = torch.Generator().manual_seed(seed)
    picked = [terms[i] for i in torch.randperm(len(terms), generator=g)[:n]]
    return [prompt[:found] + t + prompt[found + len(subject) :] for t in picked]
