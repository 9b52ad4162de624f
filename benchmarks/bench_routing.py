"""MedLaSA routing: does nearest-knowledge gating open the adapter for paraphrases and keep it
shut for locality probes? Measured on a validation split (the gates are chosen here, never on
the test split), against the paper's oracle baseline, which never shuts an adapter.

    python benchmarks/bench_routing.py [--data ../shared/data/MedCF/valid.json] [--n 100]
                                       [--out FILE]

Every case's edit prompt becomes a key (its subject known, as at edit time). Each paraphrase and
each locality probe is routed among all keys exactly as medit does at inference; the script
prints, per group, the mean gate and the share of inputs fully on / fully off, and the
similarity quantiles behind them.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from medit.core.models import DEFAULT_MODEL, load_model  # noqa: E402
from medit.editors.patching.adapters import Adapter  # noqa: E402
from medit.editors.patching.bank import PatchBank  # noqa: E402
from medit.editors.patching.routing import RoutingConfig, SequenceRouter  # noqa: E402
from medit.facts.requests import load_requests  # noqa: E402

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--data", default=str(DATA / "MedCF" / "valid.json"))
    ap.add_argument("--n", type=int, default=100)
    ap.add_argument("--model", default=DEFAULT_MODEL)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    reqs = load_requests(args.data)[: args.n]
    lm = load_model(args.model)
    patches = PatchBank(lm.model, lm.arch)
    bank = SequenceRouter(patches, lm.tokenizer, RoutingConfig())
    patches.router = bank
    t = time.perf_counter()
    keys = bank.represent(bank._encode([r.prompt for r in reqs]))
    patches.patches = [
        Adapter(r.id, r.prompt, {}, {}, {}, key=k, subject=r.subject or "")
        for r, k in zip(reqs, keys, strict=True)
    ]
    groups: dict[str, list[tuple[float, bool]]] = {}
    sims: dict[str, list[float]] = {}
    n_inputs = 0
    for i, r in enumerate(reqs):
        inputs = [("paraphrase", p) for p in r.rephrase_prompts]
        inputs += [
            (f"locality:{t}", p) for t, ps in r.locality.items() for p, _ in ps if p != r.prompt
        ]
        if not inputs:
            continue
        n_inputs += len(inputs)
        rows = bank._encode([p for _, p in inputs])
        which, gate = bank._nearest(rows, [p for _, p in inputs])
        reps = bank.represent(rows)
        for (group, _), w, g, rep in zip(inputs, which.tolist(), gate.tolist(), reps, strict=True):
            own = w == i  # routed to its own case's edit
            groups.setdefault(group, []).append((g, own))
            sims.setdefault(group, []).append(float(rep @ keys[i]))
    seconds = time.perf_counter() - t
    q = torch.tensor([0.05, 0.25, 0.5, 0.75, 0.95])
    figures = {
        "data": args.data,
        "n_cases": len(reqs),
        "n_inputs": n_inputs,
        "routing": vars(RoutingConfig()),
        "seconds_per_input": seconds / max(n_inputs, 1),
        "groups": {},
    }
    print(
        f"{Path(args.data).parent.name}/{Path(args.data).name}: {len(reqs)} edits, "
        f"{n_inputs} inputs routed ({1000 * seconds / max(n_inputs, 1):.1f} ms each)"
    )
    print(
        f"  {'group':20s} {'mean gate':>9s} {'fully on':>9s} {'off':>6s} {'own edit':>9s}  "
        "similarity to own key (q05 q25 q50 q75 q95)"
    )
    for group, vals in sorted(groups.items()):
        gates = torch.tensor([g for g, _ in vals])
        row = {
            "mean_gate": gates.mean().item(),
            "fully_on": (gates >= 1).float().mean().item(),
            "off": (gates <= 0).float().mean().item(),
            "routed_to_own_edit": sum(o for _, o in vals) / len(vals),
            "similarity_quantiles": [
                round(x, 3) for x in torch.tensor(sims[group]).quantile(q).tolist()
            ],
        }
        figures["groups"][group] = row
        print(
            f"  {group:20s} {row['mean_gate']:9.2f} {row['fully_on']:9.2f} {row['off']:6.2f} "
            f"{row['routed_to_own_edit']:9.2f}  {row['similarity_quantiles']}"
        )
    print("  oracle baseline (the paper): every input keeps its adapter on (gate 1 everywhere)")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(figures, indent=2) + "\n")


if __name__ == "__main__":
    main()
