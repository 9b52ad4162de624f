"""Which GRACE key finds paraphrases and keeps locality? Measured on MedCF *validation*.

GRACE replaces a layer's output where the layer's input lies within the radius of a codebook key.
Whether an edit generalises is first of all whether a paraphrase of its prompt reaches its key;
whether it keeps locality is whether an unrelated prompt stays outside every key. Both are read
here from the default model's activations, with no edit trained (forward passes only), for the
keys of all N validation edits at once (a codebook after N sequential edits):

* **paraphrase hit**: the paraphrase's last prompt token finds its own edit's key as the nearest
  key and lies within that key's radius (GRACE's rule: nearest key, then its radius);
* **locality false hit**: any position of a locality probe (probes that repeat another edit's
  question excluded) lies within the radius of its nearest key.

Keys measured, at the input of ``down_proj`` (GRACE's module on Llama) of several layers:

* ``last`` — the paper's: the input at the prompt's last token, Euclidean distance, fixed radius
  (the paper's ``eps`` 1.0, and the largest radius whose false-hit rate stays <= 1%);
* ``last-cos`` — the same key under cosine distance;
* ``last-corpus`` — the same key with a radius per entry learned from negatives: ``alpha`` times
  the distance from the key to the nearest of the corpus activations (text the model generated,
  ``medit.facts.corpus``; not the validation probes);
* ``subject-mean`` — the mean input over the subject's tokens (an oracle: at inference a question
  does not come with its subject marked; its locality is measured with every window of the
  subject's length in the probes).

    python benchmarks/bench_grace_keys.py --data ../shared/data/MedCF/valid.json --limit 200 \\
        --out benchmarks/results/grace_keys_medcf_valid.json
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from medit.bench.suites import get_suite
from medit.core.hooks import capture_inputs
from medit.core.models import DEFAULT_MODEL, load_model
from medit.core.text import normalise, right_padded
from medit.editors.locate.common import KeyValueHParams, base_corpus


def inputs_at(lm, layers, texts, batch_size=32):
    """Per text, {layer: (seq, d_in)} inputs of down_proj at every position (float32)."""
    modules = [lm.arch.module(lm.model, layer, "mlp_out") for layer in layers]
    got: list[dict[int, torch.Tensor]] = []
    for i in range(0, len(texts), batch_size):
        chunk = texts[i : i + batch_size]
        enc = right_padded(
            lm.tokenizer, lambda c=chunk: lm.tokenizer(c, return_tensors="pt", padding=True)
        )
        with torch.no_grad():
            seen = capture_inputs(modules, lambda e=enc: lm.model(**e, use_cache=False))
        for b, n in enumerate(enc.attention_mask.sum(1).tolist()):
            got.append({layer: seen[j][b, :n].float() for j, layer in enumerate(layers)})
    return got


def subject_span(tok, text, subject):
    """Token indices of the subject's first occurrence in text (case-insensitive), or None."""
    at = text.lower().find(subject.lower()) if subject else -1
    if at < 0:
        return None
    enc = tok(text, return_offsets_mapping=True)
    idx = [i for i, (s, e) in enumerate(enc.offset_mapping) if e > at and s < at + len(subject)]
    return idx or None


def distances(q, keys, kind):
    if kind == "cos":
        qn = q / q.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        kn = keys / keys.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        return 1 - qn @ kn.T
    return torch.cdist(q, keys)


def rates(own_d, own_nearest, loc_min, loc_arg, radii):
    """(paraphrase hit rate, locality false-hit rate) for per-key radii."""
    hit = (own_nearest & (own_d <= radii[torch.arange(len(own_d))])).float().mean().item()
    false = (loc_min <= radii[loc_arg]).float().mean().item()
    return hit, false


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--data", required=True)
    ap.add_argument("--limit", type=int, default=200)
    ap.add_argument("--layers", default="6,12,18,22,25,27,29")
    ap.add_argument("--negatives", type=int, default=20000, help="corpus positions")
    ap.add_argument("--out")
    args = ap.parse_args()
    torch.manual_seed(0)
    t0 = time.perf_counter()
    lm = load_model(DEFAULT_MODEL, "cpu", "float32")
    tok = lm.tokenizer
    layers = [int(x) for x in args.layers.split(",")]
    reqs = get_suite("medcf").load(args.data, args.limit)
    asked = {normalise(p) for r in reqs for p in (r.prompt, *r.rephrase_prompts)}
    probes = [
        p
        for r in reqs
        for items in r.locality.values()
        for p, _ in items
        if normalise(p) not in asked
    ]
    paras = [(i, p) for i, r in enumerate(reqs) for p in r.rephrase_prompts]
    edit_acts = inputs_at(lm, layers, [r.prompt for r in reqs])
    para_acts = inputs_at(lm, layers, [p for _, p in paras])
    probe_acts = inputs_at(lm, layers, probes)
    corpus = base_corpus(lm.model, tok, KeyValueHParams())
    neg_acts = inputs_at(lm, layers, list(corpus.texts), batch_size=16)
    spans = [subject_span(tok, r.prompt, r.subject) for r in reqs]
    para_spans = [subject_span(tok, p, reqs[i].subject) for i, p in paras]
    owner = torch.tensor([i for i, _ in paras])
    result = {
        "data": args.data,
        "n_edits": len(reqs),
        "n_paraphrases": len(paras),
        "n_probes": len(probes),
        "layers": {},
    }
    for layer in layers:
        keys = torch.stack([a[layer][-1] for a in edit_acts])
        q_para = torch.stack([a[layer][-1] for a in para_acts])
        q_probe = [a[layer] for a in probe_acts]
        negs = torch.cat([a[layer] for a in neg_acts])
        negs = negs[torch.randperm(len(negs))[: args.negatives]]
        row = {"key_norm_median": keys.norm(dim=-1).median().item()}
        for kind in ("euc", "cos"):
            d_para = distances(q_para, keys, kind)
            own_d = d_para[torch.arange(len(paras)), owner]
            own_nearest = d_para.argmin(1) == owner
            mins = [distances(q, keys, kind).min(1) for q in q_probe]
            # per probe: its closest (position, key) pair
            loc = [(m.values.min(), m.indices[m.values.argmin()]) for m in mins]
            loc_min = torch.stack([v for v, _ in loc])
            loc_arg = torch.stack([k for _, k in loc])
            fixed = {}
            grid = torch.quantile(torch.cat([own_d, loc_min]), torch.linspace(0, 1, 201))
            best = None
            for r in grid.tolist():
                radii = torch.full((len(keys),), r)
                hit, false = rates(own_d, own_nearest, loc_min, loc_arg, radii)
                if false <= 0.01 and (best is None or hit > best["paraphrase_hit"]):
                    best = {"radius": r, "paraphrase_hit": hit, "locality_false_hit": false}
            fixed["best_radius_false_hit_le_1pct"] = best
            if kind == "euc":
                hit, false = rates(own_d, own_nearest, loc_min, loc_arg, torch.ones(len(keys)))
                fixed["paper_eps_1.0"] = {"paraphrase_hit": hit, "locality_false_hit": false}
            nearest_neg = torch.cat(
                [
                    distances(keys[i : i + 64], negs, kind).min(1).values
                    for i in range(0, len(keys), 64)
                ]
            )
            learned = {}
            for alpha in (0.25, 0.5, 0.75, 0.9, 1.0):
                hit, false = rates(own_d, own_nearest, loc_min, loc_arg, alpha * nearest_neg)
                learned[str(alpha)] = {"paraphrase_hit": hit, "locality_false_hit": false}
            row[kind] = {
                "own_distance_median": own_d.median().item(),
                "own_is_nearest": own_nearest.float().mean().item(),
                "probe_min_distance_median": loc_min.median().item(),
                "fixed_radius": fixed,
                "corpus_radius_alpha": learned,
            }
        # subject-mean oracle (Euclidean): key = mean over the subject's tokens of the prompt
        ok = [i for i, s in enumerate(spans) if s]
        skeys = torch.stack(
            [
                edit_acts[i][layer][spans[i]].mean(0) if spans[i] else keys[i] * 0
                for i in range(len(reqs))
            ]
        )
        found = [j for j, s in enumerate(para_spans) if s and spans[owner[j]]]
        if ok and found:
            qs = torch.stack([para_acts[j][layer][para_spans[j]].mean(0) for j in found])
            d = torch.cdist(qs, skeys[ok])
            own = torch.tensor([ok.index(int(owner[j])) for j in found])
            own_d = d[torch.arange(len(found)), own]
            nearest = d.argmin(1) == own
            widths = sorted({len(spans[i]) for i in ok})
            loc_min = []
            for q in q_probe:
                best_d = torch.tensor(float("inf"))
                for w in widths:
                    if len(q) < w:
                        continue
                    win = q.unfold(0, w, 1).mean(-1)  # (positions, d)
                    best_d = torch.minimum(best_d, torch.cdist(win, skeys[ok]).min())
                loc_min.append(best_d)
            loc_min = torch.stack(loc_min)
            # per entry, the nearest corpus window of the entry's subject width
            sk = skeys[ok]
            wid = torch.tensor([len(spans[i]) for i in ok])
            neg_near = torch.full((len(ok),), float("inf"))
            for a in neg_acts[:400]:
                q = a[layer]
                for w in widths:
                    sel = (wid == w).nonzero().squeeze(1)
                    if len(q) < w or not len(sel):
                        continue
                    dmin = torch.cdist(sk[sel], q.unfold(0, w, 1).mean(-1)).min(1).values
                    neg_near[sel] = torch.minimum(neg_near[sel], dmin)
            learned = {}
            for alpha in (0.25, 0.5, 0.75, 0.9, 1.0):
                radii = alpha * neg_near
                hit = (nearest & (own_d <= radii[own])).float().sum().item() / len(paras)
                false = []
                for q in q_probe:
                    hit_any = False
                    for w in widths:
                        sel = (wid == w).nonzero().squeeze(1)
                        if len(q) < w or not len(sel):
                            continue
                        d = torch.cdist(q.unfold(0, w, 1).mean(-1), sk[sel])  # (pos, n_w)
                        hit_any |= bool((d <= radii[sel][None]).any())
                    false.append(float(hit_any))
                learned[str(alpha)] = {
                    "paraphrase_hit": hit,
                    "locality_false_hit": sum(false) / len(false),
                }
            best = None
            for r in torch.quantile(
                torch.cat([own_d, loc_min[loc_min.isfinite()]]), torch.linspace(0, 1, 201)
            ).tolist():
                hit = (nearest & (own_d <= r)).float().sum().item() / len(paras)
                false = (loc_min <= r).float().mean().item()
                if false <= 0.01 and (best is None or hit > best["paraphrase_hit"]):
                    best = {"radius": r, "paraphrase_hit": hit, "locality_false_hit": false}
            row["subject_mean_oracle"] = {
                "paraphrases_with_subject": len(found) / len(paras),
                "best_radius_false_hit_le_1pct": best,
                "corpus_radius_alpha": learned,
            }
        result["layers"][str(layer)] = row
        print(json.dumps({layer: row}, indent=1), flush=True)
    result["seconds"] = time.perf_counter() - t0
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
