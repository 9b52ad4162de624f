"""FT-M speed and memory on the default model, against the physical floor; model load times.

    python benchmarks/bench_ft.py [--n 10] [--device auto] [--out benchmarks/results/ft.json]

Prints, in one run:
* load: GGUF dequantisation (what every load would cost without the cache) vs the cached
  safetensors copy;
* FT-M seconds per edit (single mode: apply + restore) over the first N built-in requests, with
  the optimisation steps actually taken, next to the floor = one forward of the frozen prefix +
  steps x (forward+backward of the trained suffix), each measured here on the same inputs, and
  next to the naive cost steps x (full forward+backward) that medit avoids;
* peak memory (process RSS; CUDA allocator peak on GPU).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from medit.core.forward import target_nll  # noqa: E402
from medit.core.hooks import frozen_prefix  # noqa: E402
from medit.core.models import builtin_gguf_path, load_model  # noqa: E402
from medit.core.results import peak_memory_mb  # noqa: E402
from medit.core.text import teacher_batch  # noqa: E402
from medit.editors.ft import _entering_hidden  # noqa: E402
from medit.editors.registry import make_editor  # noqa: E402
from medit.facts.requests import load_requests  # noqa: E402


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device, repeat=5):
    fn()  # warm-up
    times = []
    for _ in range(repeat):
        sync(device)
        t = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def load_times(device: str) -> dict:
    from transformers import AutoModelForCausalLM

    gguf = builtin_gguf_path("smollm2")
    t = time.perf_counter()
    AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    gguf_s = time.perf_counter() - t
    load_model("builtin:smollm2", device)  # make sure the cache exists
    t = time.perf_counter()
    load_model("builtin:smollm2", device)
    cached_s = time.perf_counter() - t
    return {"gguf_dequantise_s": gguf_s, "cached_safetensors_s": cached_s}


def floor_per_request(lm, req, layer: int, device) -> dict:
    """Measured costs of one prefix forward, one suffix fwd+bwd and one full fwd+bwd."""
    model, tok, arch = lm.model, lm.tokenizer, lm.arch
    batch = teacher_batch(tok, [req.prompt], [req.target_new]).to(device)
    weight = arch.module(model, layer, "mlp_out").weight
    model.requires_grad_(False)  # as during FT: only the edited weight needs a gradient
    weight.requires_grad_(True)
    hidden = _entering_hidden(model, arch, layer, batch)

    def suffix():
        with frozen_prefix(model, arch, layer, hidden):
            target_nll(model, arch, batch).backward()
        weight.grad = None

    def full():
        target_nll(model, arch, batch).backward()
        weight.grad = None

    out = {
        "prefix_forward_s": timed(lambda: _entering_hidden(model, arch, layer, batch), device),
        "suffix_fwd_bwd_s": timed(suffix, device),
        "full_fwd_bwd_s": timed(full, device),
    }
    weight.requires_grad_(False)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--n", type=int, default=10, help="built-in requests to edit")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--out", default=None, help="write the figures as JSON here")
    args = ap.parse_args()

    loads = load_times(args.device)
    lm = load_model("builtin:smollm2", args.device)
    device = lm.device
    requests = load_requests("builtin")[: args.n]
    editor = make_editor("ft-m")
    hp = editor.hparams_for(lm.model)
    layer = hp.resolve_layers(lm.arch.n_layers(lm.model))[0]
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    rows = []
    for req in requests:
        result = editor.apply(lm.model, lm.tokenizer, [req])
        steps = result.diagnostics[0]["steps"]
        result.restore()
        costs = floor_per_request(lm, req, layer, device)
        floor = costs["prefix_forward_s"] + steps * costs["suffix_fwd_bwd_s"]
        naive = steps * costs["full_fwd_bwd_s"]
        rows.append({"seconds": result.seconds, "steps": steps, "floor_s": floor, "naive_s": naive})

    mean = lambda k: statistics.mean(r[k] for r in rows)  # noqa: E731
    figures = {
        "device": str(device),
        "torch_threads": torch.get_num_threads(),
        "model": "builtin:smollm2",
        "method": "ft-m",
        "layer": layer,
        "n_edits": len(rows),
        **loads,
        "seconds_per_edit": mean("seconds"),
        "mean_steps": mean("steps"),
        "floor_seconds_per_edit": mean("floor_s"),
        "naive_seconds_per_edit": mean("naive_s"),
        "ratio_to_floor": mean("seconds") / mean("floor_s"),
        "speedup_vs_naive_full_forward": mean("naive_s") / mean("seconds"),
        "memory": peak_memory_mb(device),
    }
    print(f"device {figures['device']} ({figures['torch_threads']} threads), FT-M at layer {layer}")
    print(
        f"load: GGUF dequantisation {loads['gguf_dequantise_s']:.1f} s, "
        f"cached safetensors {loads['cached_safetensors_s']:.1f} s"
    )
    print(
        f"FT-M: {figures['seconds_per_edit']:.3f} s/edit over {len(rows)} edits, "
        f"{figures['mean_steps']:.1f} steps on average"
    )
    print(
        f"  floor (prefix fwd + steps x suffix fwd+bwd): {figures['floor_seconds_per_edit']:.3f} s"
        f"  -> ratio {figures['ratio_to_floor']:.2f}x the floor"
    )
    print(
        f"  naive (steps x full fwd+bwd): {figures['naive_seconds_per_edit']:.3f} s"
        f"  -> medit is {figures['speedup_vs_naive_full_forward']:.2f}x faster"
    )
    print(f"  peak memory: {figures['memory']}")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(figures, indent=2) + "\n")


if __name__ == "__main__":
    main()
