"""Peak resident memory of MEMIT (one batch) and AlphaEdit (a sequence), phase by phase.

    python benchmarks/bench_memory.py [--methods memit,alphaedit] [--n 20] [--threads 1]
                                      [--uncached] [--trim] [--no-eval] [--save-deltas DIR]
                                      [--compare DIR] [--out benchmarks/results/memory_cpu.json]

Each method runs in a process of its own on the default model (float32, CPU) and the first N
built-in facts: MEMIT edits them in one batch, AlphaEdit one after another (each edit given the
combined result of the earlier ones as ``prior``, as ``medit.loop`` does in sequential mode).
Printed per method:

* the process's peak resident memory (VmHWM / ``ru_maxrss``), the resident memory after loading
  the model, the weights' bytes, and (peak - runtime) / weights, the runtime being the resident
  memory after loading less the weights (the interpreter, torch and its libraries);
* per phase of the editor (value optimisation, keys, the current values, C and its load, the
  projector, the solve, ...): the resident memory before, the peak during (the kernel's
  high-water mark, reset at the start of each phase through ``/proc/self/clear_refs``) and after.

``--uncached`` generates the corpus and computes C instead of reading them from the cache (what
a model's first edit does; the cache is left as it is). ``--trim`` gives the heap's free memory
back before each phase (glibc ``malloc_trim``), so that a phase's rise is its own, not hidden in
what earlier phases freed (diagnosis only: the peak is then lower than a real run's).
``--save-deltas DIR`` writes each method's weight deltas; ``--compare DIR`` reports the largest
difference from those written earlier (max |Δ1 − Δ2| / max |Δ1|), the check that a memory
optimisation left the edit unchanged. Linux only (``/proc``).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

METHODS = ("memit", "alphaedit")
MB = 2**20


def _status_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return 0.0


def _malloc_trim() -> None:
    """Give the heap's free memory back to the system (glibc), so that the resident memory
    before a phase is what is alive then, not what earlier phases freed into the heap."""
    import ctypes

    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


class Phases:
    """Per-phase resident memory: before, peak during (VmHWM after a reset), after. The
    process's overall peak is kept here since a reset also clears ``ru_maxrss``."""

    def __init__(self, trim: bool = False) -> None:
        self.rows: list[dict] = []
        self.overall = 0.0
        self.depth = 0
        self.trim = _malloc_trim if trim else (lambda: None)

    def peak(self) -> float:
        return max(self.overall, _status_mb("VmHWM"))

    def _reset(self) -> None:
        self.overall = self.peak()
        Path("/proc/self/clear_refs").write_text("5")

    @contextlib.contextmanager
    def phase(self, name: str):
        if self.depth:  # nested: the outer phase owns the high-water mark
            yield
            return
        self.depth += 1
        self.trim()
        self._reset()
        before, t0 = _status_mb("VmRSS"), time.perf_counter()
        try:
            yield
        finally:
            self.depth -= 1
            peak = _status_mb("VmHWM")
            self.rows.append(
                {
                    "phase": name,
                    "before_mb": round(before),
                    "peak_mb": round(peak),
                    "after_mb": round(_status_mb("VmRSS")),
                    "seconds": round(time.perf_counter() - t0, 2),
                }
            )
            self._reset()

    def wrap(self, owner, attr: str, name: str | None = None, static: bool = False) -> None:
        """Time ``owner.attr`` (a module function, a method or a staticmethod) as a phase."""
        if not hasattr(owner, attr):
            return
        fn = owner.__dict__[attr] if static else getattr(owner, attr)
        inner = fn.__func__ if isinstance(fn, staticmethod) else fn

        @functools.wraps(inner)
        def timed(*args, **kwargs):
            with self.phase(name or attr):
                return inner(*args, **kwargs)

        setattr(owner, attr, staticmethod(timed) if static else timed)


def instrument(phases: Phases) -> None:
    from medit.editors import alphaedit, memit
    from medit.editors.locate import common
    from medit.editors.results import WeightEdit

    for fn in ("optimise_values", "layer_outputs_at", "request_keys", "second_moments"):
        phases.wrap(memit, fn)
    for fn in ("second_moments", "null_space_projector"):
        phases.wrap(alphaedit, fn)
    phases.wrap(common.KeyValueHParams, "templates")
    for cls in (memit.MEMIT, alphaedit.AlphaEdit):
        phases.wrap(cls, "layer_update", f"{cls.name}.layer_update", static=True)
        phases.wrap(cls, "_state_after", f"{cls.name}._state_after")
    phases.wrap(WeightEdit, "combine", "WeightEdit.combine")


def child(args) -> dict:
    import torch

    torch.set_num_threads(args.threads)
    from medit.core.models import DEFAULT_MODEL, load_model
    from medit.editors.registry import make_editor
    from medit.evaluation import EvalConfig, evaluate
    from medit.facts.requests import load_requests

    method = args.child
    phases = Phases(trim=args.trim)
    if args.uncached:  # the corpus generated and C accumulated, as on a model's first edit
        from medit.editors.locate import covariance
        from medit.facts import corpus

        for cache in (covariance.MOMENTS, corpus.CORPORA):
            cache.get = lambda key: None
            cache.put = lambda key, value: value
    with phases.phase("load model"):
        lm = load_model(args.model or DEFAULT_MODEL, "cpu", "float32")
    model, tok, arch = lm.model, lm.tokenizer, lm.arch
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    loaded_mb = _status_mb("VmRSS")
    runtime_mb = loaded_mb - weights / MB
    reqs = load_requests("builtin")[: args.n]
    cfg = EvalConfig(fluency_tokens=0)
    instrument(phases)
    if args.eval:
        with phases.phase("evaluate (pre)"):
            pre = evaluate(model, tok, arch, reqs, cfg)
    editor = make_editor(method)
    t0 = time.perf_counter()
    if method == "memit":
        result = editor.apply(model, tok, reqs)
    else:
        result = None
        for req in reqs:
            last = editor.apply(model, tok, [req], prior=result)
            result = last if result is None else type(last).combine([result, last])
    seconds = time.perf_counter() - t0
    if args.eval:
        with phases.phase("evaluate (post)"):
            evaluate(model, tok, arch, reqs, cfg, reference=pre)
    deltas = {
        n: (p.detach().double() - result.originals[n].double())
        for n, p in result.edited_tensors().items()
    }
    check = None
    if args.save_deltas:
        Path(args.save_deltas).mkdir(parents=True, exist_ok=True)
        torch.save(deltas, Path(args.save_deltas) / f"{method}.pt")
    if args.compare:
        ref = torch.load(Path(args.compare) / f"{method}.pt")
        diff = max((deltas[n] - ref[n]).abs().max().item() for n in ref)
        scale = max(ref[n].abs().max().item() for n in ref)
        check = {"max_abs_diff": diff, "max_abs_delta": scale, "relative": diff / scale}
    peak_mb = phases.peak()
    return {
        "method": method,
        "n": len(reqs),
        "mode": "batch" if method == "memit" else "sequential",
        "uncached_covariance": args.uncached,
        "threads": args.threads,
        "edit_seconds": round(seconds, 1),
        "peak_rss_mb": round(peak_mb),
        "ru_maxrss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
        "loaded_rss_mb": round(loaded_mb),
        "weights_mb": round(weights / MB),
        "runtime_mb": round(runtime_mb),
        "peak_over_weights": round((peak_mb - runtime_mb) * MB / weights, 2),
        "delta_check": check,
        "peak_reached_in": _first_peak(phases.rows, peak_mb),
        "phases": _merge(phases.rows),
    }


def _first_peak(rows: list[dict], peak_mb: float) -> str | None:
    """The phase (and which call of it) where the process's peak was first reached."""
    calls: dict[str, int] = {}
    for r in rows:
        calls[r["phase"]] = calls.get(r["phase"], 0) + 1
        if r["peak_mb"] >= round(peak_mb) - 1:
            return f"{r['phase']} (call {calls[r['phase']]})"
    return None


def _merge(rows: list[dict]) -> list[dict]:
    """Phases by name, in order of first appearance: calls, total seconds, highest peak."""
    out: dict[str, dict] = {}
    for r in rows:
        rise = r["peak_mb"] - r["before_mb"]
        m = out.setdefault(r["phase"], {**r, "calls": 0, "seconds": 0.0, "max_rise_mb": rise})
        m["calls"] += 1
        m["seconds"] = round(m["seconds"] + r["seconds"], 2)
        m["max_rise_mb"] = max(m["max_rise_mb"], rise)
        if r["peak_mb"] > m["peak_mb"]:
            m.update(before_mb=r["before_mb"], peak_mb=r["peak_mb"], after_mb=r["after_mb"])
    return list(out.values())


def table(row: dict) -> str:
    if "error" in row:
        return f"{row['method']}: failed: {row['error']}"
    head = (
        f"{row['method']} ({row['mode']}, n={row['n']}, {row['edit_seconds']} s): peak "
        f"{row['peak_rss_mb']} MB, after loading {row['loaded_rss_mb']} MB, weights "
        f"{row['weights_mb']} MB, (peak - runtime) / weights = {row['peak_over_weights']}"
    )
    head += f"\n  peak first reached in: {row['peak_reached_in']}"
    if row["delta_check"]:
        head += f"\n  deltas vs saved: relative max diff {row['delta_check']['relative']:.3g}"
    lines = [
        head,
        "  | phase | calls | s | RSS before | peak during | after | largest rise in a call |",
        "  |---|---|---|---|---|---|---|",
    ]
    for p in row["phases"]:
        lines.append(
            f"  | {p['phase']} | {p['calls']} | {p['seconds']} | {p['before_mb']} "
            f"| {p['peak_mb']} | {p['after_mb']} | {p['max_rise_mb']} |"
        )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--n", type=int, default=20, help="built-in facts edited")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--model", default=None, help="model spec (default: the default model)")
    ap.add_argument("--uncached", action="store_true", help="generate the corpus and C, not read")
    ap.add_argument("--eval", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument(
        "--trim", action="store_true", help="malloc_trim before each phase (diagnosis only)"
    )
    ap.add_argument("--save-deltas", default=None, help="write the weight deltas here")
    ap.add_argument("--compare", default=None, help="compare the deltas with those saved here")
    ap.add_argument("--out", default=None, help="write the rows as JSON here")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args)), flush=True)
        return
    rows = []
    for method in args.methods.split(","):
        cmd = [sys.executable, __file__, "--child", method, "--n", str(args.n)]
        cmd += ["--threads", str(args.threads)]
        cmd += ["--model", args.model] if args.model else []
        cmd += ["--uncached"] if args.uncached else []
        cmd += [] if args.eval else ["--no-eval"]
        cmd += ["--trim"] if args.trim else []
        cmd += ["--save-deltas", args.save_deltas] if args.save_deltas else []
        cmd += ["--compare", args.compare] if args.compare else []
        env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
        done = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if done.returncode:
            tail = done.stderr.strip().splitlines()[-1:] or ["no output"]
            rows.append({"method": method, "error": tail[0][:300]})
        else:
            rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
        print(table(rows[-1]), flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps({"rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
