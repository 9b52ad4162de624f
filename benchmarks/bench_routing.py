"""MedLaSA routing: how well nearest-knowledge similarity separates paraphrases from locality
probes, on a validation split (thresholds are chosen here, never on the test split).

    python benchmarks/bench_routing.py [--data ../shared/data/MedCF/valid.json] [--n 100]
                                       [--depths 0.25,0.5,0.75] [--out FILE]

For each case the edit prompt is the key; its paraphrases should route to it (gate on) and its
locality probes should not (gate off). Prints, per representation depth, the similarity
quantiles of both groups and, for the default gates, the share of paraphrases fully on and of
probes fully off.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from medit.editors._adapters import AdapterBank, RoutingConfig  # noqa: E402
from medit.models import DEFAULT_MODEL, load_model  # noqa: E402
from medit.requests import load_requests  # noqa: E402

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--data", default=str(DATA / "MedCF" / "valid.json"))
    ap.add_argument("--n", type=int, default=100)
    ap.add_argument("--depths", default="0.25,0.5,0.75")
    ap.add_argument("--model", default=DEFAULT_MODEL)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    reqs = load_requests(args.data)[: args.n]
    lm = load_model(args.model)
    figures = {"data": args.data, "n_cases": len(reqs), "depths": {}}
    for depth in [float(d) for d in args.depths.split(",")]:
        cfg = RoutingConfig(route_depth=depth)
        bank = AdapterBank(lm.model, lm.tokenizer, lm.arch, cfg)
        keys = bank.represent([r.prompt for r in reqs])
        para, local, cross = [], [], []
        for i, r in enumerate(reqs):
            if r.rephrase_prompts:
                para += (bank.represent(list(r.rephrase_prompts)) @ keys[i]).tolist()
            probes = [p for ps in r.locality.values() for p, _ in ps if p != r.prompt]
            if probes:
                sims = bank.represent(probes) @ keys.T  # nearest edit among all keys
                local += sims.max(1).values.tolist()
            others = torch.cat([keys[:i], keys[i + 1 :]])
            cross.append((others @ keys[i]).max().item())
        q = lambda v: [round(x, 3) for x in torch.tensor(v).quantile(  # noqa: E731
            torch.tensor([0.05, 0.25, 0.5, 0.75, 0.95])).tolist()]
        on = sum(s >= cfg.gate_on for s in para) / len(para)
        off = sum(s <= cfg.gate_off for s in local) / len(local)
        figures["depths"][str(depth)] = {
            "paraphrase_sim_q05_q25_q50_q75_q95": q(para),
            "locality_max_sim_q05_q25_q50_q75_q95": q(local),
            "other_edits_max_sim_q05_q25_q50_q75_q95": q(cross),
            f"paraphrases_fully_on(>={cfg.gate_on})": on,
            f"locality_probes_fully_off(<={cfg.gate_off})": off,
        }
        print(f"depth {depth}: paraphrase sims {q(para)}; locality sims {q(local)}; "
              f"on {on:.2f}, off {off:.2f}")
    if args.out:
        Path(args.out).write_text(json.dumps(figures, indent=2) + "\n")


if __name__ == "__main__":
    main()
