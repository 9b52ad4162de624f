"""``medit check``: ask a model a clinic's questions and split them into the facts it gets wrong
(ready-to-edit requests) and the facts it knows (locality probes for those edits).

Every question is asked with the evaluation's greedy decoding (:func:`medit.evaluation.answers`:
batched, each answer within the expected answer's length plus the slack), and the answer is
right when it states the expected one:

* as whole words, after normalising case, spacing and punctuation ("insulin" is not stated by
  "insulinoma"; "type 2 diabetes" is stated by "... type 2 diabetes mellitus");
* or, for an expected answer of ``LONG`` words or more, when the word-overlap F1 of the answer
  against it (articles left out, as SQuAD's F1) reaches ``similarity`` (a long answer is rarely
  repeated verbatim).

The run directory holds ``wrong.jsonl`` (one request per wrong answer: ``target_new`` the expected
answer, ``ground_truth`` what the model said), ``right.jsonl`` (the known facts, the same shape:
``medit edit --locality-from DIR/right.jsonl`` samples them as locality probes),
``results.json`` (kind ``check``: counts, settings, provenance, every answer), ``answers.csv``
(every answer, for a spreadsheet); ``medit check``
then renders ``report.html`` from it (``medit report DIR`` does the same). It is written atomically; an existing directory is replaced only with
``--overwrite`` and only when medit wrote it as a check run.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import re
import time
from pathlib import Path
from typing import Any

from medit.core import results as R
from medit.core.errors import UserError
from medit.core.fs import atomic_dir, atomic_write_text, check_disjoint, check_out
from medit.core.models import DEFAULT_MODEL, load_model
from medit.core.text import normalise
from medit.evaluation import EvalConfig, answers
from medit.facts.requests import EditRequest, check_lengths, context_length, load_requests

SCHEMA = "medit.check/1"
KIND = "check-run"
#: an expected answer of this many words or more may also match by similarity
LONG = 4
#: left out of the word overlap (as SQuAD's answer F1 does)
ARTICLES = frozenset({"a", "an", "the"})


@dataclasses.dataclass(frozen=True)
class CheckConfig:
    out: str  #: run directory to write
    questions: str  #: a requests file (CSV/TSV/JSON/JSONL): prompt and expected answer
    model: str = DEFAULT_MODEL
    device: str = "auto"
    dtype: str = "auto"
    limit: int | None = None  #: ask only the first N questions
    similarity: float = 0.8  #: word-overlap F1 that counts a long answer as right
    eval: EvalConfig = EvalConfig(fluency_tokens=0)
    overwrite: bool = False
    allow_pickle: bool = False
    trust_remote_code: bool = False
    quiet: bool = False

    def __post_init__(self):
        if not 0.0 < self.similarity <= 1.0:
            raise UserError(f"--similarity must be in (0, 1], got {self.similarity}")
        if self.limit is not None and self.limit < 1:
            raise UserError("--limit must be >= 1")


def words(text: str) -> list[str]:
    return re.findall(r"\w+", normalise(text))


def judge(answer: str, expected: str, similarity: float) -> tuple[bool, float]:
    """(right, score): does ``answer`` state ``expected`` (see the module docstring); score 1.0
    for a whole-word match, else the word-overlap F1."""
    got, want = words(answer), words(expected)
    if not want:
        return False, 0.0
    n = len(want)
    if any(got[i : i + n] == want for i in range(len(got) - n + 1)):
        return True, 1.0
    got, want = [w for w in got if w not in ARTICLES], [w for w in want if w not in ARTICLES]
    common = sum(min(got.count(w), want.count(w)) for w in set(want))
    f1 = 0.0 if not common else 2 * common / (len(got) + len(want))
    return (n >= LONG and f1 >= similarity), round(f1, 4)


def said(text: str) -> str:
    """What the model said, as a request's ``ground_truth``: its first line, trimmed."""
    first = text.strip().split("\n", 1)[0].strip()
    return first or "(no answer)"


def run_check(cfg: CheckConfig) -> dict[str, Any]:
    """Ask, judge, and write the run directory; returns its results.json."""
    check_disjoint({"--out": cfg.out, "--questions": cfg.questions})
    out = check_out(cfg.out, cfg.overwrite, KIND)
    questions = load_requests(cfg.questions)[: cfg.limit]
    lm = load_model(
        cfg.model,
        cfg.device,
        cfg.dtype,
        allow_pickle=cfg.allow_pickle,
        trust_remote_code=cfg.trust_remote_code,
    )
    check_lengths(questions, lm.tokenizer, context_length(lm.model.config), source=cfg.questions)
    start = time.perf_counter()
    bar = None if cfg.quiet else _bar()
    texts = answers(lm.model, lm.tokenizer, questions, cfg.eval, bar)
    if bar is not None:
        bar.close()
    seconds = time.perf_counter() - start
    rows = []
    for q, text in zip(questions, texts, strict=True):
        right, score = judge(text, q.target_new, cfg.similarity)
        rows.append(
            {
                "id": q.id,
                "prompt": q.prompt,
                "expected": q.target_new,
                "answer": text,
                "right": right,
                "score": score,
            }
        )
    results = {
        "schema": SCHEMA,
        "kind": "check",
        "config": {**dataclasses.asdict(cfg), "eval": dataclasses.asdict(cfg.eval)},
        "provenance": R.provenance(
            model=lm.provenance(), questions_sha256=R.file_hash(cfg.questions)
        ),
        "counts": {
            "asked": len(rows),
            "right": sum(r["right"] for r in rows),
            "wrong": sum(not r["right"] for r in rows),
        },
        "seconds": round(seconds, 2),
        "rule": {"whole_words": True, "long_words": LONG, "similarity": cfg.similarity},
        "answers": rows,
    }
    wrong, right = [], []
    for q, r in zip(questions, rows, strict=True):
        (right if r["right"] else wrong).append(_request(q, r, edit=not r["right"]))
    with atomic_dir(out, KIND) as tmp:
        atomic_write_text(tmp / "wrong.jsonl", _jsonl(wrong))
        atomic_write_text(tmp / "right.jsonl", _jsonl(right))
        atomic_write_text(tmp / R.RESULTS_FILE, json.dumps(results, indent=2, ensure_ascii=False))
        atomic_write_text(tmp / "answers.csv", answers_csv(rows))
    return results


def _request(q: EditRequest, row: dict[str, Any], edit: bool) -> dict[str, Any]:
    """A request record medit reads back: the question, the expected answer as ``target_new``;
    a wrong one carries what the model said as ``ground_truth`` (the answer the edit replaces)."""
    rec: dict[str, Any] = {"id": q.id, "prompt": q.prompt, "target_new": q.target_new}
    if q.subject:
        rec["subject"] = q.subject
    if edit:
        rec["ground_truth"] = said(row["answer"])
    if q.rephrase_prompts:
        rec["rephrase_prompts"] = list(q.rephrase_prompts)
    if q.locality:
        rec["locality"] = {k: [list(p) for p in v] for k, v in q.locality.items()}
    return rec


def answers_csv(rows: list[dict[str, Any]]) -> str:
    """Every answer as a spreadsheet opens it (UTF-8 with a byte order mark, which Excel needs
    to read UTF-8): id, question, expected, the model's answer, right, overlap."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\r\n")
    writer.writerow(["id", "question", "expected", "answer", "right", "overlap"])
    for r in rows:
        writer.writerow(
            [
                r["id"],
                r["prompt"],
                r["expected"],
                r["answer"].strip(),
                "yes" if r["right"] else "no",
                r["score"],
            ]
        )
    return "\ufeff" + out.getvalue()


def _jsonl(records: list[dict[str, Any]]) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)


def _bar():
    """A bar whose total the evaluation grows as it goes."""
    from tqdm.auto import tqdm

    return tqdm(total=0, desc="asking", unit="question", dynamic_ncols=True)


def summary(results: dict[str, Any], out: str | Path) -> str:
    c = results["counts"]
    return (
        f"asked {c['asked']} questions in {results['seconds']:.1f} s: {c['right']} right, "
        f"{c['wrong']} wrong\n"
        f"  to edit:  {Path(out) / 'wrong.jsonl'}\n"
        f"  known:    {Path(out) / 'right.jsonl'}  (medit edit --locality-from)\n"
        f"  report:   {Path(out) / 'report.html'}"
    )
