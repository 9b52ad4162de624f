"""MedLaSA: layer-wise scalable adapters (Xu et al., "Editing Factual Knowledge and Explanatory
Ability of Medical Large Language Models", CIKM 2024).

In the order of the paper:

1. **Associate knowledge with layers** — causal tracing (``medit.tracing.trace``) of the edit prompt
   gives, per layer, the mean indirect effect of restoring the MLP / attention output over the
   subject tokens (the association profile).
2. **Scale per layer** — the profile is normalised across layers (min-max, as the paper's code;
   or mean-std) into s_l, and every adapted module of layer l gets
   ``alpha_l = clip(s_l · alpha0, alpha0/2, 2·alpha0)`` (attention projections from the attention
   profile, MLP projections from the MLP profile) and a rank
   ``r_l = clip(ceil(s_l · r0), r0/2, 2·r0)`` from the scores averaged over the edits of the call
   (the paper averages over its dataset), or from each edit's own scores (``rank_mode=knowledge``,
   which the paper describes but its code does not do).
3. **Train** — one LoRA adapter per edit, update (alpha/r)·B·A, Adam for ``steps`` steps on the
   target tokens only (the first target token included: the paper's code masks it out).
4. **Scale at inference** — the paper's code looks each evaluated prompt up in traces computed
   beforehand for every test prompt (an oracle). medit routes any input to its nearest edited
   knowledge instead and switches the adapter off for inputs far from every edit
   (``medit.editors.patching.adapters``); ``routing=oracle`` keeps the paper's protocol.

Edits coexist (batch and sequential editing): each keeps its own adapter, key and scales.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

import torch

from medit.core.arch import ArchSpec, get_arch, get_module
from medit.core.cache import base_weights_sha256
from medit.core.errors import UserError
from medit.core.forward import target_nll
from medit.core.hooks import trainable_only
from medit.core.memory import Component, Shapes, Workload, activations, no_grad_forward, trained
from medit.core.placement import input_device, module_device
from medit.core.text import teacher_batch
from medit.editors.base import Capabilities, Defaults, Editor, HParamError, HParams, check_kinds, hp
from medit.editors.patching.adapters import Adapter, adapters_from, linear_dims, lora_init
from medit.editors.patching.bank import PatchBank
from medit.editors.patching.routing import ROUTING_MODES, RoutingConfig, SequenceRouter
from medit.editors.results import ModuleEdit
from medit.facts.requests import EditRequest
from medit.facts.subject import detect_subject, template_subject
from medit.tracing.run import TRACES_FILE
from medit.tracing.trace import MODES as TRACE_MODES
from medit.tracing.trace import TraceConfig, cached_trace

ATTN_KINDS = ("q", "k", "v", "o", "qkv", "attn_out")
MLP_KINDS = ("gate", "up", "down", "mlp_in", "mlp_out")

#: the paper's presets (Section 5.1 and its code): MedCF and MedFE. ``medcf`` / ``medfe`` take
#: the size-dependent defaults below over the paper's lr; ``paper-medcf`` / ``paper-medfe`` keep
#: every value of the paper at any model size
_MEDCF = {"targets": ("q", "v", "up", "down"), "alpha0": 32.0, "r0": 24, "lr": 1e-5}
_MEDFE = {
    "targets": ("q", "k", "v", "o", "gate", "up", "down"),
    "alpha0": 16.0,
    "r0": 24,
    "lr": 5e-5,
}
#: the paper traces every edit prompt in full and trains its 70 steps; medit's defaults take the
#: association profile from attribution patching and stop once the target loss is below 0.01
#: (the same MedCF validation quality at a fraction of the time: benchmarks/results/README.md)
_PAPER = {"trace_mode": "full", "early_stop_loss": 0.0}
PRESETS: dict[str, dict[str, Any]] = {
    "medcf": _MEDCF,
    "medfe": _MEDFE,
    "paper-medcf": {**_MEDCF, **_PAPER},
    "paper-medfe": {**_MEDFE, **_PAPER},
}
#: the paper's lr (1e-5, tuned on 7B models) under-trains small ones: on SmolLM2-135M it leaves
#: teacher-forced efficacy at 35% on 16 MedCF validation cases; 1e-4 is the smallest lr that
#: completes them (100% efficacy and generality, 88% routed locality;
#: benchmarks/results/medlasa_lr_medcf_valid.json)
DEFAULTS = (
    Defaults(
        {"lr": 1e-4},
        "MedCF validation sweep on SmolLM2-135M: the paper's 1e-5 reaches 35% efficacy",
        max_params=1e9,
    ),
)


@dataclasses.dataclass(frozen=True)
class MedLaSAHParams(HParams):
    preset: str = hp(
        "medcf",
        "the paper's settings for MedCF or MedFE (with the size-dependent lr of `medit methods`); "
        "paper-*: the paper's values at any size; fields set explicitly win",
        choices=tuple(PRESETS),
    )
    targets: tuple[str, ...] = hp(
        PRESETS["medcf"]["targets"], "module kinds adapted in every layer"
    )
    alpha0: float = hp(32.0, "base LoRA alpha, scaled per layer by the association score")
    r0: int = hp(24, "base LoRA rank, scaled per layer by the association score")
    lr: float = hp(1e-5, "Adam learning rate")
    steps: int = hp(70, "Adam steps per edit at most (the paper: 70)")
    early_stop_loss: float = hp(
        0.01, "stop once the target loss is below this; 0: never (the paper's presets)"
    )
    normalisation: str = hp(
        "minmax", "profile normalisation (minmax: the paper's code)", choices=("minmax", "meanstd")
    )
    rank_mode: str = hp(
        "average",
        "ranks from the scores averaged over the edits of one call, or each edit's own",
        choices=("average", "knowledge"),
    )
    adapters: str = hp(
        "per_edit",
        "'per_edit': one adapter per edit; 'shared': one adapter "
        "trained on all edits of a call, each edit's rows scaled by its own alphas",
        choices=("per_edit", "shared"),
    )
    routing: str = hp("nearest", "adapter scale at inference", choices=ROUTING_MODES)
    route_depth: float = hp(0.28, "relative depth of the layer representing a prompt for routing")
    gate_on: float = hp(0.75, "similarity to an edit's key from which its adapter is fully on")
    gate_off: float = hp(0.65, "similarity at or below which an adapter is off")
    gate_on_unmentioned: float = hp(0.9, "gate_on for inputs that do not mention the subject")
    gate_off_unmentioned: float = hp(0.8, "gate_off for inputs that do not mention the subject")
    trace_mode: str = hp(
        "fast",
        "association profile from causal tracing: fast (attribution patching: one forward and "
        "backward) or full (every restoration run, the paper's)",
        choices=TRACE_MODES,
    )
    trace_answer: str = hp("ground_truth", "answer traced", choices=("ground_truth", "predicted"))
    traces: str = hp(
        "",
        "a `medit trace` run directory whose profiles are used for the prompts "
        "it traced (others are traced here)",
    )

    PRESETS: ClassVar[dict[str, dict[str, Any]]] = PRESETS
    NO_DEFAULTS: ClassVar[tuple[str, ...]] = ("paper-medcf", "paper-medfe")
    DEFAULTS: ClassVar[tuple[Defaults, ...]] = DEFAULTS

    def __post_init__(self):
        super().__post_init__()
        self._at_least(1, "steps", "r0")
        self._positive("lr", "alpha0")
        if not self.targets:
            raise HParamError("targets", ": give at least one module kind")
        self._within("route_depth", 0.0, 1.0)
        for off, on in (("gate_off", "gate_on"), ("gate_off_unmentioned", "gate_on_unmentioned")):
            self._within(on, -1.0, 1.0)
            self._within(off, -1.0, 1.0)
            if not getattr(self, off) < getattr(self, on):
                raise HParamError(
                    off, f"must be < {on} ({getattr(self, on)}), got {getattr(self, off)}"
                )
        self.routing_config()

    def check_arch(self, arch: ArchSpec, n_layers: int | None) -> None:
        for kind in check_kinds("targets", self.targets, arch, fused=True):
            try:
                trace_kind(kind)
            except ValueError as exc:
                raise HParamError("targets", f": {exc}") from None

    def routing_config(self) -> RoutingConfig:
        return RoutingConfig(
            self.routing,
            self.route_depth,
            self.gate_on,
            self.gate_off,
            self.gate_on_unmentioned,
            self.gate_off_unmentioned,
        )


# -- 1. association profiles ---------------------------------------------------------------------
def run_profiles(path: str, weights_sha256: str | None) -> dict[tuple, dict[str, list[float]]]:
    """Association profiles of a ``medit trace`` run directory (or its traces.json), keyed by
    (prompt, subject) and (prompt, None); refuses traces of other weights."""
    file = Path(path) / TRACES_FILE if Path(path).is_dir() else Path(path)
    if not file.is_file():
        raise UserError(f"traces={path}: no {TRACES_FILE} there (write one with `medit trace`)")
    doc = json.loads(file.read_text(encoding="utf-8"))
    sha = doc.get("provenance", {}).get("model", {}).get("weights_sha256")
    if weights_sha256 and sha and sha != weights_sha256:
        raise UserError(
            f"traces={path} were made for other weights (sha256 {sha[:12]}..., "
            f"this model {weights_sha256[:12]}...)"
        )
    out = {}
    for item in doc.get("traces", []):
        profile = item.get("profile", {})
        if not {"mlp", "attn"} <= set(profile):
            continue  # medlasa needs both kinds
        out[(item["prompt"], item["subject"])] = profile
        out.setdefault((item["prompt"], None), profile)
    return out


def _profile(
    model, tok, arch, prompt: str, subject: str | None, answer: str | None, hp: MedLaSAHParams
) -> dict[str, list[float]]:
    if not subject:
        try:
            subject = detect_subject(prompt)
        except (ValueError, ImportError):  # no medical term found (or no spaCy)
            subject = prompt.strip()  # the whole prompt is corrupted
    # the profile reads the subject tokens only: the other cells are not run
    config = TraceConfig(kinds=("mlp", "attn"), mode=hp.trace_mode, subject_only=True)
    sha = base_weights_sha256(model)
    with torch.no_grad():
        t = cached_trace(model, tok, arch, prompt, subject, answer, config, None, sha)
    return t.profile()


# -- 2. scales -----------------------------------------------------------------------------------
def normalise_profile(values: list[float], how: str = "minmax") -> list[float]:
    """Association scores across layers -> s_l. ``minmax``: (p - min) / (max - min), in [0, 1].
    ``meanstd``: 1 + (p - mean) / (2·std), so the mean layer gets alpha0 and ±2 std reach the
    clip bounds."""
    t = torch.tensor(values, dtype=torch.float64)
    if how == "minmax":
        span = (t.max() - t.min()).item()
        return [1.0] * len(values) if span == 0 else ((t - t.min()) / span).tolist()
    std = t.std(unbiased=False).item()
    return [1.0] * len(values) if std == 0 else (1 + (t - t.mean()) / (2 * std)).tolist()


def layer_alphas(scores: list[float], alpha0: float) -> list[float]:
    """alpha_l = clip(s_l · alpha0, alpha0 / 2, 2 · alpha0)."""
    return [min(max(s * alpha0, alpha0 / 2), 2 * alpha0) for s in scores]


def layer_ranks(scores: list[float], r0: int) -> list[int]:
    """r_l = clip(ceil(s_l · r0), r0 / 2, 2 · r0)."""
    low = max(1, math.ceil(r0 / 2))
    return [min(max(math.ceil(s * r0 - 1e-9), low), 2 * r0) for s in scores]


def trace_kind(kind: str) -> str:
    if kind in ATTN_KINDS:
        return "attn"
    if kind in MLP_KINDS:
        return "mlp"
    raise UserError(
        f"medlasa cannot scale module kind {kind!r}: use attention ({', '.join(ATTN_KINDS)}) "
        f"or MLP ({', '.join(MLP_KINDS)}) projections"
    )


def module_plan(
    arch: ArchSpec,
    n_layers: int,
    targets,
    scores: dict[str, list[float]],
    rank_scores: dict[str, list[float]],
    hp: MedLaSAHParams,
) -> dict[str, tuple[float, int]]:
    """Module name -> (alpha, rank) for one edit."""
    plan = {}
    for kind in targets:
        tk = trace_kind(kind)
        alphas = layer_alphas(scores[tk], hp.alpha0)
        ranks = layer_ranks(rank_scores[tk], hp.r0)
        for layer in range(n_layers):
            plan[arch.layer_path(layer, kind)] = (alphas[layer], ranks[layer])
    return plan


# -- 3. training ---------------------------------------------------------------------------------
def train_adapter(
    model: Any,
    tok: Any,
    arch: ArchSpec,
    req: EditRequest,
    plan: dict[str, tuple[float, int]],
    hp: MedLaSAHParams,
) -> tuple[Adapter, dict]:
    """One LoRA adapter trained on one request with fixed per-module scales alpha/r."""
    adapters, diag = train_adapters(model, tok, arch, [req], [plan], hp)
    return adapters[0], diag


def train_adapters(
    model: Any,
    tok: Any,
    arch: ArchSpec,
    reqs: Sequence[EditRequest],
    plans: Sequence[dict[str, tuple[float, int]]],
    hp: MedLaSAHParams,
) -> tuple[list[Adapter], dict]:
    """One LoRA adapter (A, B per module) trained on all ``reqs`` together. Request i's rows are
    scaled by its own alpha/r (``plans[i]``) and use only the first r_i of the module's rank
    dimensions (the maximum over the plans; the paper's per-knowledge rank as a mask). Returns
    one :class:`Adapter` per request, each holding views of the shared A and B cut to its rank,
    with its own scales."""
    ref = input_device(model)  # small per-row tensors; each A, B lives on its module's device
    ranks = {name: max(p[name][1] for p in plans) for name in plans[0]}
    A, B, handles = {}, {}, []
    scales = [{n: alpha / r for n, (alpha, r) in p.items()} for p in plans]
    coeff = {n: torch.tensor([s[n] for s in scales], device=ref).view(-1, 1, 1) for n in ranks}
    # rank dimensions beyond r_i masked per row; only where some edit's rank is below the maximum
    own = {n: torch.tensor([p[n][1] for p in plans], device=ref) for n in ranks}
    mask = {
        n: (torch.arange(r, device=ref) < own[n][:, None]).float()[:, None, :]
        for n, r in ranks.items()
        if bool((own[n] < r).any())
    }
    # the initialisation depends on the requests and the global seed only, not on how many
    # edits came before: a resumed sequential run trains exactly what an uninterrupted one does
    blob = f"{torch.initial_seed()}|" + "|".join(f"{q.prompt}|{q.target_new}" for q in reqs)
    gen = torch.Generator().manual_seed(int(hashlib.sha256(blob.encode()).hexdigest()[:15], 16))
    for name, r in ranks.items():
        module = get_module(model, name)
        n_in, n_out = linear_dims(module, arch.conv1d)
        A[name], B[name] = lora_init(r, n_in, n_out, module_device(module), torch.float32, gen)
        A[name].requires_grad_(True)
        B[name].requires_grad_(True)

        def hook(_m, args, out, n=name):
            low = args[0].float() @ A[n].T
            if n in mask:
                low = low * mask[n].to(low.device)
            return out + (low @ B[n].T * coeff[n].to(out.device)).to(out.dtype)

        handles.append(module.register_forward_hook(hook))
    batch = teacher_batch(tok, [q.prompt for q in reqs], [q.target_new for q in reqs])
    batch = batch.to(ref)
    opt = torch.optim.Adam([*A.values(), *B.values()], lr=hp.lr)
    losses, t0 = [], time.perf_counter()
    try:
        with torch.enable_grad(), trainable_only(model, []):  # only A and B get gradients
            for _ in range(hp.steps):
                loss = target_nll(model, arch, batch)
                losses.append(loss.item())
                if loss.item() < hp.early_stop_loss:
                    break
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
    finally:
        for h in handles:
            h.remove()
    A = {n: a.detach() for n, a in A.items()}
    B = {n: b.detach() for n, b in B.items()}
    adapters = [
        Adapter(
            edit_id=q.id,
            prompt=q.prompt,
            subject=q.subject or "",
            A={n: a[: p[n][1]] for n, a in A.items()},
            B={n: b[:, : p[n][1]] for n, b in B.items()},
            scale=s,
        )
        for q, p, s in zip(reqs, plans, scales, strict=True)
    ]
    diag = {
        "requests": [q.id for q in reqs],
        "losses": losses,
        "steps": len(losses),
        "train_seconds": time.perf_counter() - t0,
    }
    return adapters, diag


# -- the editor ----------------------------------------------------------------------------------
class MedLaSA(Editor):
    name = "medlasa"
    hparams_class = MedLaSAHParams
    capabilities = Capabilities(batch=True)
    summary = "layer-wise scalable LoRA adapters from causal tracing, routed per input (MedLaSA)"

    def edited_modules(self, hp: MedLaSAHParams, arch: ArchSpec, n_layers: int) -> tuple[str, ...]:
        """The target projections of every layer (each layer gets an adapter, scaled by its
        association score)."""
        kinds = arch.resolve_kinds(hp.targets)
        return tuple(arch.layer_path(layer, k) for layer in range(n_layers) for k in kinds)

    def memory_plan(self, hp: MedLaSAHParams, config: Any, work: Workload) -> list[Component]:
        """One adapter per edit in every layer (rank up to 2 x r0: counted at 2 x r0), float32,
        with gradients and Adam moments; activations through every layer; the causal tracing
        forwards (``max_batch_tokens``) before training."""
        s = Shapes.of(config)
        dims = [s.linear(k) for k in get_arch(config).resolve_kinds(hp.targets)]
        adapters = work.edits * s.layers * sum(2 * hp.r0 * (i + o) for i, o in dims)
        trace = TraceConfig(kinds=("mlp", "attn"), mode=hp.trace_mode, subject_only=True)
        if hp.trace_mode == "fast":  # one forward + backward of the clean and k corrupted rows
            tracing = dataclasses.replace(
                activations(s, work, trace.samples + 1, s.layers, step="trace"),
                name="causal tracing (attribution: forward + backward)",
            )
        else:  # restoration rows: 2 kinds x layers x k per token, up to the batch budget
            rows = min(trace.max_batch_tokens // work.seq_len, 2 * s.layers * trace.samples)
            tracing = no_grad_forward(
                s, work, max(1, rows), work.seq_len, "causal tracing", "trace", False
            )
        return [
            *trained(f"{work.edits} x {s.layers}-layer adapters", adapters),
            activations(s, work, work.edits, s.layers),
            tracing,
        ]

    def _apply(
        self, model: Any, tok: Any, requests: list[EditRequest], hp: MedLaSAHParams, prior=None
    ) -> ModuleEdit:
        arch = get_arch(model)
        n_layers = arch.n_layers(model)
        bank = self._bank(model, tok, arch, hp)
        with bank.disabled():  # 1-3 run on the base model
            profiles = [self._scores(model, tok, arch, r, hp) for r in requests]
            average = {
                k: torch.tensor([p[k] for p in profiles]).mean(0).tolist() for k in ("attn", "mlp")
            }
            plans = [
                module_plan(
                    arch,
                    n_layers,
                    arch.resolve_kinds(hp.targets),
                    scores,
                    scores if hp.rank_mode == "knowledge" else average,
                    hp,
                )
                for scores in profiles
            ]
            if hp.adapters == "shared":
                adapters, diag = train_adapters(model, tok, arch, requests, plans, hp)
                diags = [diag]
            else:
                trained = [
                    train_adapter(model, tok, arch, req, plan, hp)
                    for req, plan in zip(requests, plans, strict=True)
                ]
                adapters, diags = [a for a, _ in trained], [d for _, d in trained]
            for adapter, scores, plan in zip(adapters, profiles, plans, strict=True):
                adapter.info = {
                    "scores": scores,
                    "alpha_rank": {n: list(v) for n, v in plan.items()},
                }
        bank.add(*adapters)  # 4: routed per input from now on
        result = ModuleEdit(self.name, hp, bank, adapters)
        result.diagnostics += diags
        return result

    def _bank(self, model, tok, arch, hp: MedLaSAHParams) -> PatchBank:
        """The model's patch bank, routed by a :class:`SequenceRouter` (oracle mode: the
        prompt's own trace gives its scales)."""

        def router(bank: PatchBank) -> SequenceRouter:
            def oracle(prompt: str) -> dict[str, float]:
                edits = [(a.prompt, a.subject) for a in bank.patches]
                return self._oracle_alphas(model, tok, arch, prompt, hp, edits)

            return SequenceRouter(bank, tok, hp.routing_config(), oracle_scales=oracle)

        return PatchBank.of(model, arch, make_router=router)

    @classmethod
    def load(cls, model: Any, tok: Any, manifest: dict, tensors: dict) -> ModuleEdit:
        """The adapters of a MedLaSA artifact installed on ``model`` with their routing."""
        arch = get_arch(model)
        device = input_device(model)
        hp = cls.hparams_class.from_dict(manifest["hparams"])
        bank = cls()._bank(model, tok, arch, hp)
        router = bank.router
        if "center" in tensors and router._center is None:
            router._center = tensors["center"].to(device)
            router._token_stats = (
                tensors["token_mean"].to(device),
                tensors["token_std"].to(device),
            )
        adapters = adapters_from(manifest, tensors, device)
        bank.add(*adapters)
        return ModuleEdit(manifest["method"], hp, bank, adapters)

    def _scores(
        self, model, tok, arch, req: EditRequest, hp: MedLaSAHParams
    ) -> dict[str, list[float]]:
        """Normalised association scores of a request's prompt (step 1 and 2)."""
        answer = req.ground_truth if hp.trace_answer == "ground_truth" else None
        profile = None
        if hp.traces:  # a `medit trace` run (whatever answer it traced) wins where it has one
            runs = run_profiles(hp.traces, base_weights_sha256(model))
            profile = runs.get((req.prompt, req.subject)) or runs.get((req.prompt, None))
        if profile is None:
            profile = _profile(model, tok, arch, req.prompt, req.subject, answer, hp)
        return {k: normalise_profile(profile[k], hp.normalisation) for k in ("attn", "mlp")}

    def _oracle_alphas(
        self,
        model,
        tok,
        arch,
        prompt: str,
        hp: MedLaSAHParams,
        edits: Sequence[tuple[str, str]] = (),
    ) -> dict[str, float]:
        """The paper's inference scales: the prompt's own trace -> alpha per module. The subject
        corrupted is an edited subject the prompt mentions, else the one its template shares
        with an edit prompt (``edits``: (prompt, subject) pairs), else a detected one."""
        low = prompt.lower()
        subject = next((s for _, s in edits if s and s.lower() in low), None)
        if subject is not None:
            start = low.index(subject.lower())
            subject = prompt[start : start + len(subject)]
        else:
            subject = template_subject(prompt, edits)
        profile = _profile(model, tok, arch, prompt, subject, None, hp)
        scores = {k: normalise_profile(profile[k], hp.normalisation) for k in ("attn", "mlp")}
        out = {}
        for kind in arch.resolve_kinds(hp.targets):
            alphas = layer_alphas(scores[trace_kind(kind)], hp.alpha0)
            for layer, alpha in enumerate(alphas):
                out[arch.layer_path(layer, kind)] = alpha
        return out
