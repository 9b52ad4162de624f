"""Keys of the locate-then-edit editors (ROME, MEMIT, AlphaEdit).

A decoder layer's MLP output projection ``W`` (``mlp_out``: down_proj, c_proj, fc_out) is read as
a key-value memory: its input at the subject's last token is the *key* k, its output the *value*
(``values.py``); C = E[k kᵀ] over a corpus is in ``covariance.py``.

* :func:`context_templates` — ``"{}"`` plus short prefixes sampled from the model itself
  ("<prefix>. {}"), so that keys and values do not depend on one exact wording (cached).
* :func:`request_keys` — k* for each request: the key at the subject's last token, averaged over
  the templates (ROME eq. 3); :func:`template_keys` the same per template.
* :func:`layer_outputs_at` — a layer's output at the subject's last token (MEMIT's current
  values, which the residuals are measured from).
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Sequence
from typing import Any

import torch

from medit.core.arch import ArchSpec
from medit.core.cache import Cache, base_weights_sha256
from medit.core.hooks import capture_input, capture_inputs, edited_outputs, record
from medit.core.placement import input_device
from medit.core.text import right_padded
from medit.facts.corpus import sample_continuations
from medit.facts.requests import EditRequest
from medit.facts.subject import subject_tokens

log = logging.getLogger(__name__)

#: first words of the sampled prefixes (MEMIT's)
PREFIX_STARTS = ("The", "Therefore", "Because", "I", "You")
#: context templates sampled from a base model (also kept in memory: every edit reads them)
TEMPLATES = Cache("templates", version=1, memory=True)


# -- context templates ---------------------------------------------------------------------------
def context_templates(
    model: Any, tok: Any, lengths: Sequence[int], count: int, seed: int = 0
) -> list[str]:
    """``["{}"]`` plus ``count`` sampled prefixes of each length in ``lengths`` tokens, each as
    "<prefix>. {}" (top-5 sampling, fixed seed; kept in :data:`TEMPLATES` by the weights' hash)."""
    sha = base_weights_sha256(model)
    key = TEMPLATES.key(sha, list(lengths), count, seed) if sha else None
    return TEMPLATES.get_or_compute(
        key, lambda: ["{}"] + _sample_prefixes(model, tok, lengths, count, seed)
    )


@torch.no_grad()
def _sample_prefixes(model, tok, lengths, count, seed) -> list[str]:
    starts = [PREFIX_STARTS[i % len(PREFIX_STARTS)] for i in range(count)]
    out = []
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for length in lengths:
            for text in sample_continuations(model, tok, starts, length, top_k=5):
                text = " ".join(text.replace("{", " ").replace("}", " ").split())
                out.append(text + ". {}")
    return out


def fill(template: str, prompt: str) -> tuple[str, int]:
    """The templated prompt and the character offset where ``prompt`` starts in it."""
    head = template.split("{}")[0]
    return head + prompt, len(head)


def subject_last(tok: Any, template: str, req: EditRequest, subject: str) -> tuple[str, int]:
    """(templated prompt, index of the subject's last token in it)."""
    text, offset = fill(template, req.prompt)
    return text, subject_tokens(tok, text, subject, offset)[1] - 1


# -- keys ----------------------------------------------------------------------------------------
@torch.no_grad()
def module_inputs(
    model: Any,
    tok: Any,
    arch: ArchSpec,
    layers: Sequence[int],
    texts: Sequence[str],
    positions: Sequence[int],
    batch_size: int = 32,
) -> dict[int, torch.Tensor]:
    """Input of each layer's ``mlp_out`` at ``positions[i]`` of ``texts[i]`` -> {layer: (N, d_in)}
    (float32). The forward stops after the last layer asked for."""
    layers = sorted(layers)
    modules = [arch.module(model, layer, "mlp_out") for layer in layers]
    base, device = arch.base_model(model), input_device(model)
    out: dict[int, list[torch.Tensor]] = {layer: [] for layer in layers}
    for i in range(0, len(texts), batch_size):
        chunk = list(texts[i : i + batch_size])
        enc = right_padded(tok, lambda: tok(chunk, return_tensors="pt", padding=True))  # noqa: B023
        pos = torch.tensor(positions[i : i + batch_size], device=device)
        rows = torch.arange(len(pos), device=device)
        ids, mask = enc.input_ids.to(device), enc.attention_mask.to(device)
        got = capture_inputs(
            modules,
            functools.partial(base, input_ids=ids, attention_mask=mask, use_cache=False),
        )
        for layer, x in zip(layers, got, strict=True):
            out[layer].append(x[rows, pos].float())
    return {layer: torch.cat(v) for layer, v in out.items()}


def template_keys(
    model: Any,
    tok: Any,
    arch: ArchSpec,
    layers: Sequence[int],
    requests: Sequence[EditRequest],
    subjects: Sequence[str],
    templates: Sequence[str],
) -> dict[int, torch.Tensor]:
    """Each request's key at the subject's last token in each templated prompt
    -> {layer: (N, T, d_in)}."""
    pairs = [
        subject_last(tok, t, r, s)
        for r, s in zip(requests, subjects, strict=True)
        for t in templates
    ]
    keys = module_inputs(model, tok, arch, layers, [p[0] for p in pairs], [p[1] for p in pairs])
    return {layer: k.view(len(requests), len(templates), -1) for layer, k in keys.items()}


def request_keys(
    model: Any,
    tok: Any,
    arch: ArchSpec,
    layers: Sequence[int],
    requests: Sequence[EditRequest],
    subjects: Sequence[str],
    templates: Sequence[str],
) -> dict[int, torch.Tensor]:
    """k* of each request at each layer: the key at the subject's last token averaged over the
    templates (ROME eq. 3) -> {layer: (N, d_in)}."""
    keys = template_keys(model, tok, arch, layers, requests, subjects, templates)
    return {layer: k.mean(1) for layer, k in keys.items()}


@torch.no_grad()
def layer_outputs_at(model, tok, arch: ArchSpec, layer: int, requests, subjects) -> torch.Tensor:
    """Output of decoder ``layer`` at each request's subject-last token (plain prompt) (N, d)."""
    pairs = [subject_last(tok, "{}", r, s) for r, s in zip(requests, subjects, strict=True)]
    enc = right_padded(tok, lambda: tok([p[0] for p in pairs], return_tensors="pt", padding=True))
    device = input_device(model)
    ids, mask = enc.input_ids.to(device), enc.attention_mask.to(device)
    store: list[torch.Tensor] = []
    nxt = layer + 1
    if nxt < arch.n_layers(model):
        hidden = capture_input(
            arch.module(model, nxt),
            lambda: arch.base_model(model)(input_ids=ids, attention_mask=mask),
        )
    else:
        with edited_outputs([(arch.module(model, layer), lambda t: record(store, t))]):
            arch.base_model(model)(input_ids=ids, attention_mask=mask, use_cache=False)
        hidden = store[0]
    rows = torch.arange(len(pairs), device=device)
    return hidden[rows, torch.tensor([p[1] for p in pairs], device=device)].float()
