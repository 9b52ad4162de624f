import json

import pytest

from medit.facts.requests import (
    RequestError,
    check_lengths,
    load_requests,
    parse_record,
)
from tests.conftest import need_data


def _slice(tmp_path, name, n=3):
    records = json.loads(need_data(name).read_text())[:n]
    path = tmp_path / name.replace("/", "_")
    path.write_text(json.dumps(records))
    return path, records


def test_medcf_fields_map_onto_edit_requests(tmp_path):
    path, raw = _slice(tmp_path, "MedCF/test.json")
    reqs = load_requests(path)
    r, rec = reqs[0], raw[0]
    assert r.prompt == rec["prompt"] and r.target_new == rec["target_new"]
    assert r.subject == rec["subject"] and r.ground_truth == rec["ground_truth"]
    assert r.rephrase_prompts == (rec["rephrase_prompt"],)
    assert set(r.locality) == {"target", "mapping", "struc", "tokenSem"}
    assert r.locality["mapping"] == (
        (rec["locality_mapping_prompt"], rec["locality_mapping_ground_truth"]),
    )
    assert r.id.endswith(":1")


def test_medfe_fields_map_and_extra_fields_are_kept(tmp_path):
    path, raw = _slice(tmp_path, "MedFE/test.json")
    r = load_requests(path)[0]
    assert set(r.locality) == {"topic", "tokenSem"}
    assert r.meta == {"subject_type": raw[0]["subject_type"], "topic_type": raw[0]["topic_type"]}


@pytest.mark.parametrize("name", ["MedCF/test.json", "MedFE/test.json"])
def test_whole_benchmark_files_validate(name):
    reqs = load_requests(need_data(name))
    assert len(reqs) > 800 and all(r.locality for r in reqs)


def test_native_jsonl_with_locality_groups(tmp_path):
    path = tmp_path / "reqs.jsonl"
    rec = {
        "prompt": "Insulin is made in the",
        "target_new": "pancreas",
        "subject": "Insulin",
        "rephrase_prompts": ["Insulin comes from the"],
        "locality": {
            "general": [["The heart has four", "chambers"]],
            "easyedit": {"prompt": "Aspirin treats", "ground_truth": "pain"},
        },
    }
    path.write_text(json.dumps(rec) + "\n\n" + json.dumps(rec) + "\n")
    reqs = load_requests(path)
    assert len(reqs) == 2
    assert reqs[0].locality_probes() == [
        ("general", "The heart has four", "chambers"),
        ("easyedit", "Aspirin treats", "pain"),
    ]


def test_builtin_sample_set_is_valid():
    reqs = load_requests("builtin")
    assert len(reqs) >= 28
    assert all(r.subject and r.rephrase_prompts and r.locality for r in reqs)


@pytest.mark.parametrize(
    "record, field, problem",
    [
        ({"target_new": "x"}, "prompt", "missing"),
        ({"prompt": "  ", "target_new": "x"}, "prompt", "empty"),
        ({"prompt": "p", "target_new": 3}, "target_new", "expected a string, got int"),
        (
            {"prompt": "Insulin is", "target_new": "x", "subject": "Aspirin"},
            "subject",
            "does not occur in the prompt",
        ),
        (
            {"prompt": "p", "target_new": "x", "rephrase_prompts": [""]},
            "rephrase_prompts[0]",
            "non-empty",
        ),
        (
            {"prompt": "p", "target_new": "x", "locality": {"a": [["q"]]}},
            "locality.a[0]",
            "expected",
        ),
        (
            {"prompt": "p", "target_new": "x", "locality_a_prompt": "q"},
            "locality_a_ground_truth",
            "missing",
        ),
    ],
)
def test_bad_records_name_file_record_and_field(record, field, problem):
    with pytest.raises(RequestError) as err:
        parse_record(record, "reqs.json", 7)
    msg = str(err.value)
    assert msg.startswith("reqs.json: record 7") and f"field '{field}'" in msg and problem in msg


def test_bad_files(tmp_path):
    latin = tmp_path / "latin1.json"
    latin.write_bytes('[{"prompt": "caf\xe9", "target_new": "x"}]'.encode("latin-1"))
    with pytest.raises(RequestError, match="latin1.json: not UTF-8 text"):
        load_requests(latin)
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"prompt": "a", "target_new": "b"}\n{"prompt": \n')
    with pytest.raises(RequestError, match="broken.jsonl: record 2.*invalid JSON on line 2"):
        load_requests(broken)
    empty = tmp_path / "empty.json"
    empty.write_text("[]")
    with pytest.raises(RequestError, match="contains no requests"):
        load_requests(empty)
    with pytest.raises(RequestError, match="file not found"):
        load_requests(tmp_path / "nope.json")


def test_prompts_longer_than_the_context_are_rejected(tokenizer):
    r = parse_record({"prompt": "The heart " * 40, "target_new": "x"}, "long.json", 1)
    check_lengths([r], tokenizer, 1024)
    with pytest.raises(RequestError, match=r"long.json: record 1, field 'prompt'.*context of 16"):
        check_lengths([r], tokenizer, 16)
