"""MedLaSA's learning rate, chosen on a validation split (never on the test cases).

    python benchmarks/bench_medlasa_lr.py [--data ../shared/data/MedCF/valid.json] [--n 16]
                                          [--lrs 1e-5,3e-5,1e-4,3e-4] [--out FILE]

The paper's presets (lr 1e-5 for MedCF, 5e-5 for MedFE) were tuned for 7B models. For every lr
the first n cases are edited one at a time (single mode, the preset otherwise unchanged), and
evaluated teacher-forced right after their edit: efficacy and generality with the default routing
(nearest), and locality twice, routed and with the adapter applied everywhere (``always``, which
shows how far the adapter itself reaches beyond its fact). Per lr it prints those means, the
final training loss and the seconds per edit.
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
from medit.editors.patching.bank import bank_of  # noqa: E402
from medit.editors.registry import make_editor  # noqa: E402
from medit.evaluation import EvalConfig, aggregate, evaluate  # noqa: E402
from medit.facts.requests import load_requests  # noqa: E402

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def sweep(lm, reqs, lr: float, preset: str, reference) -> dict:
    cfg = EvalConfig(generation=False)
    editor = make_editor("medlasa", lr=lr, preset=preset)
    routed, everywhere, losses, seconds = [], [], [], []
    for i, req in enumerate(reqs):
        result = editor.apply(lm.model, lm.tokenizer, [req])
        seconds.append(result.seconds)
        losses.append(result.diagnostics[0]["losses"][-1])
        router = bank_of(lm.model).router
        routed += evaluate(lm.model, lm.tokenizer, lm.arch, [req], cfg, reference[i : i + 1])
        nearest = router.routing
        router.routing = dataclasses.replace(nearest, mode="always")
        try:
            everywhere += evaluate(
                lm.model, lm.tokenizer, lm.arch, [req], cfg, reference[i : i + 1]
            )
        finally:
            router.routing = nearest
        result.restore()
        print(f"  lr {lr:g}: {i + 1}/{len(reqs)} final loss {losses[-1]:.3f}", flush=True)
    a, b = aggregate(routed), aggregate(everywhere)
    return {
        "lr": lr,
        "efficacy": 100 * a["teacher_forced"]["efficacy"],
        "generality": 100 * a["teacher_forced"]["generality"],
        "locality_routed": 100 * a["teacher_forced"]["locality_mean"],
        "locality_always": 100 * b["teacher_forced"]["locality_mean"],
        "final_loss_mean": sum(losses) / len(losses),
        "seconds_per_edit": sum(seconds) / len(seconds),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--data", default=str(DATA / "MedCF" / "valid.json"))
    ap.add_argument("--preset", default="medcf", choices=("medcf", "medfe"))
    ap.add_argument("--n", type=int, default=16)
    ap.add_argument("--lrs", default="1e-5,3e-5,1e-4,3e-4")
    ap.add_argument("--model", default=DEFAULT_MODEL)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    reqs = load_requests(args.data)[: args.n]
    lm = load_model(args.model)
    torch.manual_seed(0)
    t = time.perf_counter()
    reference = evaluate(lm.model, lm.tokenizer, lm.arch, reqs, EvalConfig(generation=False))
    print(f"unedited evaluation of {len(reqs)} cases: {time.perf_counter() - t:.1f} s", flush=True)
    rows = [sweep(lm, reqs, float(lr), args.preset, reference) for lr in args.lrs.split(",")]
    print(
        f"\nmedlasa (preset {args.preset}) on {Path(args.data).name}, first {len(reqs)} cases, "
        f"{lm.device}, {torch.get_num_threads()} threads; teacher-forced, %"
    )
    print(
        "| lr | Efficacy | Generality | Locality (routed) | Locality (always) | final loss | "
        "s/edit |\n|---|---|---|---|---|---|---|"
    )
    for r in rows:
        print(
            f"| {r['lr']:g} | {r['efficacy']:.1f} | {r['generality']:.1f} | "
            f"{r['locality_routed']:.1f} | {r['locality_always']:.1f} | "
            f"{r['final_loss_mean']:.3f} | {r['seconds_per_edit']:.1f} |"
        )
    if args.out:
        out = {
            "data": args.data,
            "n": len(reqs),
            "preset": args.preset,
            "device": str(lm.device),
            "torch_threads": torch.get_num_threads(),
            "rows": rows,
        }
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
