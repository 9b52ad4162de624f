import pytest
import torch
from transformers import LlamaConfig

from medit.core.arch import ARCHITECTURES, get_arch
from medit.core.hooks import capture_input, frozen_prefix, hooked


def test_every_kind_of_tiny_models_resolves_to_a_module(tiny):
    model, _ = tiny
    arch = get_arch(model)
    params = dict(model.named_parameters())
    for kind in arch.kinds:
        arch.module(model, 1, kind)  # raises if the path is wrong
    assert arch.weight_name(2, "mlp_out") in params
    assert arch.n_layers(model) == 4


def test_unsupported_architecture_names_the_supported_ones():
    cfg = LlamaConfig()
    cfg.model_type = "mamba"
    with pytest.raises(ValueError, match="unsupported model architecture 'mamba'.*llama"):
        get_arch(cfg)
    assert {"llama", "mistral", "qwen2", "gemma", "gemma2", "gpt2", "gptj", "gpt_neox"} <= set(
        ARCHITECTURES
    )


def test_unknown_kind_is_a_clear_error(tiny_llama):
    model, _ = tiny_llama
    with pytest.raises(ValueError, match="no module kind 'qkv'"):
        get_arch(model).module(model, 0, "qkv")


def test_tied_embeddings_are_detected(tiny):
    model, _ = tiny
    assert get_arch(model).tied_embeddings(model) is True


def test_head_reproduces_model_logits(tiny, tokenizer):
    model, _ = tiny
    arch = get_arch(model)
    ids = tokenizer(["The heart has four chambers"], return_tensors="pt")
    with torch.no_grad():
        full = model(**ids).logits
        hidden = arch.base_model(model)(**ids).last_hidden_state
        assert torch.allclose(arch.head(model, hidden), full, atol=1e-5)


def test_frozen_prefix_matches_the_full_forward(tiny, tokenizer):
    model, _ = tiny
    arch = get_arch(model)
    enc = tokenizer(["The liver produces bile", "Aspirin"], return_tensors="pt", padding=True)
    base = arch.base_model(model)
    with torch.no_grad():
        full = base(**enc).last_hidden_state
        for start in range(arch.n_layers(model)):
            hidden = capture_input(arch.module(model, start), lambda: base(**enc))
            with frozen_prefix(model, arch, start, hidden):
                part = base(**enc).last_hidden_state
            assert torch.allclose(part, full, atol=1e-5), start
    # everything is back to normal afterwards
    assert all("forward" not in layer.__dict__ for layer in arch.layer_list(model))


def test_capture_input_equals_hidden_states_output(tiny, tokenizer):
    model, _ = tiny
    arch = get_arch(model)
    enc = tokenizer(["Vitamin C deficiency causes scurvy"], return_tensors="pt")
    with torch.no_grad():
        states = model(**enc, output_hidden_states=True).hidden_states
        got = capture_input(arch.module(model, 2), lambda: arch.base_model(model)(**enc))
    assert torch.allclose(got, states[2], atol=1e-6)


def test_hooks_are_removed_even_when_the_forward_fails(tiny_llama):
    model, _ = tiny_llama
    layer = get_arch(model).module(model, 0)

    def boom(*_):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError), hooked([(layer, boom, None)]):
        model(torch.tensor([[1, 2, 3]]))
    assert not layer._forward_pre_hooks
