"""Evaluation throughput: batched evaluation of N cases vs one case at a time, same run.

    python benchmarks/bench_eval.py [--suite medcf] [--data ../shared/data/MedCF/test.json]
                                    [--n 32] [--batch-size 32] [--model SPEC] [--device D]
                                    [--out FILE]

Both ways evaluate the unedited default model on the same N cases, both protocols (teacher-forced
scoring and greedy generation), and must give the same metrics; the script prints cases per
second for each and the speed-up (goal: >= 5x on CPU).
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

from medit.bench.suites import get_suite  # noqa: E402
from medit.core.models import DEFAULT_MODEL, load_model  # noqa: E402
from medit.evaluation import evaluate  # noqa: E402
from medit.facts.requests import BUILTIN, load_requests  # noqa: E402

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--suite", default="medcf")
    ap.add_argument("--data", default=str(DATA / "MedCF" / "test.json"))
    ap.add_argument("--n", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--model", default=DEFAULT_MODEL)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    suite = get_suite(args.suite)
    # medit's own reader (no `datasets` needed, so the script also runs on a bare GPU machine)
    requests = load_requests(args.data if suite.needs_data else BUILTIN)[: args.n]
    lm = load_model(args.model, args.device)
    cfg = dataclasses.replace(suite.eval, batch_size=args.batch_size)
    run = lambda reqs: evaluate(lm.model, lm.tokenizer, lm.arch, reqs, cfg)  # noqa: E731
    run(requests[:2])  # warm-up

    t = time.perf_counter()
    batched = run(requests)
    batched_s = time.perf_counter() - t
    t = time.perf_counter()
    single = [run([r])[0] for r in requests]
    single_s = time.perf_counter() - t

    key = lambda s: (s["teacher_forced"]["efficacy"], s["teacher_forced"]["generality"])  # noqa: E731
    same_tf = all(key(a) == key(b) for a, b in zip(batched, single, strict=True))
    agree = sum(
        a["generation"]["prompt"]["text"] == b["generation"]["prompt"]["text"]
        for a, b in zip(batched, single, strict=True)
    )
    figures = {
        "device": str(lm.device),
        "device_name": torch.cuda.get_device_name(lm.device) if lm.device.type == "cuda" else None,
        "model": args.model,
        "torch_threads": torch.get_num_threads(),
        "suite": args.suite,
        "n_cases": len(requests),
        "batch_size": args.batch_size,
        "batched_cases_per_s": len(requests) / batched_s,
        "one_at_a_time_cases_per_s": len(requests) / single_s,
        "speedup": single_s / batched_s,
        "teacher_forced_accuracies_identical": same_tf,
        "identical_generations": f"{agree}/{len(requests)}",
    }
    print(
        f"{args.suite}: {len(requests)} cases on {figures['device']} "
        f"({figures['torch_threads']} threads), both protocols"
    )
    print(f"  batched (batch {args.batch_size}): {figures['batched_cases_per_s']:.2f} cases/s")
    print(f"  one at a time:    {figures['one_at_a_time_cases_per_s']:.2f} cases/s")
    print(
        f"  speed-up {figures['speedup']:.1f}x; teacher-forced accuracies identical: {same_tf}; "
        f"identical greedy generations: {figures['identical_generations']}"
    )
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(figures, indent=2) + "\n")


if __name__ == "__main__":
    main()
