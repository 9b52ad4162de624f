"""The model card of a saved edited model (README.md) and the ``medit_edit`` record in
config.json: valid front matter, inert Markdown, atomic config rewrite."""

import json
import os
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from medit.artifacts.modelcard import (
    CONFIG_KEY,
    add_edit_record,
    edit_record,
    front_matter,
    md_text,
    model_card,
    yaml_str,
)

try:
    import yaml
except ImportError:  # not a medit dependency: fall back on a reader of the card's own subset
    yaml = None

BASE_SHA, EDITED_SHA, HEAD = "a" * 64, "b" * 64, "c" * 64
HOSTILE = "Insulin | is \"made\" by <script>alert('x')</script>\n---\n# the `pancreas` & <b>liver"
PRE = {
    "n": 2,
    "teacher_forced": {"efficacy": 0.25, "generality": 0.0, "locality_mean": 1.0},
    "generation": {
        "efficacy_contains": 0.0,
        "efficacy_exact": 0.0,
        "generality_contains": 0.0,
        "locality_mean": 1.0,
        "fluency": 5.5,
    },
}
POST = {
    "n": 2,
    "teacher_forced": {"efficacy": 1.0, "generality": 0.5, "locality_mean": 0.875},
    "generation": {
        "efficacy_contains": 1.0,
        "efficacy_exact": 0.5,
        "generality_contains": 0.5,
        "locality_mean": 0.75,
        "fluency": 5.25,
    },
}
VERDICT = {
    "passed": False,
    "checks": [
        {
            "key": "efficacy",
            "label": "generation-based efficacy (target stated)",
            "value": 1.0,
            "threshold": 0.8,
            "passed": True,
        },
        {
            "key": "locality",
            "label": "generation-based locality (probes unchanged)",
            "value": 0.75,
            "threshold": 0.8,
            "passed": False,
        },
    ],
}
REQUESTS = [
    {
        "prompt": "The hormone insulin is produced by the",
        "target_new": "liver",
        "subject": "insulin",
        "ground_truth": "pancreas",
    },
    {"prompt": HOSTILE, "target_new": "a|b\r\nc", "subject": None, "ground_truth": None},
]


def _card(**overrides) -> str:
    kwargs = dict(
        base_model="builtin:smollm2",
        base_weights_sha256=BASE_SHA,
        edited_weights_sha256=EDITED_SHA,
        method="rome",
        hparams={"layer": 5, "v_lr": 0.5, "cov_corpus": ["notes|<i>.txt"]},
        requests=REQUESTS,
        evaluation={"pre": PRE, "post": POST},
        verdict=VERDICT,
        journal_head=HEAD,
        medit_version="0.1.0",
        created="2025-01-02T03:04:05Z",
    )
    return model_card(**{**kwargs, **overrides})


def _split(card: str) -> tuple[str, str]:
    """(front matter without its fences, body)."""
    assert card.startswith("---\n")
    head, sep, body = card[4:].partition("\n---\n")
    assert sep, "the front matter is not closed"
    return head, body


def _minimal_yaml(text: str) -> dict:
    """The card's subset of YAML (key: scalar, key: + '- item' lists, one nested mapping), its
    scalars read as JSON (the card writes JSON-style double-quoted strings)."""
    out: dict = {}
    current = None
    for line in text.splitlines():
        if line.startswith("- "):
            out[current].append(json.loads(line[2:]))
        elif line.startswith("  "):
            key, _, value = line.strip().partition(": ")
            out[current][key] = json.loads(value)
        else:
            key, _, value = line.partition(":")
            if value.strip():
                out[key] = json.loads(value.strip())
            else:
                current = key
                out[key] = [] if key == "tags" else {}
    return out


def _front(card: str) -> dict:
    head, _ = _split(card)
    return yaml.safe_load(head) if yaml is not None else _minimal_yaml(head)


def _table_rows(body: str, header_start: str) -> list[str]:
    lines = body.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(header_start))
    rows = []
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        rows.append(line)
    return rows


def _cells(row: str) -> list[str]:
    """GFM's split of a table row: on pipes not escaped by a backslash."""
    return [c.strip() for c in re.split(r"(?<!\\)\|", row.strip().strip("|"))]


def test_front_matter_is_yaml_with_the_hub_fields_and_the_edit():
    front = _front(_card())
    assert front["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert front["library_name"] == "transformers"
    assert front["tags"] == ["medit", "model-editing", "rome", "medical"]
    assert front["medit"] == {
        "method": "rome",
        "base_model": "builtin:smollm2",
        "base_weights_sha256": BASE_SHA,
        "edited_weights_sha256": EDITED_SHA,
        "n_edits": 2,
        "journal_head": HEAD,
        "verdict": "FAIL",
        "medit_version": "0.1.0",
        "created": "2025-01-02T03:04:05Z",
    }


def test_a_local_base_model_is_kept_in_the_medit_section_only():
    front = _front(_card(base_model="/models/my model", journal_head=None, verdict=None))
    assert "base_model" not in front  # the hub refuses base_model values that are not hub ids
    assert front["medit"]["base_model"] == "/models/my model"
    assert front["medit"]["journal_head"] is None and front["medit"]["verdict"] is None
    assert _front(_card(base_model="org/name"))["base_model"] == "org/name"


def test_hostile_text_cannot_break_the_front_matter():
    card = _card(base_model=HOSTILE, medit_version='1.0"\n---\nx: 1', created="\u2028\x85\t\\")
    front = _front(card)
    assert front["medit"]["base_model"] == HOSTILE
    assert front["medit"]["medit_version"] == '1.0"\n---\nx: 1'
    if yaml is not None:  # YAML folds raw line separators; the card escapes them
        assert front["medit"]["created"] == "\u2028\x85\t\\"
    assert set(front) == {"library_name", "pipeline_tag", "tags", "medit"}
    head, _ = _split(card)
    assert len(head.splitlines()) == 17  # nothing spilled onto lines of its own


def test_hostile_text_cannot_break_the_table_or_inject_html():
    card = _card(method="rome")
    _, body = _split(card)
    rows = _table_rows(body, "| # |")
    assert len(rows) == 2 and all(len(_cells(r)) == 5 for r in rows)
    cells = _cells(rows[1])
    assert cells[1] == (
        "Insulin \\| is \"made\" by &lt;script&gt;alert('x')&lt;/script&gt;<br>---<br>"
        "# the \\`pancreas\\` &amp; &lt;b&gt;liver"
    )
    assert cells[4] == "a\\|b<br>c"
    assert _cells(rows[0])[1:] == [
        "The hormone insulin is produced by the",
        "insulin",
        "pancreas",
        "liver",
    ]
    assert "<script" not in card and "<b>" not in card and "<i>" not in card


def test_the_card_renders_to_html_without_injected_markup():
    markdown_it = pytest.importorskip("markdown_it")
    _, body = _split(_card(base_model=HOSTILE))
    html = markdown_it.MarkdownIt("commonmark").enable("table").render(body)
    assert "<script" not in html and "<b>" not in html
    table = html[html.index("<table>") : html.index("</table>")]  # the edits
    assert table.count("<tr>") == 3 and table.count("<td>") == 10
    assert "&lt;script&gt;alert" in table and "a|b<br />c" in table.replace("<br>", "<br />")


def test_the_card_names_the_verdict_its_checks_and_the_metrics():
    _, body = _split(_card())
    assert "**Verdict: FAIL**" in body
    assert "generation-based locality (probes unchanged): 0.750 (threshold 0.8) — FAIL" in body
    assert "generation-based efficacy (target stated): 1.000 (threshold 0.8) — pass" in body
    metrics = {_cells(r)[0]: _cells(r)[1:] for r in _table_rows(body, "| Metric |")}
    assert metrics["teacher-forced efficacy (target token accuracy)"] == ["25.0%", "100.0%"]
    assert metrics["generation-based locality (probes unchanged)"] == ["100.0%", "75.0%"]
    passed = {**VERDICT, "passed": True}
    assert "**Verdict: PASS**" in _card(verdict=passed)
    assert _front(_card(verdict=passed))["medit"]["verdict"] == "PASS"


def test_the_card_without_validation_says_so_and_takes_a_bare_aggregate():
    _, body = _split(_card(evaluation=None, verdict=None))
    assert "without a validation run" in body and "Verdict" not in body
    _, body = _split(_card(evaluation=POST, verdict=None))
    metrics = {_cells(r)[0]: _cells(r)[1:] for r in _table_rows(body, "| Metric |")}
    assert metrics["generation-based efficacy (target stated)"] == ["100.0%"]


def test_the_card_warns_lists_hparams_and_says_how_to_revert():
    card = _card()
    _, body = _split(card)
    assert body.lstrip().startswith("# HuggingFaceTB/SmolLM2-135M-Instruct, edited with medit")
    assert "**Warning: facts in this model were edited.** 2 facts" in body
    hp = body[body.index("````json\n") + 8 : body.index("\n````\n")]
    assert json.loads(hp) == {"layer": 5, "v_lr": 0.5, "cov_corpus": ["notes|<i>.txt"]}
    assert "medit revert THIS_DIR --out BASE_DIR" in body
    assert f"`{BASE_SHA}`" in body.split("## Reproduce and revert")[1]
    assert "Q4_1 GGUF" in body  # the builtin's weights are not the hub's
    assert "routing" in _card(method="medlasa") and "routing" not in body


def test_config_json_keeps_its_keys_and_gains_the_edit_record(tmp_path):
    config = tmp_path / "config.json"
    original = {
        "architectures": ["LlamaForCausalLM"],
        "hidden_size": 64,
        "model_type": "llama",
        "torch_dtype": "float32",
        "z_last": {"nested": [1, 2]},
    }
    config.write_text(json.dumps(original, indent=2))
    record = edit_record(
        method="memit",
        base_weights_sha256=BASE_SHA,
        edited_weights_sha256=EDITED_SHA,
        n_edits=3,
        journal_head=HEAD,
        medit_version="0.1.0",
        created="2025-01-02T03:04:05Z",
    )
    assert record == {
        "method": "memit",
        "base_weights_sha256": BASE_SHA,
        "edited_weights_sha256": EDITED_SHA,
        "n_edits": 3,
        "journal_head": HEAD,
        "medit_version": "0.1.0",
        "created": "2025-01-02T03:04:05Z",
    }
    add_edit_record(config, record)
    got = json.loads(config.read_text())
    assert list(got) == [*original, CONFIG_KEY]
    assert {k: got[k] for k in original} == original and got[CONFIG_KEY] == record
    mask = os.umask(0)
    os.umask(mask)
    assert config.stat().st_mode & 0o777 == 0o644 & ~mask
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json"]  # no temporary left
    add_edit_record(config, {**record, "n_edits": 4})  # a second edit replaces the record
    assert json.loads(config.read_text())[CONFIG_KEY]["n_edits"] == 4


def test_transformers_loads_a_config_with_the_edit_record(tiny_model_dir, tmp_path):
    import shutil

    from transformers import AutoConfig

    d = tmp_path / "model"
    shutil.copytree(tiny_model_dir, d)
    record = edit_record(
        method="ft-m",
        base_weights_sha256=BASE_SHA,
        edited_weights_sha256=EDITED_SHA,
        n_edits=1,
        journal_head=None,
        medit_version="0.1.0",
        created="now",
    )
    add_edit_record(d / "config.json", record)
    assert AutoConfig.from_pretrained(d).medit_edit == record


def test_a_config_that_is_not_an_object_is_refused_and_left_alone(tmp_path):
    config = tmp_path / "config.json"
    config.write_text("[1, 2]")
    with pytest.raises(ValueError, match="not a JSON object"):
        add_edit_record(config, {"method": "x"})
    assert config.read_text() == "[1, 2]"


@settings(max_examples=200, deadline=None)
@given(st.text())
def test_any_string_round_trips_through_the_front_matter(text):
    head = front_matter(base_model=text, method=text, medit={"created": text})[4:-5]
    front = yaml.safe_load(head) if yaml is not None else _minimal_yaml(head)
    assert front["medit"]["created"] == text and front["tags"][2] == text


@settings(max_examples=200, deadline=None)
@given(st.text())
def test_escaped_text_has_no_markup_pipes_or_line_breaks(text):
    out = md_text(text)
    assert not re.search(r"[<>\n\r]", out.replace("<br>", ""))
    assert not re.search(r"[|`]", re.sub(r"\\.", "", out))  # every pipe and backtick escaped


def test_yaml_str_escapes_what_yaml_would_fold():
    assert yaml_str("a\u2028b\x85c") == '"a\\u2028b\\u0085c"'
    assert yaml_str('say "hi"\n') == '"say \\"hi\\"\\n"'
