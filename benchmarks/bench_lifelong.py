"""GRACE and Transformer-Patcher on the default model: seconds per edit against the floor, bytes
per edit, and what a growing codebook / neuron bank costs at inference.

    python benchmarks/bench_lifelong.py [--n 10] [--entries 800] [--out benchmarks/results/lifelong_cpu.json]

For each editor, over the first N built-in requests applied one after another (after one
warm-up edit, restored: the corpus queries GRACE's radius and T-Patcher's memory read are
computed once per model and kept in memory):

* seconds per edit, the optimisation steps taken, and the floor = steps x (forward+backward of
  what each step runs: the layers from the edited one up and the output head) + the forwards an
  edit needs before training (its key, the entering hidden state), each timed here on the same
  inputs;
* bytes per edit: the artifact's tensors (safetensors) divided by the number of edits;
* inference: one forward of a 32-prompt batch with no patch, with the N real patches, and with
  ``--entries`` synthetic entries (random keys far from any input: every gate shut), the cost of
  the lookup alone.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from medit.core.forward import target_nll  # noqa: E402
from medit.core.hooks import capture_input, frozen_prefix  # noqa: E402
from medit.core.models import DEFAULT_MODEL, load_model  # noqa: E402
from medit.core.results import peak_memory_mb  # noqa: E402
from medit.core.text import left_padded, teacher_batch  # noqa: E402
from medit.editors.grace import GraceEntry  # noqa: E402
from medit.editors.patching.bank import bank_of  # noqa: E402
from medit.editors.registry import make_editor  # noqa: E402
from medit.editors.tpatcher import Neurons  # noqa: E402
from medit.facts.requests import load_requests  # noqa: E402


def timed(fn, repeat=5):
    fn()
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def step_floor(lm, req, layer: int) -> float:
    """One forward+backward of the layers from ``layer`` up and the head, on the edit's batch."""
    model, arch = lm.model, lm.arch
    batch = teacher_batch(lm.tokenizer, [req.prompt], [req.target_new])
    hidden = capture_input(arch.layer_list(model)[layer], lambda: model(batch.input_ids))
    probe = torch.zeros(hidden.shape[-1], requires_grad=True)

    def step():
        with torch.enable_grad(), frozen_prefix(model, arch, layer, hidden + probe):
            target_nll(model, arch, batch).backward()

    return timed(step)


def bench(lm, method, hparams, reqs, entries: int) -> dict:
    model, tok = lm.model, lm.tokenizer
    editor = make_editor(method, **hparams)
    editor.apply(model, tok, reqs[:1]).restore()  # warm: the corpus queries, computed once a model
    results, seconds, steps = [], [], []
    for req in reqs:
        r = editor.apply(model, tok, [req])
        results.append(r)
        seconds.append(r.seconds)
        steps.append(r.diagnostics[0]["steps"])
    combined = type(results[0]).combine(results)
    layer = int(results[0].patches[0].module.split(".")[2])
    floor_step = step_floor(lm, reqs[0], layer)
    one_forward = timed(lambda: model(**tok([reqs[0].prompt], return_tensors="pt")), 3)
    floors = [s * floor_step + 2 * one_forward for s in steps]
    with tempfile.TemporaryDirectory() as d:
        art = combined.export(d)
        size = sum(f.stat().st_size for f in art.glob("*.safetensors"))
    prompts = [r.prompt for r in load_requests("builtin")][:32]
    enc = left_padded(tok, prompts, lm.device)

    def forward():
        with torch.no_grad():
            model(**enc)

    with_real = timed(forward, 3)
    bank = bank_of(model)
    with bank.disabled():
        without = timed(forward, 3)
    synthetic = _synthetic(combined.patches[0], entries)
    bank.add(*synthetic)
    with_many = timed(forward, 3)
    bank.remove(*synthetic)
    combined.restore()
    return {
        "method": method,
        "hparams": hparams,
        "edits": len(reqs),
        "seconds_per_edit": statistics.mean(seconds),
        "steps_mean": statistics.mean(steps),
        "floor_seconds_per_edit": statistics.mean(floors),
        "ratio_to_floor": statistics.mean(seconds) / statistics.mean(floors),
        "step_floor_seconds": floor_step,
        "artifact_bytes_per_edit": size / len(reqs),
        "forward_32_prompts_seconds": {
            "no_patch": without,
            f"{len(reqs)}_edits": with_real,
            f"{entries}_synthetic_entries": with_many,
        },
    }


def _synthetic(like, n: int) -> list:
    """``n`` entries like ``like`` whose keys lie far from any input (every gate shut)."""
    g = torch.Generator().manual_seed(0)
    if isinstance(like, GraceEntry):
        return [
            GraceEntry(
                f"synthetic-{i}",
                like.module,
                like.key + 1e3 * torch.randn(like.key.shape, generator=g),
                like.value,
                1.0,
                like.width,
                (i,),
            )
            for i in range(n)
        ]
    assert isinstance(like, Neurons)
    return [
        Neurons(
            f"synthetic-{i}",
            like.module,
            like.keys,
            torch.full_like(like.bias, -1e4),  # s far below 0 everywhere
            like.ups,
            like.values,
            like.memory[:1],
            like.act_fn,
        )
        for i in range(n)
    ]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--n", type=int, default=10)
    ap.add_argument("--entries", type=int, default=800)
    ap.add_argument("--out")
    args = ap.parse_args()
    torch.manual_seed(0)
    lm = load_model(DEFAULT_MODEL, "cpu", "float32")
    reqs = load_requests("builtin")[: args.n]
    rows = [
        bench(lm, "grace", {}, reqs, args.entries),
        bench(lm, "grace", {"preset": "paper"}, reqs, args.entries),
        bench(lm, "tpatcher", {}, reqs, args.entries),
    ]
    out = {
        "model": DEFAULT_MODEL,
        "threads": torch.get_num_threads(),
        "rows": rows,
        "memory": peak_memory_mb(lm.device),
    }
    print(json.dumps(out, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
