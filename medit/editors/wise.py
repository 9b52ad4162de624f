"""WISE (Wang et al., "WISE: Rethinking the Knowledge Memory for Lifelong Model Editing of Large
Language Models", NeurIPS 2024): a side copy of one late FFN output projection (``mlp_out``) holds
the edits; a routing activation decides, once per sequence, whether the side memory or the main
one runs.

Per edit, in the paper's order:

1. **knowledge shard** — edits fill side memories of ``shard_size`` edits each (the paper's
   save_freq); every side memory W' starts as the main weight W and trains only its own random
   subset of entries, a Bernoulli(``mask_ratio``) gradient mask drawn from the shard's seed.
2. **edit** — SGD at lr ``lr`` (the paper's 1.0) for at most ``steps`` (n_iter) on the edit's
   prompt under ``templates`` sampled context prefixes plus the bare prompt, with W' in place of W
   at every position: the cross-entropy of the target plus the routing loss (eq. 5)
   ``mean+(out - in + gamma) + mean+(out - alpha) + mean+(beta - in)``, where the activation of
   a row is the mean over its tokens of |x (W' - W)^T| (x the projection's input; ``in``: the
   edit's rows, over the prompt's own tokens; ``out``: ``irrelevant`` texts of the model's own
   generated corpus, over all their tokens) and mean+ averages the positive entries only. After
   each step every entry of W' is kept within ``norm_constraint`` of W (the paper's box).
3. **threshold** — the edit's activation after training is recorded; a side memory opens for
   an input whose activation exceeds ``act_ratio`` x the smallest activation of its edits (the
   reference code's epsilon; the paper states the minimum itself). The edit's activation is
   the smallest over its rows (the reference code: their mean), so that the bare prompt, one of
   them, opens its memory however its templated rows score.
4. **merge** — every ``merge_every`` edits the side memories filled since the last merge are
   TIES-merged (Yadav et al. 2023: trim each change W' - W to its ``density`` largest entries,
   elect the sign of their sum, average the entries that agree with it) into one memory, whose
   threshold is the smallest of theirs (WISE-Retrieve: each merged memory stays a candidate).

At inference the prompt's prefill reads x at every real token; the memory with the largest
activation above its threshold replaces W for the whole sequence, decoding included (the bank's
sequence-gated patches); without one, W runs bit for bit.

Departures from the reference code, each a fault it has: the activation skips padding (the code
averages over pad tokens), ``in`` reads the prompt's tokens and inference decides on the prompt
(the code trains on prompt + target and routes on whatever the forward holds, one token per
decoding step with a cache); SGD has no weight decay (the code's 1e-5 decays the whole side
memory, untrained entries too, by ~30% over a 500-edit shard); the difference is not passed
through the activation function (the paper has none; ``routing_fn="silu"`` follows the code:
|silu(x W'^T) - silu(x W^T)|, which bounds the activation a shift into the SiLU's tail makes).

Each edit is kept as its change of its shard at the shard's mask (float32), its activation, and
the merge it closed; a side memory is the sum of its edits' changes. Removing an edit takes its
change out (exact for the last edit of a shard, which is what ``remove`` after a sequential edit
restores; an earlier edit's successors were trained on top of it) and undoes a merge it closed.
"""

from __future__ import annotations

import dataclasses
import functools

import torch
import torch.nn.functional as F

from medit.core.arch import ArchSpec, get_arch, get_module
from medit.core.cache import base_weights_sha256
from medit.core.errors import UserError
from medit.core.forward import target_nll
from medit.core.hooks import layer_states, side_training
from medit.core.placement import input_device
from medit.core.text import teacher_batch
from medit.editors.base import Capabilities, Editor, HParams, check_layers, hp
from medit.editors.locate.keys import context_templates, fill
from medit.editors.patching.bank import Patch, PatchBank, patch_site
from medit.editors.patching.negatives import swapped_prompts, text_inputs
from medit.editors.results import ModuleEdit
from medit.facts.corpus import GenerationSettings, generated_corpus
from medit.facts.requests import EditRequest
from medit.facts.subject import request_subjects, subject_tokens


@dataclasses.dataclass(frozen=True)
class WiseHParams(HParams):
    layer: int = hp(-1, "decoder layer whose mlp_out gets the side memories; -1: at layer_depth")
    layer_depth: float = hp(0.87, "relative depth of the default layer (the paper: 27 of 31)")
    mask_ratio: float = hp(0.2, "share of a side memory's entries one shard trains (rho)")
    lr: float = hp(1.0, "SGD learning rate (eta)")
    steps: int = hp(70, "SGD steps per edit at most (n_iter)")
    stop_loss: float = hp(0.02, "stop once the loss is below this and moved by <= 1e-4")
    norm_constraint: float = hp(1.0, "every entry of a side memory stays within this of W")
    alpha: float = hp(5.0, "routing loss: irrelevant inputs' activation is pushed below alpha")
    beta: float = hp(20.0, "routing loss: the edit's activation is pushed above beta")
    gamma: float = hp(10.0, "routing loss: the edit's activation exceeds irrelevant ones' by gamma")
    act_ratio: float = hp(0.88, "a memory opens above act_ratio x its edits' smallest activation")
    routing_fn: str = hp(
        "linear",
        "the routing activation: linear |x (W' - W)^T| (the paper's equation) or silu "
        "|silu(x W'^T) - silu(x W^T)| (the reference code's)",
        ("linear", "silu"),
    )
    shard_size: int = hp(500, "edits per side memory (save_freq)")
    merge_every: int = hp(
        1000,
        "TIES-merge the memories filled since the last merge every this many edits "
        "(merge_freq, a multiple of shard_size; 0: never)",
    )
    density: float = hp(0.53, "TIES: share of each memory's largest changes kept")
    templates: int = hp(5, "context prefixes sampled of 5 and of 10 tokens each (the paper: 10)")
    irrelevant: int = hp(1, "texts of the generated corpus an edit is trained to stay shut on")
    irrelevant_tokens: int = hp(32, "tokens kept of an irrelevant text")
    negative_swaps: int = hp(
        0,
        "prompts an edit is trained to stay shut on besides the corpus texts: its own prompt "
        "with the subject swapped for this many medical terms (the paper: none)",
    )
    seed: int = hp(0, "seed of the shards' masks (shard k: seed + k) and of the texts' choice")
    preset: str = hp("default", "default: the paper's values", ("default", "paper"))

    #: the paper's values (Table 10 and EasyEdit's llama-7b.yaml), pinned
    PAPER = {
        "layer_depth": 0.87,
        "mask_ratio": 0.2,
        "lr": 1.0,
        "steps": 70,
        "norm_constraint": 1.0,
        "alpha": 5.0,
        "beta": 20.0,
        "gamma": 10.0,
        "act_ratio": 0.88,
        "routing_fn": "linear",
        "shard_size": 500,
        "merge_every": 1000,
        "density": 0.53,
        "templates": 5,
        "irrelevant": 1,
        "negative_swaps": 0,
    }
    PRESETS = {"default": {}, "paper": PAPER}
    NO_DEFAULTS = ("paper",)

    def __post_init__(self):
        super().__post_init__()
        self._at_least(1, "steps", "shard_size")
        self._at_least(0, "templates", "irrelevant", "merge_every", "stop_loss", "negative_swaps")
        self._at_least(1, "irrelevant_tokens")
        self._positive("lr", "norm_constraint")
        self._within("layer_depth", 0.0, 1.0)
        self._within("mask_ratio", 0.0, 1.0)
        self._within("density", 0.0, 1.0)
        self._within("act_ratio", 0.0, 1.0)
        if self.merge_every % self.shard_size:
            raise ValueError(
                f"merge_every ({self.merge_every}) must be a multiple of shard_size "
                f"({self.shard_size})"
            )

    def check_arch(self, arch: ArchSpec, n_layers: int | None) -> None:
        if self.layer >= 0:
            check_layers("layer", self.layer, n_layers)

    def resolve_layer(self, n_layers: int) -> int:
        return self.layer if self.layer >= 0 else round(self.layer_depth * (n_layers - 1))


# -- shards and merging --------------------------------------------------------------------------
@functools.lru_cache(maxsize=8)
def shard_mask(seed: int, numel: int, ratio: float) -> torch.Tensor:
    """(n,) flat indices of the entries a shard trains: a Bernoulli(ratio) draw from ``seed``."""
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(numel, generator=g) < ratio).nonzero().squeeze(1)


def ties_merge(changes: list[torch.Tensor], density: float) -> torch.Tensor:
    """TIES-merging of task vectors (W'_i - W) with equal weights: each trimmed to its
    ``density`` largest magnitudes, the sign of their sum elected per entry (>= 0: +), the
    entries agreeing with it averaged (an entry no vector keeps stays 0)."""
    trimmed = []
    for c in changes:
        keep = int(density * c.numel())
        if keep < c.numel():
            floor = c.abs().flatten().kthvalue(c.numel() - keep).values if keep else float("inf")
            c = torch.where(c.abs() > floor, c, torch.zeros_like(c))
        trimmed.append(c)
    t = torch.stack(trimmed)  # (k, d_out, d_in)
    sign = torch.where(t.sum(0) >= 0, 1.0, -1.0)
    agree = torch.sign(t) == sign  # zeros never agree
    return (t * agree).sum(0) / agree.sum(0).clamp_min(1)


@dataclasses.dataclass
class Memories:
    """The side memories of one module, derived from its edits in order: the change W' - W of
    each (M, d_out, d_in), its threshold (M,), and which edit stands for it in the bank (M,)."""

    ids: tuple[int, ...]  #: id() of the edits they come from
    changes: torch.Tensor
    thresholds: torch.Tensor
    owner: list[int]  #: index (in the edits) of each memory's last edit
    of_edit: list[int]  #: the memory each edit's change now lives in
    shards: list[int]  #: the shard each memory was last trained as (merged: its first)


def _arrange(edits: list[WiseEdit]) -> Memories:
    changes: dict[int, torch.Tensor] = {}
    acts: dict[int, list[float]] = {}
    members: dict[int, list[int]] = {}
    for i, e in enumerate(edits):
        shape = tuple(e.shape)
        flat = changes[e.shard].flatten() if e.shard in changes else torch.zeros(shape).flatten()
        idx = shard_mask(e.seed, flat.numel(), e.mask_ratio)
        changes[e.shard] = flat.index_add(0, idx, e.values.float()).view(shape)
        acts.setdefault(e.shard, []).append(e.level * e.act_ratio)
        members.setdefault(e.shard, []).append(i)
        if e.merged:
            into = e.merged[0]
            changes[into] = ties_merge([changes.pop(s) for s in e.merged], e.density)
            acts[into] = [a for s in e.merged for a in acts.pop(s)]
            members[into] = sorted(j for s in e.merged for j in members.pop(s))
    shards = sorted(changes, key=lambda s: max(members[s]))
    of_edit = [0] * len(edits)
    for m, s in enumerate(shards):
        for j in members[s]:
            of_edit[j] = m
    return Memories(
        ids=tuple(id(e) for e in edits),
        changes=torch.stack([changes[s] for s in shards]),
        thresholds=torch.tensor([min(acts[s]) for s in shards]),
        owner=[max(members[s]) for s in shards],
        of_edit=of_edit,
        shards=shards,
    )


def shift_norms(delta: torch.Tensor, base: torch.Tensor | None = None) -> torch.Tensor:
    """(..., ) per position, how far the side memory moves the projection's output: |delta|
    (the paper's equation), or, given the main memory's output ``base``, the reference code's
    |silu(base + delta) - silu(base)|."""
    if base is None:
        return delta.norm(dim=-1)
    return (F.silu(base + delta) - F.silu(base)).norm(dim=-1)


def activation(
    x: torch.Tensor, change: torch.Tensor, real: torch.Tensor, base: torch.Tensor | None = None
) -> torch.Tensor:
    """(batch,) the routing activation: the mean over the real positions of the shift
    (:func:`shift_norms`) that ``change`` makes, x (batch, pos, d_in), change (d_out, d_in), real
    (batch, pos); given the main memory's output ``base`` (batch, pos, d_out), the shift after
    the SiLU."""
    return real_mean(shift_norms(x @ change.to(x.device).T, base), real)


def real_mean(norms: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
    """(batch,) the mean of ``norms`` (batch, pos) over the real positions ``real``."""
    real = real.to(norms.dtype)
    return (norms * real).sum(1) / real.sum(1).clamp_min(1)


# -- the patch -----------------------------------------------------------------------------------
@dataclasses.dataclass(eq=False)
class WiseEdit(Patch):
    """One edit's change of its shard's side memory at ``module`` (at the shard's mask)."""

    edit_id: str
    module: str
    shape: tuple[int, int]  #: (d_out, d_in) of the side memory
    shard: int
    seed: int  #: the shard's mask seed
    mask_ratio: float
    values: torch.Tensor  #: (n,) float32 change at the mask's entries
    level: float  #: the edit's activation after training
    act_ratio: float
    merged: tuple[int, ...] = ()  #: shards TIES-merged (into the first) after this edit
    density: float = 0.53
    routing_fn: str = "linear"  #: linear | silu (see :func:`shift_norms`)

    sequence = True  # decided once per sequence, on the prompt's prefill
    policy = "max"  # the memory with the largest activation acts
    mergeable = False  # routed per sequence: no weight change

    @property
    def modules(self) -> list[str]:
        return [self.module]

    @classmethod
    def arrange(cls, patches, module):
        mem = _arrange(list(patches))
        for j, p in enumerate(patches):
            p._memories, p._change = mem, mem.changes[mem.of_edit[j]]

    @classmethod
    def _memories_of(cls, patches) -> Memories:
        got = getattr(patches[0], "_memories", None)
        if got is None or got.ids != tuple(id(p) for p in patches):
            cls.arrange(patches, patches[0].module)
        return patches[0]._memories

    @classmethod
    def sequence_gates(cls, patches, module, x, real, out=None):
        """Each memory's activation over the prompt where it exceeds the memory's threshold,
        on the row of the memory's last edit; 0 elsewhere. (``routing_fn="silu"`` compares with
        the main memory's output ``out``.)"""
        mem = cls._memories_of(patches)
        x = x.float()
        main = out.float() if any(p.routing_fn == "silu" for p in patches) else None
        gates = torch.zeros(len(patches), x.shape[0], 1, device=x.device)
        for m, change in enumerate(mem.changes):
            silu = patches[mem.owner[m]].routing_fn == "silu"
            a = activation(x, change, real, base=main if silu else None)  # (batch,)
            gates[mem.owner[m], :, 0] = torch.where(a > mem.thresholds[m], a, torch.zeros_like(a))
        return gates

    @classmethod
    def act(cls, patches, module, x, out, gate):
        """W' in place of W: the output plus x (W' - W)^T of the row's memory."""
        add = torch.stack([x[i].float() @ p._change.to(x.device).T for i, p in enumerate(patches)])
        return torch.where(gate[..., None] > 0, out + add.to(out.dtype), out)

    def nbytes(self) -> int:
        return self.values.numel() * self.values.element_size()

    # -- artifacts -------------------------------------------------------------------------------
    @classmethod
    def write_artifact(cls, directory, result, bank, peft: bool = True, **provenance):
        tensors = {f"{i}::values": p.values for i, p in enumerate(result.patches)}
        edits = [
            {
                "id": p.edit_id,
                "module": p.module,
                "shape": list(p.shape),
                "shard": p.shard,
                "seed": p.seed,
                "mask_ratio": p.mask_ratio,
                "activation": p.level,
                "act_ratio": p.act_ratio,
                "merged": list(p.merged),
                "density": p.density,
                "routing_fn": p.routing_fn,
            }
            for p in result.patches
        ]
        return cls.write_edits(directory, result, edits, tensors, **provenance)

    @classmethod
    def read(cls, manifest, tensors) -> list[WiseEdit]:
        return [
            cls(
                e["id"],
                e["module"],
                tuple(e["shape"]),
                int(e["shard"]),
                int(e["seed"]),
                float(e["mask_ratio"]),
                tensors[f"{i}::values"].float(),
                float(e["activation"]),
                float(e["act_ratio"]),
                tuple(e["merged"]),
                float(e["density"]),
                str(e.get("routing_fn", "linear")),
            )
            for i, e in enumerate(manifest["edits"])
        ]


# -- the editor ----------------------------------------------------------------------------------
class WISE(Editor):
    name = "wise"
    hparams_class = WiseHParams
    capabilities = Capabilities(batch=True)
    summary = (
        "WISE: side memories of one late mlp_out trained in masked shards, TIES-merged, routed "
        "per prompt by their activation"
    )

    def edited_modules(self, hp: WiseHParams, arch: ArchSpec, n_layers: int) -> tuple[str, ...]:
        return (arch.layer_path(hp.resolve_layer(n_layers), "mlp_out"),)

    def _apply(self, model, tok, requests, hp: WiseHParams, prior=None):
        arch, layer, name, bank = patch_site(model, hp)
        with bank.disabled():  # both are read from (and cached for) the base model
            templates = ["{}"]
            if hp.templates:
                templates = context_templates(model, tok, (5, 10), hp.templates, hp.seed)
            texts = _corpus(model, tok) if hp.irrelevant else []
        subjects = request_subjects(requests) if hp.negative_swaps else [None] * len(requests)

        def make(item):
            req, subject = item
            earlier = [p for p in bank.patches if isinstance(p, WiseEdit) and p.module == name]
            picked = _pick(texts, len(earlier), hp)
            swaps = swapped_prompts(req.prompt, subject, hp.negative_swaps, hp.seed + 2)
            negatives = []
            with torch.no_grad(), bank.disabled():
                if picked:
                    negatives.append(text_inputs(model, tok, name, picked, hp.irrelevant_tokens))
                if swaps:
                    negatives.append(text_inputs(model, tok, name, swaps))
            return _edit(
                model, tok, arch, layer, name, bank, req, earlier, templates, negatives, hp
            )

        items = list(zip(requests, subjects, strict=True))
        return ModuleEdit.one_by_one(self.name, hp, bank, items, make)

    @classmethod
    def load(cls, model, tok, manifest, tensors):
        bank = PatchBank.of(model, get_arch(model))
        return ModuleEdit.loaded(cls, bank, manifest, WiseEdit.read(manifest, tensors))


def _corpus(model, tok) -> list[str]:
    """The model's own generated corpus (the one ROME, GRACE and T-Patcher read, cached)."""
    settings = GenerationSettings(samples_per_prompt=4, new_tokens=96)
    sha = base_weights_sha256(model)
    return list(generated_corpus(model, tok, settings, weights_sha256=sha).texts)


def _edit(model, tok, arch, layer, name, bank, req: EditRequest, earlier, templates, negatives, hp):
    """Train the edit's change of its shard (the ``len(earlier)``-th edit at ``name``);
    ``negatives``: (x, real) inputs of ``name`` on the texts the memory must stay shut on."""
    device = input_device(model)
    index = len(earlier)
    shard = index // hp.shard_size
    module = get_module(model, name)
    batch, real_in = _rows(tok, templates, req)
    batch, real_in = batch.to(device), real_in.to(device)
    with torch.no_grad(), bank.disabled():
        hidden, x, out = layer_states(model, arch, layer, module, batch.input_ids)
    shape = (out.shape[-1], x.shape[-1])
    base = torch.zeros(shape)
    if earlier:
        mem = WiseEdit._memories_of(earlier)  # the bank's arrangement of these edits
        if shard in mem.shards:  # the shard is open: this edit trains on from it
            base = mem.changes[mem.shards.index(shard)]
    seed = hp.seed + shard
    idx = shard_mask(seed, shape[0] * shape[1], hp.mask_ratio)
    with bank.disabled():
        values, act, info = _train(
            model, arch, layer, module, batch, hidden, real_in, negatives, base, idx, hp
        )
    merged = ()
    if hp.merge_every and (index + 1) % hp.merge_every == 0:
        k = hp.merge_every // hp.shard_size
        merged = tuple(range(shard - k + 1, shard + 1))
    patch = WiseEdit(
        req.id,
        name,
        shape,
        shard,
        seed,
        hp.mask_ratio,
        values,
        act,
        hp.act_ratio,
        merged,
        hp.density,
        hp.routing_fn,
    )
    return patch, {**info, "shard": shard, "merged": list(merged), "bytes": patch.nbytes()}


def _pick(texts: list[str], index: int, hp: WiseHParams) -> list[str]:
    """The irrelevant texts of the ``index``-th edit: consecutive texts of a seeded order."""
    if not texts:
        return []
    order = torch.randperm(len(texts), generator=torch.Generator().manual_seed(hp.seed)).tolist()
    return [texts[order[(index * hp.irrelevant + j) % len(texts)]] for j in range(hp.irrelevant)]


def _rows(tok, templates, req: EditRequest):
    """One batch: the templated prompts with the target (labels); and where each row's
    activation is read (rows, pos): the prompt's own tokens."""
    prompts, spans = [], []
    for t in templates:
        text, offset = fill(t, req.prompt)
        try:
            spans.append(subject_tokens(tok, text, req.prompt, offset))
        except UserError:  # the prompt's characters found no token of their own
            spans.append((0, len(tok(text).input_ids)))
        prompts.append(text)
    batch = teacher_batch(tok, prompts, [req.target_new] * len(prompts))
    real_in = torch.zeros(batch.input_ids.shape, dtype=torch.bool)
    for r, (start, end) in enumerate(spans):
        real_in[r, start:end] = True
    return batch, real_in


def routing_loss(act_in: torch.Tensor, act_out: torch.Tensor, hp: WiseHParams) -> torch.Tensor:
    """Eq. 5: mean+(out - in + gamma) + mean+(out - alpha) + mean+(beta - in), mean+ the mean of
    the positive entries (0 where none is)."""

    def mean_pos(t: torch.Tensor) -> torch.Tensor:
        t = F.relu(t)
        return t.sum() / (t > 0).sum().clamp_min(1)

    loss = mean_pos(hp.beta - act_in)
    if len(act_out):
        loss = loss + mean_pos(act_out[:, None] - act_in[None] + hp.gamma)
        loss = loss + mean_pos(act_out - hp.alpha)
    return loss


def _train(model, arch, layer, module, batch, hidden, real_in, negatives, base, idx, hp):
    """SGD on the shard's masked entries (``idx`` of the flat (d_out, d_in) change, from
    ``base``): the target's cross-entropy plus the routing loss, W' kept in W's box. The
    negatives' activations need no forward: their input of the module does not depend on W'."""
    device = hidden.device
    d_out, d_in = base.shape
    flat, idx = base.flatten().to(device), idx.to(device)
    start = flat[idx]
    v = torch.zeros(len(idx), device=device, requires_grad=True)
    seen: dict[str, torch.Tensor] = {}
    silu = hp.routing_fn == "silu"
    with torch.no_grad():  # the main memory's output on each negative (the module's own)
        negatives = [
            (x.float(), real, module(x).float() if silu else None) for x, real in negatives
        ]  # (input, real positions, the main memory's output)

    def side(_m, args, output):  # W' in place of W at every position of every row
        delta = args[0].float() @ seen["change"].T  # (rows, pos, d_out)
        seen["norms"] = shift_norms(delta, output.detach().float() if silu else None)
        return output + delta.to(output.dtype)

    opt = torch.optim.SGD([v], lr=hp.lr)
    steps, previous = 0, float("inf")
    with side_training(model, arch, layer, hidden, module, side):
        while True:
            seen["change"] = change = flat.index_add(0, idx, v).view(d_out, d_in)
            ce = target_nll(model, arch, batch)
            act_in = real_mean(seen["norms"], real_in)
            outs = [activation(x, change, real, base=main) for x, real, main in negatives]
            act_out = torch.cat(outs) if outs else torch.zeros(0, device=device)
            routing = routing_loss(act_in, act_out, hp)
            loss = ce + routing
            value = float(loss.detach())
            if steps == hp.steps or (value <= hp.stop_loss and abs(previous - value) <= 1e-4):
                break
            previous = value
            opt.zero_grad()
            loss.backward()
            opt.step()
            with torch.no_grad():  # every entry of W' within norm_constraint of W
                c = hp.norm_constraint
                v.copy_((start + v).clamp(-c, c) - start)
            steps += 1
    info = {
        "steps": steps,
        "loss": float(ce.detach()),
        "routing_loss": float(routing.detach()),
        "act_in": float(act_in.detach().mean()),
        "act_out": float(act_out.detach().mean()) if len(act_out) else 0.0,
    }
    return v.detach().cpu(), float(act_in.detach().min()), info
