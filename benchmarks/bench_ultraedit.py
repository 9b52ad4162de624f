"""UltraEdit against AlphaEdit on the default model: seconds per edit in a sequence, UltraEdit's
floor, and the state each carries between edits.

    python benchmarks/bench_ultraedit.py [--n 10] [--alphaedit-n 3] [--out benchmarks/results/ultraedit_cpu.json]

Over the first N built-in requests applied one after another (each edit one turn, the
sequential benchmark's setting):

* seconds per edit, the passes taken (``iters`` at most; a pass is one forward and backward of
  the edit, then one solve per module) and the floor = passes x (forward + backward from the
  lowest edited layer up, the output head included) + one forward (the pass that finds the
  target reached), timed here on the same inputs; the solves are the rest;
* the editor state carried between edits (bytes): UltraEdit's normalisation statistics (fixed
  size) against AlphaEdit's accumulated K Kᵀ per layer (also fixed size, but with the corpus
  statistics and the null-space projector computed once per model, reported apart);
* AlphaEdit on ``--alphaedit-n`` of the same requests (after one warm-up edit that computes and
  caches its projector), for the ratio.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_lifelong import step_floor, timed  # noqa: E402

from medit.core.forward import target_nll  # noqa: E402
from medit.core.models import DEFAULT_MODEL, load_model  # noqa: E402
from medit.core.results import peak_memory_mb  # noqa: E402
from medit.core.text import teacher_batch  # noqa: E402
from medit.editors.registry import make_editor  # noqa: E402
from medit.facts.requests import load_requests  # noqa: E402


def sequence(lm, method, reqs, hparams=None):
    editor = make_editor(method, **(hparams or {}))
    prior, seconds, diags = None, [], []
    for req in reqs:
        r = editor.apply(lm.model, lm.tokenizer, [req], prior=prior)
        prior = r if prior is None else type(r).combine([prior, r])
        seconds.append(r.seconds)
        diags.append(r.diagnostics[0])
    return prior, seconds, diags


def state_bytes(result) -> int:
    return sum(t.numel() * t.element_size() for t in (result.editor_state or {}).values())


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--n", type=int, default=10)
    ap.add_argument("--alphaedit-n", type=int, default=3)
    ap.add_argument("--out")
    args = ap.parse_args()
    torch.manual_seed(0)
    lm = load_model(DEFAULT_MODEL, "cpu", "float32")
    reqs = load_requests("builtin")[: args.n]

    ue, seconds, diags = sequence(lm, "ultraedit", reqs)
    passes = [sum(1 for t in d["turns"] if not t.get("stopped")) for d in diags]
    checks = [sum(1 for t in d["turns"] if t.get("stopped")) for d in diags]
    lowest = min(int(n.split(".")[2]) for n in ue.names)
    step = step_floor(lm, reqs[0], lowest)  # forward + backward from the lowest edited layer
    batch = teacher_batch(lm.tokenizer, [reqs[0].prompt], [reqs[0].target_new])
    with torch.no_grad():
        forward = timed(lambda: target_nll(lm.model, lm.arch, batch))
    floors = [p * step + c * forward for p, c in zip(passes, checks, strict=True)]
    ue_state = state_bytes(ue)
    ue.restore()

    make_editor("alphaedit").apply(lm.model, lm.tokenizer, reqs[:1]).restore()  # warm: P, C
    ae, ae_seconds, _ = sequence(lm, "alphaedit", reqs[: args.alphaedit_n])
    ae_state = state_bytes(ae)
    ae.restore()

    out = {
        "model": DEFAULT_MODEL,
        "threads": torch.get_num_threads(),
        "edits": len(reqs),
        "ultraedit": {
            "modules": ue.names,
            "seconds_per_edit": statistics.mean(seconds),
            "passes_mean": statistics.mean(passes),
            "floor_seconds_per_edit": statistics.mean(floors),
            "ratio_to_floor": statistics.mean(seconds) / statistics.mean(floors),
            "pass_floor_seconds": step,
            "state_bytes": ue_state,
        },
        "alphaedit": {
            "edits": len(ae_seconds),
            "seconds_per_edit": statistics.mean(ae_seconds),
            "state_bytes": ae_state,
        },
        "speedup_over_alphaedit": statistics.mean(ae_seconds) / statistics.mean(seconds),
        "memory": peak_memory_mb(lm.device),
    }
    print(json.dumps(out, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
