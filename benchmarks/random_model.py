"""A random-weight copy of a model's architecture, for timing where the weights cannot travel.

    python benchmarks/random_model.py CONFIG_DIR OUT_DIR [--seed 0]

CONFIG_DIR holds ``config.json`` and the tokenizer files (e.g. the default model's materialised
folder in medit's cache). OUT_DIR receives the same files plus ``model.safetensors`` with weights
drawn from the config's ``initializer_range``: same shapes, same FLOPs, same memory traffic, so
speed figures carry over; quality figures do not (greedy decoding of random weights rarely stops
early, which makes generation timings an upper bound).
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("config_dir")
    ap.add_argument("out_dir")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    src, out = Path(args.config_dir), Path(args.out_dir)
    torch.manual_seed(args.seed)
    config = AutoConfig.from_pretrained(src)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    for f in src.iterdir():
        if f.name.startswith("tokenizer") or f.name in {
            "special_tokens_map.json",
            "chat_template.jinja",
        }:
            shutil.copy(f, out / f.name)
    n = sum(p.numel() for p in model.parameters())
    print(f"{out}: random {config.model_type} with {n / 1e6:.1f}M parameters")


if __name__ == "__main__":
    main()
