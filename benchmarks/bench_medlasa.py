"""MedLaSA editing speed against its floor, and the cost of routing at evaluation.

    python benchmarks/bench_medlasa.py [--n 3] [--data ../shared/data/MedCF/test.json]
                                       [--lr 1e-4] [--out FILE]

Per edit: causal tracing of the edit prompt (uncached), adapter training, and the floor of the
training: steps x (forward + backward of the model with the adapters on the same batch),
measured in the same run. Then the evaluation of the n cases with the n adapters installed and
routed, against the same adapters merged into the weights (the overhead of routing), beside the
unedited model's.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from medit.core.models import DEFAULT_MODEL, load_model  # noqa: E402
from medit.editors import medlasa as M  # noqa: E402
from medit.editors.medlasa import train_adapter  # noqa: E402
from medit.editors.patching.bank import bank_of  # noqa: E402
from medit.editors.registry import make_editor  # noqa: E402
from medit.evaluation import EvalConfig, evaluate  # noqa: E402
from medit.facts.requests import load_requests  # noqa: E402

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def _floor(lm, req, plan, hp) -> float:
    """Seconds of steps x (forward + backward) with adapters of the same shapes."""
    one = dataclasses.replace(hp, steps=3)
    train_adapter(lm.model, lm.tokenizer, lm.arch, req, plan, one)  # warm-up
    t = time.perf_counter()
    train_adapter(lm.model, lm.tokenizer, lm.arch, req, plan, one)
    per_step = (time.perf_counter() - t) / 3
    return per_step * hp.steps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--data", default=str(DATA / "MedCF" / "test.json"))
    ap.add_argument("--n", type=int, default=3)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--model", default=DEFAULT_MODEL)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    reqs = load_requests(args.data)[130 : 130 + args.n]  # past the cases benchmarked elsewhere
    lm = load_model(args.model)
    torch.manual_seed(0)
    cfg = EvalConfig()
    t = time.perf_counter()
    base_eval = evaluate(lm.model, lm.tokenizer, lm.arch, reqs, cfg)
    base_eval_s = time.perf_counter() - t
    editor = make_editor("medlasa", lr=args.lr)
    results, rows = [], []
    for req in reqs:
        hp = editor.hparams_for(lm.model)
        bank = bank_of(lm.model)
        if bank is not None:
            bank.enabled = False  # trace and time the base model, as the editor does
        t = time.perf_counter()
        scores = editor._scores(lm.model, lm.tokenizer, lm.arch, req, hp)  # cached for apply()
        trace_s = time.perf_counter() - t
        plan = M.module_plan(
            lm.arch,
            lm.arch.n_layers(lm.model),
            lm.arch.resolve_kinds(hp.targets),
            scores,
            scores,
            hp,
        )
        floor_s = _floor(lm, req, plan, hp)
        if bank is not None:
            bank.enabled = True
        result = editor.apply(lm.model, lm.tokenizer, [req])  # trace now cached: train only
        results.append(result)
        rows.append(
            {
                "trace_s": trace_s,
                "edit_s": result.seconds,
                "floor_s": floor_s,
                "steps": result.diagnostics[0]["steps"],
            }
        )
    t = time.perf_counter()
    evaluate(lm.model, lm.tokenizer, lm.arch, reqs, cfg, reference=base_eval)
    routed_eval_s = time.perf_counter() - t
    # the same adapters merged into the weights (each fully on, no routing): the overhead of
    # routing is the difference (generation lengths differ only where a gate stays shut)
    combined = type(results[0]).combine(results)
    with combined.merged_into_model():
        t = time.perf_counter()
        evaluate(lm.model, lm.tokenizer, lm.arch, reqs, cfg, reference=base_eval)
        merged_eval_s = time.perf_counter() - t
    mean = lambda k: sum(r[k] for r in rows) / len(rows)  # noqa: E731
    figures = {
        "device": str(lm.device),
        "torch_threads": torch.get_num_threads(),
        "n": len(reqs),
        "trace_seconds_per_edit": mean("trace_s"),
        "train_seconds_per_edit": mean("edit_s"),
        "floor_seconds_per_edit": mean("floor_s"),
        "ratio_to_floor": mean("edit_s") / mean("floor_s"),
        "eval_seconds_unedited": base_eval_s,
        "eval_seconds_routed": routed_eval_s,
        "eval_seconds_merged": merged_eval_s,
        "routing_overhead": routed_eval_s / merged_eval_s,
        "per_edit": rows,
    }
    print(f"medlasa on {lm.device} ({figures['torch_threads']} threads), {len(reqs)} MedCF edits")
    print(f"  tracing (full, uncached): {figures['trace_seconds_per_edit']:.1f} s/edit")
    print(
        f"  training: {figures['train_seconds_per_edit']:.1f} s/edit; floor "
        f"(steps x fwd+bwd) {figures['floor_seconds_per_edit']:.1f} s -> "
        f"{figures['ratio_to_floor']:.2f}x the floor"
    )
    print(
        f"  evaluation of {len(reqs)} cases: unedited {base_eval_s:.1f} s; {len(reqs)} adapters "
        f"routed {routed_eval_s:.1f} s vs merged into the weights {merged_eval_s:.1f} s "
        f"(routing overhead {figures['routing_overhead']:.2f}x)"
    )
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(figures, indent=2) + "\n")
    for r in results:
        r.restore()


if __name__ == "__main__":
    main()
