"""SCEN (Yao et al., "Scalable Model Editing via Customized Expert Networks", COLM 2024): an
expert per edit at one MLP output projection, and an indexing neuron per expert that decides,
once per sequence, whether that expert replaces the projection.

Two stages per edit, both against the base model (every earlier patch shut):

1. **expert** — a copy of the layer's ``down_proj`` (``mlp_out``) trained so that the prompt
   continues with the target when the copy replaces the projection at every position of the
   sequence. ``expert="full"`` is the paper's copy (576 x 1536 floats, 3.5 MB an edit on
   SmolLM2-135M; 45M parameters on Llama-2-7B); ``expert="lowrank"`` (the default) trains
   W + B A with B = 0 at the start (the copy, exactly) and rank ``rank`` (8: 68 KB an edit).
   Adam; training stops once the target loss is below ``stop_loss`` or after ``expert_steps``.
2. **indexing neuron** — a linear unit over the projection's input h at the prompt's last token,
   score sigmoid(w.h + b). The paper's loss ``exp(-p) + mean(exp(n) + 0.7) + mean(exp(n) - p +
   0.3)`` (p the edit's score, n the negatives') saturates: a negative whose score is near 1
   gets no gradient, and a mean over thousands of negatives is outweighed by the positive, so
   on this model every neuron ended up firing everywhere. ``neuron_loss="logistic"`` (the
   default) puts softplus on the logits past theta + margin (the edit) and theta - margin (the
   ``hard_negatives`` hardest negatives), and h is scaled to unit norm. The paper trains it against
   every earlier edit with a forward of the whole model each step (quadratic in the number of
   edits); here each edit keeps its h (3 KB in float16), so the negatives are cached vectors: a
   bounded sample of earlier edits (``negative_edits``), positions of the model's own
   generated text (``negative_texts``, :mod:`medit.editors.patching.negatives`) and the edit's
   prompt with its subject swapped for other medical terms (``negative_swaps``: the same
   question about something else, which a last-token key otherwise confuses with it), and a step
   costs a matrix product. Training stops once the edit scores above ``theta + margin`` and
   every negative below ``theta - margin``, or after ``neuron_steps``.

``reads="mean"`` (the default) makes h the mean of the projection's input over the prompt's
tokens instead of its last token (the paper's, ``reads="last"``, whose input mostly says "a
question ends here"), and the corpus negatives the means of the texts' first 8, 16, 24 and 32
tokens. Measured on MedCF validation (50 edits one after another, then all asked again,
generation-based efficacy / generality / locality): last token 92 / 50 / 13 at 8.2 s an edit,
mean 94 / 68 / 28 at 3.7 s (``benchmarks/results/scen_medcf_valid.jsonl``).

At inference the sequence's first forward (the prompt's prefill) reads h (at its last token);
the neuron with the highest score selects its expert if that score exceeds ``theta`` (the
paper's 0.65), and the expert then replaces the projection for every position of the sequence
and of its decoding; otherwise the base projection runs, bit for bit (the bank's
sequence-gated patches, :mod:`medit.editors.patching.bank`). Removing an edit drops its neuron
and its expert; the others stay as they were trained.

``preset=paper``: a full copy, Adam lr 1e-4 for 10 expert steps and 20 neuron steps, a randomly
initialised neuron without bias, earlier edits only as negatives.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math

import torch
import torch.nn.functional as F

from medit.core.arch import ArchSpec, get_arch, get_module
from medit.core.forward import target_nll
from medit.core.hooks import (
    layer_states,
    side_training,
)
from medit.core.placement import input_device
from medit.core.text import teacher_batch
from medit.editors.base import Capabilities, Editor, HParams, check_layers, hp
from medit.editors.patching.bank import Patch, PatchBank, bank_of, patch_site
from medit.editors.patching.negatives import (
    CorpusSample,
    corpus_inputs,
    swapped_prompts,
    text_inputs,
)
from medit.editors.results import ModuleEdit
from medit.facts.requests import EditRequest
from medit.facts.subject import request_subjects


@dataclasses.dataclass(frozen=True)
class ScenHParams(HParams):
    layer: int = hp(-1, "decoder layer whose mlp_out the experts replace; -1: at layer_depth")
    layer_depth: float = hp(
        0.645, "relative depth of the default layer (the paper: layer 20 of Llama-2-7B's 32)"
    )
    expert: str = hp(
        "lowrank",
        "an expert is a full copy of the projection or a low-rank change of it",
        ("full", "lowrank"),
    )
    rank: int = hp(8, "expert=lowrank: the rank of B A")
    expert_lr: float = hp(1e-2, "Adam learning rate of an expert")
    expert_steps: int = hp(100, "Adam steps of an expert at most (the paper: 10)")
    stop_loss: float = hp(5e-2, "stop training an expert once the target loss is below (0: never)")
    neuron_lr: float = hp(1e-2, "Adam learning rate of an indexing neuron (the paper: 1e-4)")
    neuron_steps: int = hp(1000, "Adam steps of an indexing neuron at most (the paper: 20)")
    neuron_init: str = hp(
        "zero",
        "an indexing neuron starts at zero or at PyTorch's Linear init (the paper's)",
        ("zero", "random"),
    )
    neuron_bias: bool = hp(True, "indexing neurons have a bias (the paper's have none)")
    normalise: bool = hp(
        True, "a neuron reads its input scaled to unit norm (the paper's reads it raw)"
    )
    neuron_loss: str = hp(
        "logistic",
        "paper: exp(-p) + mean(exp(n) + 0.7) + mean(exp(n) - p + 0.3) on the scores; logistic: "
        "softplus of the logits past theta +- margin, over the hardest negatives (no saturation)",
        ("paper", "logistic"),
    )
    hard_negatives: int = hp(64, "neuron_loss=logistic: the hardest negatives in each step")
    reads: str = hp(
        "mean",
        "a neuron reads the projection's mean input over the prompt's tokens (negatives alike: "
        "corpus prefixes of 8-32 tokens) or its input at the prompt's last token (the paper's)",
        ("last", "mean"),
    )
    theta: float = hp(0.65, "an expert acts when its neuron's score exceeds this (the paper's)")
    margin: float = hp(0.1, "a neuron is trained until the edit clears theta by this much")
    negative_swaps: int = hp(
        32, "negatives: the edit's prompt with its subject swapped for this many medical terms"
    )
    negative_edits: int = hp(1024, "earlier edits sampled as negatives of a new neuron at most")
    negative_texts: int = hp(200, "corpus texts whose positions are negatives (0: none)")
    negative_positions: int = hp(4096, "corpus positions sampled as negatives at most")
    seed: int = hp(0, "seed of the negatives' sample and of the random inits")
    preset: str = hp(
        "default",
        "default: a low-rank expert, neurons on the prompt's mean input, corpus negatives; paper: "
        "SCEN's own (a full copy, lr 1e-4, 10 + 20 steps, random neurons without bias on the "
        "last token, earlier edits as negatives)",
        ("default", "paper"),
    )

    PRESETS = {
        "default": {},
        "paper": {
            "expert": "full",
            "expert_lr": 1e-4,
            "expert_steps": 10,
            "stop_loss": 0.0,
            "neuron_lr": 1e-4,
            "neuron_steps": 20,
            "neuron_init": "random",
            "neuron_bias": False,
            "neuron_loss": "paper",
            "normalise": False,
            "margin": 0.0,
            "negative_texts": 0,
            "negative_swaps": 0,
            "reads": "last",
        },
    }
    NO_DEFAULTS = ("paper",)

    def __post_init__(self):
        super().__post_init__()
        self._at_least(1, "rank", "expert_steps", "neuron_steps", "hard_negatives")
        self._at_least(0, "stop_loss", "margin", "negative_edits", "negative_texts")
        self._at_least(0, "negative_positions", "negative_swaps")
        self._positive("expert_lr", "neuron_lr")
        self._within("layer_depth", 0.0, 1.0)
        self._within("theta", 0.0, 1.0)

    def check_arch(self, arch: ArchSpec, n_layers: int | None) -> None:
        if self.layer >= 0:
            check_layers("layer", self.layer, n_layers)

    def resolve_layer(self, n_layers: int) -> int:
        return self.layer if self.layer >= 0 else round(self.layer_depth * (n_layers - 1))


#: reads="mean": the corpus negatives are the means of each text's first this many tokens
PREFIXES = (8, 16, 24, 32)


# -- the patch -----------------------------------------------------------------------------------
@dataclasses.dataclass(eq=False)
class Expert(Patch):
    """One edit's expert at ``module`` and the indexing neuron that opens it."""

    edit_id: str
    module: str
    neuron: torch.Tensor  #: (d_in,) w
    bias: float  #: b
    theta: float
    normalise: bool  #: the neuron reads x scaled to unit norm
    delta: torch.Tensor | None  #: (d_out, d_in) expert=full: the copy minus the base weight
    down: torch.Tensor | None  #: (r, d_in) expert=lowrank: A
    up: torch.Tensor | None  #: (d_out, r) expert=lowrank: B
    key: torch.Tensor  #: (d_in,) float16: h of the edit (a negative of later neurons)
    reads: str = "last"  #: h is the input at the prompt's last token, or its mean ("mean")

    sequence = True  # decided once per sequence, on the prompt's prefill
    policy = "max"  # the most active neuron's expert acts
    mergeable = False  # an expert gated per sequence is no weight change

    @property
    def modules(self) -> list[str]:
        return [self.module]

    @classmethod
    def arrange(cls, patches, module):
        stack = (
            tuple(id(p) for p in patches),
            torch.stack([p.neuron for p in patches]),
            torch.tensor([p.bias for p in patches]),
            torch.tensor([p.theta for p in patches]),
            torch.tensor([p.normalise for p in patches]),
        )
        for p in patches:
            p._stack = stack

    @classmethod
    def scores(cls, patches, x: torch.Tensor) -> torch.Tensor:
        """(len(patches), ...) neuron scores sigmoid(w.h + b) of inputs ``x`` (..., d_in)."""
        stack = getattr(patches[0], "_stack", None)
        if stack is None or stack[0] != tuple(id(p) for p in patches):
            cls.arrange(patches, patches[0].module)
            stack = patches[0]._stack
        _, w, b, _, normalised = stack
        x = x.float()
        logits = x @ w.to(x.device).T
        if bool(normalised.any()):
            scaled = (logits / _norm_scale(x)).to(logits.dtype)
            logits = torch.where(normalised.to(x.device), scaled, logits)
        return torch.sigmoid(logits + b.to(x.device)).movedim(-1, 0)

    @classmethod
    def sequence_gates(cls, patches, module, x, real, out=None):
        """The neurons' gates on h: the input at the prompt's last token, or (``reads="mean"``)
        its mean over the prompt's real tokens."""
        means = torch.tensor([p.reads == "mean" for p in patches], device=x.device)
        if not bool(means.any()):
            return super().sequence_gates(patches, module, x, real)
        mean = cls.gates(patches, module, prompt_mean(x, real)[:, None])
        if bool(means.all()):
            return mean
        last = super().sequence_gates(patches, module, x, real)
        return torch.where(means[:, None, None], mean, last)

    @classmethod
    def gates(cls, patches, module, x):
        """Scores above each neuron's theta, 0 elsewhere; the bank lets the highest act."""
        s = cls.scores(patches, x)  # (E, batch, 1)
        theta = patches[0]._stack[3].to(s.device)[:, None, None]
        return torch.where(s > theta, s, torch.zeros_like(s))

    def change(self, x: torch.Tensor) -> torch.Tensor:
        """(..., d_out) the expert's output minus the base projection's."""
        x = x.float()
        if self.delta is not None:
            return x @ self.delta.to(x.device).T
        return (x @ self.down.to(x.device).T) @ self.up.to(x.device).T

    @classmethod
    def act(cls, patches, module, x, out, gate):
        add = torch.stack([p.change(x[i]) for i, p in enumerate(patches)])
        return torch.where(gate[..., None] > 0, out + add.to(out.dtype), out)

    def nbytes(self) -> int:
        parts = [self.neuron, self.key] + [
            t for t in (self.delta, self.down, self.up) if t is not None
        ]
        return sum(t.numel() * t.element_size() for t in parts)

    # -- artifacts -------------------------------------------------------------------------------
    @classmethod
    def write_artifact(cls, directory, result, bank, peft: bool = True, **provenance):
        tensors, edits = {}, []
        for i, p in enumerate(result.patches):
            tensors[f"{i}::neuron"], tensors[f"{i}::key"] = p.neuron, p.key
            for part in ("delta", "down", "up"):
                if getattr(p, part) is not None:
                    tensors[f"{i}::{part}"] = getattr(p, part)
            edits.append(
                {
                    "id": p.edit_id,
                    "module": p.module,
                    "bias": p.bias,
                    "theta": p.theta,
                    "normalise": p.normalise,
                    "reads": p.reads,
                }
            )
        return cls.write_edits(directory, result, edits, tensors, **provenance)

    @classmethod
    def read(cls, manifest, tensors) -> list[Expert]:
        def get(i, part):
            t = tensors.get(f"{i}::{part}")
            return None if t is None else t.float()

        return [
            cls(
                e["id"],
                e["module"],
                get(i, "neuron"),
                float(e["bias"]),
                float(e["theta"]),
                bool(e["normalise"]),
                get(i, "delta"),
                get(i, "down"),
                get(i, "up"),
                tensors[f"{i}::key"],
                e.get("reads", "last"),
            )
            for i, e in enumerate(manifest["edits"])
        ]


# -- the editor ----------------------------------------------------------------------------------
class SCEN(Editor):
    name = "scen"
    hparams_class = ScenHParams
    capabilities = Capabilities(batch=True)
    summary = "SCEN: an expert per edit at one MLP output projection, chosen by indexing neurons"

    def edited_modules(self, hp: ScenHParams, arch: ArchSpec, n_layers: int) -> tuple[str, ...]:
        return (arch.layer_path(hp.resolve_layer(n_layers), "mlp_out"),)

    def _apply(self, model, tok, requests, hp: ScenHParams, prior=None):
        arch, layer, name, bank = patch_site(model, hp)
        corpus = _corpus_negatives(model, tok, name, hp)
        subjects = request_subjects(requests) if hp.negative_swaps else [None] * len(requests)

        def make(item):
            req, subject = item
            swapped = _swapped(model, tok, name, req.prompt, subject, hp)
            negatives = torch.cat([corpus.float(), swapped]) if len(corpus) else swapped
            return _edit(model, tok, arch, layer, name, bank, req, negatives, hp)

        items = list(zip(requests, subjects, strict=True))
        return ModuleEdit.one_by_one(self.name, hp, bank, items, make)

    @classmethod
    def load(cls, model, tok, manifest, tensors):
        bank = PatchBank.of(model, get_arch(model))
        return ModuleEdit.loaded(cls, bank, manifest, Expert.read(manifest, tensors))


def prompt_mean(x: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
    """(batch, d_in) the mean of ``x`` (batch, pos, d_in) over the real positions (batch, pos)."""
    real = real.to(x.dtype)[..., None]
    return (x * real).sum(1) / real.sum(1).clamp_min(1)


def _norm_scale(x: torch.Tensor) -> torch.Tensor:
    """(..., 1) the norms of the rows of ``x``: dividing by them gives unit rows."""
    return x.norm(dim=-1, keepdim=True).clamp_min(1e-12)


@torch.no_grad()
def _swapped(model, tok, name, prompt: str, subject: str | None, hp: ScenHParams) -> torch.Tensor:
    """(n, d_in) inputs of ``name`` read on ``prompt`` with its subject swapped for
    ``negative_swaps`` medical terms: the negatives that teach a neuron the subject matters.
    Empty without a subject."""
    device = input_device(model)
    texts = swapped_prompts(prompt, subject, hp.negative_swaps, hp.seed + 2)
    if not texts:
        return torch.empty(0, device=device)
    bank = bank_of(model)
    with bank.disabled() if bank is not None else contextlib.nullcontext():
        x, real = text_inputs(model, tok, name, texts)
    if hp.reads == "mean":
        return prompt_mean(x.float(), real)
    last = real.sum(1) - 1
    return x[torch.arange(len(texts), device=device), last].float()


def _corpus_negatives(model, tok, name, hp: ScenHParams) -> torch.Tensor:
    """A seeded sample of positions of generated text: (n, d_in) float16 inputs of ``name``."""
    if not hp.negative_texts:
        return torch.empty(0)
    texts = corpus_inputs(model, tok, name, CorpusSample(texts=hp.negative_texts))
    if hp.reads == "mean":  # a prompt's mean: the means of each text's first 8-32 tokens
        means = [t[:n].float().mean(0) for t in texts for n in PREFIXES if n <= len(t)]
        return torch.stack(means).half() if means else torch.empty(0)
    every = torch.cat(texts) if texts else torch.empty(0)
    if len(every) > hp.negative_positions:
        pick = torch.randperm(len(every), generator=torch.Generator().manual_seed(hp.seed))
        every = every[pick[: hp.negative_positions]]
    return every


def _edit(model, tok, arch, layer, name, bank, req: EditRequest, fixed, hp: ScenHParams):
    device = input_device(model)
    batch = teacher_batch(tok, [req.prompt], [req.target_new]).to(device)
    module = get_module(model, name)
    with torch.no_grad(), bank.disabled():
        hidden, x, out = layer_states(model, arch, layer, module, batch.input_ids)
    end = int(batch.prompt_last[0])
    h = key = (x[0, : end + 1].mean(0) if hp.reads == "mean" else x[0, end]).float()
    with bank.disabled():
        shape = (out.shape[-1], x.shape[-1])
        expert, e_info = _train_expert(model, arch, layer, module, batch, hidden, shape, hp)
    earlier = [p.key for p in bank.patches if isinstance(p, Expert) and p.module == name]
    if len(earlier) > hp.negative_edits:
        pick = torch.randperm(len(earlier), generator=torch.Generator().manual_seed(hp.seed))
        earlier = [earlier[i] for i in pick[: hp.negative_edits].tolist()]
    parts = [fixed.to(device).float(), *(k.to(device).float()[None] for k in earlier)]
    parts = [t for t in parts if len(t)]
    negatives = torch.cat(parts) if parts else torch.empty(0, h.shape[0], device=device)
    if hp.normalise:
        h, negatives = h / _norm_scale(h), negatives / _norm_scale(negatives)
    w, b, n_info = _train_neuron(h, negatives, hp)
    patch = Expert(
        req.id,
        name,
        w.cpu(),
        b,
        hp.theta,
        hp.normalise,
        *(t.cpu() if t is not None else None for t in expert),
        key.to("cpu", torch.float16),
        hp.reads,
    )
    return patch, {**e_info, **n_info, "bytes": patch.nbytes()}


def _train_expert(model, arch, layer, module, batch, hidden, shape, hp: ScenHParams):
    """The expert: Adam on its change (``shape``: d_out, d_in) of the projection, acting at
    every position."""
    weight = next(module.parameters())
    d_out, d_in = shape
    g = torch.Generator().manual_seed(hp.seed)
    if hp.expert == "full":
        delta = torch.zeros(d_out, d_in, device=weight.device, requires_grad=True)
        params, parts = [delta], (delta, None, None)
    else:
        bound = 1.0 / math.sqrt(d_in)  # A as LoRA's (kaiming-uniform scale), B at zero
        down = ((torch.rand(hp.rank, d_in, generator=g) * 2 - 1) * bound).to(weight.device)
        down.requires_grad_(True)
        up = torch.zeros(d_out, hp.rank, device=weight.device, requires_grad=True)
        params, parts = [down, up], (None, down, up)

    def add(_m, args, output):
        x = args[0].float()
        change = x @ parts[0].T if parts[0] is not None else (x @ parts[1].T) @ parts[2].T
        return output + change.to(output.dtype)

    opt = torch.optim.Adam(params, lr=hp.expert_lr)
    steps, loss_value = 0, float("nan")
    with side_training(model, arch, layer, hidden, module, add):
        for _ in range(hp.expert_steps):
            loss = target_nll(model, arch, batch)
            loss_value = float(loss.detach())
            if loss_value < hp.stop_loss:
                break
            steps += 1
            opt.zero_grad()
            loss.backward()
            opt.step()
        if steps == hp.expert_steps:
            with torch.no_grad():
                loss_value = float(target_nll(model, arch, batch))
    done = tuple(t.detach().float() if t is not None else None for t in parts)
    return done, {"expert_steps": steps, "expert_loss": loss_value}


def _logit(p: float) -> float:
    p = min(max(p, 1e-6), 1 - 1e-6)
    return math.log(p / (1 - p))


def _train_neuron(h: torch.Tensor, negatives: torch.Tensor, hp: ScenHParams):
    """The indexing neuron: the paper's loss on the edit's h and the negatives."""
    d = h.shape[0]
    if hp.neuron_init == "random":  # nn.Linear(d, 1)'s init
        bound = 1.0 / math.sqrt(d)
        g = torch.Generator().manual_seed(hp.seed + 1)
        w0 = (torch.rand(d, generator=g) * 2 - 1) * bound
    else:
        w0 = torch.zeros(d)
    w = w0.to(h.device).requires_grad_(True)
    b = torch.zeros((), device=h.device, requires_grad=hp.neuron_bias)
    opt = torch.optim.Adam([w, b] if hp.neuron_bias else [w], lr=hp.neuron_lr)
    steps, p_value, n_max = 0, 0.0, 0.0
    with torch.enable_grad():
        for _ in range(hp.neuron_steps + 1):
            p = torch.sigmoid(h @ w + b)
            n = torch.sigmoid(negatives @ w + b) if len(negatives) else None
            p_value = float(p.detach())
            n_max = float(n.detach().max()) if n is not None else 0.0
            fired = p_value > hp.theta + hp.margin
            if fired and n_max < hp.theta - hp.margin and hp.margin > 0:
                break
            if steps == hp.neuron_steps:
                break
            if hp.neuron_loss == "paper":
                loss = torch.exp(-p)
                if n is not None:
                    e = torch.exp(n)
                    loss = loss + (e + 0.7).mean() + (e - p + 0.3).mean()
            else:
                loss = F.softplus(_logit(hp.theta + hp.margin) - (h @ w + b))
                if n is not None:
                    z = negatives @ w + b
                    hard = z.topk(min(hp.hard_negatives, len(z))).values
                    loss = loss + F.softplus(hard - _logit(hp.theta - hp.margin)).mean()
            steps += 1
            opt.zero_grad()
            loss.backward()
            opt.step()
    return (
        w.detach().float(),
        float(b.detach()),
        {"neuron_steps": steps, "score": p_value, "negative_max": n_max},
    )
