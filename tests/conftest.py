"""Shared fixtures: tiny seeded Llama and GPT-2 models with a byte-level BPE tokenizer, built
from configs (no downloads), plus paths to the shared benchmark data."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

DATA = Path(os.environ.get("MEDIT_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))


def need_data(name: str) -> Path:
    """Path of a shared benchmark file; the test is skipped, saying why, where it is absent."""
    path = DATA / name
    if not path.is_file():
        pytest.skip(f"benchmark data {path} not present (set MEDIT_DATA to the shared/data folder)")
    return path


CORPUS = [
    "The hormone insulin is produced by the pancreas.",
    "Aspirin is used to treat pain and fever.",
    "Metformin is a first-line treatment for type 2 diabetes.",
    "The heart has four chambers.",
    "Vitamin C deficiency causes scurvy.",
    "The antidote for paracetamol overdose is acetylcysteine.",
    "Penicillin is an antibiotic that kills bacteria.",
    "The largest organ of the human body is the skin.",
    "Which drug is involved in a drug-drug interaction with warfarin? Aspirin",
    "The liver produces bile, and the kidney filters blood.",
]


@pytest.fixture(scope="session")
def tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

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
    return fast


def _tiny(kind: str, vocab: int, seed: int = 0):
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    if kind == "llama":
        cfg = LlamaConfig(
            vocab_size=vocab,
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
        model = LlamaForCausalLM(cfg)
    else:
        cfg = GPT2Config(
            vocab_size=vocab,
            n_embd=64,
            n_layer=4,
            n_head=4,
            n_positions=1024,
            eos_token_id=0,
            bos_token_id=0,
            pad_token_id=0,
        )
        model = GPT2LMHeadModel(cfg)
    from medit.core.cache import mark_base_weights
    from medit.core.models import state_dict_sha256

    # as load_model does: work on the base weights (traces, covariances, corpora) is cached
    mark_base_weights(model, state_dict_sha256(model))
    return model.eval()


@pytest.fixture(params=["llama", "gpt2"])
def tiny(request, tokenizer):
    """(model, tokenizer) for each tiny architecture; a fresh, seeded model per test."""
    return _tiny(request.param, len(tokenizer)), tokenizer


@pytest.fixture
def tiny_llama(tokenizer):
    return _tiny("llama", len(tokenizer)), tokenizer


@pytest.fixture
def tiny_model_dir(tmp_path_factory, tokenizer):
    """A tiny Llama saved as a safetensors HF directory (what `--model DIR` loads)."""
    d = tmp_path_factory.mktemp("tiny-llama")
    _tiny("llama", len(tokenizer)).save_pretrained(d, safe_serialization=True)
    tokenizer.save_pretrained(d)
    return d


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """Unit tests never touch the user's cache; integration tests share one per session."""
    if "MEDIT_CACHE" not in os.environ:
        monkeypatch.setenv("MEDIT_CACHE", str(tmp_path_factory.getbasetemp() / "medit-cache"))
