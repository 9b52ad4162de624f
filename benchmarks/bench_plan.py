"""``medit plan`` against the measured peak memory of an edit, on the CPU.

    python benchmarks/bench_plan.py [--default-model] [--methods ft-m,memit,grace]

For each editor: the plan (``medit.plan.plan_memory``, from the config alone) and the measured
peak (``medit.plan.measure_edit``): the weights, plus the larger of the peaks torch allocates
above them while the editor edits one request and while the evaluation runs, each measured with
the torch profiler's allocation events (every allocation and free, summed in time order). Runs
on a tiny random Llama (4 layers, d=64, the tests' shape) and, with ``--default-model``, on
SmolLM2-135M (float32). A fresh cache directory is used so that covariance statistics and codebook
negatives are computed, not read from disk (the generated corpora and models are linked in).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

import torch

REQUEST = {
    "prompt": "The hormone insulin is produced by the",
    "target_new": "liver",
    "subject": "insulin",
    "rephrase_prompts": ["Insulin is a hormone made by the"],
    "locality": {"neighborhood": [["Aspirin is used to treat", "pain"]]},
}
#: settings on the tiny random model's scale (as tests/test_editors.py's TINY table)
TINY = {
    "ft-m": {},
    "memit": {"clamp_norm_factor": 200.0, "v_weight_decay": 0.0},
    "rome": {"clamp_norm_factor": 200.0, "v_weight_decay": 0.0, "layer_selection": "depth"},
    "grace": {"radius": "fixed", "eps": 1e-3},
    "lora": {},
}
DEFAULT = {"rome": {"layer_selection": "depth"}}
CORPUS = [
    "The hormone insulin is produced by the pancreas.",
    "Aspirin is used to treat pain and fever.",
    "Metformin is a first-line treatment for type 2 diabetes.",
    "The heart has four chambers.",
    "Vitamin C deficiency causes scurvy.",
]


def tiny_model():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(CORPUS * 5, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>")
    fast.pad_token = fast.eos_token
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(fast),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
        eos_token_id=0,
        pad_token_id=0,
        bos_token_id=0,
    )
    return LlamaForCausalLM(config).eval(), fast


def compare(name, model, tok, methods, settings, batch_size=32):
    from medit.core.cache import mark_base_weights
    from medit.core.models import state_dict_sha256
    from medit.facts.requests import parse_record
    from medit.plan import measure_edit, plan_memory, workload

    mark_base_weights(model, state_dict_sha256(model))
    requests = [parse_record(REQUEST, "bench", 1)]
    rows = []
    for method in methods:
        hp = settings.get(method, {})
        work = workload(requests, "single", batch_size, lambda t: len(tok(t).input_ids))
        plan = plan_memory(name, method, hparams=hp, device="cpu", config=model.config, work=work)
        planned = plan.peaks()["cpu"]
        got = measure_edit(model, tok, method, requests, hp, batch_size=batch_size)
        row = {
            "model": name,
            "method": method,
            "planned_mb": planned / 2**20,
            "measured_mb": got["peak"] / 2**20,
            "ratio": planned / got["peak"],
            "measured": {k: v / 2**20 for k, v in got.items()},
        }
        rows.append(row)
        print(
            f"{name:<14} {method:<8} plan {row['planned_mb']:9.2f} MB  measured "
            f"{row['measured_mb']:9.2f} MB (weights {got['weights'] / 2**20:.2f}, edit "
            f"+{got['edit'] / 2**20:.2f}, eval +{got['eval'] / 2**20:.2f})  "
            f"ratio {row['ratio']:.2f}",
            flush=True,
        )
    return rows


def fresh_cache() -> Path:
    """A cache directory with the models, corpora and templates of $MEDIT_CACHE linked in."""
    tmp = Path(tempfile.mkdtemp(prefix="medit-plan-bench-"))
    old = os.environ.get("MEDIT_CACHE")
    if old:
        for sub in ("corpora", "templates"):
            if (Path(old) / sub).exists():
                (tmp / sub).symlink_to(Path(old).resolve() / sub)
    os.environ["MEDIT_CACHE"] = str(tmp)
    return tmp


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--methods", default="ft-m,memit,grace")
    ap.add_argument("--default-model", action="store_true", help="also SmolLM2-135M")
    ap.add_argument("--json", help="write the rows here")
    args = ap.parse_args()
    cache = fresh_cache()
    torch.set_num_threads(1)
    # the tiny model's C over full windows of a text file: a random model's generated text
    # re-tokenises to about twice its length, which no plan can know from the config
    (cache / "corpus.txt").write_text(" ".join(CORPUS * 120))  # 16 windows or more
    TINY["memit"] = {**TINY["memit"], "cov_corpus": str(cache / "corpus.txt")}
    methods = args.methods.split(",")
    model, tok = tiny_model()
    rows = compare("tiny-llama", model, tok, methods, TINY, batch_size=32)
    if args.default_model:
        from medit.core.models import load_model

        lm = load_model("builtin:smollm2", "cpu", "float32")
        rows += compare("smollm2-135m", lm.model, lm.tokenizer, methods, DEFAULT)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    bad = [r for r in rows if not 0.8 <= r["ratio"] <= 1.2]
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
