"""Bad user input: every problem is a ValueError with a one-line message naming the file, the
record and the field (hyper-parameters: the field and the method), raised before any model
weight is read where the input allows."""

from __future__ import annotations

import dataclasses
import json
import time
from typing import Literal

import pytest

from medit.editors.base import HParams, hp
from medit.editors.registry import METHODS, get_editor_class, make_editor
from medit.facts.requests import RequestError, check_lengths, load_requests, parse_record


def _one_line_value_error(exc: BaseException) -> str:
    assert isinstance(exc, ValueError), type(exc)
    msg = str(exc)
    assert "\n" not in msg, msg
    return msg


# -- 1. hyper-parameter types and values ---------------------------------------------------------
@pytest.mark.parametrize(
    "method, values, message",
    [
        ("ft-m", {"steps": 2.5}, "hyper-parameter 'steps' of ft-m expects an integer, got 2.5"),
        ("ft-m", {"steps": True}, "hyper-parameter 'steps' of ft-m expects an integer, got True"),
        ("ft-m", {"steps": "many"}, "'steps' of ft-m expects an integer, got 'many'"),
        ("ft-m", {"layers": "abc"}, "hyper-parameter 'layers' of ft-m expects integers, got 'abc'"),
        ("ft-m", {"layers": "4,x"}, "'layers' of ft-m expects integers, got 'x'"),
        ("ft-m", {"layers": [1, 2.5]}, "'layers' of ft-m expects integers, got 2.5"),
        ("ft-m", {"layers": {"a": 1}}, "'layers' of ft-m expects integers, got {'a': 1}"),
        ("ft-m", {"lr": "fast"}, "hyper-parameter 'lr' of ft-m expects a number, got 'fast'"),
        ("ft-m", {"lr": float("nan")}, "'lr' of ft-m expects a finite number, got nan"),
        ("ft-m", {"lr": False}, "'lr' of ft-m expects a number, got False"),
        ("ft-m", {"module": 2.5}, "hyper-parameter 'module' of ft-m expects a string, got 2.5"),
        ("rome", {"mom2_adjustment": "yes"}, "'mom2_adjustment' of rome expects true or false"),
        ("rome", {"mom2_adjustment": 1}, "'mom2_adjustment' of rome expects true or false, got 1"),
        ("lora", {"targets": [1.5]}, "hyper-parameter 'targets' of lora expects strings, got 1.5"),
        ("memit", {"layers": None}, "'layers' of memit expects integers, got None"),
        # value checks of the classes' own __post_init__
        ("ft-m", {"steps": 0}, "hyper-parameter 'steps' of ft-m must be >= 1, got 0"),
        ("ft-l", {"lr": 0}, "hyper-parameter 'lr' of ft-l must be > 0, got 0.0"),
        ("ft-m", {"batch_size": -1}, "'batch_size' of ft-m must be >= 1, got -1"),
        ("ft-m", {"layer_depth": 1.5}, "'layer_depth' of ft-m must lie in [0, 1], got 1.5"),
        ("ft-m", {"layers": [-1]}, "'layers' of ft-m must be >= 0, got -1"),
        ("ft-m", {"objective": "x"}, "'objective' of ft-m must be one of 'target_new', "),
        ("lora", {"rank": 0}, "hyper-parameter 'rank' of lora must be >= 1, got 0"),
        ("lora", {"batch_size": 0}, "'batch_size' of lora must be >= 1, got 0"),
        ("lora", {"dropout": 1}, "'dropout' of lora must lie in [0, 1), got 1.0"),
        ("lora", {"targets": []}, "'targets' of lora: give at least one module kind"),
        ("adalora", {"rank": 16}, "'init_rank' of adalora must be >= rank (16), got 12"),
        ("adalora", {"tinit": 60}, "'tinit' of adalora: tinit + tfinal (74) must be < steps (70)"),
        ("adalora", {"delta_t": 0}, "'delta_t' of adalora must be >= 1, got 0"),
        ("medlasa", {"r0": 0}, "hyper-parameter 'r0' of medlasa must be >= 1, got 0"),
        ("medlasa", {"routing": "x"}, "'routing' of medlasa must be one of 'nearest', "),
        ("medlasa", {"gate_off": 0.9}, "'gate_off' of medlasa must be < gate_on (0.75), got 0.9"),
        ("medlasa", {"preset": "x"}, "'preset' of medlasa must be one of 'medcf', 'medfe'"),
        ("rome", {"layer": -2}, "hyper-parameter 'layer' of rome must be >= -1, got -2"),
        ("rome", {"v_steps": 0}, "hyper-parameter 'v_steps' of rome must be >= 1, got 0"),
        ("rome", {"prefix_lengths": [0]}, "'prefix_lengths' of rome must be >= 1, got 0"),
        ("memit", {"n_edit_layers": 0}, "'n_edit_layers' of memit must be >= 1, got 0"),
        ("alphaedit", {"nullspace_threshold": 0}, "'nullspace_threshold' of alphaedit must be > 0"),
        ("alphaedit", {"L2": -1}, "hyper-parameter 'L2' of alphaedit must be >= 0, got -1.0"),
    ],
)
def test_bad_hyper_parameters_are_value_errors_naming_field_and_method(method, values, message):
    with pytest.raises(ValueError) as err:
        make_editor(method, **values)
    assert message in _one_line_value_error(err.value)


@pytest.mark.parametrize(
    "method, values, expected",
    [
        ("ft-m", {"steps": "40"}, {"steps": 40}),
        ("ft-m", {"steps": 3.0}, {"steps": 3}),
        ("ft-m", {"lr": 1, "weight_decay": "1e-3"}, {"lr": 1.0, "weight_decay": 1e-3}),
        ("ft-m", {"layers": "4,5, 6"}, {"layers": (4, 5, 6)}),
        ("ft-m", {"layers": 3}, {"layers": (3,)}),
        ("ft-m", {"layers": [1, "2"]}, {"layers": (1, 2)}),
        ("ft-m", {"layers": ""}, {"layers": ()}),
        (
            "rome",
            {"mom2_adjustment": "false", "cov_include_requests": True},
            {"mom2_adjustment": False, "cov_include_requests": True},
        ),
        ("lora", {"targets": "q, v,up"}, {"targets": ("q", "v", "up")}),
        ("memit", {"cov_corpus": "a.txt,2.jsonl"}, {"cov_corpus": ("a.txt", "2.jsonl")}),
        ("medlasa", {"traces": 2024}, {"traces": "2024"}),
    ],
)
def test_cli_values_are_converted_to_the_declared_types(method, values, expected):
    hparams = get_editor_class(method).hparams_class.from_dict(values)
    for name, value in expected.items():
        got = getattr(hparams, name)
        assert got == value and type(got) is type(value), (name, got)


@pytest.mark.parametrize("method", list(METHODS))
def test_every_default_passes_the_type_checks(method):
    cls = get_editor_class(method).hparams_class
    assert cls.from_dict(dataclasses.asdict(cls())) == cls()
    families = {row.family for row in cls.DEFAULTS} - {"*"} | {"llama", "gpt2"}
    for family in sorted(families):
        for n_params in (None, 10**8, 10**10):  # every size row, and none
            for preset in cls.PRESETS or [None]:
                extra = {"preset": preset} if preset else {}
                resolved = cls.for_model(family, n_params, **extra)
                assert cls.from_dict(json.loads(json.dumps(resolved.to_dict()))) == resolved


def test_size_rows_of_the_defaults_table_apply_by_parameter_count():
    """MedLaSA's paper lr under-trains small models: under 1B parameters the table's lr
    applies over the preset; the paper-* presets and big models keep the paper's value."""
    cls = get_editor_class("medlasa").hparams_class
    assert cls.for_model("llama", 135 * 10**6).lr == 1e-4
    assert cls.for_model("llama", 7 * 10**9).lr == 1e-5
    assert cls.for_model("llama", 135 * 10**6, preset="paper-medcf").lr == 1e-5
    assert cls.for_model("llama", 135 * 10**6, lr=3e-5).lr == 3e-5  # the user's value wins


@dataclasses.dataclass(frozen=True)
class _Typed(HParams):
    limit: int | None = hp(None, "an optional integer")
    mode: Literal["a", "b"] = hp("a", "a choice")


@pytest.mark.parametrize(
    "values, expected",
    [
        ({"limit": None}, None),
        ({"limit": "none"}, None),
        ({"limit": "null"}, None),
        ({"limit": "7"}, 7),
        ({"mode": "b"}, "b"),
    ],
)
def test_optional_and_literal_fields(values, expected):
    assert getattr(_Typed.from_dict(values), next(iter(values))) == expected


def test_optional_and_literal_fields_reject_bad_values():
    with pytest.raises(ValueError, match="'limit' expects an integer, got 'x'"):
        _Typed.from_dict({"limit": "x"})
    with pytest.raises(ValueError, match="'mode' must be one of 'a', 'b', got 'c'"):
        _Typed.from_dict({"mode": "c"})


# -- 2. hyper-parameters against the model's config ----------------------------------------------
def _config(kind: str):
    from transformers import GPT2Config, LlamaConfig

    if kind == "llama":
        return LlamaConfig(
            vocab_size=64,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=2,
        )
    return GPT2Config(vocab_size=64, n_embd=32, n_layer=4, n_head=4)


@pytest.mark.parametrize(
    "method, kind, values, message",
    [
        (
            "ft-m",
            "llama",
            {"layers": [1, 40]},
            "hyper-parameter 'layers' of ft-m: layers [40] out of range: the model has 4 layers (0-3)",
        ),
        ("ft-l", "gpt2", {"layers": "4,5"}, "'layers' of ft-l: layers [4, 5] out of range"),
        (
            "ft-m",
            "gpt2",
            {"module": "q"},
            "hyper-parameter 'module' of ft-m: the gpt2 architecture has no module kind 'q'",
        ),
        ("ft-m", "llama", {"module": "mlp"}, "'module' of ft-m: 'mlp' is a whole block"),
        (
            "lora",
            "llama",
            {"targets": "q,x"},
            "hyper-parameter 'targets' of lora: the llama architecture has no module kind 'x'",
        ),
        ("lora", "gpt2", {"layers": [4]}, "'layers' of lora: layers [4] out of range"),
        (
            "adalora",
            "llama",
            {"targets": ["attn"]},
            "'targets' of adalora: 'attn' is a whole block",
        ),
        (
            "medlasa",
            "llama",
            {"targets": ["q", "mlp"]},
            "'targets' of medlasa: 'mlp' is a whole block, not a projection with a weight",
        ),
        (
            "medlasa",
            "gpt2",
            {"targets": ["gate", "nope"]},
            "'targets' of medlasa: the gpt2 architecture has no module kind 'nope'",
        ),
        (
            "rome",
            "gpt2",
            {"layer": 4},
            "hyper-parameter 'layer' of rome: layer 4 out of range: the model has 4 layers (0-3)",
        ),
        ("memit", "llama", {"layers": [0, 9]}, "'layers' of memit: layers [9] out of range"),
        ("alphaedit", "gpt2", {"layers": [7]}, "'layers' of alphaedit: layers [7] out of range"),
    ],
)
def test_check_config_catches_what_the_config_can_tell(method, kind, values, message):
    editor = make_editor(method, **values)  # valid on its own: only the model makes it wrong
    with pytest.raises(ValueError) as err:
        editor.check_config(_config(kind))
    assert message in _one_line_value_error(err.value)


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
@pytest.mark.parametrize("method", list(METHODS))
def test_check_config_accepts_the_defaults_and_valid_choices(method, kind):
    make_editor(method).check_config(_config(kind))
    fields = {f.name for f in dataclasses.fields(get_editor_class(method).hparams_class)}
    valid = {"layers": [0, 3], "layer": 3, "targets": ["q", "v", "down"]}
    make_editor(method, **{k: v for k, v in valid.items() if k in fields}).check_config(
        _config(kind)
    )


def test_check_config_of_an_unsupported_architecture():
    from transformers import BertConfig

    with pytest.raises(ValueError, match="unsupported model architecture 'bert'"):
        make_editor("ft-m").check_config(BertConfig())


def test_apply_checks_against_the_model_too(tiny_llama):
    model, tok = tiny_llama
    req = parse_record({"prompt": "The heart has four", "target_new": "chambers"}, "t.json", 1)
    with pytest.raises(ValueError, match=r"'layers' of lora: layers \[9\] out of range"):
        make_editor("lora", layers=[9]).apply(model, tok, [req])


# -- 3. request files ----------------------------------------------------------------------------
REC = {"prompt": "Insulin is made in the", "target_new": "pancreas", "subject": "Insulin"}


def _write(tmp_path, name: str, content: str | bytes):
    path = tmp_path / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode("utf-8"))
    return path


@pytest.mark.parametrize("name", ["bom.json", "bom.jsonl"])
def test_a_utf8_byte_order_mark_is_accepted(tmp_path, name):
    body = json.dumps([REC]) if name.endswith(".json") else json.dumps(REC) + "\n"
    reqs = load_requests(_write(tmp_path, name, b"\xef\xbb\xbf" + body.encode()))
    assert reqs[0].prompt == REC["prompt"]


def test_jsonl_strings_may_hold_unicode_line_separators(tmp_path):
    rec = {**REC, "rephrase_prompts": ["Insulin\u2028is made in the"]}
    path = _write(tmp_path, "sep.jsonl", json.dumps(rec, ensure_ascii=False) + "\n")
    assert load_requests(path)[0].rephrase_prompts == ("Insulin\u2028is made in the",)


def test_optional_nulls_are_absent(tmp_path):
    path = _write(tmp_path, "n.json", json.dumps([{**REC, "id": None, "locality": None}]))
    req = load_requests(path)[0]
    assert req.id == "n.json:1" and req.locality == {}


def test_a_directory_is_not_a_request_file(tmp_path):
    with pytest.raises(RequestError) as err:
        load_requests(tmp_path)
    assert _one_line_value_error(err.value) == (
        f"{tmp_path}: is a directory, expected a JSON or JSONL file"
    )


def _bad(rec) -> str:
    return json.dumps([{**REC, **rec}])


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("empty.json", "", "empty.json: is empty"),
        ("blank.jsonl", "  \n\n\t\n", "blank.jsonl: is empty"),
        ("null.json", "null", "null.json: expected a JSON list of request objects, got null"),
        ("obj.json", '{"prompt": "x"}', "obj.json: expected a JSON list of request objects, got "),
        ("nums.json", "[1, 2]", "nums.json: record 1: expected an object, got int"),
        ("nulls.jsonl", "null\n", "nulls.jsonl: record 1: expected an object, got null"),
        (
            "col.json",
            '[{"prompt": "a",\n  "target_new": }]',
            "col.json: invalid JSON at line 2, column 17: Expecting value",
        ),
        (
            "gap.jsonl",
            json.dumps(REC) + "\n\n{oops\n",
            "gap.jsonl: record 2: invalid JSON on line 3, column 2",
        ),
        (
            "pairs.json",
            _bad({"locality": {"general": "The heart has four"}}),
            "pairs.json: record 1, field 'locality.general': expected a list of [prompt, answer] pairs",
        ),
        (
            "flat.json",
            _bad({"locality": {"general": ["The heart has four", "chambers"]}}),
            "flat.json: record 1, field 'locality.general[0]': expected [prompt, answer]",
        ),
        (
            "none.json",
            _bad({"locality": {"general": []}}),
            "none.json: record 1, field 'locality.general': no probes",
        ),
        (
            "probe.json",
            _bad({"locality": {"general": [["The heart has four", 4]]}}),
            "probe.json: record 1, field 'locality.general[0]': answer must be a non-empty string",
        ),
        (
            "groups.json",
            _bad({"portability": [["a", "b"]]}),
            "groups.json: record 1, field 'portability': expected an object",
        ),
        (
            "reph.json",
            _bad({"rephrase_prompt": 5}),
            "reph.json: record 1, field 'rephrase_prompt': expected a string or a list of strings",
        ),
        (
            "rephs.json",
            _bad({"rephrase_prompts": ["ok", 5]}),
            "rephs.json: record 1, field 'rephrase_prompts[1]': expected a non-empty string, got int",
        ),
        (
            "subj.json",
            _bad({"subject": "Aspirin"}),
            "subj.json: record 1, field 'subject': subject 'Aspirin' does not occur in the prompt",
        ),
        ("id.json", _bad({"id": ["x"]}), "id.json: record 1, field 'id': expected a string"),
        (
            "latin.json",
            '[{"prompt": "caf\xe9"}]'.encode("latin-1"),
            "latin.json: not UTF-8 text (byte 16, line 1)",
        ),
    ],
)
def test_bad_request_files_give_one_line_errors(tmp_path, name, content, message):
    path = _write(tmp_path, name, content)
    with pytest.raises(RequestError) as err:
        load_requests(path)
    msg = _one_line_value_error(err.value)
    assert msg.startswith(str(tmp_path)) and message in msg, msg


def test_long_prompt_error_names_the_path_the_user_gave(tmp_path, tokenizer):
    path = _write(tmp_path, "long.json", json.dumps([REC, {**REC, "prompt": "Insulin " * 60}]))
    reqs = load_requests(path)
    assert reqs[1].id == "long.json:2"  # ids keep the base name
    with pytest.raises(RequestError) as err:
        check_lengths(reqs, tokenizer, 32, source=str(path))
    assert _one_line_value_error(err.value).startswith(f"{path}: record 2, field 'prompt'")


# -- 4. benchmark files --------------------------------------------------------------------------
MEDCF = {
    **REC,
    "ground_truth": "liver",
    "rephrase_prompt": "Insulin comes from the",
    **{
        f"locality_{t}_{part}": "x"
        for t in ("target", "mapping", "struc", "tokenSem")
        for part in ("prompt", "ground_truth")
    },
}
TRAILING_COMMA = json.dumps([MEDCF], indent=1).removesuffix("\n]") + ",\n]"


@pytest.mark.parametrize(
    "content, message",
    [
        (TRAILING_COMMA, f"invalid JSON at line {TRAILING_COMMA.count(chr(10)) + 1}, column 1"),
        (
            "[" + json.dumps(MEDCF) + "\n" + json.dumps(MEDCF) + "]",
            "invalid JSON at line 2, column 1: Expecting ',' delimiter",
        ),
        (b"\xff[]", "not UTF-8 text (byte 0, line 1)"),
        ("", "is empty"),
    ],
)
def test_malformed_benchmark_files_name_file_line_and_column(tmp_path, content, message):
    from medit.bench.suites import get_suite

    path = _write(tmp_path, "test.json", content)
    with pytest.raises(RequestError) as err:
        get_suite("medcf").load(str(path))
    msg = _one_line_value_error(err.value)
    assert msg.startswith(f"{path}: ") and message in msg, msg


def test_benchmark_files_with_a_byte_order_mark_load(tmp_path):
    from medit.bench.suites import get_suite

    path = _write(tmp_path, "test.json", b"\xef\xbb\xbf" + json.dumps([MEDCF, MEDCF]).encode())
    reqs = get_suite("medcf").load(str(path))
    assert len(reqs) == 2 and set(reqs[0].locality) == {"target", "mapping", "struc", "tokenSem"}


# -- 5. model specs and directories --------------------------------------------------------------
@pytest.mark.parametrize(
    "spec",
    [
        "./no-such-model",
        "../no-such-model",
        "~/no-such-medit-model",
        "/no/such/model",
        "models/no/such",
        "no-such-model/",
    ],
)
def test_a_missing_local_model_path_fails_at_once(spec):
    from medit.core.models import resolve_source

    t0 = time.perf_counter()
    with pytest.raises(ValueError) as err:
        resolve_source(spec)
    assert _one_line_value_error(err.value) == f"model path {spec} does not exist"
    assert time.perf_counter() - t0 < 1.0


def test_org_name_stays_a_hub_id():
    from medit.core.models import resolve_source

    assert resolve_source("some-org/some-model") == "some-org/some-model"


def _model_dir(tmp_path, tokenizer=None, config: str | None = None):
    d = tmp_path / "model"
    d.mkdir()
    _config("llama").to_json_file(d / "config.json")
    if config is not None:
        (d / "config.json").write_text(config)
    (d / "model.safetensors").write_bytes(b"not weights")  # never read before the checks
    if tokenizer is not None:
        tokenizer.save_pretrained(d)
    return d


@pytest.mark.parametrize(
    "config, message",
    [
        ('{"model_type": "llama",}', "config.json: invalid JSON at line 1, column 24"),
        ('{"hidden_size": 8}', "config.json has no 'model_type'"),
        ('["llama"]', "config.json: expected a JSON object"),
        ('{"model_type": "bert"}', "config.json: unsupported model architecture 'bert'"),
    ],
)
def test_a_bad_config_json_is_named(tmp_path, config, message):
    from medit.core.models import load_model

    d = _model_dir(tmp_path, config=config)
    with pytest.raises(ValueError) as err:
        load_model(str(d), device="cpu")
    msg = _one_line_value_error(err.value)
    assert msg.startswith(str(d)) and message in msg, msg


def test_a_model_directory_without_a_tokenizer(tmp_path):
    from medit.core.models import load_model

    d = _model_dir(tmp_path)
    with pytest.raises(ValueError) as err:
        load_model(str(d), device="cpu")
    msg = _one_line_value_error(err.value)
    assert msg.startswith(f"{d} has no tokenizer (tokenizer.json / tokenizer_config.json"), msg


def test_unreadable_weights_are_a_user_error_naming_the_model(tmp_path, tokenizer):
    from medit.core.models import load_model

    d = _model_dir(tmp_path, tokenizer)
    with pytest.raises(ValueError) as err:
        load_model(str(d), device="cpu")
    assert f"cannot load model '{d}'" in _one_line_value_error(err.value)
    (d / "model.safetensors").unlink()
    index = {"metadata": {}, "weight_map": {"lm_head.weight": "model-00001-of-00002.safetensors"}}
    (d / "model.safetensors.index.json").write_text(json.dumps(index))
    (d / "model-00002-of-00002.safetensors").write_bytes(b"")
    with pytest.raises(ValueError) as err:
        load_model(str(d), device="cpu")
    msg = _one_line_value_error(err.value)
    assert f"cannot load model '{d}'" in msg and "model-00001-of-00002.safetensors" in msg, msg


# -- 6. evaluation settings ----------------------------------------------------------------------
@pytest.mark.parametrize(
    "values, message",
    [
        ({"batch_size": 0}, "batch_size must be >= 1, got 0"),
        ({"batch_size": -4}, "batch_size must be >= 1, got -4"),
        ({"max_new_tokens": 0}, "max_new_tokens must be >= 1, got 0"),
        ({"answer_slack": -1}, "answer_slack must be >= 0, got -1"),
    ],
)
def test_evaluation_settings_are_checked(values, message):
    from medit.evaluation import EvalConfig

    with pytest.raises(ValueError) as err:
        EvalConfig(**values)
    assert message in _one_line_value_error(err.value)
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        dataclasses.replace(EvalConfig(), batch_size=0)
