"""Memory arithmetic from a model's config alone (no weights): the vocabulary of ``medit plan``.

An editor describes what it holds while it edits as a list of :class:`Component` (its
``Editor.memory_plan``), built from the shapes here (:class:`Shapes`, read from the config) and
the workload (:class:`Workload`: sequence length, batch, edits per call). The planner
(:mod:`medit.plan`) adds the weights, per device, and the evaluation's forward.

The activation model is deliberately simple, in bytes of the model's dtype per token:

* a forward **without** grad holds the residual stream plus one layer's temporaries at a time
  (:func:`forward_bytes`): the MLP's intermediate tensors, attention scores where the attention
  kernel materialises them, the logits the output head computes;
* a forward **with** grad keeps, in each layer that backward runs through, what autograd saves
  (:func:`grad_activation_bytes`): about ``SAVED_D`` vectors of the model's width and
  ``SAVED_FF`` of the MLP's width per token (fused attention keeps no probabilities).

The constants were fitted on the tiny test models and SmolLM2-135M on the CPU (see
``benchmarks/bench_plan.py``); on GPUs they are not measured.
"""

from __future__ import annotations

import dataclasses
from typing import Any

#: vectors of width d_model autograd keeps per token and layer (norm inputs, q/k/v, residuals)
SAVED_D = 12
#: vectors of the MLP's width kept per token and layer (gate, up, activation, product)
SAVED_FF = 4
#: a forward without grad: residual stream copies (d) and MLP temporaries (ff) alive at once
LIVE_D = 6
LIVE_FF = 3

PHASES = ("weights", "edit", "eval")


@dataclasses.dataclass(frozen=True)
class Shapes:
    """The sizes of a decoder-only transformer, read from its config."""

    d: int  #: hidden size
    ff: int  #: MLP width
    layers: int  #: decoder layers
    vocab: int  #: vocabulary size
    heads: int  #: attention heads
    kv: int  #: width of keys / values (kv heads x head dim)
    gated: bool  #: three MLP matrices (gate, up, down) instead of two

    @classmethod
    def of(cls, config: Any) -> Shapes:
        text = config.get_text_config() if hasattr(config, "get_text_config") else config
        d = getattr(text, "hidden_size", None) or getattr(text, "n_embd", 0)
        heads = getattr(text, "num_attention_heads", None) or getattr(text, "n_head", 1) or 1
        kv_heads = getattr(text, "num_key_value_heads", None) or heads
        head_dim = getattr(text, "head_dim", None) or d // heads
        inter = getattr(text, "intermediate_size", None)
        return cls(
            d=d,
            ff=inter or getattr(text, "n_inner", None) or 4 * d,
            layers=getattr(text, "num_hidden_layers", None) or getattr(text, "n_layer", 0),
            vocab=getattr(text, "vocab_size", 0),
            heads=heads,
            kv=kv_heads * head_dim,
            gated=inter is not None and getattr(text, "model_type", "") != "gpt_neox",
        )

    def linear(self, kind: str) -> tuple[int, int]:
        """(d_in, d_out) of a projection kind (see :mod:`medit.core.arch`)."""
        d, ff, kv = self.d, self.ff, self.kv
        dims = {
            "q": (d, d),
            "k": (d, kv),
            "v": (d, kv),
            "o": (d, d),
            "attn_out": (d, d),
            "qkv": (d, d + 2 * kv),
            "gate": (d, ff),
            "up": (d, ff),
            "mlp_in": (d, ff),
            "down": (ff, d),
            "mlp_out": (ff, d),
        }
        return dims.get(kind, (d, d))


@dataclasses.dataclass(frozen=True)
class Workload:
    """What one edit call runs on."""

    seq_len: int = 64  #: tokens of an edit prompt + target (the longest)
    batch_size: int = 32  #: sequences per evaluation forward
    edits: int = 1  #: requests per edit call (single / sequential mode: 1; batch: all)
    dtype_bytes: int = 4  #: bytes per element of the model's weights and activations
    new_tokens: int = 32  #: tokens the evaluation generates per answer
    target_len: int = 4  #: tokens of a target (the output head runs at these positions only)


@dataclasses.dataclass(frozen=True)
class Component:
    """One line of a memory plan."""

    name: str  #: what it is ("Adam moments of 1 x mlp_out")
    bytes: int
    #: "weights" (held throughout), "edit" (held while the editor runs) or "eval" (while the
    #: evaluation runs; the edit's and the evaluation's lines never coexist)
    phase: str = "edit"
    note: str = ""  #: how it was counted
    #: within the edit: "" for what is held throughout, else the step it belongs to; steps run
    #: one after another, so the edit's peak is the held lines plus its largest step
    step: str = ""
    device: Any = None  #: None: the device the model computes on (a map's main device)

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["device"] = None if self.device is None else str(self.device)
        return out


# -- the terms editors combine -------------------------------------------------------------------
def trained(what: str, numel: int, *, bytes_per: int = 4, own: bool = True) -> list[Component]:
    """A trained tensor: itself (``own``: a new tensor, not a weight of the model), its gradient
    and Adam's two moments."""
    out = [Component(f"{what}", numel * bytes_per, note=f"{numel:,} values")] if own else []
    return out + [
        Component(f"gradients of {what}", numel * bytes_per, note=f"{numel:,} values"),
        Component(f"Adam moments of {what}", 2 * numel * bytes_per, note="2 moments"),
    ]


def weight_copy(what: str, numel: int, dtype_bytes: int) -> Component:
    """The originals of the weights an edit changes, kept for ``restore()``."""
    return Component(f"originals of {what} (restore)", numel * dtype_bytes, note=f"{numel:,}")


def forward_bytes(s: Shapes, sequences: int, seq_len: int, dtype_bytes: int, logits: int) -> int:
    """Peak of one forward without grad over ``sequences`` x ``seq_len`` tokens: the residual
    stream and one layer's temporaries, attention scores (batch x heads x seq²), and ``logits``
    rows of the output head in float32 (with their log-softmax)."""
    tokens = sequences * seq_len
    layer = tokens * (LIVE_D * s.d + LIVE_FF * s.ff) * dtype_bytes
    return layer + 2 * logits * s.vocab * 4


def grad_activation_bytes(
    s: Shapes, sequences: int, seq_len: int, layers: int, dtype_bytes: int, logits: int
) -> int:
    """Activations a forward with grad keeps for backward through ``layers`` decoder layers, one
    forward's temporaries on top, and the float32 logits of ``logits`` rows (with their
    log-softmax and its gradient)."""
    tokens = sequences * seq_len
    per_layer = tokens * (SAVED_D * s.d + SAVED_FF * s.ff) * dtype_bytes
    return (
        layers * per_layer
        + forward_bytes(s, sequences, seq_len, dtype_bytes, 0)
        + (3 * logits * s.vocab * 4)
    )


def activations(
    s: Shapes,
    w: Workload,
    sequences: int,
    layers: int,
    *,
    seq_len: int | None = None,
    step: str = "train",
) -> Component:
    """The activations of a forward + backward through the top ``layers`` decoder layers, the
    output head scored at every target position."""
    seq = seq_len or w.seq_len
    n = grad_activation_bytes(s, sequences, seq, layers, w.dtype_bytes, sequences * w.target_len)
    return Component(
        "activations (forward + backward)",
        n,
        note=f"{sequences} seq x {seq} tokens through {layers} of {s.layers} layers",
        step=step,
    )


def no_grad_forward(
    s: Shapes, w: Workload, sequences: int, seq_len: int, what: str, step: str, logits: bool = True
) -> Component:
    """One forward without grad (``logits``: the head at every position)."""
    rows = sequences * seq_len if logits else 0
    n = forward_bytes(s, sequences, seq_len, w.dtype_bytes, rows)
    return Component(what, n, note=f"{sequences} seq x {seq_len} tokens, no grad", step=step)


def evaluation(s: Shapes, w: Workload) -> Component:
    """The evaluation's forwards (no grad): a prefill of ``batch_size`` prompts, the KV cache
    over the prompt and the generated tokens, logits at the scored and generated positions."""
    seq = w.seq_len + w.new_tokens
    kv = 2 * s.layers * w.batch_size * seq * s.kv * w.dtype_bytes
    n = kv + forward_bytes(s, w.batch_size, w.seq_len, w.dtype_bytes, 4 * w.batch_size)
    return Component(
        "evaluation forward + KV cache",
        n,
        phase="eval",
        note=f"{w.batch_size} seq x {w.seq_len} + {w.new_tokens} tokens",
    )
