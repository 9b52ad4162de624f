"""Offline text corpora for second-moment statistics (ROME/MEMIT/AlphaEdit covariance).

The original code streams 100k Wikipedia articles through the model (hours, and a download).
medit needs no network: a :class:`Corpus` is a list of texts with a content hash, built from

* text the model itself generates from seed prompts (``medit/data/background_prompts.txt``, general
  and medical sentence openings), sampled with a fixed seed and cached on disk by the weights'
  hash and the generation settings (:func:`generated_corpus`);
* local files the user names (:func:`file_corpus`): ``.txt`` (blank-line separated passages),
  ``.json`` / ``.jsonl`` (records with a ``text`` field, or a JSON list of strings), or a folder
  written by ``datasets.Dataset.save_to_disk`` (its ``text`` column).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import time
from collections.abc import Sequence
from importlib import resources
from pathlib import Path
from typing import Any

import torch

from medit.core.errors import UserError
from medit.core.fs import atomic_write_text
from medit.core.models import cache_dir
from medit.core.text import left_padded

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Corpus:
    name: str
    texts: tuple[str, ...]

    @property
    def sha256(self) -> str:
        h = hashlib.sha256()
        for text in self.texts:
            h.update(text.encode("utf-8"))
            h.update(b"\0")
        return h.hexdigest()

    def __add__(self, other: Corpus) -> Corpus:
        return Corpus(f"{self.name}+{other.name}", self.texts + other.texts)


def seed_prompts() -> list[str]:
    """The shipped general and medical seed prompts."""
    text = resources.files("medit.data").joinpath("background_prompts.txt").read_text("utf-8")
    return [s for line in text.splitlines() if (s := line.strip()) and not s.startswith("#")]


@dataclasses.dataclass(frozen=True)
class GenerationSettings:
    samples_per_prompt: int = 4  #: continuations sampled from each seed prompt
    new_tokens: int = 96  #: tokens generated per continuation (end-of-text suppressed)
    top_k: int = 40  #: top-k sampling
    seed: int = 0  #: sampling seed
    batch_size: int = 64  #: rows generated together


def generated_corpus(
    model: Any,
    tok: Any,
    settings: GenerationSettings = GenerationSettings(),
    prompts: Sequence[str] | None = None,
    weights_sha256: str | None = None,
    quiet: bool = True,
) -> Corpus:
    """Continuations of the seed prompts sampled from the model (each text is prompt plus
    continuation), cached under ``cache_dir()/corpora`` when the weights' hash is given."""
    prompts = list(prompts or seed_prompts())
    path = None
    if weights_sha256:
        blob = json.dumps([weights_sha256, prompts, dataclasses.asdict(settings)], sort_keys=True)
        key = hashlib.sha256(blob.encode()).hexdigest()[:32]
        path = cache_dir() / "corpora" / f"generated-{key}.json"
        if path.is_file():
            return Corpus("generated", tuple(json.loads(path.read_text("utf-8"))["texts"]))
    t0 = time.perf_counter()
    jobs = [p for p in prompts for _ in range(settings.samples_per_prompt)]
    texts = []
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(settings.seed)
        for i in range(0, len(jobs), settings.batch_size):
            batch = jobs[i : i + settings.batch_size]
            texts += sample_continuations(model, tok, batch, settings.new_tokens, settings.top_k)
            if not quiet:
                log.info("corpus: generated %d/%d texts", len(texts), len(jobs))
    log.info("generated %d corpus texts in %.1f s", len(texts), time.perf_counter() - t0)
    if path is not None:
        atomic_write_text(
            path, json.dumps({"settings": dataclasses.asdict(settings), "texts": texts})
        )
    return Corpus("generated", tuple(texts))


def sample_continuations(
    model: Any, tok: Any, prompts: list[str], new_tokens: int, top_k: int
) -> list[str]:
    """Each prompt followed by exactly ``new_tokens`` top-k-sampled tokens (end-of-text
    suppressed); seed with ``torch.manual_seed`` beforehand for reproducible text."""
    device = next(model.parameters()).device
    enc = left_padded(tok, prompts, device)
    eos = [t for t in (tok.eos_token_id, tok.pad_token_id) if t is not None]
    out = model.generate(
        **enc,
        do_sample=True,
        top_k=top_k,
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        suppress_tokens=eos or None,
        pad_token_id=tok.pad_token_id,
    )
    new = tok.batch_decode(out[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
    return [p + n for p, n in zip(prompts, new, strict=True)]


def file_corpus(paths: Sequence[str | Path]) -> Corpus:
    """Texts from local files or saved datasets; errors name the file and record."""
    texts: list[str] = []
    for raw in paths:
        path = Path(raw)
        if not path.exists():
            raise UserError(f"corpus {path}: no such file or folder")
        try:
            texts += _read_texts(path)
        except UnicodeDecodeError:
            raise UserError(f"corpus {path}: not UTF-8 text") from None
    if not texts:
        raise UserError(f"corpus {', '.join(map(str, paths))}: no text found")
    return Corpus("files:" + ",".join(Path(p).name for p in paths), tuple(texts))


def _read_texts(path: Path) -> list[str]:
    if path.is_dir():
        from datasets import load_from_disk

        ds = load_from_disk(str(path))
        if "text" not in ds.column_names:
            raise UserError(
                f"corpus {path}: the dataset has no 'text' column "
                f"(columns: {', '.join(ds.column_names)})"
            )
        return [t for t in ds["text"] if isinstance(t, str) and t.strip()]
    raw = path.read_text(encoding="utf-8")
    if path.suffix == ".jsonl":
        records = []
        for n, line in enumerate(raw.splitlines(), 1):
            if line.strip():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as exc:
                    raise UserError(f"corpus {path}, line {n}: invalid JSON ({exc.msg})") from None
        return _record_texts(path, records)
    if path.suffix == ".json":
        try:
            data = json.loads(raw)
        except json.JSONDecodeError as exc:
            raise UserError(f"corpus {path}: invalid JSON ({exc.msg}, line {exc.lineno})") from None
        return _record_texts(path, data if isinstance(data, list) else [data])
    return [p.strip() for p in raw.split("\n\n") if p.strip()]


def _record_texts(path: Path, records: list) -> list[str]:
    out = []
    for i, rec in enumerate(records, 1):
        text = rec if isinstance(rec, str) else rec.get("text") if isinstance(rec, dict) else None
        if not isinstance(text, str):
            raise UserError(f"corpus {path}, record {i}: field 'text' missing or not a string")
        if text.strip():
            out.append(text)
    return out
