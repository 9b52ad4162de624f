"""--quantize: bitsandbytes 8-bit / 4-bit bases (on the CPU) with the editor's modules kept in
full precision; editing a quantised module, or with an editor that cannot say what it edits, is
refused clearly."""

import json

import pytest
import torch
from click.testing import CliRunner

from medit.cli import main
from medit.core.errors import UserError
from medit.core.models import load_model
from medit.core.placement import is_quantized
from medit.editors.registry import editor_modules, make_editor
from medit.facts.requests import parse_record

pytest.importorskip("bitsandbytes")

REQ = parse_record(
    {"prompt": "The drug aspirin is used to treat", "target_new": "gout"}, "t.json", 1
)


def _target_logprob(lm):
    tok = lm.tokenizer
    ids = tok([REQ.prompt + " gout"], return_tensors="pt").input_ids
    n = len(tok(REQ.prompt).input_ids)
    with torch.no_grad():
        logp = torch.log_softmax(lm.model(ids).logits[0, n - 1 : -1].float(), -1)
    return logp.gather(1, ids[0, n:, None]).sum().item()


@pytest.mark.parametrize("scheme", ["8bit", "4bit"])
def test_a_quantised_base_is_edited_in_its_full_precision_modules(tiny_model_dir, scheme):
    editor = make_editor("ft-m", steps=20, lr=1e-2)
    config = json.loads((tiny_model_dir / "config.json").read_text())
    from transformers import AutoConfig

    keep = editor_modules(editor, AutoConfig.for_model(**config), None, scheme)
    lm = load_model(str(tiny_model_dir), "cpu", "float32", quantize=scheme, keep_resident=keep)
    model = lm.model
    assert keep and all(not is_quantized(model.get_submodule(n)) for n in keep)
    others = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    assert any(is_quantized(model.get_submodule(n)) for n in others)  # the rest is quantised
    assert lm.provenance()["quantize"] == {"scheme": scheme, "full_precision": ["lm_head", *keep]}
    editor.check_placement(model)
    before = {n: t.clone() for n, t in model.state_dict().items() if torch.is_floating_point(t)}
    lp0 = _target_logprob(lm)
    result = editor.apply(model, lm.tokenizer, [REQ])
    assert _target_logprob(lm) > lp0 + 1.0  # the edit took, through the quantised layers
    changed = {
        n for n, t in model.state_dict().items() if n in before and not torch.equal(t, before[n])
    }
    assert changed and all(n.rsplit(".", 1)[0] in keep for n in changed)
    result.restore()
    assert all(torch.equal(model.state_dict()[n], t) for n, t in before.items())


def test_editing_a_quantised_module_is_refused_naming_it(tiny_model_dir):
    lm = load_model(str(tiny_model_dir), "cpu", "float32", quantize="8bit")  # nothing kept
    with pytest.raises(
        UserError, match=r"ft-m: module 'model\.layers\.\d\.mlp\.down_proj' is quantised"
    ):
        make_editor("ft-m").check_placement(lm.model)


def test_an_editor_that_cannot_say_what_it_edits_is_refused(tiny_model_dir, monkeypatch):
    from medit.editors.ft import FineTune

    monkeypatch.setattr(FineTune, "edited_modules", lambda self, hp, arch, n: None)
    result = CliRunner().invoke(
        main,
        ["edit", "--model", str(tiny_model_dir), "--method", "ft-m", "--quantize", "4bit"]
        + ["--requests", "builtin", "--limit", "1", "--device", "cpu", "--out", "unused"],
    )
    assert result.exit_code == 2, result.output
    assert "cannot edit a quantised model (--quantize)" in result.output
    assert "Traceback" not in result.output


def test_without_bitsandbytes_the_error_says_what_to_install(tiny_model_dir, monkeypatch):
    import builtins

    real = builtins.__import__

    def no_bnb(name, *args, **kwargs):
        if name == "bitsandbytes":
            raise ImportError(name)
        return real(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_bnb)
    with pytest.raises(UserError, match=r"pip install 'medit\[quantized\]'"):
        load_model(str(tiny_model_dir), "cpu", "float32", quantize="8bit")


def test_edit_cli_with_quantize_records_it(tiny_model_dir, tmp_path):
    out = tmp_path / "run"
    result = CliRunner().invoke(
        main,
        ["--quiet", "edit", "--model", str(tiny_model_dir), "--method", "ft-m", "--quantize"]
        + ["8bit", "--requests", "builtin", "--limit", "1", "--device", "cpu", "--out", str(out)]
        + ["--hparam", "steps=2", "--no-generation"],
    )
    assert result.exit_code == 0, result.output
    prov = json.loads((out / "results.json").read_text())["provenance"]["model"]
    assert prov["quantize"]["scheme"] == "8bit"
