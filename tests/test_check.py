"""`medit check` (medit/check.py): a clinic's questions asked, the wrong answers written as
requests to edit, the right ones as locality probes; `medit edit --locality-from` samples them."""

from __future__ import annotations

import codecs
import csv
import io
import json

import pytest
from click.testing import CliRunner

from medit.check import judge, said
from medit.cli import main
from medit.core.models import load_model
from medit.evaluation import EvalConfig, answers
from medit.facts.probes import KNOWN, add_known_probes
from medit.facts.requests import load_requests, parse_record

QUESTIONS = [
    "The hormone insulin is produced by the",
    "Aspirin is used to treat",
    "The heart has four",
    "Vitamin C deficiency causes",
    "The largest organ of the body is the",
    "Metformin is used to treat",
]


@pytest.mark.parametrize(
    ("answer", "expected", "right"),
    [
        (" pancreas, which makes", "pancreas", True),
        (" Pancreas.", "pancreas", True),  # case and punctuation
        (" insulinoma of the", "insulin", False),  # whole words only
        (" type 2 diabetes mellitus", "type 2 diabetes", True),
        (" type 1 diabetes", "type 2 diabetes", False),
        (" a range of", "scurvy", False),
        # a long answer: word-overlap F1 >= 0.8 counts
        (
            " inhibits the enzyme cyclooxygenase of platelets",
            "inhibits the enzyme cyclooxygenase in platelets",
            True,
        ),
        (" the liver and the kidneys", "the kidneys and the heart", False),
    ],
)
def test_judge_whole_words_and_similarity_for_long_answers(answer, expected, right):
    assert judge(answer, expected, 0.8)[0] is right


def test_said_is_the_first_line():
    assert said(" pancreas.\n\nThe next") == "pancreas."
    assert said("\n\n") == "(no answer)"


def _planted(tiny_model_dir, tmp_path):
    """Questions whose expected answers are planted: the tiny model's own first word (right)
    for the even ones, a word it never says (wrong) for the odd ones."""
    lm = load_model(str(tiny_model_dir), "cpu", "float32")
    probe = [
        parse_record({"prompt": q, "target_new": "x y z w"}, "q", i)
        for i, q in enumerate(QUESTIONS, 1)
    ]
    said_now = answers(lm.model, lm.tokenizer, probe, EvalConfig(fluency_tokens=0))
    rows, right = [], set()
    for i, (q, text) in enumerate(zip(QUESTIONS, said_now, strict=True)):
        words = [w for w in text.split() if w.isalpha()]
        if i % 2 == 0 and words:
            rows.append({"id": f"q{i}", "prompt": q, "target_new": words[0]})
            right.add(f"q{i}")
        else:
            rows.append({"id": f"q{i}", "prompt": q, "target_new": "zzqxv"})
    path = tmp_path / "questions.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path, right


def test_check_splits_planted_answers_exactly(tiny_model_dir, tmp_path):
    questions, right = _planted(tiny_model_dir, tmp_path)
    assert right  # the tiny model says some words
    out = tmp_path / "check"
    res = CliRunner().invoke(
        main,
        [
            "-q",
            "check",
            "--model",
            str(tiny_model_dir),
            "--questions",
            str(questions),
            "--out",
            str(out),
            "--device",
            "cpu",
        ],
    )
    assert res.exit_code == 0, res.output
    got_right = {r.id for r in load_requests(out / "right.jsonl")}
    wrong = load_requests(out / "wrong.jsonl")
    assert got_right == right
    assert {r.id for r in wrong} == {f"q{i}" for i in range(len(QUESTIONS))} - right
    # a wrong one is an edit request: the expected answer as target, what the model said kept
    assert all(r.target_new == "zzqxv" and r.ground_truth for r in wrong)
    sheet = (out / "answers.csv").read_bytes()
    assert sheet.startswith(codecs.BOM_UTF8)  # Excel reads it as UTF-8
    cells = list(csv.reader(io.StringIO(sheet.decode("utf-8-sig"))))
    assert cells[0] == ["id", "question", "expected", "answer", "right", "overlap"]
    assert {c[0] for c in cells[1:] if c[4] == "yes"} == right and len(cells) == 7
    results = json.loads((out / "results.json").read_text())
    assert results["counts"] == {"asked": 6, "right": len(right), "wrong": 6 - len(right)}
    html = (out / "report.html").read_text()
    assert 'id="verdict"' in html and html.index('id="wrong"') < html.index('id="right"')
    assert "zzqxv" in html and "<script" not in html.lower()
    # the report command renders it again
    assert CliRunner().invoke(main, ["report", str(out)]).exit_code == 0
    # a second check refuses to replace the directory unless told, then replaces its own
    again = [
        "-q",
        "check",
        "--model",
        str(tiny_model_dir),
        "--questions",
        str(questions),
        "--out",
        str(out),
        "--device",
        "cpu",
    ]
    assert CliRunner().invoke(main, again).exit_code == 2
    assert CliRunner().invoke(main, [*again, "--overwrite"]).exit_code == 0


def test_check_refuses_a_directory_it_did_not_write_and_bad_questions(tiny_model_dir, tmp_path):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    q = tmp_path / "q.csv"
    q.write_text("question,answer\nThe heart has four,chambers\n")
    res = CliRunner().invoke(
        main,
        [
            "check",
            "--model",
            str(tiny_model_dir),
            "--questions",
            str(q),
            "--out",
            str(mine),
            "--overwrite",
        ],
    )
    assert res.exit_code == 2 and (mine / "notes.txt").read_text() == "keep me"
    bad = tmp_path / "bad.csv"
    bad.write_text("question,answer\nThe heart has four,\n")
    res = CliRunner().invoke(
        main,
        [
            "check",
            "--model",
            str(tiny_model_dir),
            "--questions",
            str(bad),
            "--out",
            str(tmp_path / "o"),
        ],
    )
    assert res.exit_code == 2 and "bad.csv: row 2, field 'target_new': missing" in res.output
    assert "Traceback" not in res.output and not (tmp_path / "o").exists()


def _req(prompt, rephrases=(), rid="r"):
    return parse_record(
        {"prompt": prompt, "target_new": "x", "rephrase_prompts": list(rephrases), "id": rid},
        "r",
        1,
    )


def test_locality_from_never_asks_an_edited_question_and_samples_per_request():
    edits = [
        _req("Insulin is produced by the", ["The hormone insulin comes from the"], "e1"),
        _req("Aspirin is used to treat", rid="e2"),
    ]
    known = [
        _req("insulin is produced by the ", rid="k0"),  # an edit's own question (normalised)
        _req("The hormone insulin comes from the", rid="k1"),  # an edit's paraphrase
        *(_req(f"Known fact number {i} is", rid=f"k{i}") for i in range(2, 12)),
    ]
    out = add_known_probes(edits, known, per_edit=4, seed=0)
    asked = {
        "insulin is produced by the",
        "the hormone insulin comes from the",
        "aspirin is used to treat",
    }
    for req in out:
        probes = req.locality[KNOWN]
        assert len(probes) == 4 and len(set(probes)) == 4
        assert not {p.lower().strip() for p, _ in probes} & asked
    assert out[0].locality[KNOWN] != out[1].locality[KNOWN]  # a sample per request
    assert add_known_probes(edits, known, 4, seed=0) == out  # seeded
    with pytest.raises(Exception, match="none of its 2 facts"):
        add_known_probes(edits, known[:2], 3)


def test_edit_with_locality_from_right_jsonl(tiny_model_dir, tmp_path):
    right = tmp_path / "right.jsonl"
    right.write_text(
        "".join(
            json.dumps({"prompt": f"Known fact {i} is", "target_new": "yes"}) + "\n"
            for i in range(5)
        )
    )
    reqs = tmp_path / "wrong.jsonl"
    reqs.write_text(json.dumps({"prompt": "Aspirin is used to treat", "target_new": "gout"}) + "\n")
    out = tmp_path / "run"
    res = CliRunner().invoke(
        main,
        [
            "-q",
            "edit",
            "--model",
            str(tiny_model_dir),
            "--requests",
            str(reqs),
            "--out",
            str(out),
            "--device",
            "cpu",
            "--hparam",
            "steps=2",
            "--locality-from",
            str(right),
            "--locality-per-edit",
            "2",
        ],
    )
    assert res.exit_code == 0, res.output
    sample = json.loads((out / "samples.jsonl").read_text().splitlines()[0])
    kinds = [x["type"] for x in sample["post"]["generation"]["locality"]]
    assert kinds == [KNOWN, KNOWN]
    results = json.loads((out / "results.json").read_text())
    assert results["provenance"]["locality_from_sha256"]
