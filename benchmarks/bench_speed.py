"""Every editor on the same facts: seconds per edit against its floor, peak memory, quality.

    python benchmarks/bench_speed.py [--methods ft-m,lora,rome,...] [--n 20] [--threads 2]
                                     [--device auto] [--out benchmarks/results/speed_cpu.json]

Each method runs in a process of its own (so that its peak resident memory is its own) on the
first N built-in facts in single mode: one warm-up edit (restored; it computes what a method keeps
per model: covariance statistics, the generated corpus, projectors), then each fact edited,
asked again under greedy decoding and restored. A causal trace is per prompt, so MedLaSA's traces
are not read from the cache (``--fresh-traces``, on by default). Printed, one row per method:

* s/edit: the median over the N edits of the editor's own clock (``result.seconds``);
* floor: the median over the edits of steps x (one forward and backward, on the rows the
  method trains on, of the layers from the lowest trained layer up and the output head) plus one
  forward of the whole model (the edit's inputs must be read once), each timed here on the same
  inputs; ratio = s/edit / floor. Where a method does work no step of training pays for (a
  causal trace, a covariance solve), the ratio shows it;
* peak RSS (the process's maximum resident memory, model included) and, after taking away
  the runtime (the resident memory after loading, less the weights: the interpreter, torch and
  its libraries), its multiple of the weights' bytes;
* generation-based efficacy / generality / locality over the N facts (%), the quality beside
  the speed.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import statistics
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

#: methods timed by default (ft-l changes nothing a user asked for: left out)
METHODS = (
    "ft-m",
    "lora",
    "adalora",
    "medlasa",
    "rome",
    "memit",
    "alphaedit",
    "grace",
    "tpatcher",
    "scen",
    "wise",
    "ultraedit",
)
#: methods whose trained value sits at the last of their layers (the others: the first)
TRAIN_AT_TOP = ("memit", "alphaedit")
#: the incumbent's figures on this machine class, 2 threads, same model (issue 18), s/edit
INCUMBENT = {"ft-m": 3.5, "rome": 39.5, "lora": 20.0, "grace": 7.0}


def _layers(names) -> list[int]:
    found = [re.search(r"(?:layers|\.h)\.(\d+)\.", n) for n in names]
    return sorted({int(m.group(1)) for m in found if m})


def _steps(diagnostics: list[dict]) -> int:
    return sum(
        int(d.get("steps", 0)) + int(d.get("expert_steps", 0)) + int(d.get("neuron_steps", 0))
        for d in diagnostics
    )


def _rows(method: str, hp) -> int:
    """Rows one training step of ``method`` runs on (its prompt under context templates)."""
    if hasattr(hp, "prefix_count") and hasattr(hp, "prefix_lengths"):
        return 1 + hp.prefix_count * len(hp.prefix_lengths) + (1 if hp.kl_factor else 0)
    if method == "wise":
        return 1 + 2 * hp.templates
    return 1


def _rss_mb() -> float:
    """The process's resident memory now (MB), from /proc (Linux)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def _floor_parts(lm, req, layer: int, rows: int) -> tuple[float, float]:
    """(one forward+backward of layers >= ``layer`` and the head on ``rows`` copies of the
    edit's prompt + target, one forward of the whole model on the prompt + target)."""
    import torch
    from bench_lifelong import timed

    from medit.core.forward import target_nll
    from medit.core.hooks import capture_input, frozen_prefix
    from medit.core.text import teacher_batch

    model, arch = lm.model, lm.arch
    batch = teacher_batch(lm.tokenizer, [req.prompt] * rows, [req.target_new] * rows)
    batch = batch.to(lm.device)
    with torch.no_grad():
        hidden = capture_input(arch.layer_list(model)[layer], lambda: model(batch.input_ids))
    probe = torch.zeros(hidden.shape[-1], device=hidden.device, requires_grad=True)

    def step():
        with torch.enable_grad(), frozen_prefix(model, arch, layer, hidden + probe):
            target_nll(model, arch, batch).backward()

    one = teacher_batch(lm.tokenizer, [req.prompt], [req.target_new]).to(lm.device)

    def forward_one():
        with torch.no_grad():
            target_nll(model, arch, one)

    return timed(step, repeat=3), timed(forward_one, repeat=3)


def child(args) -> dict:
    """One method's figures (run in its own process)."""
    import torch

    torch.set_num_threads(args.threads)
    from medit.core.models import DEFAULT_MODEL, load_model
    from medit.editors.registry import make_editor
    from medit.evaluation import EvalConfig, aggregate, evaluate
    from medit.facts.requests import load_requests

    method = args.child
    hparams = json.loads(args.hparams or "{}")
    if args.fresh_traces:  # a causal trace is per prompt: a new fact pays for its own
        from medit.tracing import trace

        trace.TRACES.get = lambda key: None
    lm = load_model(args.model or DEFAULT_MODEL, args.device, "float32")
    model, tok, arch = lm.model, lm.tokenizer, lm.arch
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    runtime_mb = _rss_mb() - weights / 2**20  # the interpreter, torch and its libraries
    reqs = load_requests("builtin")[: args.n + 1]
    cfg = EvalConfig(fluency_tokens=0)
    editor = make_editor(method, **hparams)
    editor.apply(model, tok, [reqs[0]]).restore()  # warm-up: per-model statistics
    pre = evaluate(model, tok, arch, reqs[1:], cfg)
    seconds, floors, states = [], [], []
    hp = editor.hparams_for(model)
    rows = _rows(method, hp)
    for req, ref in zip(reqs[1:], pre, strict=True):
        result = editor.apply(model, tok, [req])
        states += evaluate(model, tok, arch, [req], cfg, reference=[ref])
        result.restore()
        seconds.append(result.seconds)
        layers = _layers(result.names)
        layer = (layers[-1] if method in TRAIN_AT_TOP else layers[0]) if layers else 0
        step, forward = _floor_parts(lm, req, layer, rows)
        floors.append(_steps(result.diagnostics) * step + forward)
    g = aggregate(states)["generation"]
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    s, f = statistics.median(seconds), statistics.median(floors)
    return {
        "method": method,
        "hparams": hparams,
        "n": len(seconds),
        "threads": args.threads,
        "device": str(lm.device),
        "seconds_per_edit": round(s, 3),
        "floor_seconds": round(f, 3),
        "ratio_to_floor": round(s / f, 2) if f else None,
        "train_rows": rows,
        "peak_rss_mb": round(peak_mb),
        "weights_mb": round(weights / 2**20),
        "runtime_mb": round(runtime_mb),
        "peak_over_weights": round((peak_mb - runtime_mb) * 2**20 / weights, 2),
        "gen_efficacy": round(100 * g["efficacy_contains"], 1),
        "gen_generality": round(100 * g["generality_contains"], 1),
        "gen_locality": round(100 * g["locality_mean"], 1),
        "incumbent_seconds": INCUMBENT.get(method),
    }


def table(rows: list[dict]) -> str:
    head = (
        "| method | s/edit | floor | ratio | incumbent s/edit | peak RSS MB (x weights) "
        "| gen. eff / gen / loc % |"
    )
    out = [head, "|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            out.append(f"| {r['method']} | failed: {r['error']} | | | | | |")
            continue
        inc = r["incumbent_seconds"]
        out.append(
            f"| {r['method']} | {r['seconds_per_edit']:.2f} | {r['floor_seconds']:.2f} "
            f"| {r['ratio_to_floor']} | {inc if inc is not None else '-'} "
            f"| {r['peak_rss_mb']} ({r['peak_over_weights']}) "
            f"| {r['gen_efficacy']:.0f} / {r['gen_generality']:.0f} / {r['gen_locality']:.0f} |"
        )
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--n", type=int, default=20, help="built-in facts edited (after a warm-up)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--model", default=None, help="model spec (default: the default model)")
    ap.add_argument("--hparam", action="append", default=[], help="METHOD:JSON overrides")
    ap.add_argument("--fresh-traces", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--out", default=None, help="write the rows as JSON here")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--hparams", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args)), flush=True)
        return
    overrides = dict(h.split(":", 1) for h in args.hparam)
    rows = []
    for method in args.methods.split(","):
        cmd = [sys.executable, __file__, "--child", method, "--n", str(args.n)]
        cmd += ["--threads", str(args.threads), "--device", args.device]
        cmd += ["--hparams", overrides.get(method, "{}")]
        cmd += ["--model", args.model] if args.model else []
        cmd += [] if args.fresh_traces else ["--no-fresh-traces"]
        env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
        done = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if done.returncode:
            tail = done.stderr.strip().splitlines()[-1:] or ["no output"]
            rows.append({"method": method, "error": tail[0][:200]})
        else:
            rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    print(table(rows))
    if args.out:
        Path(args.out).write_text(json.dumps({"rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
