"""Property-based tests (hypothesis) of the request reader and the bench's case store repair."""

from __future__ import annotations

import codecs
import json

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from medit.bench.store import CASES_FILE, REJECTED_FILE, read_cases
from medit.facts.requests import RequestError, load_requests

_settings = settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
_word = st.text(st.characters(categories=("L", "N"), max_codepoint=0x2FFF), min_size=1, max_size=8)


@st.composite
def _request(draw):
    subject = draw(_word)
    prompt = f"{draw(_word)} {subject} {draw(_word)}"
    rec = {"prompt": prompt, "target_new": draw(_word), "subject": subject}
    if draw(st.booleans()):
        rec["rephrase_prompts"] = draw(st.lists(_word, min_size=1, max_size=2))
    if draw(st.booleans()):
        rec["locality"] = {"neighborhood": [[draw(_word), draw(_word)]]}
    return rec


@_settings
@given(records=st.lists(_request(), min_size=1, max_size=5), jsonl=st.booleans(), bom=st.booleans())
def test_valid_requests_round_trip_in_every_format(tmp_path_factory, records, jsonl, bom):
    path = tmp_path_factory.mktemp("r") / ("r.jsonl" if jsonl else "r.json")
    body = "\n".join(json.dumps(r) for r in records) if jsonl else json.dumps(records, indent=1)
    path.write_bytes((codecs.BOM_UTF8 if bom else b"") + body.encode())
    got = load_requests(path)
    assert [(r.prompt, r.target_new, r.subject) for r in got] == [
        (r["prompt"], r["target_new"], r["subject"]) for r in records
    ]
    assert [list(r.rephrase_prompts) for r in got] == [
        r.get("rephrase_prompts", []) for r in records
    ]


_junk = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=10),
    lambda inner: (
        st.lists(inner, max_size=3)
        | st.dictionaries(
            st.sampled_from(
                [
                    "prompt",
                    "target_new",
                    "subject",
                    "rephrase_prompts",
                    "locality",
                    "portability",
                    "ground_truth",
                    "id",
                    "other",
                ]
            ),
            inner,
            max_size=5,
        )
    ),
    max_leaves=10,
)


@_settings
@given(value=_junk, suffix=st.sampled_from([".json", ".jsonl"]))
def test_any_json_is_read_or_refused_with_a_named_error(tmp_path_factory, value, suffix):
    """No input makes the reader fail with anything but a RequestError naming the file."""
    path = tmp_path_factory.mktemp("r") / f"in{suffix}"
    path.write_text(json.dumps(value), encoding="utf-8")
    try:
        load_requests(path)
    except RequestError as exc:
        assert str(path) in str(exc) and "\n" not in str(exc).strip()


@_settings
@given(data=st.binary(max_size=200))
def test_any_bytes_are_read_or_refused_with_a_named_error(tmp_path_factory, data):
    path = tmp_path_factory.mktemp("r") / "in.jsonl"
    path.write_bytes(data)
    try:
        load_requests(path)
    except RequestError as exc:
        assert str(path) in str(exc)


# -- the case store ------------------------------------------------------------------------------
_case = st.builds(
    lambda m, i, v: {"method": m, "case": i, "metrics": {"efficacy": v}},
    st.sampled_from(["ft-m", "rome"]),
    st.integers(0, 30),
    st.floats(0, 1),
)
_bad_line = st.sampled_from(
    [
        b"{oops",
        b"[]",
        b'{"method": 3, "case": 1, "metrics": {}}',
        b'{"method": "ft-m", "case": "1", "metrics": {}}',
        b"\xff\xfe",
        b'{"method": "ft-m", "case": 1}',
        b"null",
    ]
)


@_settings
@given(
    cases=st.lists(_case, max_size=8),
    damage=st.lists(st.tuples(st.integers(0, 8), _bad_line), max_size=4),
    torn=st.booleans(),
)
def test_repair_keeps_every_valid_case_and_sets_the_rest_aside(
    tmp_path_factory, cases, damage, torn
):
    out = tmp_path_factory.mktemp("bench")
    lines = [json.dumps(c).encode() + b"\n" for c in cases]
    bad = []
    for pos, junk in damage:
        lines.insert(min(pos, len(lines)), junk + b"\n")
        bad.append(junk + b"\n")
    if torn:  # a crash cut the last line short
        lines.append(json.dumps(cases[0] if cases else {"x": 1}).encode()[:-3])
        bad.append(lines[-1] + b"\n")
    (out / CASES_FILE).write_bytes(b"".join(lines))

    got = read_cases(out, repair=True)
    seen, unique = set(), []
    for c in cases:
        if (c["method"], c["case"]) not in seen:
            seen.add((c["method"], c["case"]))
            unique.append(c)
    assert got == unique  # every valid case, first copy of each, in file order
    kept = (out / CASES_FILE).read_bytes().splitlines(keepends=True)
    assert kept == [json.dumps(c).encode() + b"\n" for c in cases]
    rejected = (out / REJECTED_FILE).read_bytes() if bad else b""
    assert sorted(rejected.splitlines(keepends=True)) == sorted(bad)
    assert read_cases(out, repair=True) == got  # repaired: nothing more to move
    assert ((out / REJECTED_FILE).read_bytes() if bad else b"") == rejected
