"""GRACE (Hartvigsen et al., "Aging with GRACE: Lifelong Model Editing with Discrete Key-Value
Adaptors", NeurIPS 2023): a codebook wrapped around one layer, one entry per edit.

The wrapped module is one decoder layer's MLP output projection (``mlp_out``: ``down_proj`` on
Llama, GRACE's choice for Llama-shaped models). Each entry holds a key (the module's input for
the edit's prompt), a radius and a value (an output of the module). In a forward pass each
position's query is compared with the keys; where the nearest key lies within its radius the
module's output at that position is replaced by the entry's value; everywhere else the output is
the base model's, bit for bit.

1. **key** — ``key="last"`` (the paper's): the module's input at the prompt's last token; at
   inference every position is a query. ``key="subject"``: the mean of the module's input over
   the subject's tokens; at inference every window of the entry's subject length is a query,
   and the value replaces the output at the window's last token (the edit then sits in the KV
   cache for the rest of the sequence).
2. **codebook rules** (GRACE's, when an edit arrives; d* is the distance to the nearest key of
   the same width, r its radius, r0 the new entry's initial radius):
   - no key, or d* > r0 + r: a **new** entry with radius r0;
   - d* <= r0 + r and another answer: **split** - the new entry gets radius d*/2 and the
     neighbour's radius shrinks to d*/2 - 1e-5;
   - d* <= r0 + r and the same answer (the target's token ids): **expand** - the neighbour's
     radius grows to d* (coverage) and its value is trained further on the new prompt.
   ``radius="fixed"`` makes r0 the paper's ``eps``; ``radius="corpus"`` learns it per entry:
   ``radius_alpha`` times the distance from the key to the nearest query of unrelated text
   (the model's generated corpus, :mod:`medit.editors.patching.negatives`).
3. **value** — trained with Adam (paper: lr 1.0, 100 steps) so that the prompt continues with
   the target when the value replaces the output at the key's position; starting from the
   module's own output there (``value_init="warm"``) or uniform noise (``"cold"``, the paper's).

Entries are immutable: a split or an expand is recorded in the *new* edit's entry (the radius
it gives its neighbour; the neighbour it takes over), and the bank derives the codebook from the
entries in the order they were added (:meth:`GraceEntry.arrange`). So removing an edit undoes
exactly what it did to older entries, and a sequence checkpoints one entry per edit.

Memory: one key (d_in floats) and one value (d_out floats) per edit: 8.4 KB on SmolLM2-135M
(1536 + 576 float32).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from medit.core.arch import ArchSpec, get_arch, get_module
from medit.core.forward import target_nll
from medit.core.hooks import layer_states, side_training
from medit.core.memory import Component, Shapes, Workload, activations, no_grad_forward, trained
from medit.core.placement import input_device
from medit.core.text import teacher_batch
from medit.editors.base import Capabilities, Defaults, Editor, HParams, check_layers, hp
from medit.editors.patching.bank import Patch, PatchBank, patch_site
from medit.editors.patching.negatives import CorpusSample, corpus_inputs
from medit.editors.results import ModuleEdit
from medit.facts.requests import EditRequest
from medit.facts.subject import request_subjects, subject_tokens

SPLIT_MARGIN = 1e-5  #: GRACE's gap between the radii of two split entries


@dataclasses.dataclass(frozen=True)
class GraceHParams(HParams):
    layer: int = hp(-1, "decoder layer whose mlp_out is wrapped; -1: the layer at layer_depth")
    layer_depth: float = hp(0.4, "relative depth of the default layer (0 first, 1 last)")
    key: str = hp(
        "subject",
        "the query: the prompt's last token, or the subject's tokens",
        ("last", "subject"),
    )
    radius: str = hp(
        "corpus",
        "initial radius: the fixed eps, or learned from unrelated text",
        ("fixed", "corpus"),
    )
    eps: float = hp(1.0, "initial radius (Euclidean) with radius=fixed (the paper's eps)")
    radius_alpha: float = hp(
        0.5, "radius=corpus: this fraction of the distance to the nearest unrelated query"
    )
    radius_texts: int = hp(200, "radius=corpus: corpus texts whose queries are the negatives")
    steps: int = hp(100, "Adam steps of a value (the paper's n_iter)")
    lr: float = hp(1.0, "Adam learning rate of a value (the paper's edit_lr)")
    stop_loss: float = hp(1e-2, "stop training a value once the target loss is below (0: never)")
    value_init: str = hp(
        "warm", "a value starts from the module's output or uniform noise", ("warm", "cold")
    )

    preset: str = hp(
        "default",
        "default: the key and radius measured best on MedCF validation; paper: GRACE's own "
        "(last-token key, eps 1.0, cold values, every step run, EasyEdit's depth)",
        ("default", "paper"),
    )

    PRESETS = {
        "default": {},
        "paper": {
            "key": "last",
            "radius": "fixed",
            "eps": 1.0,
            "value_init": "cold",
            "stop_loss": 0.0,
            "layer_depth": 0.87,
        },
    }
    NO_DEFAULTS = ("paper",)
    #: the subject key's paraphrase hits are highest with the least locality cost at 0.4 of the
    #: depth (benchmarks/results/grace_keys_medcf_valid.json); the paper's depth (layer 27 of
    #: LLaMA-7B's 32, EasyEdit) is its preset's
    DEFAULTS = (
        Defaults({"layer_depth": 0.4}, "MedCF validation: bench_grace_keys.py and sequential runs"),
    )

    def __post_init__(self):
        super().__post_init__()
        self._at_least(1, "steps", "radius_texts")
        self._at_least(0, "stop_loss")
        self._positive("eps", "lr", "radius_alpha")
        self._within("layer_depth", 0.0, 1.0)

    def check_arch(self, arch: ArchSpec, n_layers: int | None) -> None:
        if self.layer >= 0:
            check_layers("layer", self.layer, n_layers)

    def resolve_layer(self, n_layers: int) -> int:
        return self.layer if self.layer >= 0 else round(self.layer_depth * (n_layers - 1))


# -- the codebook --------------------------------------------------------------------------------
def window_queries(x: torch.Tensor, width: int) -> torch.Tensor:
    """(batch, pos - width + 1, d) means of ``x`` (batch, pos, d) over each window of ``width``
    positions; window t ends at position t + width - 1. Width 1 is ``x`` itself (float32)."""
    x = x.float()
    return x if width == 1 else x.unfold(1, width, 1).mean(-1)


@dataclasses.dataclass
class _Book:
    """The effective codebook of one module: the visible entries' keys, radii and widths."""

    members: tuple[int, ...]  #: id() of the patches it was arranged from
    slots: list[int]  #: for each visible entry, its index among the patches
    keys: torch.Tensor  #: (E, d_in)
    radii: torch.Tensor  #: (E,)
    widths: list[int]


@dataclasses.dataclass(eq=False)
class GraceEntry(Patch):
    """One edit's codebook entry (or, for an expand, the neighbour's entry it takes over)."""

    edit_id: str
    module: str
    key: torch.Tensor  #: (d_in,) float32
    value: torch.Tensor  #: (d_out,) float32
    radius: float
    width: int  #: 1: a position's input; k: the mean over a window of k positions
    label: tuple[int, ...]  #: the target's token ids (same answer: expand, else split)
    replaces: tuple[str, ...] = ()  #: expand: the entries (edit ids) this one takes over
    shrinks: dict[str, float] = dataclasses.field(default_factory=dict)  #: split: neighbour radii

    policy = "sum"  # gates pick at most one entry per position: every open entry replaces its own
    mergeable = False  # a replacement where a key matches is no change of the weights

    def __post_init__(self):
        self.effective_radius = self.radius
        self._book: _Book | None = None

    @property
    def modules(self) -> list[str]:
        return [self.module]

    @classmethod
    def arrange(cls, patches, module):
        """The codebook from the entries in order: an entry hides the ones it replaces and
        shrinks the radii of the ones it split from (while they are installed)."""
        live = {p.edit_id: p for p in patches}
        for p in patches:
            p.effective_radius = p.radius
        hidden: set[str] = set()
        for p in patches:
            hidden.update(r for r in p.replaces if r in live)
            for other, r in p.shrinks.items():
                if other in live:
                    live[other].effective_radius = min(live[other].effective_radius, r)
        slots = [i for i, p in enumerate(patches) if p.edit_id not in hidden]
        book = _Book(
            members=tuple(id(p) for p in patches),
            slots=slots,
            keys=torch.stack([patches[i].key for i in slots]) if slots else torch.empty(0),
            radii=torch.tensor([patches[i].effective_radius for i in slots]),
            widths=[patches[i].width for i in slots],
        )
        for p in patches:
            p._book = book

    @classmethod
    def visible(cls, patches) -> list[GraceEntry]:
        """The entries that can act (not taken over by a later expand), in order."""
        book = cls._book_of(patches)
        return [patches[i] for i in book.slots]

    @classmethod
    def _book_of(cls, patches) -> _Book:
        book = patches[0]._book if patches else None
        if book is None or book.members != tuple(id(p) for p in patches):
            cls.arrange(patches, patches[0].module if patches else "")
            book = patches[0]._book
        return book

    @classmethod
    def nearest(cls, book: _Book, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(distance, slot) of the nearest key per (batch, position) of ``x``; a window query
        of width k is scored at its last position (earlier positions: inf, slot -1)."""
        b, n = x.shape[:2]
        best = torch.full((b, n), float("inf"), device=x.device)
        slot = torch.full((b, n), -1, dtype=torch.long, device=x.device)
        keys = book.keys.to(x.device)
        for width in sorted(set(book.widths)):
            if n < width:
                continue
            idx = torch.tensor(
                [j for j, w in enumerate(book.widths) if w == width], device=x.device
            )
            q = window_queries(x, width)  # (b, n - width + 1, d)
            d = torch.cdist(q, keys[idx][None].expand(b, -1, -1))  # (b, n - width + 1, E_w)
            dmin, arg = d.min(-1)
            tail_d, tail_s = best[:, width - 1 :], slot[:, width - 1 :]
            better = dmin < tail_d
            best[:, width - 1 :] = torch.where(better, dmin, tail_d)
            slot[:, width - 1 :] = torch.where(better, idx[arg], tail_s)
        return best, slot

    @classmethod
    def gates(cls, patches, module, x):
        book = cls._book_of(patches)
        out = torch.zeros((len(patches), *x.shape[:2]), device=x.device)
        if not book.slots:
            return out
        dist, slot = cls.nearest(book, x)
        radii = book.radii.to(x.device)
        hit = (slot >= 0) & (dist <= radii[slot.clamp_min(0)])
        hit = cls._one_position_each(hit, dist, slot)
        if bool(hit.any()):
            which = torch.tensor(book.slots, device=x.device)[slot[hit]]
            b, pos = hit.nonzero(as_tuple=True)
            out[which, b, pos] = 1.0
        return out

    @staticmethod
    def _one_position_each(hit, dist, slot) -> torch.Tensor:
        """Per sequence, an entry acts at its nearest position only, as GRACE queries one
        position per sequence: windows that overlap the matching one are close to its key as
        well, and replacing them too would undo what the value was trained for."""
        if not bool(hit.any()):
            return hit
        keep = torch.zeros_like(hit)
        masked = torch.where(hit, dist, torch.full_like(dist, float("inf")))
        for s in slot[hit].unique().tolist():
            mine = torch.where(slot == s, masked, torch.full_like(masked, float("inf")))
            best = mine.argmin(dim=1)  # (batch,)
            rows = mine.gather(1, best[:, None]).squeeze(1).isfinite()
            keep[rows.nonzero().squeeze(1), best[rows]] = True
        return keep

    @classmethod
    def act(cls, patches, module, x, out, gate):
        values = torch.stack([p.value for p in patches])[:, None, :].to(out.device, out.dtype)
        return torch.where(gate[..., None] > 0, values.expand_as(out), out)

    # -- artifacts -------------------------------------------------------------------------------
    def describe(self) -> dict[str, Any]:
        return {
            "id": self.edit_id,
            "module": self.module,
            "radius": self.radius,
            "width": self.width,
            "label": list(self.label),
            "replaces": list(self.replaces),
            "shrinks": self.shrinks,
        }

    @classmethod
    def write_artifact(cls, directory, result, bank, peft: bool = True, **provenance):
        tensors = {}
        for i, e in enumerate(result.patches):
            tensors[f"{i}::key"], tensors[f"{i}::value"] = e.key, e.value
        edits = [e.describe() for e in result.patches]
        return cls.write_edits(directory, result, edits, tensors, **provenance)

    @classmethod
    def read(cls, manifest: dict, tensors: dict) -> list[GraceEntry]:
        return [
            cls(
                e["id"],
                e["module"],
                tensors[f"{i}::key"].float(),
                tensors[f"{i}::value"].float(),
                float(e["radius"]),
                int(e["width"]),
                tuple(e["label"]),
                tuple(e["replaces"]),
                {k: float(v) for k, v in e["shrinks"].items()},
            )
            for i, e in enumerate(manifest["edits"])
        ]


def place(entry: GraceEntry, near: list[GraceEntry]) -> tuple[str, torch.Tensor | None]:
    """GRACE's rules for a new ``entry`` (its key is the query, its radius r0) among the visible
    entries ``near`` of the same width: "new", "split" (the entry records the neighbour's
    shrunk radius) or "expand" (the entry takes the neighbour over: its key, a radius grown to
    the distance); returns the rule and the value training starts from (the neighbour's, on an
    expand)."""
    if not near:
        return "new", None
    keys = torch.stack([p.key for p in near])
    d = (keys - entry.key).norm(dim=-1)
    j = int(d.argmin())
    d_star, other = float(d[j]), near[j]
    if d_star > entry.radius + other.effective_radius:
        return "new", None
    if other.label != entry.label:
        entry.radius = d_star / 2
        entry.shrinks = {other.edit_id: d_star / 2 - SPLIT_MARGIN}
        return "split", None
    entry.key = other.key
    entry.radius = max(other.effective_radius, d_star)
    entry.replaces = (*other.replaces, other.edit_id)
    return "expand", other.value


# -- the editor ----------------------------------------------------------------------------------
class GRACE(Editor):
    name = "grace"
    hparams_class = GraceHParams
    capabilities = Capabilities(batch=True)
    summary = "GRACE: a key-value codebook at one MLP output projection, an entry per edit"

    def edited_modules(self, hp: GraceHParams, arch: ArchSpec, n_layers: int) -> tuple[str, ...]:
        return (arch.layer_path(hp.resolve_layer(n_layers), "mlp_out"),)

    def memory_plan(self, hp: GraceHParams, config: Any, work: Workload) -> list[Component]:
        """One entry per edit (a key and a value, float32); per edit, one full forward for the
        key, the value trained with Adam through the layers from the wrapped one up; with
        radius=corpus the unrelated texts' queries (float16, kept) and their forwards."""
        s = Shapes.of(config)
        d_in, d_out = s.linear("mlp_out")
        out = [
            Component("codebook", work.edits * (d_in + d_out) * 4, note=f"{work.edits} entries"),
            no_grad_forward(s, work, 1, work.seq_len, "forward for the key", "key"),
            *[dataclasses.replace(c, step="train") for c in trained("value", d_out)],
            activations(s, work, 1, s.layers - hp.resolve_layer(s.layers)),
        ]
        if hp.radius == "corpus":
            out += [
                Component("unrelated queries", hp.radius_texts * 128 * d_in * 2, note="float16"),
                no_grad_forward(s, work, 16, 128, "unrelated texts' forward", "radius", False),
            ]
        return out

    def _apply(self, model, tok, requests, hp: GraceHParams, prior=None):
        arch, layer, name, bank = patch_site(model, hp)
        subjects = request_subjects(requests) if hp.key == "subject" else [None] * len(requests)

        def make(item):
            req, subject = item
            return self._entry(model, tok, arch, layer, name, bank, req, subject, hp)

        items = list(zip(requests, subjects, strict=True))
        return ModuleEdit.one_by_one(self.name, hp, bank, items, make)

    def _entry(self, model, tok, arch, layer, name, bank, req: EditRequest, subject, hp):
        batch = teacher_batch(tok, [req.prompt], [req.target_new])
        if hp.key == "subject":
            start, end = subject_tokens(tok, req.prompt, subject)
            pos, width = end - 1, end - start
        else:
            pos, width = int(batch.prompt_last[0]), 1
        module = get_module(model, name)
        device = input_device(model)
        batch = batch.to(device)
        with torch.no_grad(), bank.disabled():
            hidden, x, out = layer_states(model, arch, layer, module, batch.input_ids)
        query = window_queries(x, width)[0, pos - width + 1]
        label = tuple(batch.labels.tolist())
        r0 = self._initial_radius(model, tok, name, query, width, hp)
        mine = [p for p in bank.patches if isinstance(p, GraceEntry) and p.module == name]
        near = [p for p in GraceEntry.visible(mine) if p.width == width] if mine else []
        entry = GraceEntry(req.id, name, query.cpu(), torch.empty(0), r0, width, label)
        rule, start_value = place(entry, near)
        if start_value is not None:
            init = start_value.to(device).float()
        elif hp.value_init == "warm":
            init = out[0, pos].float()
        else:
            init = torch.rand(out.shape[-1], device=device)
        value, steps, loss = _train_value(model, arch, layer, module, batch, hidden, pos, init, hp)
        entry.value = value.cpu()
        entry.effective_radius = entry.radius
        return entry, {"rule": rule, "radius": entry.radius, "steps": steps, "loss": loss}

    def _initial_radius(self, model, tok, name, query, width, hp: GraceHParams) -> float:
        if hp.radius == "fixed":
            return hp.eps
        sample = CorpusSample(texts=hp.radius_texts)
        nearest = float("inf")
        for x in corpus_inputs(model, tok, name, sample):
            if len(x) >= width:
                q = window_queries(x[None].to(query.device), width)[0]
                nearest = min(nearest, float((q - query).norm(dim=-1).min()))
        return hp.radius_alpha * nearest

    @classmethod
    def load(cls, model, tok, manifest, tensors):
        bank = PatchBank.of(model, get_arch(model))
        return ModuleEdit.loaded(cls, bank, manifest, GraceEntry.read(manifest, tensors))


def _train_value(model, arch, layer, module, batch, hidden, pos, init, hp: GraceHParams):
    """The module output at ``pos`` that makes the prompt continue with the target: Adam on the
    value alone from ``init``, the layers below ``layer`` replaced by ``hidden``
    (``frozen_prefix``)."""
    value = init.clone().requires_grad_(True)

    def put(_m, _args, output):
        output = output.clone()
        output[:, pos] = value.to(output.dtype)
        return output

    opt = torch.optim.Adam([value], lr=hp.lr)
    steps, loss_value = 0, float("nan")
    with side_training(model, arch, layer, hidden, module, put):
        for _ in range(hp.steps):
            steps += 1
            loss = target_nll(model, arch, batch)
            loss_value = float(loss.detach())
            if loss_value < hp.stop_loss:
                break
            opt.zero_grad()
            loss.backward()
            opt.step()
    return value.detach().float(), steps, loss_value
