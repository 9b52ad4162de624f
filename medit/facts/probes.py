"""Locality probes from facts the model is known to get right (``medit edit --locality-from``).

``medit check`` writes the questions a model answers correctly to ``right.jsonl``; those are the
natural locality probes of the corrections made beside them: after an edit they should still be
answered as before. Each request gets its own seeded sample of them, as probes of type ``known``
added to the ones it has. A probe never asks the question (prompt or paraphrase) of an edit of
the same run: its answer is supposed to change.
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Sequence

from medit.core.errors import UserError
from medit.core.text import normalise
from medit.facts.requests import EditRequest

KNOWN = "known"


def add_known_probes(
    requests: Sequence[EditRequest],
    known: Sequence[EditRequest],
    per_edit: int,
    seed: int = 0,
    source: str = "--locality-from",
) -> list[EditRequest]:
    """``requests`` with up to ``per_edit`` of ``known``'s facts (prompt, expected answer) added
    to each as locality probes of type ``known``, sampled per request (seeded by ``seed`` and
    the request's position)."""
    if per_edit < 1:
        raise UserError(f"--locality-per-edit must be >= 1, got {per_edit}")
    asked = {normalise(p) for r in requests for p in (r.prompt, *r.rephrase_prompts)}
    pool = [(k.prompt, k.target_new) for k in known if normalise(k.prompt) not in asked]
    if not pool:
        raise UserError(
            f"{source}: none of its {len(known)} facts can be a locality probe (each asks the "
            "question of an edit in this run)"
        )
    out = []
    for i, req in enumerate(requests):
        picked = random.Random(f"{seed}:{i}").sample(pool, min(per_edit, len(pool)))
        locality = dict(req.locality)
        locality[KNOWN] = tuple(locality.get(KNOWN, ())) + tuple(picked)
        out.append(dataclasses.replace(req, locality=locality))
    return out
