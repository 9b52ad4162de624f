"""The edit journal: the hash chain finds every edited, removed, reordered or inserted entry;
appends are safe across processes and after an interrupted write."""

from __future__ import annotations

import json
import multiprocessing as mp
import warnings

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from medit.artifacts import journal

_json = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**53), 2**53)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)
_settings = settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


def _entry(i: int = 0, **kw):
    body = dict(
        action="edit",
        author="dr.house",
        reason=f"fix {i}",
        method="ft-m",
        hparams={"steps": i},
        requests=[{"prompt": f"q{i}", "target_new": "a"}],
        base_weights_sha256="a" * 64,
        result_weights_sha256="b" * 64,
        artifacts={"edit.safetensors": "c" * 64},
        evaluation={"verdict": "PASS"},
    )
    body.update(kw)
    return journal.make_entry(**body)


def _write(path, n):
    return [journal.append(path, _entry(i)) for i in range(n)]


def _lines(path):
    return path.read_text(encoding="utf-8").splitlines()


def _put(path, lines):
    path.write_text("".join(x + "\n" for x in lines), encoding="utf-8")


# -- the chain -----------------------------------------------------------------------------------
def test_entries_are_chained_and_read_back(tmp_path):
    p = tmp_path / journal.JOURNAL_FILE
    stored = _write(p, 3)
    assert [e["seq"] for e in stored] == [0, 1, 2]
    assert stored[0]["prev"] == journal.GENESIS
    assert stored[1]["prev"] == stored[0]["sha256"] and stored[2]["prev"] == stored[1]["sha256"]
    assert journal.read(p) == stored and journal.head(p) == stored[-1]["sha256"]
    assert journal.verify(p) == [] and journal.verify(p, expected_head=stored[1]["sha256"]) == []
    assert stored[0]["time"].endswith("Z") and stored[0]["author"] == "dr.house"


def test_an_empty_or_missing_journal(tmp_path):
    p = tmp_path / "none.jsonl"
    assert journal.read(p) == [] and journal.verify(p) == [] and journal.head(p) == journal.GENESIS


@_settings
@given(
    bodies=st.lists(
        st.dictionaries(st.text(min_size=1, max_size=8), _json, max_size=4), min_size=1, max_size=5
    )
)
def test_any_json_round_trips_and_verifies(tmp_path_factory, bodies):
    p = tmp_path_factory.mktemp("j") / journal.JOURNAL_FILE
    stored = [
        journal.append(p, _entry(i, extra={f"x_{k}": v for k, v in b.items()}))
        for i, b in enumerate(bodies)
    ]
    assert journal.read(p) == stored and journal.verify(p) == []


@_settings
@given(n=st.integers(2, 6), data=st.data())
def test_editing_any_field_of_any_entry_is_found(tmp_path_factory, n, data):
    p = tmp_path_factory.mktemp("j") / journal.JOURNAL_FILE
    _write(p, n)
    lines = _lines(p)
    i = data.draw(st.integers(0, n - 1), label="entry")
    entry = json.loads(lines[i])
    field = data.draw(st.sampled_from(sorted(k for k in entry if k != "sha256")), label="field")
    new = data.draw(_json.filter(lambda v: v != entry[field]), label="value")
    entry[field] = new
    lines[i] = json.dumps(entry, ensure_ascii=False)
    _put(p, lines)
    problems = journal.verify(p)
    assert problems and any(
        f"seq {entry['seq']} at line {i + 1}" in x or f"line {i + 1}" in x for x in problems
    )


@_settings
@given(n=st.integers(3, 7), data=st.data())
def test_removing_reordering_or_inserting_entries_is_found(tmp_path_factory, n, data):
    p = tmp_path_factory.mktemp("j") / journal.JOURNAL_FILE
    _write(p, n)
    lines = _lines(p)
    how = data.draw(st.sampled_from(["remove", "swap", "insert"]), label="how")
    i = data.draw(st.integers(0, n - 2), label="at")
    if how == "remove":
        del lines[i]
    elif how == "swap":
        lines[i], lines[i + 1] = lines[i + 1], lines[i]
    else:
        lines.insert(i + 1, lines[i])
    _put(p, lines)
    problems = journal.verify(p)
    words = {"remove": "removed", "swap": "reordered", "insert": "inserted"}[how]
    assert problems and all(words in x for x in problems[:1])


def test_a_rehashed_edit_breaks_the_next_link(tmp_path):
    """Recomputing the sha256 of an edited entry moves the break to the entry after it."""
    p = tmp_path / journal.JOURNAL_FILE
    _write(p, 3)
    lines = _lines(p)
    e = json.loads(lines[1])
    e["author"] = "someone else"
    e["sha256"] = journal.entry_sha256(e)
    lines[1] = json.dumps(e)
    _put(p, lines)
    (problem,) = journal.verify(p)
    assert "seq 2 at line 3" in problem and "prev" in problem


def test_a_removed_tail_is_found_with_the_recorded_head(tmp_path):
    p = tmp_path / journal.JOURNAL_FILE
    stored = _write(p, 3)
    _put(p, _lines(p)[:2])
    assert journal.verify(p) == []  # the chain alone cannot know
    (problem,) = journal.verify(p, expected_head=stored[-1]["sha256"])
    assert "removed" in problem and "head you hold" in problem


def test_a_tampered_journal_is_not_appended_to(tmp_path):
    p = tmp_path / journal.JOURNAL_FILE
    _write(p, 2)
    _put(p, [_lines(p)[0].replace("dr.house", "dr.wilson"), _lines(p)[1]])
    before = p.read_bytes()
    with pytest.raises(journal.JournalError, match="refusing to append.*seq 0"):
        journal.append(p, _entry(9))
    assert p.read_bytes() == before


def test_an_invalid_line_is_named(tmp_path):
    p = tmp_path / journal.JOURNAL_FILE
    _write(p, 1)
    p.write_text(p.read_text() + "{oops\n")
    with pytest.raises(journal.JournalError, match=r"journal.jsonl: line 2: invalid JSON"):
        journal.read(p)
    assert "line 2" in journal.verify(p)[0]


def test_an_interrupted_write_is_dropped_with_a_warning(tmp_path):
    p = tmp_path / journal.JOURNAL_FILE
    stored = _write(p, 2)
    line = json.dumps(_entry(5))
    with open(p, "ab") as f:
        f.write(line.encode()[: len(line) // 2])  # the crash tore the line
    assert journal.read(p) == stored and journal.verify(p) == []
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        third = journal.append(p, _entry(3))
    assert any("incomplete last line" in str(x.message) for x in w)
    assert journal.read(p) == [*stored, third] and journal.verify(p) == []


def test_make_entry_checks_its_input():
    with pytest.raises(ValueError, match="action"):
        _entry(action="delete")
    with pytest.raises(ValueError, match="clash"):
        _entry(extra={"seq": 3})
    with pytest.raises(ValueError):
        _entry(evaluation={"x": float("nan")})


def test_entries_for_run_and_format(tmp_path):
    p = tmp_path / journal.JOURNAL_FILE
    journal.append(p, _entry(0, run_dir=str(tmp_path / "r1")))
    journal.append(p, _entry(1, run_dir=str(tmp_path / "r2")))
    journal.append(p, _entry(2, action="apply", extra={"out": str(tmp_path / "r1")}))
    assert [e["seq"] for e in journal.entries_for_run(p, tmp_path / "r1")] == [0, 2]
    text = journal.format_entries(journal.read(p))
    assert text.splitlines()[0].startswith("seq") and len(text.splitlines()) == 4
    assert "dr.house" in text and "fix 1" in text


# -- concurrency ---------------------------------------------------------------------------------
def _worker(path: str, who: int, n: int) -> None:
    for i in range(n):
        journal.append(path, _entry(i, author=f"proc{who}"))


def test_concurrent_processes_keep_one_chain(tmp_path):
    p = tmp_path / journal.JOURNAL_FILE
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_worker, args=(str(p), w, 10)) for w in range(4)]
    for x in procs:
        x.start()
    for x in procs:
        x.join(120)
    assert all(x.exitcode == 0 for x in procs)
    entries = journal.read(p)
    assert len(entries) == 40 and [e["seq"] for e in entries] == list(range(40))
    assert journal.verify(p) == []
    assert sorted({e["author"] for e in entries}) == [f"proc{w}" for w in range(4)]
