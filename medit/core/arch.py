"""Architecture table: the only place in medit that knows module paths.

Every editor, tracer and evaluator asks an :class:`ArchSpec` where a model keeps its decoder
layers, MLP projections, attention projections, embeddings, final norm and output head. The spec is
chosen by ``config.model_type``; a model's name never decides anything.

Module "kinds" used across medit (names relative to one decoder layer):

==========  ===========================================================
kind        meaning
==========  ===========================================================
mlp         the whole MLP block (its output is added to the residual)
mlp_in      first MLP projection(s) (gate/up, c_fc, fc_in, ...)
mlp_out     MLP output projection (down_proj, c_proj, fc_out, ...)
attn        the whole self-attention block
attn_out    attention output projection (o_proj, c_proj, dense, ...)
q, k, v, o  attention projections (absent for fused-qkv models)
gate, up    gated-MLP input projections (llama family)
down        alias of mlp_out for gated MLPs
==========  ===========================================================
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from medit.core.errors import UserError

#: separate projections -> the fused module that holds them, where an architecture fuses them
_FUSED = {
    "q": "qkv",
    "k": "qkv",
    "v": "qkv",
    "o": "attn_out",
    "gate": "mlp_in",
    "up": "mlp_in",
    "down": "mlp_out",
}


@dataclasses.dataclass(frozen=True)
class ArchSpec:
    """Where a family of causal LMs keeps its parts (dotted paths from the top-level model)."""

    family: str  #: short family name, used as the key of per-family editor defaults
    base: str  #: the bare transformer (returns last hidden state after the final norm)
    layers: str  #: the ModuleList of decoder layers
    embed: str  #: input token embedding
    final_norm: str  #: norm applied after the last layer
    lm_head: str  #: output projection to the vocabulary
    kinds: dict[str, str]  #: kind -> path inside one decoder layer (see module docstring)
    conv1d: bool = False  #: weights stored as (in, out) (GPT-2's Conv1D) instead of (out, in)

    # -- paths ---------------------------------------------------------------------------------
    def layer_path(self, layer: int, kind: str | None = None) -> str:
        """Dotted path of a decoder layer, or of one of its parts."""
        path = f"{self.layers}.{layer}"
        if kind is None:
            return path
        if kind not in self.kinds:
            raise UserError(
                f"the {self.family} architecture has no module kind {kind!r}; "
                f"it has: {', '.join(sorted(self.kinds))}"
            )
        return f"{path}.{self.kinds[kind]}"

    def resolve_kinds(self, kinds: Sequence[str]) -> tuple[str, ...]:
        """Module kinds named for separate projections (q, k, v, o, gate, up, down) mapped onto
        an architecture that fuses them (GPT-2: qkv, attn_out, mlp_in, mlp_out), deduplicated."""
        out: list[str] = []
        for kind in kinds:
            k = kind if kind in self.kinds else _FUSED.get(kind, kind)
            if k not in self.kinds:
                raise UserError(
                    f"the {self.family} architecture has no module kind {kind!r}; "
                    f"it has: {', '.join(sorted(self.kinds))}"
                )
            if k not in out:
                out.append(k)
        return tuple(out)

    def weight_name(self, layer: int, kind: str) -> str:
        """State-dict name of the weight of a linear module of one layer."""
        return f"{self.layer_path(layer, kind)}.weight"

    # -- modules -------------------------------------------------------------------------------
    def layer_list(self, model: nn.Module) -> nn.ModuleList:
        return get_module(model, self.layers)

    def n_layers(self, model: nn.Module) -> int:
        return len(self.layer_list(model))

    def module(self, model: nn.Module, layer: int, kind: str | None = None) -> nn.Module:
        return get_module(model, self.layer_path(layer, kind))

    def base_model(self, model: nn.Module) -> nn.Module:
        return get_module(model, self.base)

    def lm_head_module(self, model: nn.Module) -> nn.Module:
        return get_module(model, self.lm_head)

    def embedding(self, model: nn.Module) -> nn.Embedding:
        return get_module(model, self.embed)

    def tied_embeddings(self, model: nn.Module) -> bool:
        """True when the output head shares its weight with the input embedding."""
        return self.lm_head_module(model).weight is self.embedding(model).weight

    def head(self, model: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        """Vocabulary logits from final hidden states (after the final norm), as the model's
        own forward computes them (including Gemma-2/3 final logit soft-capping)."""
        logits = self.lm_head_module(model)(hidden)
        cap = getattr(model.config, "final_logit_softcapping", None)
        if cap:
            logits = torch.tanh(logits / cap) * cap
        return logits


_LLAMA_KINDS = {
    "mlp": "mlp",
    "mlp_in": "mlp.up_proj",
    "mlp_out": "mlp.down_proj",
    "gate": "mlp.gate_proj",
    "up": "mlp.up_proj",
    "down": "mlp.down_proj",
    "attn": "self_attn",
    "attn_out": "self_attn.o_proj",
    "q": "self_attn.q_proj",
    "k": "self_attn.k_proj",
    "v": "self_attn.v_proj",
    "o": "self_attn.o_proj",
}


def _llama_like(family: str, base: str = "model") -> ArchSpec:
    return ArchSpec(
        family=family,
        base=base,
        layers=f"{base}.layers",
        embed=f"{base}.embed_tokens",
        final_norm=f"{base}.norm",
        lm_head="lm_head",
        kinds=dict(_LLAMA_KINDS),
    )


_GPT2 = ArchSpec(
    family="gpt2",
    base="transformer",
    layers="transformer.h",
    embed="transformer.wte",
    final_norm="transformer.ln_f",
    lm_head="lm_head",
    kinds={
        "mlp": "mlp",
        "mlp_in": "mlp.c_fc",
        "mlp_out": "mlp.c_proj",
        "attn": "attn",
        "attn_out": "attn.c_proj",
        "qkv": "attn.c_attn",
    },
    conv1d=True,
)

_GPTJ = ArchSpec(
    family="gptj",
    base="transformer",
    layers="transformer.h",
    embed="transformer.wte",
    final_norm="transformer.ln_f",
    lm_head="lm_head",
    kinds={
        "mlp": "mlp",
        "mlp_in": "mlp.fc_in",
        "mlp_out": "mlp.fc_out",
        "attn": "attn",
        "attn_out": "attn.out_proj",
        "q": "attn.q_proj",
        "k": "attn.k_proj",
        "v": "attn.v_proj",
        "o": "attn.out_proj",
    },
)

_GPT_NEOX = ArchSpec(
    family="gpt_neox",
    base="gpt_neox",
    layers="gpt_neox.layers",
    embed="gpt_neox.embed_in",
    final_norm="gpt_neox.final_layer_norm",
    lm_head="embed_out",
    kinds={
        "mlp": "mlp",
        "mlp_in": "mlp.dense_h_to_4h",
        "mlp_out": "mlp.dense_4h_to_h",
        "attn": "attention",
        "attn_out": "attention.dense",
        "qkv": "attention.query_key_value",
    },
)

#: config.model_type -> ArchSpec. Add a family here and nowhere else.
ARCHITECTURES: dict[str, ArchSpec] = {
    "llama": _llama_like("llama"),
    "mistral": _llama_like("mistral"),
    "qwen2": _llama_like("qwen2"),
    "qwen3": _llama_like("qwen3"),
    "gemma": _llama_like("gemma"),
    "gemma2": _llama_like("gemma2"),
    "gemma3_text": _llama_like("gemma3"),
    "gemma3": _llama_like("gemma3", base="model.language_model"),
    "gpt2": _GPT2,
    "gptj": _GPTJ,
    "gpt_neox": _GPT_NEOX,
}


def get_arch(model_or_config: Any) -> ArchSpec:
    """The ArchSpec for a model (or its config), chosen by ``config.model_type`` alone."""
    config = getattr(model_or_config, "config", model_or_config)
    model_type = getattr(config, "model_type", None)
    if model_type not in ARCHITECTURES:
        raise UserError(
            f"unsupported model architecture {model_type!r}; medit supports model_type "
            f"{', '.join(sorted(ARCHITECTURES))}"
        )
    return ARCHITECTURES[model_type]


def get_module(model: nn.Module, path: str) -> nn.Module:
    """``model.get_submodule`` with an error that names the path and the model class."""
    try:
        return model.get_submodule(path)
    except AttributeError as exc:
        raise UserError(f"{type(model).__name__} has no module {path!r}") from exc


def parameter_count(model_or_config: Any) -> int:
    """Parameters of a model, counted; of a config, estimated from its shapes (embeddings,
    attention and MLP weights of every layer, an untied head): within a few percent for
    decoder-only transformers, enough to choose size-dependent defaults before weights load."""
    if isinstance(model_or_config, nn.Module):
        return sum(p.numel() for p in model_or_config.parameters())
    config = model_or_config
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    d = getattr(text, "hidden_size", None) or getattr(text, "n_embd", 0)
    layers = getattr(text, "num_hidden_layers", None) or getattr(text, "n_layer", 0)
    vocab = getattr(text, "vocab_size", 0)
    ff = getattr(text, "intermediate_size", None) or getattr(text, "n_inner", None) or 4 * d
    heads = getattr(text, "num_attention_heads", None) or getattr(text, "n_head", 1) or 1
    kv = getattr(text, "num_key_value_heads", None) or heads
    attn = 2 * d * d + 2 * d * (d * kv // heads)
    mlp = (3 if getattr(text, "intermediate_size", None) else 2) * d * ff
    tied = getattr(text, "tie_word_embeddings", True)
    return int(layers * (attn + mlp) + vocab * d * (1 if tied else 2))
