"""Second moments of a layer's keys, and AlphaEdit's null-space projector.

* :func:`covariance` — C = E[k kᵀ] of a layer's keys (the input of ``mlp_out``) over an offline
  corpus (``medit.facts.corpus``), kept on disk by weights hash, layer and corpus hash;
* :func:`null_space_projector` — the projector onto the eigenvectors of C with eigenvalues under
  a threshold (kept in memory).
"""

from __future__ import annotations

import functools
import hashlib
import logging
import time
from collections.abc import Sequence
from typing import Any

import torch

from medit.core.arch import ArchSpec
from medit.core.cache import Cache, base_weights_sha256
from medit.core.errors import UserError
from medit.core.hooks import capture_inputs
from medit.core.placement import input_device
from medit.facts.corpus import Corpus

log = logging.getLogger(__name__)

#: Σ k kᵀ and the token count per (base weights, layer, corpus, max length)
MOMENTS = Cache("covariance", version=2, kind="tensors", memory=True)
#: AlphaEdit's projectors, per (content of C, threshold): in memory only
PROJECTORS = Cache("projectors", version=1, kind="memory")


def covariance(
    model: Any,
    tok: Any,
    arch: ArchSpec,
    layers: Sequence[int],
    corpus: Corpus,
    max_length: int = 256,
    batch_size: int = 16,
    cache: bool = True,
) -> dict[int, tuple[torch.Tensor, int]]:
    """{layer: (Σ k kᵀ in float64 on the CPU, number of tokens)} over ``corpus``; kept in
    :data:`MOMENTS` by the weights' hash, layer and corpus hash where the hash is known."""
    sha = base_weights_sha256(model) if cache else None
    keys = {
        layer: MOMENTS.key(sha, arch.weight_name(layer, "mlp_out"), corpus.sha256, max_length)
        for layer in layers
    }
    out, todo = {}, []
    for layer, key in keys.items():
        got = MOMENTS.get(key) if sha else None
        if got is None:
            todo.append(layer)
        else:
            out[layer] = (got["sum"], int(got["count"].item()))
    if todo:
        t0 = time.perf_counter()
        fresh = _accumulate(model, tok, arch, todo, corpus, max_length, batch_size)
        log.info(
            "second moments of layers %s over %d tokens in %.1f s",
            todo,
            next(iter(fresh.values()))[1],
            time.perf_counter() - t0,
        )
        for layer, (total, count) in fresh.items():
            out[layer] = (total, count)
            if sha:
                MOMENTS.put(keys[layer], {"sum": total, "count": torch.tensor([count])})
    return out


@torch.no_grad()
def _accumulate(model, tok, arch, layers, corpus: Corpus, max_length, batch_size):
    chunks = []
    for text in corpus.texts:
        ids = tok(text).input_ids
        chunks += [ids[i : i + max_length] for i in range(0, len(ids), max_length)]
    chunks.sort(key=len)
    device = input_device(model)
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    modules = [arch.module(model, layer, "mlp_out") for layer in sorted(layers)]
    base = arch.base_model(model)
    sums = {layer: None for layer in layers}
    count = 0
    for i in range(0, len(chunks), batch_size):
        part = chunks[i : i + batch_size]
        width = max(len(c) for c in part)
        ids = torch.full((len(part), width), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for j, c in enumerate(part):
            ids[j, : len(c)], mask[j, : len(c)] = torch.tensor(c), 1
        ids, mask = ids.to(device), mask.to(device)
        got = capture_inputs(
            modules,
            functools.partial(base, input_ids=ids, attention_mask=mask, use_cache=False),
        )
        real = mask.bool()
        count += int(real.sum())
        for layer, x in zip(sorted(layers), got, strict=True):
            k = x[real].float()
            s = (k.T @ k).double().cpu()
            sums[layer] = s if sums[layer] is None else sums[layer] + s
    if count == 0:
        raise UserError(f"corpus {corpus.name!r} has no tokens")
    return {layer: (sums[layer], count) for layer in layers}


def null_space_projector(C: torch.Tensor, threshold: float) -> tuple[torch.Tensor, int]:
    """(P, null-space dimension): the projector U Uᵀ onto the eigenvectors of C whose eigenvalues
    are below ``threshold`` (AlphaEdit), float64; kept in memory by C's content and the
    threshold (every sequential edit asks again for the same C)."""
    C = C.double().contiguous().cpu()

    def compute():
        evals, evecs = torch.linalg.eigh(C)
        U = evecs[:, evals < threshold]
        return U @ U.T, int(U.shape[1])

    content = hashlib.sha256(C.numpy().data).hexdigest()  # C's own buffer, no copy
    return PROJECTORS.get_or_compute(PROJECTORS.key(content, list(C.shape), threshold), compute)
