"""Transformer-Patcher (Huang et al., "Transformer-Patcher: One Mistake worth One Neuron", ICLR
2023): each mistake is corrected by a few neurons added to the last FFN layer, trained alone.

A neuron is one more hidden unit of the last layer's MLP, read from the MLP's input x:

* SwiGLU MLP (Llama): a row k of ``gate_proj`` (with a bias b, which Llama's projections lack),
  a row u of ``up_proj`` and a column v of ``down_proj``: ``act(k.x + b) * (u.x) * v``;
* GPT-2-shaped MLP: a column k of ``c_fc`` (with its bias b) and a row v of ``c_proj``:
  ``act(k.x + b) * v``.

The neuron acts only where its pre-activation s = k.x + b is positive; where every neuron of
the patch is at s <= 0 the MLP's output is the base model's, bit for bit. The paper's losses
train s to be positive on the mistake and below a margin elsewhere, which is what that gate
makes exact.

Training (per edit, only the new neurons; the paper's defaults):

1. **neurons**: one per target token the model gets wrong under teacher forcing, at most
   ``max_neurons`` (5); a neuron's key starts at x / ||x||^2 for the input at the position that
   predicts its token (s = 1 there), the up row likewise, the value at 0;
2. **losses**: the edit loss (label-smoothed cross-entropy of the target, smoothing 0.1), the
   activation loss ``alc * mean exp(-s_e)`` over each neuron's own position, and the memory
   loss ``mlc * [mean_top_k exp(s_m - s_e + gamma) + mean_top_k exp(s_m - beta)]`` over the
   memory's inputs (gamma 3: the edit beats every memory input by 3; beta -3: memory inputs stay
   below -3), alc 1, mlc 10, top_k 1000;
3. **memory**: the MLP inputs of text the model generated (the corpus ROME and MEMIT use) plus
   the inputs of every earlier edit on the model (kept with its patch, so later patches stay
   silent on earlier edits);
4. **optimiser**: Adam, lr 1e-2, weight decay 0.01 (the paper's), until every target token is
   the argmax, every neuron fires on its position and no memory input opens the patch, or
   ``steps`` (the paper allows 2000; 300 here, as the last layer alone trains per step).

Memory per edit on SmolLM2-135M: per neuron k, u, v and b (3 x 576 + 1 float32 = 6.9 KB) plus
the edit's own inputs kept for later edits' memory loss (float16, 1.2 KB per token).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
import torch.nn.functional as F

from medit.core.arch import ArchSpec, get_arch, get_module
from medit.core.errors import UserError
from medit.core.forward import logits_at
from medit.core.hooks import capture_inputs, side_training
from medit.core.placement import input_device
from medit.core.text import teacher_batch
from medit.editors.base import Capabilities, Editor, HParams, hp
from medit.editors.patching.bank import Patch, PatchBank
from medit.editors.patching.negatives import CorpusSample, corpus_inputs
from medit.editors.results import ModuleEdit
from medit.facts.requests import EditRequest


@dataclasses.dataclass(frozen=True)
class TPatcherHParams(HParams):
    max_neurons: int = hp(5, "neurons per edit at most (one per wrong target token)")
    steps: int = hp(300, "Adam steps at most (the paper: 2000)")
    lr: float = hp(1e-2, "Adam learning rate (the paper's)")
    weight_decay: float = hp(1e-2, "Adam weight decay (the paper's)")
    label_smoothing: float = hp(0.1, "label smoothing of the edit loss (the paper's)")
    alc: float = hp(1.0, "weight of the activation loss (the paper's)")
    mlc: float = hp(10.0, "weight of the memory loss (the paper's, zsRE)")
    act_margin: float = hp(0.0, "the activation loss pushes s_e above this (the paper's 0)")
    edit_margin: float = hp(3.0, "gamma: the edit's s beats every memory input's by this")
    memory_margin: float = hp(-3.0, "beta: memory inputs' s are pushed below this")
    top_k: int = hp(1000, "memory inputs in each memory loss term (the largest s)")
    memory_texts: int = hp(200, "corpus texts whose MLP inputs are the memory")

    def __post_init__(self):
        super().__post_init__()
        self._at_least(1, "max_neurons", "steps", "top_k", "memory_texts")
        self._at_least(0, "weight_decay", "label_smoothing", "alc", "mlc")
        self._positive("lr")


@dataclasses.dataclass(eq=False)
class Neurons(Patch):
    """One edit's neurons at the last layer's MLP, and the inputs it keeps for later edits."""

    edit_id: str
    module: str  #: the MLP block
    keys: torch.Tensor  #: (n, d) rows of the gate (SwiGLU) or columns of c_fc
    bias: torch.Tensor  #: (n,)
    ups: torch.Tensor | None  #: (n, d) rows of up_proj (SwiGLU), or None
    values: torch.Tensor  #: (n, d) columns of down_proj / rows of c_proj
    memory: torch.Tensor  #: (m, d) float16: the edit's MLP inputs (the memory of later edits)
    act_fn: Any = None  #: the MLP's activation (taken from the model, not exported)

    policy = "sum"  # extra hidden units: every open patch adds its own
    mergeable = False  # the s > 0 gate is no weight change

    @property
    def modules(self) -> list[str]:
        return [self.module]

    def pre(self, x: torch.Tensor) -> torch.Tensor:
        """(..., n) pre-activations s = k.x + b."""
        return x.float() @ self.keys.to(x.device).T + self.bias.to(x.device)

    def gate(self, module, x):
        return (self.pre(x) > 0).any(-1).float()

    @classmethod
    def arrange(cls, patches, module):
        """The keys and biases of every patch at the module, stacked once for :meth:`gates`."""
        stack = (
            tuple(id(p) for p in patches),
            torch.cat([p.keys for p in patches]),
            torch.cat([p.bias for p in patches]),
            torch.repeat_interleave(
                torch.arange(len(patches)), torch.tensor([len(p.bias) for p in patches])
            ),
        )
        for p in patches:
            p._stack = stack

    @classmethod
    def gates(cls, patches, module, x):
        stack = getattr(patches[0], "_stack", None)
        if stack is None or stack[0] != tuple(id(p) for p in patches):
            cls.arrange(patches, module)
            stack = patches[0]._stack
        _, keys, bias, owner = stack
        s = x.float() @ keys.to(x.device).T + bias.to(x.device)  # (batch, pos, all neurons)
        opened = torch.zeros((len(patches), *x.shape[:2]), device=x.device)
        opened.index_add_(0, owner.to(x.device), (s > 0).permute(2, 0, 1).float())
        return (opened > 0).float()

    def contribution(self, x: torch.Tensor) -> torch.Tensor:
        """(..., d_out) the neurons' output where each is open (s > 0), 0 elsewhere."""
        s = self.pre(x)
        h = torch.where(s > 0, self.act_fn(s), torch.zeros_like(s))
        if self.ups is not None:
            h = h * (x.float() @ self.ups.to(x.device).T)
        return h @ self.values.to(x.device)

    @classmethod
    def act(cls, patches, module, x, out, gate):
        add = torch.stack([p.contribution(x[i]) for i, p in enumerate(patches)])
        return torch.where(gate[..., None] > 0, out + add.to(out.dtype), out)

    # -- artifacts -------------------------------------------------------------------------------
    @classmethod
    def write_artifact(cls, directory, result, bank, peft: bool = True, **provenance):
        tensors = {}
        for i, p in enumerate(result.patches):
            tensors |= {f"{i}::keys": p.keys, f"{i}::bias": p.bias, f"{i}::values": p.values}
            tensors[f"{i}::memory"] = p.memory
            if p.ups is not None:
                tensors[f"{i}::ups"] = p.ups
        edits = [
            {"id": p.edit_id, "module": p.module, "neurons": len(p.bias)} for p in result.patches
        ]
        return cls.write_edits(directory, result, edits, tensors, **provenance)


def _mlp_act(model, module: str):
    mlp = get_module(model, module)
    act = getattr(mlp, "act_fn", None) or getattr(mlp, "act", None)
    if act is None:
        raise UserError(f"tpatcher: {module} has no activation it names (act_fn or act)")
    return act


class TPatcher(Editor):
    name = "tpatcher"
    hparams_class = TPatcherHParams
    capabilities = Capabilities(batch=True)
    summary = "Transformer-Patcher: a few trained neurons in the last MLP per mistake"

    def edited_modules(self, hp: TPatcherHParams, arch: ArchSpec, n_layers: int) -> tuple[str, ...]:
        return (arch.layer_path(n_layers - 1, "mlp"),)

    def _apply(self, model, tok, requests, hp: TPatcherHParams, prior=None):
        arch = get_arch(model)
        layer = arch.n_layers(model) - 1
        name = arch.layer_path(layer, "mlp")
        bank = PatchBank.of(model, arch)
        corpus = corpus_inputs(model, tok, name, CorpusSample(texts=hp.memory_texts))
        corpus = torch.cat(corpus) if corpus else torch.empty(0)

        def make(req):
            earlier = [p.memory for p in bank.patches if isinstance(p, Neurons)]
            memory = torch.cat([corpus, *earlier]) if earlier else corpus
            return _patch(model, tok, arch, layer, name, bank, req, memory, hp)

        return ModuleEdit.one_by_one(self.name, hp, bank, requests, make)

    @classmethod
    def load(cls, model, tok, manifest, tensors):
        arch = get_arch(model)
        bank = PatchBank.of(model, arch)
        patches = []
        for i, e in enumerate(manifest["edits"]):
            patches.append(
                Neurons(
                    e["id"],
                    e["module"],
                    tensors[f"{i}::keys"].float(),
                    tensors[f"{i}::bias"].float(),
                    tensors[f"{i}::ups"].float() if f"{i}::ups" in tensors else None,
                    tensors[f"{i}::values"].float(),
                    tensors[f"{i}::memory"],
                    _mlp_act(model, e["module"]),
                )
            )
        bank.add(*patches)
        hparams = cls.hparams_class.from_dict(manifest["hparams"])
        return ModuleEdit(manifest["method"], hparams, bank, patches)


def _patch(model, tok, arch, layer, name, bank, req: EditRequest, memory, hp: TPatcherHParams):
    """Train one edit's neurons (see the module docstring)."""
    device = input_device(model)
    batch = teacher_batch(tok, [req.prompt], [req.target_new]).to(device)
    mlp = get_module(model, name)
    with torch.no_grad():
        hidden, x = capture_inputs(
            [arch.layer_list(model)[layer], mlp], lambda: model(batch.input_ids)
        )
        x = x[0].float()  # (T, d)
        wrong = logits_at(model, arch, batch).argmax(-1) != batch.labels
    order = [int(c) for c, bad in zip(batch.cols, wrong, strict=True) if bad]
    positions = (order or [int(batch.cols[0])])[: hp.max_neurons]
    q = x[positions]  # (n, d): the inputs that predict the wrong tokens
    init = q / q.norm(dim=-1, keepdim=True).pow(2).clamp_min(1e-12)
    gated = "gate" in arch.kinds  # SwiGLU: gate and up rows
    keys = init.clone().requires_grad_(True)
    bias = torch.zeros(len(positions), device=device, requires_grad=True)
    ups = init.clone().requires_grad_(True) if gated else None
    values = torch.zeros(len(positions), arch.embedding(model).weight.shape[1], device=device)
    values.requires_grad_(True)
    trained = [t for t in (keys, bias, ups, values) if t is not None]
    act = _mlp_act(model, name)
    probe = Neurons(req.id, name, keys, bias, ups, values, torch.empty(0), act)

    def add(_m, args, output):  # the neurons in training, gated as at inference
        return output + probe.contribution(args[0]).to(output.dtype)

    mem = memory.to(device, torch.float32)
    opt = torch.optim.Adam(trained, lr=hp.lr, weight_decay=hp.weight_decay)
    steps, done, losses = 0, False, {}
    with side_training(model, arch, layer, hidden, mlp, add):
        for _ in range(hp.steps):
            steps += 1
            logits = logits_at(model, arch, batch).float()
            edit = F.cross_entropy(logits, batch.labels, label_smoothing=hp.label_smoothing)
            s_e = probe.pre(q).diagonal()  # each neuron at its own position
            act_loss = torch.exp(hp.act_margin - s_e).mean()
            s_m = probe.pre(mem) if len(mem) else torch.empty(0, len(positions))
            if len(mem):
                top = s_m.topk(min(hp.top_k, len(mem)), dim=0).values  # (k, n)
                mem_loss = (
                    torch.exp(top - s_e + hp.edit_margin).mean()
                    + torch.exp(top - hp.memory_margin).mean()
                )
            else:
                mem_loss = torch.zeros((), device=device)
            loss = edit + hp.alc * act_loss + hp.mlc * mem_loss
            right = bool((logits.argmax(-1) == batch.labels).all())
            silent = not len(mem) or bool((s_m.detach() <= 0).all())
            losses = {
                "edit": float(edit.detach()),
                "act": float(act_loss.detach()),
                "memory": float(mem_loss.detach()),
            }
            if right and silent and bool((s_e.detach() > 0).all()):
                done = True
                break
            opt.zero_grad()
            loss.backward()
            opt.step()
    patch = Neurons(
        req.id,
        name,
        keys.detach().cpu(),
        bias.detach().cpu(),
        ups.detach().cpu() if ups is not None else None,
        values.detach().cpu(),
        x.to("cpu", torch.float16),
        act,
    )
    info = {"neurons": len(positions), "steps": steps, "converged": done, **losses}
    return patch, info
