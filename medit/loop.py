"""The one run loop behind ``medit edit`` and ``medit bench``: single, batch and sequential.

* ``single`` — each request is applied, evaluated and restored (independent edits);
* ``batch`` — requests applied in groups of ``batch_size`` (all of them when None), each group
  evaluated after its edit;
* ``sequential`` — requests applied one after another without restoring, each edit folded
  into one combined result (memory stays O(1) in the number of edits), then the requests
  evaluated again (retention). With a checkpoint directory the sequence is recorded after every
  edit and a rerun continues from the last recorded edit. With a :class:`Curve`, every ``every``
  edits a fixed sample of the requests edited so far and a fixed probe sample are evaluated on
  the model as it stands (the retention curve, O(edits) in cost).

``keep=True`` leaves the model edited at the end (``medit edit``'s batch and sequential modes:
the returned ``combined`` result is then what the run saves); otherwise every edit is restored.
The loop never looks at what kind of edit a result is: the contract
(:mod:`medit.editors.results`) is all it uses.
"""

from __future__ import annotations

import dataclasses
import logging
import random
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from medit.editors.load import load_checkpoint
from medit.editors.results import EditResult
from medit.evaluation import evaluate

log = logging.getLogger(__name__)

MODES = ("single", "batch", "sequential")

#: called as each case is evaluated: (request index, post state, seconds of its edit, result)
OnCase = Callable[[int, dict[str, Any], float, EditResult], None]


def set_seed(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)
    try:
        import numpy as np

        np.random.seed(seed)
    except ImportError:
        pass


@dataclasses.dataclass
class Curve:
    """The retention curve of a sequential run: after every ``every`` edits (and after the
    last), ``on_point(n, edited, probes, posts, seconds)`` receives the evaluation of ``edited``
    (up to ``sample`` of the n requests edited so far) and ``probes`` (a fixed sample of all
    requests, for locality); ``posts`` maps a request index to its state, ``seconds`` are the n
    edits' times. Both samples are the first requests of one fixed random order (``seed``), so
    a point's sample is the same in a rerun or a resumed run. ``done``: edit counts already
    recorded (a resumed run skips them)."""

    every: int
    sample: int
    on_point: Callable[[int, list[int], list[int], dict[int, dict[str, Any]], list[float]], None]
    seed: int = 0
    done: set[int] = dataclasses.field(default_factory=set)

    def due(self, n: int, total: int) -> bool:
        return n not in self.done and (n % self.every == 0 or n == total)

    def samples(self, n: int, total: int) -> tuple[list[int], list[int]]:
        order = list(range(total))
        random.Random(self.seed).shuffle(order)
        edited = sorted([i for i in order if i < n][: self.sample])
        return edited, sorted(order[: self.sample])


@dataclasses.dataclass
class Plan:
    """What one run of the loop does."""

    mode: str  #: single | batch | sequential
    eval: Any  #: the EvalConfig of the post-edit evaluation
    todo: Sequence[int] | None = None  #: indices still to evaluate (None: all)
    batch_size: int | None = None  #: batch mode: requests per edit (None: all in one)
    keep: bool = False  #: leave the model edited at the end
    checkpoint: Path | None = None  #: sequential mode: record progress here, resume from it
    provenance: dict[str, Any] = dataclasses.field(default_factory=dict)  #: for checkpoints
    progress: str | None = None  #: description of the final evaluation's progress bar
    curve: Curve | None = None  #: sequential mode: the retention curve's points
    #: the global RNGs are seeded with seed + the request's index before each edit call, so an
    #: edit does not depend on which cases a process ran before it (a resumed or sharded run
    #: makes the edits an uninterrupted one does); None: left as they are
    seed: int | None = None


@dataclasses.dataclass(frozen=True)
class EditRecord:
    """What a run keeps of one edit call once the call is restored or folded into the combined
    result: seconds, diagnostics and the names it touched. No tensors: the result itself holds
    copies of the touched weights (and an editor's state, AlphaEdit's K Kᵀ per layer), so
    keeping every result grew a sequential run by that much per edit."""

    seconds: float
    diagnostics: list[dict[str, Any]]
    names: list[str]

    @classmethod
    def of(cls, result: EditResult) -> EditRecord:
        return cls(result.seconds, list(result.diagnostics), list(result.names))


@dataclasses.dataclass
class Outcome:
    edits: list[EditRecord]  #: one per edit call (single, batch) or per request (sequential)
    combined: EditResult | None  #: the model's edit at the end when ``keep`` (else None)
    seconds: list[float]  #: per request


def run_edits(editor, lm, requests, pre, plan: Plan, on_case: OnCase, bar=None) -> Outcome:
    """Apply ``requests`` in ``plan.mode`` and evaluate them (``pre``: their pre-edit states);
    ``on_case`` receives each evaluated case; ``bar`` advances per request edited."""
    todo = list(range(len(requests))) if plan.todo is None else list(plan.todo)
    if plan.mode == "single":
        return _single(editor, lm, requests, pre, plan, todo, on_case, bar)
    if plan.mode == "batch":
        return _batch(editor, lm, requests, pre, plan, todo, on_case, bar)
    return _sequential(editor, lm, requests, pre, plan, todo, on_case, bar)


def _evaluate(lm, requests, idx, pre, ecfg, progress=None):
    reqs, ref = [requests[i] for i in idx], [pre[i] for i in idx]
    return evaluate(lm.model, lm.tokenizer, lm.arch, reqs, ecfg, reference=ref, progress=progress)


def _seed(plan: Plan, index: int) -> None:
    if plan.seed is not None:
        set_seed(plan.seed + index)


def _reset_peak(lm) -> None:
    if lm.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(lm.device)


def _single(editor, lm, requests, pre, plan, todo, on_case, bar) -> Outcome:
    edits, seconds = [], [0.0] * len(requests)
    for i in todo:
        _reset_peak(lm)
        _seed(plan, i)
        result = editor.apply(lm.model, lm.tokenizer, [requests[i]])
        seconds[i] = result.seconds
        on_case(i, _evaluate(lm, requests, [i], pre, plan.eval)[0], result.seconds, result)
        result.restore()
        edits.append(EditRecord.of(result))
        _advance(bar, 1)
    return Outcome(edits, None, seconds)


def _batch(editor, lm, requests, pre, plan, todo, on_case, bar) -> Outcome:
    """Fixed groups of ``batch_size``; a group with a case to do is edited whole (the edit is
    deterministic for a seed) and only its cases still to do are reported."""
    size = plan.batch_size or len(requests)
    missing, edits, seconds, combined = set(todo), [], [0.0] * len(requests), None
    for start in range(0, len(requests), size):
        idx = list(range(start, min(start + size, len(requests))))
        if not missing.intersection(idx):
            continue
        _seed(plan, start)
        result = editor.apply(lm.model, lm.tokenizer, [requests[i] for i in idx])
        edits.append(EditRecord.of(result))
        _advance(bar, len(idx))
        posts = _evaluate(lm, requests, idx, pre, plan.eval, plan.progress)
        for i, post in zip(idx, posts, strict=True):
            seconds[i] = result.seconds / len(idx)
            if i in missing:
                on_case(i, post, seconds[i], result)
        if plan.keep:
            combined = result if combined is None else type(result).combine([combined, result])
        else:
            result.restore()
    return Outcome(edits, combined, seconds)


def _sequential(editor, lm, requests, pre, plan, todo, on_case, bar) -> Outcome:
    model, tok = lm.model, lm.tokenizer
    combined, seconds = (None, [])
    if plan.checkpoint is not None:
        combined, seconds = load_checkpoint(model, tok, plan.checkpoint)
        if seconds:
            log.info("resumed %s after %d sequential edits", editor.name, len(seconds))
    _curve_point(lm, requests, pre, plan, seconds)  # a point the interruption skipped
    edits = []
    for i in range(len(seconds), len(requests)):
        _seed(plan, i)
        last = editor.apply(model, tok, [requests[i]], prior=combined)
        seconds.append(last.seconds)
        edits.append(EditRecord.of(last))
        combined = last if combined is None else type(last).combine([combined, last])
        if plan.checkpoint is not None:
            prov = {**plan.provenance, "edit_seconds": seconds}
            combined.checkpoint(plan.checkpoint, last, i, **prov)
        _advance(bar, 1)
        _curve_point(lm, requests, pre, plan, seconds)
    posts = _evaluate(lm, requests, todo, pre, plan.eval, plan.progress)
    for i, post in zip(todo, posts, strict=True):
        on_case(i, post, seconds[i], combined)
    if not plan.keep and combined is not None:
        combined.restore()
        combined = None
    return Outcome(edits, combined, seconds)


def _curve_point(lm, requests, pre, plan: Plan, seconds: list[float]) -> None:
    curve, n = plan.curve, len(seconds)
    if curve is None or n == 0 or not curve.due(n, len(requests)):
        return
    edited, probes = curve.samples(n, len(requests))
    idx = sorted(set(edited) | set(probes))
    posts = dict(zip(idx, _evaluate(lm, requests, idx, pre, plan.eval), strict=True))
    curve.on_point(n, edited, probes, posts, list(seconds))
    curve.done.add(n)


def _advance(bar, n: int) -> None:
    if bar is not None:
        bar.update(n)
