"""Causal tracing on the default model: batched vs ROME's loop, and the fast estimate.

    python benchmarks/bench_tracing.py [--reference 3] [--device auto] [--threads N]
                                       [--out benchmarks/results/tracing_cpu.json]

Prints, in one run, for drug-fact prompts whose subject sits first, mid-sentence or at the end
(where restorations before the subject are skipped and most positions come from the cache):
* the batched full trace (hidden, mlp, attn; 10 noise samples; window 10) next to ROME's loop
  (one full forward of 1 + k rows per restoration; ``medit.tracing.trace.trace_reference``) on the
  first ``--reference`` prompts: largest score difference, speed ratio, and the ratio of work
  (token x layer passes) the two do;
* seconds per prompt of the full and the fast (attribution patching) trace;
* Pearson and Spearman correlation of fast and full indirect effects per kind, over the cells
  of the subject and the tokens after it (earlier tokens are the corrupted score in both);
* the peak layers of each drug fact's association profile.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from medit.core.models import load_model  # noqa: E402
from medit.facts.requests import load_requests  # noqa: E402
from medit.tracing.trace import (  # noqa: E402
    TraceConfig,
    _join_layer,
    noise_level,
    trace,
    trace_reference,
)

#: (prompt, subject, where the subject sits): drug facts the model gets (about) right; the
#: first ones are also traced with ROME's loop
PROMPTS = [
    ("Aspirin irreversibly inhibits the enzyme", "Aspirin", "first"),
    ("Statins such as atorvastatin lower the level of", "atorvastatin", "mid"),
    ("The drug of choice for anaphylaxis is", "anaphylaxis", "end"),
    ("Atorvastatin lowers cholesterol by inhibiting the enzyme", "Atorvastatin", "first"),
    ("Ciprofloxacin belongs to the antibiotic class called", "Ciprofloxacin", "first"),
    ("Warfarin is an anticoagulant that inhibits", "Warfarin", "first"),
]


def work(n_tokens: int, start_token: int, n_layers: int, cfg: TraceConfig) -> tuple[int, int]:
    """(reference, batched) token x layer passes of one prompt's full trace (the batched one
    includes its pass over the clean and corrupted runs; a hidden cell runs from the layer after
    it, and none for the last layer)."""
    ref = len(cfg.kinds) * n_tokens * n_layers * (cfg.samples + 1) * n_tokens * n_layers
    ours = (cfg.samples + 1) * n_tokens * n_layers
    for kind in cfg.kinds:
        for layer in range(n_layers):
            first = _join_layer(kind, layer, n_layers, cfg.window)
            for t in range(start_token, n_tokens):
                ours += cfg.samples * (n_tokens - t) * (n_layers - first)
    return ref, ours


def correlations(full, fast) -> dict[str, dict[str, float]]:
    start = full.subject_range[0]
    out = {}
    for kind in full.scores:
        a = full.effects(kind)[start:].flatten().numpy()
        b = fast.effects(kind)[start:].flatten().numpy()
        rank = lambda x: np.argsort(np.argsort(x))  # noqa: E731
        out[kind] = {
            "pearson": float(np.corrcoef(a, b)[0, 1]),
            "spearman": float(np.corrcoef(rank(a), rank(b))[0, 1]),
        }
    return out


def one_prompt(lm, prompt, subject, where, cfg, noise, with_reference: bool) -> dict:
    model, tok, arch = lm.model, lm.tokenizer, lm.arch
    full = trace(model, tok, arch, prompt, subject, None, cfg, noise)
    fast = trace(
        model, tok, arch, prompt, subject, None, dataclasses.replace(cfg, mode="fast"), noise
    )
    n_layers = arch.n_layers(model)
    ref_work, our_work = work(len(full.tokens), full.subject_range[0], n_layers, cfg)
    row = {
        "prompt": prompt,
        "subject": subject,
        "subject_position": where,
        "n_tokens": len(full.tokens),
        "subject_range": list(full.subject_range),
        "answer_token": full.answer_token,
        "clean_prob": full.clean_prob,
        "corrupted_prob": full.corrupted_prob,
        "full_s": full.seconds,
        "fast_s": fast.seconds,
        "work_ratio": ref_work / our_work,
        "fast_vs_full": correlations(full, fast),
        "peak_layers": full.peak_layers(),
    }
    if with_reference:
        t0 = time.perf_counter()
        ref = trace_reference(model, tok, arch, prompt, subject, full.answer_id, cfg, noise)
        row["reference_s"] = time.perf_counter() - t0
        row["max_abs_diff"] = max(
            (torch.tensor(full.scores[k]) - ref[k]).abs().max().item() for k in cfg.kinds
        )
        row["speedup"] = row["reference_s"] / full.seconds
    return row


def report(row: dict) -> None:
    print(
        f"{row['prompt']!r} [{row['subject']}: tokens {row['subject_range']} of "
        f"{row['n_tokens']}] -> {row['answer_token']!r} p={row['clean_prob']:.3f}, "
        f"corrupted {row['corrupted_prob']:.3f}"
    )
    line = f"  full {row['full_s']:.1f} s, fast {row['fast_s']:.2f} s"
    if "reference_s" in row:
        line += (
            f"; ROME loop {row['reference_s']:.1f} s -> {row['speedup']:.2f}x "
            f"(work ratio {row['work_ratio']:.2f}x), max |diff| {row['max_abs_diff']:.2e}"
        )
    print(line)
    corr = ", ".join(
        f"{k} r={v['pearson']:.2f} rho={v['spearman']:.2f}" for k, v in row["fast_vs_full"].items()
    )
    print(f"  fast vs full: {corr}; peak layers {row['peak_layers']}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--reference", type=int, default=3, help="prompts also run with ROME's loop")
    ap.add_argument("--prompts", type=int, default=len(PROMPTS), help="prompts traced")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    ap.add_argument("--out", default=None, help="write the figures as JSON here")
    ap.add_argument("--note", default=None, help="conditions of the run, kept in the JSON")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    lm = load_model("builtin:smollm2", args.device)
    cfg = TraceConfig()
    requests = load_requests("builtin")
    noise = noise_level(lm.model, lm.tokenizer, lm.arch, [(r.prompt, r.subject) for r in requests])
    print(
        f"device {lm.device} ({torch.get_num_threads()} threads); noise {noise:.4f} "
        f"(3 x std of the built-in subjects' embeddings); {cfg.samples} samples, "
        f"window {cfg.window}"
    )
    rows = []
    for i, (prompt, subject, where) in enumerate(PROMPTS[: args.prompts]):
        rows.append(one_prompt(lm, prompt, subject, where, cfg, noise, i < args.reference))
        report(rows[-1])

    with_ref = [r for r in rows if "reference_s" in r]
    kinds = list(rows[0]["fast_vs_full"])
    summary = {
        "full_seconds_per_prompt": statistics.mean(r["full_s"] for r in rows),
        "fast_seconds_per_prompt": statistics.mean(r["fast_s"] for r in rows),
        "fast_vs_full_mean": {
            k: {
                m: statistics.mean(r["fast_vs_full"][k][m] for r in rows)
                for m in ("pearson", "spearman")
            }
            for k in kinds
        },
    }
    if with_ref:
        summary["speedup_total"] = sum(r["reference_s"] for r in with_ref) / sum(
            r["full_s"] for r in with_ref
        )
        summary["max_abs_diff"] = max(r["max_abs_diff"] for r in with_ref)
        print(
            f"batched vs ROME loop over {len(with_ref)} prompts: "
            f"{summary['speedup_total']:.2f}x, max |score diff| {summary['max_abs_diff']:.2e}"
        )
    print(
        f"seconds per prompt: full {summary['full_seconds_per_prompt']:.1f}, "
        f"fast {summary['fast_seconds_per_prompt']:.2f}"
    )
    for k, v in summary["fast_vs_full_mean"].items():
        print(f"fast vs full, {k}: mean Pearson {v['pearson']:.2f}, Spearman {v['spearman']:.2f}")
    figures = {
        "device": str(lm.device),
        "torch_threads": torch.get_num_threads(),
        "model": "builtin:smollm2",
        "note": args.note,
        "settings": cfg.settings(noise),
        **summary,
        "prompts": rows,
    }
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(figures, indent=2) + "\n")


if __name__ == "__main__":
    main()
