"""Locate-then-edit (ROME, MEMIT, AlphaEdit): covariance cost, how many tokens C needs, and
seconds per edit against the floor.

    python benchmarks/bench_locate.py [--n 3] [--data ../shared/data/MedCF/test.json]
                                      [--model builtin:smollm2] [--device cpu] [--out FILE]

1. Covariance, from a cold cache (a temporary MEDIT_CACHE): the time to generate the default
   corpus and the time to accumulate C = E[k kᵀ] over it, with the token count.
2. How many tokens are needed: C estimated from every 16th, 8th, 4th, 2nd corpus text, against
   C from the whole corpus: relative Frobenius error, the smallest eigenvalue, and the
   cosine between ROME's update directions C_N⁻¹k* and C⁻¹k* for real MedCF keys.
3. Seconds per edit for each method (templates and C cached, as after the first edit), against
   the floor: value-optimisation steps taken x (forward + backward of the layers above the edited
   one on the same batch), the per-step cost measured in the same run.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from medit.core.cache import clear_memory  # noqa: E402
from medit.core.models import DEFAULT_MODEL, load_model  # noqa: E402
from medit.editors.locate import keys as _keys  # noqa: E402
from medit.editors.locate.common import base_corpus  # noqa: E402
from medit.editors.locate.covariance import covariance  # noqa: E402
from medit.editors.locate.values import optimise_values  # noqa: E402
from medit.editors.registry import make_editor  # noqa: E402
from medit.facts.corpus import Corpus  # noqa: E402
from medit.facts.requests import load_requests  # noqa: E402
from medit.tracing.trace import request_subjects  # noqa: E402

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def covariance_cost(lm, hp, layers) -> dict:
    t = time.perf_counter()
    corpus = base_corpus(lm.model, lm.tokenizer, hp)
    gen_s = time.perf_counter() - t
    t = time.perf_counter()
    stats = covariance(lm.model, lm.tokenizer, lm.arch, layers, corpus, hp.cov_max_length)
    acc_s = time.perf_counter() - t
    tokens = next(iter(stats.values()))[1]
    return {
        "corpus_texts": len(corpus.texts),
        "tokens": tokens,
        "generate_s": gen_s,
        "accumulate_s": acc_s,
        "layers": list(layers),
        "total_s": gen_s + acc_s,
    }, corpus


def tokens_needed(lm, corpus: Corpus, layer: int, keys: torch.Tensor, hp) -> list[dict]:
    full, n_full = covariance(
        lm.model, lm.tokenizer, lm.arch, [layer], corpus, hp.cov_max_length, cache=False
    )[layer]
    C = full / n_full
    ref = torch.linalg.solve(C, keys.double().T).T  # (n, d_in)
    rows, texts = [], list(corpus.texts)
    for stride in (16, 8, 4, 2):  # every stride-th text: all seed prompts stay represented
        part = Corpus("part", tuple(texts[::stride]))
        s, n = covariance(
            lm.model, lm.tokenizer, lm.arch, [layer], part, hp.cov_max_length, cache=False
        )[layer]
        Cn = s / n
        dirs = torch.linalg.solve(Cn, keys.double().T).T
        cos = torch.nn.functional.cosine_similarity(dirs, ref, dim=-1)
        rows.append(
            {
                "tokens": n,
                "rel_frobenius_error": ((Cn - C).norm() / C.norm()).item(),
                "min_eigenvalue": torch.linalg.eigvalsh(Cn).min().item(),
                "rome_direction_cosine_mean": cos.mean().item(),
                "rome_direction_cosine_min": cos.min().item(),
            }
        )
    rows.append(
        {
            "tokens": n_full,
            "rel_frobenius_error": 0.0,
            "min_eigenvalue": torch.linalg.eigvalsh(C).min().item(),
            "rome_direction_cosine_mean": 1.0,
            "rome_direction_cosine_min": 1.0,
        }
    )
    return rows


def per_step_seconds(lm, method_hp, layer, req, subject, templates) -> float:
    """Seconds of one value-optimisation step: (t(6 steps) - t(1 step)) / 5, early stop off."""
    times = {}
    for steps in (1, 6):
        vs = dataclasses.replace(method_hp.values(), steps=steps, early_stop_loss=-1.0)
        t = time.perf_counter()
        optimise_values(lm.model, lm.tokenizer, lm.arch, layer, [req], [subject], templates, vs)
        times[steps] = time.perf_counter() - t
    return (times[6] - times[1]) / 5


def edit_speed(lm, method: str, reqs) -> dict:
    editor = make_editor(method)
    hp = editor.hparams_for(lm.model)
    editor.apply(lm.model, lm.tokenizer, reqs[:1]).restore()  # warm caches (templates, C, layer)
    rows = []
    subjects = request_subjects(reqs)
    for req, subject in zip(reqs, subjects, strict=True):
        t = time.perf_counter()
        result = editor.apply(lm.model, lm.tokenizer, [req])
        seconds = time.perf_counter() - t
        diag = result.diagnostics[0]
        result.restore()
        layer = diag.get("layer", (diag.get("layers") or [0])[-1])
        step = per_step_seconds(lm, hp, layer, req, subject, hp.templates(lm.model, lm.tokenizer))
        floor = diag["value_steps"] * step
        rows.append(
            {
                "seconds": seconds,
                "value_steps": diag["value_steps"],
                "per_step_s": step,
                "floor_s": floor,
                "ratio_to_floor": seconds / floor,
            }
        )
    mean = {k: sum(r[k] for r in rows) / len(rows) for k in rows[0]}
    return {"method": method, "mean": mean, "edits": rows}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--data", default=str(DATA / "MedCF" / "test.json"))
    ap.add_argument("--n", type=int, default=3)
    ap.add_argument("--model", default=DEFAULT_MODEL)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--methods", default="rome,memit,alphaedit")
    ap.add_argument("--out", default=None)
    ap.add_argument(
        "--only",
        choices=("tokens",),
        default=None,
        help="tokens: only the tokens-needed study (cached corpus)",
    )
    args = ap.parse_args()
    reqs = load_requests(args.data)[150 : 150 + args.n]  # past the cases benchmarked elsewhere
    lm = load_model(args.model, device=args.device)
    report = {"model": args.model, "device": str(lm.device), "threads": torch.get_num_threads()}
    hp = make_editor("memit").hparams_for(lm.model)
    layers = hp.resolve_layers(lm.arch.n_layers(lm.model))
    if args.only == "tokens":
        corpus = base_corpus(lm.model, lm.tokenizer, hp)
        keys = _keys.request_keys(
            lm.model,
            lm.tokenizer,
            lm.arch,
            [layers[0]],
            reqs,
            request_subjects(reqs),
            hp.templates(lm.model, lm.tokenizer),
        )
        rows = tokens_needed(lm, corpus, layers[0], keys[layers[0]], hp)
        for row in rows:
            print(json.dumps(row), flush=True)
        if args.out:
            Path(args.out).write_text(
                json.dumps(
                    {**report, "tokens_needed": {"layer": layers[0], "rows": rows}}, indent=2
                )
            )
        return
    with tempfile.TemporaryDirectory() as cold:  # a cold cache: generation and accumulation
        old = os.environ.get("MEDIT_CACHE")
        os.environ["MEDIT_CACHE"] = cold
        clear_memory()
        try:
            report["covariance"], corpus = covariance_cost(lm, hp, layers)
        finally:
            if old is None:
                os.environ.pop("MEDIT_CACHE")
            else:
                os.environ["MEDIT_CACHE"] = old
            clear_memory()
    print(json.dumps(report["covariance"]), flush=True)
    keys = _keys.request_keys(
        lm.model,
        lm.tokenizer,
        lm.arch,
        [layers[0]],
        reqs,
        request_subjects(reqs),
        hp.templates(lm.model, lm.tokenizer),
    )
    report["tokens_needed"] = {
        "layer": layers[0],
        "rows": tokens_needed(lm, corpus, layers[0], keys[layers[0]], hp),
    }
    for row in report["tokens_needed"]["rows"]:
        print(json.dumps(row), flush=True)
    report["speed"] = []
    for method in args.methods.split(","):
        report["speed"].append(edit_speed(lm, method, reqs))
        print(json.dumps({"method": method, **report["speed"][-1]["mean"]}), flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
