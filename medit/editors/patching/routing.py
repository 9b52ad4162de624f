"""Per-row routing of input-dependent edits (MedLaSA's scaled adapters).

Some edits change a model's computation depending on the input: the adapter strength for each
batch row is chosen from the row's *prompt*. Such an edit installs a router on the model (the
attribute ``ROUTER``); medit's own forward passes tell it which prompt each row holds:

* ``prompts_for_rows(model, prompts)`` around a batched forward (teacher forcing feeds prompt +
  target, and only the prompt may decide the routing);
* ``select_rows(model, keep)`` when a decoder drops finished rows from its batch.

Callers that know nothing of routing (``model.generate``, a user's own forward) still work: the
router then reads the prompts from the input ids of each new sequence (see
:class:`medit.editors.patching.adapters.AdapterBank`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any, Protocol

import torch

ROUTER = "medit_router"


class Router(Protocol):
    def route(self, prompts: Sequence[str]) -> None:
        """Fix the routing of the next forward passes: row i holds ``prompts[i]``."""

    def select_rows(self, keep: torch.Tensor) -> None:
        """Rows ``keep`` of the current batch go on (a decoder dropped the others)."""

    def clear(self) -> None:
        """Forget the fixed routing."""


def router_of(model: Any) -> Router | None:
    return getattr(model, ROUTER, None)


@contextlib.contextmanager
def prompts_for_rows(model: Any, prompts: Sequence[str]) -> Iterator[None]:
    """Route the forward passes inside the block by these per-row prompts."""
    router = router_of(model)
    if router is None:
        yield
        return
    router.route(list(prompts))
    try:
        yield
    finally:
        router.clear()


def select_rows(model: Any, keep: torch.Tensor) -> None:
    router = router_of(model)
    if router is not None:
        router.select_rows(keep)
