"""The bad-input corpus: every case exits 2 with one line naming the file, record and field (or
the option), no traceback, and nothing written.

Each case is (name, files to create, command line, words the message must contain). Paths in
the command line and the words are templates: ``{tmp}`` is the case's directory, ``{model}`` the
tiny model directory.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from medit.cli import main

GOOD = {
    "prompt": "The hormone insulin is produced by the",
    "target_new": "pancreas",
    "subject": "insulin",
}


def _json(obj) -> str:
    return json.dumps(obj)


def _edit(reqs: str = "{tmp}/r.json", *extra: str) -> list[str]:
    return [
        "edit",
        "--model",
        "{model}",
        "--requests",
        reqs,
        "--out",
        "{tmp}/out",
        "--device",
        "cpu",
        *extra,
    ]


HUGE = "word " * 3000
MEDCF = {
    "prompt": "What treats scurvy?",
    "target_new": "Insulin",
    "subject": "scurvy",
    "rephrase_prompt": "Scurvy is treated by?",
}

_BENCH_MEDCF = [
    "bench",
    "--suite",
    "medcf",
    "--data",
    "{tmp}/medcf.json",
    "--out",
    "{tmp}/out",
    "--model",
    "{model}",
    "--device",
    "cpu",
]

#: (name, {relative path: text or bytes}, argv, words in the message)
CASES = [
    # request files: JSON and JSONL syntax, encoding, emptiness
    (
        "json-syntax",
        {"r.json": '[{"prompt": "a",\n "target_new": '},
        _edit(),
        ["r.json", "invalid JSON at line 2"],
    ),
    (
        "jsonl-syntax",
        {"r.jsonl": _json(GOOD) + "\n{oops}\n"},
        _edit("{tmp}/r.jsonl"),
        ["r.jsonl", "record 2", "line 2"],
    ),
    ("not-utf8", {"r.json": b'[{"prompt": "caf\xe9"}]'}, _edit(), ["r.json", "not UTF-8"]),
    ("empty-file", {"r.json": ""}, _edit(), ["r.json"]),
    ("whitespace-file", {"r.jsonl": "  \n\n"}, _edit("{tmp}/r.jsonl"), ["r.jsonl"]),
    ("json-null", {"r.json": "null"}, _edit(), ["r.json", "list"]),
    ("empty-list", {"r.json": "[]"}, _edit(), ["r.json", "no requests"]),
    ("list-of-strings", {"r.json": '["a"]'}, _edit(), ["r.json", "record 1", "object"]),
    ("record-is-list", {"r.json": _json([GOOD, ["p", "t"]])}, _edit(), ["record 2", "object"]),
    # request files: fields
    (
        "prompt-number",
        {"r.json": _json([{**GOOD, "prompt": 3}])},
        _edit(),
        ["record 1", "field 'prompt'", "string"],
    ),
    (
        "prompt-empty",
        {"r.json": _json([{**GOOD, "prompt": "  ", "subject": None}])},
        _edit(),
        ["record 1", "field 'prompt'", "empty"],
    ),
    (
        "target-missing",
        {"r.json": _json([{"prompt": "x y"}])},
        _edit(),
        ["record 1", "field 'target_new'", "missing"],
    ),
    (
        "target-empty",
        {"r.json": _json([GOOD, {**GOOD, "target_new": ""}])},
        _edit(),
        ["record 2", "field 'target_new'"],
    ),
    (
        "subject-not-in-prompt",
        {"r.json": _json([{**GOOD, "subject": "glucagon"}])},
        _edit(),
        ["record 1", "field 'subject'", "glucagon"],
    ),
    (
        "subject-number",
        {"r.json": _json([{**GOOD, "subject": 7}])},
        _edit(),
        ["record 1", "field 'subject'"],
    ),
    (
        "ground-truth-list",
        {"r.json": _json([{**GOOD, "ground_truth": ["x"]}])},
        _edit(),
        ["record 1", "field 'ground_truth'"],
    ),
    (
        "rephrase-number",
        {"r.json": _json([{**GOOD, "rephrase_prompt": 5}])},
        _edit(),
        ["record 1", "field 'rephrase_prompt'"],
    ),
    (
        "rephrase-empty-item",
        {"r.json": _json([{**GOOD, "rephrase_prompts": ["ok", ""]}])},
        _edit(),
        ["record 1", "field 'rephrase_prompts[1]'"],
    ),
    (
        "locality-not-object",
        {"r.json": _json([{**GOOD, "locality": [["a", "b"]]}])},
        _edit(),
        ["record 1", "field 'locality'"],
    ),
    (
        "locality-probe-not-pair",
        {"r.json": _json([{**GOOD, "locality": {"x": [["a"]]}}])},
        _edit(),
        ["record 1", "field 'locality.x[0]'"],
    ),
    (
        "locality-answer-empty",
        {"r.json": _json([{**GOOD, "locality": {"x": [["a", ""]]}}])},
        _edit(),
        ["record 1", "field 'locality.x[0]'", "answer"],
    ),
    (
        "flat-locality-no-answer",
        {"r.json": _json([{**GOOD, "locality_x_prompt": "a b"}])},
        _edit(),
        ["record 1", "field 'locality_x_ground_truth'", "missing"],
    ),
    (
        "huge-prompt",
        {"r.json": _json([GOOD, {**GOOD, "prompt": HUGE + GOOD["prompt"]}])},
        _edit(),
        ["{tmp}/r.json", "record 2", "field 'prompt'", "context"],
    ),
    (
        "huge-rephrase",
        {"r.json": _json([{**GOOD, "rephrase_prompts": [HUGE]}])},
        _edit(),
        ["record 1", "field 'rephrase_prompts'", "context"],
    ),
    ("requests-dir", {"d/x.txt": "x"}, _edit("{tmp}/d"), ["{tmp}/d", "directory"]),
    ("requests-missing", {}, _edit("{tmp}/nope.json"), ["nope.json", "not found"]),
    # editors and hyper-parameters (checked before the model loads)
    ("unknown-method", {}, _edit("builtin", "--method", "rmoe"), ["rmoe", "rome"]),
    ("unknown-hparam", {}, _edit("builtin", "--hparam", "stpes=3"), ["stpes", "steps"]),
    ("hparam-float-for-int", {}, _edit("builtin", "--hparam", "steps=2.5"), ["steps", "2.5"]),
    ("hparam-layers-text", {}, _edit("builtin", "--hparam", "layers=abc"), ["layers", "abc"]),
    (
        "hparam-layer-out-of-range",
        {},
        _edit("builtin", "--hparam", "layers=40"),
        ["layers", "40", "4 layers"],
    ),
    ("hparam-unknown-module", {}, _edit("builtin", "--hparam", "module=nope"), ["module", "nope"]),
    ("hparam-negative-lr", {}, _edit("builtin", "--hparam", "lr=-1"), ["lr"]),
    ("hparam-no-equals", {}, _edit("builtin", "--hparam", "steps"), ["--hparam", "KEY=VALUE"]),
    (
        "rome-layer-out-of-range",
        {},
        _edit("builtin", "--method", "rome", "--hparam", "layer=9"),
        ["layer", "9"],
    ),
    # options
    ("batch-size-zero", {}, _edit("builtin", "--batch-size", "0"), ["--batch-size", "0"]),
    ("limit-zero", {}, _edit("builtin", "--limit", "0"), ["--limit"]),
    ("unknown-threshold", {}, _edit("builtin", "--threshold", "fluency=0.5"), ["fluency"]),
    ("threshold-above-one", {}, _edit("builtin", "--threshold", "efficacy=2"), ["efficacy"]),
    (
        "save-model-single-mode",
        {},
        _edit("builtin", "--save-model", "{tmp}/m"),
        ["--save-model", "single"],
    ),
    ("cuda-absent", {}, _edit("builtin", "--device", "cuda:3"), ["cuda:3"]),
    ("bad-device", {}, _edit("builtin", "--device", "tpu"), ["tpu"]),
    ("bad-dtype", {}, _edit("builtin", "--dtype", "int8"), ["--dtype", "int8"]),
    ("bad-mode", {}, _edit("builtin", "--mode", "parallel"), ["--mode", "parallel"]),
    # models
    (
        "model-path-missing",
        {},
        ["edit", "--model", "{tmp}/no-model", "--out", "{tmp}/out"],
        ["{tmp}/no-model", "does not exist"],
    ),
    (
        "model-relative-missing",
        {},
        ["edit", "--model", "./no/such/model", "--out", "{tmp}/out"],
        ["./no/such/model"],
    ),
    (
        "model-no-config",
        {"m/weights.txt": "x"},
        ["edit", "--model", "{tmp}/m", "--out", "{tmp}/out"],
        ["{tmp}/m", "config.json"],
    ),
    (
        "model-bad-config",
        {"m/config.json": "{oops", "m/model.safetensors": b"x"},
        ["edit", "--model", "{tmp}/m", "--out", "{tmp}/out"],
        ["config.json"],
    ),
    (
        "pickle-weights",
        {"m/config.json": "copy:config.json", "m/pytorch_model.bin": b"x"},
        ["edit", "--model", "{tmp}/m", "--out", "{tmp}/out"],
        ["{tmp}/m", "pickle", "--allow-pickle"],
    ),
    (
        "model-no-tokenizer",
        {"m/config.json": "copy:config.json", "m/model.safetensors": "copy:model.safetensors"},
        ["edit", "--model", "{tmp}/m", "--out", "{tmp}/out", "--device", "cpu"],
        ["{tmp}/m", "tokenizer"],
    ),
    (
        "model-gguf-missing",
        {},
        ["edit", "--model", "{tmp}/x.gguf", "--out", "{tmp}/out"],
        ["x.gguf"],
    ),
    (
        "builtin-unknown",
        {},
        ["edit", "--model", "builtin:gpt5", "--out", "{tmp}/out"],
        ["gpt5", "builtin:smollm2"],
    ),
    # artifacts and generate
    (
        "artifact-json-file",
        {"a.json": "{}"},
        [
            "generate",
            "--model",
            "{model}",
            "--artifact",
            "{tmp}/a.json",
            "--prompt",
            "x",
            "--device",
            "cpu",
        ],
        ["{tmp}/a.json", "safetensors"],
    ),
    (
        "artifact-empty-dir",
        {"run/x.txt": "x"},
        [
            "generate",
            "--model",
            "{model}",
            "--artifact",
            "{tmp}/run",
            "--prompt",
            "x",
            "--device",
            "cpu",
        ],
        ["{tmp}/run", "artifact"],
    ),
    ("generate-no-prompt", {}, ["generate", "--model", "{model}", "--device", "cpu"], ["--prompt"]),
    (
        "prompts-jsonl-bad-line",
        {"p.jsonl": '{"prompt": "a"}\n{"prompt": 3}\n'},
        ["generate", "--model", "{model}", "--prompts", "{tmp}/p.jsonl", "--device", "cpu"],
        ["p.jsonl", "line 2", "field 'prompt'"],
    ),
    # reports
    (
        "report-no-results",
        {"run/x.txt": "x"},
        ["report", "{tmp}/run"],
        ["{tmp}/run", "results.json"],
    ),
    (
        "report-unknown-schema",
        {"run/results.json": _json({"schema": "other/1"})},
        ["report", "{tmp}/run"],
        ["results.json", "unknown schema"],
    ),
    (
        "report-invalid-json",
        {"run/results.json": '{\n "schema": '},
        ["report", "{tmp}/run"],
        ["results.json", "line 2"],
    ),
    (
        "report-results-list",
        {"run/results.json": "[1, 2]"},
        ["report", "{tmp}/run"],
        ["results.json", "object"],
    ),
    (
        "report-missing-field",
        {"run/results.json": _json({"schema": "medit.results/1"})},
        ["report", "{tmp}/run"],
        ["results.json", "field 'config'"],
    ),
    # benchmarks
    (
        "bench-compare-edit-run",
        {"run/results.json": _json({"schema": "medit.results/1"})},
        ["bench", "--compare", "{tmp}/run"],
        ["results.json", "not a benchmark run"],
    ),
    ("bench-medcf-no-data", {}, ["bench", "--suite", "medcf", "--out", "{tmp}/out"], ["--data"]),
    (
        "bench-medcf-bad-json",
        {"medcf.json": '[\n{"prompt": "x",}\n]'},
        _BENCH_MEDCF,
        ["medcf.json", "line 2"],
    ),
    (
        "bench-medcf-missing-locality",
        {"medcf.json": _json([MEDCF])},
        _BENCH_MEDCF,
        ["medcf.json", "record 1", "locality_"],
    ),
    (
        "bench-hparam-other-method",
        {},
        ["bench", "--hparam", "rome:layer=1", "--out", "{tmp}/out"],
        ["rome"],
    ),
    (
        "bench-batch-size-zero",
        {},
        ["bench", "--batch-size", "0", "--out", "{tmp}/out"],
        ["--batch-size"],
    ),
    (
        "bench-resume-not-a-run",
        {"out/thesis.tex": "x"},
        ["bench", "--resume", "--out", "{tmp}/out", "--model", "{model}", "--device", "cpu"],
        ["{tmp}/out", "not a medit benchmark run"],
    ),
    # apply, revert, journal, trace
    (
        "revert-not-a-medit-model",
        {"m/config.json": "{}"},
        ["revert", "{tmp}/m", "--out", "{tmp}/base"],
        ["{tmp}/m", "medit"],
    ),
    (
        "apply-no-artifact",
        {"run/x.txt": "x"},
        ["apply", "{tmp}/run", "--model", "{model}", "--out", "{tmp}/m"],
        ["{tmp}/run", "artifact"],
    ),
    (
        "journal-missing",
        {"ws/x.txt": "x"},
        ["journal", "verify", "{tmp}/ws"],
        ["{tmp}/ws", "journal"],
    ),
    (
        "journal-bad-line",
        {"ws/journal.jsonl": "{oops\n"},
        ["journal", "show", "{tmp}/ws"],
        ["journal.jsonl", "line 1"],
    ),
    (
        "trace-subject-without-prompt",
        {},
        ["trace", "--subject", "x", "--out", "{tmp}/out"],
        ["--subject", "--prompt"],
    ),
]


def _fill(text: str, tmp: Path, model: Path) -> str:
    return text.replace("{tmp}", str(tmp)).replace("{model}", str(model))


def _files(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


def test_the_corpus_is_large_and_named_uniquely():
    names = [c[0] for c in CASES]
    assert len(names) >= 40 and len(set(names)) == len(names)


@pytest.mark.parametrize("name, files, argv, words", CASES, ids=[c[0] for c in CASES])
def test_bad_input_exits_2_with_one_line_and_writes_nothing(
    name, files, argv, words, tmp_path, tiny_model_dir, monkeypatch
):
    monkeypatch.chdir(tmp_path)
    for rel, content in files.items():
        path = tmp_path / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, str) and content.startswith("copy:"):  # a file of the tiny model
            content = (tiny_model_dir / content.removeprefix("copy:")).read_bytes()
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
    before = _files(tmp_path)
    res = CliRunner().invoke(main, [_fill(a, tmp_path, tiny_model_dir) for a in argv])
    assert res.exit_code == 2, (res.output, res.exception)
    assert "Traceback" not in res.output
    # progress bars (stderr) are progress, not the error
    lines = [x for x in res.output.splitlines() if x.strip() and "it/s]" not in x]
    assert len(lines) == 1 and lines[0].startswith("medit: error: "), res.output
    for word in words:
        assert _fill(word, tmp_path, tiny_model_dir) in lines[0], (word, lines[0])
    assert _files(tmp_path) == before, "something was written"


# -- an internal error is a bug, never dressed up as bad input -----------------------------------
@pytest.mark.parametrize("verbose", [False, True])
def test_an_internal_error_exits_1_and_names_itself_a_bug(
    tmp_path, tiny_model_dir, monkeypatch, verbose
):
    """A ValueError raised deep inside (not a UserError) exits 1 as an internal error with a hint
    to rerun with -v; with -v the traceback is printed."""
    import medit.runner

    def broken(*_a, **_k):
        raise ValueError("shapes (3, 4) and (5, 6) do not match")

    monkeypatch.setattr(medit.runner, "evaluate", broken)
    (tmp_path / "r.json").write_text(_json([GOOD]))
    argv = (["-v"] if verbose else []) + _edit(f"{tmp_path}/r.json")
    res = CliRunner().invoke(main, [_fill(a, tmp_path, tiny_model_dir) for a in argv])
    assert res.exit_code == 1, res.output
    assert "internal error" in res.output and "a bug in medit" in res.output
    assert "shapes (3, 4)" in res.output
    assert ("Traceback" in res.output) is verbose
    assert ("rerun with -v" in res.output) is not verbose
    assert not (tmp_path / "out").exists()
