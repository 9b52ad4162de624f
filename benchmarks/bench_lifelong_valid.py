"""A lifelong editor's settings on the MedCF validation split (never the test split): UltraEdit's
step and turn sizes, SCEN's expert (low-rank against the paper's full copy) and neurons.

    python benchmarks/bench_lifelong_valid.py --n 15 --turn 1 '{"preset": "paper"}' '{"lr": 1e-4, "iters": 5, "stop_loss": 0.05}'
    python benchmarks/bench_lifelong_valid.py --n 15 --single '{"lr": 1e-4, "iters": 5, "stop_loss": 0.05}'
    python benchmarks/bench_lifelong_valid.py --method scen --n 50 '{}' '{"expert": "full", "expert_lr": 1e-3}'
    python benchmarks/bench_lifelong_valid.py --method medlasa --n 48 --seq 16 '{}' '{"trace_mode": "full", "early_stop_loss": 0}'

Each configuration (a JSON object of hyper-parameters) edits the first N validation cases in
turns of ``--turn`` requests (one ``apply`` per turn, 1: the sequential benchmark's setting),
then asks all N again under both protocols against the base model's answers; with
``--single`` every edit is applied alone, scored and restored; with ``--seq S`` the N cases are
edited in sequences of S (each sequence asked again at its end, then restored, so that 48
cases at ``--seq 16`` are three 16-edit sequences). One JSON line per configuration:
teacher-forced and generation-based efficacy / generality / locality (%), seconds per edit,
and the mean of the per-edit diagnostics the editor reports (bytes kept, steps, losses).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from medit.bench.suites import get_suite  # noqa: E402
from medit.core.models import DEFAULT_MODEL, load_model  # noqa: E402
from medit.editors.registry import make_editor  # noqa: E402
from medit.evaluation import EvalConfig, aggregate, evaluate  # noqa: E402


def scores(states) -> dict:
    a = aggregate(states)
    tf, g = a["teacher_forced"], a["generation"]
    pct = lambda *xs: [round(100 * x) for x in xs]  # noqa: E731
    return {
        "tf": pct(tf["efficacy"], tf["generality"], tf["locality_mean"]),
        "gen": pct(g["efficacy_contains"], g["generality_contains"], g["locality_mean"]),
    }


#: per-edit diagnostics worth a mean in the row (those the editor reports)
DIAGNOSTICS = ("bytes", "steps", "expert_steps", "neuron_steps", "loss", "act_in", "act_out")


def means(diagnostics: list[dict]) -> dict:
    """Mean of each numeric diagnostic of :data:`DIAGNOSTICS` over the edits that report it."""
    out = {}
    for key in DIAGNOSTICS:
        values = [d[key] for d in diagnostics if isinstance(d.get(key), (int, float))]
        if values:
            out[f"mean_{key}"] = round(sum(values) / len(values), 3)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("configs", nargs="+", help="JSON objects of hyper-parameters")
    ap.add_argument("--method", default="ultraedit")
    ap.add_argument("--data", default="../shared/data/MedCF/valid.json")
    ap.add_argument("--n", type=int, default=15)
    ap.add_argument("--turn", type=int, default=1)
    ap.add_argument("--single", action="store_true")
    ap.add_argument("--seq", type=int, default=0, help="sequences of this many cases (0: all N)")
    args = ap.parse_args()
    lm = load_model(DEFAULT_MODEL, "cpu", "float32")
    model, tok, arch = lm.model, lm.tokenizer, lm.arch
    reqs = get_suite("medcf").load(args.data, limit=args.n)
    size = args.seq or len(reqs)  # cases per sequence (all N in one by default)
    cfg = EvalConfig(fluency_tokens=0)
    ref = evaluate(model, tok, arch, reqs, cfg)
    for spec in args.configs:
        hp = json.loads(spec)
        edit_seconds, kept = 0.0, []
        if args.single:
            states = []
            for i, r in enumerate(reqs):
                result = make_editor(args.method, **hp).apply(model, tok, [r])
                edit_seconds += result.seconds
                kept += getattr(result, "diagnostics", [])
                states += evaluate(model, tok, arch, [r], cfg, reference=[ref[i]])
                result.restore()
        else:
            states = []
            for start in range(0, len(reqs), size):
                block = reqs[start : start + size]
                editor, prior = make_editor(args.method, **hp), None
                for s in range(0, len(block), args.turn):
                    last = editor.apply(model, tok, block[s : s + args.turn], prior=prior)
                    edit_seconds += last.seconds
                    kept += getattr(last, "diagnostics", [])
                    prior = last if prior is None else type(last).combine([prior, last])
                states += evaluate(
                    model, tok, arch, block, cfg, reference=ref[start : start + size]
                )
                prior.restore()
        row = {
            "method": args.method,
            "hp": hp,
            "turn": "single" if args.single else args.turn,
            "seq": None if args.single else size,
            "n": len(reqs),
            "seconds_per_edit": round(edit_seconds / len(reqs), 2),
            **scores(states),
        }
        row.update(means(kept))
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
