"""``medit plan``: the expected peak memory of an edit per device, from the model's config alone.

No weight is read: the model is built empty (``accelerate.init_empty_weights``), its tensors
counted in the chosen dtype and, with ``--device_map``, placed by accelerate exactly as
``load_model`` would place them (:func:`medit.core.placement.resolve_device_map`, the editor's
modules kept resident). The editor adds what it holds while it edits (``Editor.memory_plan``:
trained tensors, gradients, Adam moments, activations, covariance statistics), the evaluation
its forwards. The peak of a device is its weights plus the larger of the edit's peak (what it
holds throughout plus its largest step) and the evaluation's, on the device the model computes
on (a device map's main device).

:func:`measure_peak` measures the same quantity on a real run (``benchmarks/bench_plan.py``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from medit.core.errors import UserError
from medit.core.memory import Component, Shapes, Workload, evaluation
from medit.core.models import empty_model, load_config, resolve_device, resolve_dtype
from medit.core.placement import main_device, parse_max_memory, resolve_device_map
from medit.editors.registry import make_editor
from medit.facts.requests import EditRequest

log = logging.getLogger(__name__)

GB = 1e9


@dataclasses.dataclass
class MemoryPlan:
    model: str
    method: str
    dtype: str
    compute_device: str  #: where activations and the editor's tensors live
    components: list[Component]
    hparams: dict[str, Any]
    work: Workload

    def peaks(self) -> dict[str, int]:
        """Device -> expected peak bytes."""
        out: dict[str, int] = {}
        for c in self.components:
            if c.phase == "weights":
                out[str(c.device)] = out.get(str(c.device), 0) + c.bytes
        held = sum(c.bytes for c in self.components if c.phase == "edit" and not c.step)
        steps: dict[str, int] = {}
        for c in self.components:
            if c.phase == "edit" and c.step:
                steps[c.step] = steps.get(c.step, 0) + c.bytes
        edit = held + max(steps.values(), default=0)
        ev = sum(c.bytes for c in self.components if c.phase == "eval")
        dev = self.compute_device
        out[dev] = out.get(dev, 0) + max(edit, ev)
        return out

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "method": self.method,
            "dtype": self.dtype,
            "compute_device": self.compute_device,
            "workload": dataclasses.asdict(self.work),
            "hparams": self.hparams,
            "components": [c.to_dict() for c in self.components],
            "peak_bytes": self.peaks(),
        }

    def table(self) -> str:
        """One line per component, then the peak of each device."""
        rows = [f"memory plan: {self.method} on {self.model} ({self.dtype})"]
        rows.append(f"  {'component':<44} {'phase':<14} {'device':<7} {'MB':>10}  how")
        for c in self.components:
            phase = f"{c.phase}:{c.step}" if c.step else c.phase
            dev = str(c.device if c.device is not None else self.compute_device)
            rows.append(
                f"  {c.name[:44]:<44} {phase:<14} {dev:<7} {c.bytes / 2**20:>10.1f}  {c.note}"
            )
        rows.append(self.summary())
        return "\n".join(rows)

    def summary(self) -> str:
        """One line: the expected peak per device."""
        parts = [f"{d}: {b / GB:.2f} GB" for d, b in self.peaks().items()]
        return f"planned peak memory ({self.method}): " + ", ".join(parts)


def plan_memory(
    model: str,
    method: str,
    *,
    hparams: Mapping[str, Any] | None = None,
    device: str = "auto",
    dtype: str = "auto",
    device_map: str | None = None,
    max_memory: str | None = None,
    work: Workload | None = None,
    config: Any = None,
    trust_remote_code: bool = False,
) -> MemoryPlan:
    """The memory plan of editing ``model`` with ``method``; reads the config, never weights."""
    editor = make_editor(method, **dict(hparams or {}))
    config = (
        config if config is not None else load_config(model, trust_remote_code=trust_remote_code)
    )
    editor.check_config(config)
    hp = editor.hparams_for(config)
    dev = resolve_device(device if device_map is None else "cpu")
    torch_dtype = resolve_dtype(dtype, dev, config)
    meta = empty_model(config, torch_dtype, trust_remote_code)
    weights = _weights(meta, dev, device_map, max_memory, editor.resident_modules(config) or ())
    compute = _name(main_device(list(weights))) if device_map else str(dev)
    base = Workload() if work is None else work
    work = dataclasses.replace(base, dtype_bytes=torch.tensor([], dtype=torch_dtype).element_size())
    kind = str(torch_dtype).removeprefix("torch.")
    comps = [
        Component(f"weights ({kind})", n, phase="weights", device=d, note=f"{count:,} values")
        for d, (n, count) in weights.items()
    ]
    comps += editor.memory_plan(hp, config, work)
    comps.append(evaluation(Shapes.of(config), work))
    return MemoryPlan(
        model=model,
        method=method,
        dtype=kind,
        compute_device=compute,
        components=comps,
        hparams=hp.to_dict(),
        work=work,
    )


def _weights(meta, dev, device_map, max_memory, keep) -> dict[Any, tuple[int, int]]:
    """Device -> (bytes, values) of the model's tensors (tied ones once)."""
    tensors: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for name, t in [*meta.named_parameters(), *meta.named_buffers()]:
        if id(t) not in seen:
            seen.add(id(t))
            tensors[name] = t
    if device_map is None:
        return {str(dev): _sum(tensors.values())}
    placed = resolve_device_map(
        device_map, meta, max_memory=parse_max_memory(max_memory), keep_resident=keep
    )
    groups: dict[Any, list[torch.Tensor]] = {}
    for name, t in tensors.items():
        owner = max(
            (k for k in placed if k == "" or name == k or name.startswith(k + ".")), key=len
        )
        groups.setdefault(_name(placed[owner]), []).append(t)
    return {d: _sum(ts) for d, ts in groups.items()}


def _sum(tensors) -> tuple[int, int]:
    tensors = list(tensors)
    return sum(t.numel() * t.element_size() for t in tensors), sum(t.numel() for t in tensors)


def _name(device: Any) -> str:
    return f"cuda:{device}" if isinstance(device, int) else str(device)


# -- fitting -------------------------------------------------------------------------------------
def available_bytes(device: str) -> int | None:
    """Memory free on ``device`` now (None where it cannot be known: disk, mps, no source)."""
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            return None
        index = int(device.partition(":")[2] or 0)
        return int(torch.cuda.mem_get_info(index)[0])
    if device != "cpu":
        return None
    with contextlib.suppress(ImportError):
        import psutil

        return int(psutil.virtual_memory().available)
    meminfo = Path("/proc/meminfo")
    if not meminfo.is_file():
        return None
    for line in meminfo.read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return None


def too_big(plan: MemoryPlan) -> list[tuple[str, int, int]]:
    """(device, planned peak, available) for each device the plan does not fit; a device whose
    free memory is unknown (disk among them) is never refused."""
    out = []
    for device, peak in plan.peaks().items():
        free = available_bytes(device)
        if free is not None and peak > free:
            out.append((device, peak, free))
    return out


def check_fits(plan: MemoryPlan, force: bool = False) -> None:
    """Refuse (a UserError carrying the plan) when the planned peak exceeds a device's free
    memory, unless ``force``."""
    over = too_big(plan)
    if not over:
        return
    what = "; ".join(f"{d} needs {p / GB:.2f} GB, {f / GB:.2f} GB free" for d, p, f in over)
    if force:
        log.warning("the edit may not fit (%s); going on (--force)", what)
        return
    raise UserError(
        f"the edit is not expected to fit: {what}. Pick a device map or dtype that fits "
        f"(medit plan), or pass --force.\n{plan.table()}"
    )


# -- measuring -----------------------------------------------------------------------------------
def measure_peak(fn: Callable[[], Any], device: str = "cpu") -> tuple[int, Any]:
    """(peak bytes allocated by torch while ``fn`` runs, above what was allocated before, and
    fn's result). CPU: the torch profiler's allocation events (every alloc and free, summed in
    time order); CUDA: ``torch.cuda.max_memory_allocated``."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(device)
        start = torch.cuda.memory_allocated(device)
        out = fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated(device) - start, out
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile

    os.environ.setdefault("KINETO_LOG_LEVEL", "5")
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        out = fn()
    events: list[tuple[int, int]] = []
    stack = list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        node = stack.pop()
        if node.tag == _EventType.Allocation and node.extra_fields.device.type == "cpu":
            events.append((node.start_time_ns, node.extra_fields.alloc_size))
        stack.extend(node.children)
    now = peak = 0
    for _, size in sorted(events):
        now += size
        peak = max(peak, now)
    return peak, out


def workload(
    requests: Sequence[EditRequest],
    mode: str,
    batch_size: int,
    count_tokens: Callable[[str], int] | None = None,
    new_tokens: int = 32,
) -> Workload:
    """The workload of an edit run over ``requests``: the longest prompt + target in tokens
    (``count_tokens``; without a tokenizer ~3 characters a token, on the safe side), the
    sequences of one evaluation forward (the batch size, or fewer probes), edits per call."""
    count = count_tokens or (lambda text: len(text) // 3 + 2)
    texts = [r.prompt + " " + r.target_new for r in requests]
    texts += [p + " " + r.target_new for r in requests for p in r.rephrase_prompts]
    texts += [p + " " + a for r in requests for _, p, a in r.locality_probes()]
    probes = sum(1 + len(r.rephrase_prompts) + len(r.locality_probes()) for r in requests)
    return Workload(
        seq_len=max((count(t) for t in texts), default=64),
        batch_size=max(1, min(batch_size, probes)),
        edits=len(requests) if mode == "batch" else 1,
        new_tokens=new_tokens,
        target_len=max((count(r.target_new) for r in requests), default=4),
    )


def measure_edit(
    model: Any,
    tok: Any,
    method: str,
    requests: Sequence[EditRequest],
    hparams: Mapping[str, Any] | None = None,
    mode: str = "single",
    batch_size: int = 32,
) -> dict[str, int]:
    """Bytes measured for what a plan predicts: the model's weights, the peak above them while
    the editor edits (one call: the first request, or all in batch mode), and while the
    evaluation runs; the edit is restored afterwards. Device: the model's input device."""
    from medit.core.arch import get_arch
    from medit.core.placement import input_device
    from medit.evaluation import EvalConfig, evaluate

    arch, device = get_arch(model), str(input_device(model))
    editor = make_editor(method, **dict(hparams or {}))
    call = list(requests) if mode == "batch" else list(requests[:1])
    weights = _sum({id(t): t for t in [*model.parameters(), *model.buffers()]}.values())[0]
    config = EvalConfig(batch_size=batch_size)
    evaluated, _ = measure_peak(lambda: evaluate(model, tok, arch, call, config), device)
    edited, result = measure_peak(lambda: editor.apply(model, tok, call), device)
    result.restore()
    return {
        "weights": weights,
        "edit": edited,
        "eval": evaluated,
        "peak": weights + max(edited, evaluated),
    }
