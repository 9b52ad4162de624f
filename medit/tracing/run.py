"""The ``medit trace`` run directory: trace requests (or one prompt), write ``traces.json``
(schema ``medit.traces/1``: per prompt the grids, probabilities, subject span, association
profile and peak layers; the set's association profile) and one standalone SVG heatmap per
prompt. Written atomically: a failed run leaves nothing behind."""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from medit.core import results as R
from medit.core.errors import UserError
from medit.core.fs import atomic_dir, atomic_write_text, check_out
from medit.core.models import load_model
from medit.facts.requests import EditRequest, load_requests
from medit.facts.subject import request_subjects
from medit.tracing.heatmap import trace_svg
from medit.tracing.trace import (
    TraceConfig,
    association_profile,
    request_answer,
    trace_requests,
)

TRACES_FILE = "traces.json"
RUN_SCHEMA = "medit.traces/1"


@dataclasses.dataclass(frozen=True)
class TraceRunConfig:
    out: str  #: run directory to write (traces.json + one SVG heatmap per prompt)
    model: str = "builtin:smollm2"  #: model spec (see medit.core.models)
    requests: str = "builtin"  #: request file, or "builtin"; prompts and subjects are traced
    prompt: str | None = None  #: trace this one prompt instead of a request file
    subject: str | None = None  #: its subject (detected when omitted)
    answer: str = "predicted"  #: predicted | ground_truth | target_new
    trace: TraceConfig = TraceConfig()
    limit: int | None = None  #: trace only the first N requests
    device: str = "auto"
    dtype: str = "auto"
    device_map: str | None = None  #: instead of device: auto | balanced | sequential | FILE.json
    max_memory: str | None = None  #: with device_map: "0=20GiB,cpu=64GiB"
    quantize: str | None = None  #: "8bit" | "4bit": bitsandbytes weights (the head kept)
    use_cache: bool = True  #: reuse traces cached on disk
    overwrite: bool = False  #: replace an existing run directory
    quiet: bool = False  #: no progress bars


def run_trace(cfg: TraceRunConfig) -> dict[str, Any]:
    """Trace the requests' prompts; write ``traces.json`` and the heatmaps; return the JSON."""

    out = check_out(cfg.out, cfg.overwrite, "trace-run")
    if cfg.limit is not None and cfg.limit < 1:
        raise UserError("--limit must be >= 1")
    if cfg.prompt is not None:
        requests = [EditRequest(prompt=cfg.prompt, target_new="", subject=cfg.subject, id="prompt")]
        if cfg.subject is not None and cfg.subject not in cfg.prompt:
            raise UserError(f"--subject {cfg.subject!r} does not occur in --prompt")
    else:
        requests = load_requests(cfg.requests)[: cfg.limit]
    for req in requests:
        request_answer(req, cfg.answer)  # bad input fails before the model loads
    subjects = request_subjects(requests)
    requests = [dataclasses.replace(r, subject=s) for r, s in zip(requests, subjects, strict=True)]
    lm = load_model(
        cfg.model,
        cfg.device,
        cfg.dtype,
        device_map=cfg.device_map,
        max_memory=cfg.max_memory,
        quantize=cfg.quantize,
    )
    traces = trace_requests(lm, requests, cfg.trace, cfg.answer, cfg.use_cache, cfg.quiet)
    config = {**dataclasses.asdict(cfg), "trace": dataclasses.asdict(cfg.trace)}
    items = [
        {
            "id": r.id,
            "svg": f"trace-{i:03d}.svg",
            "profile": t.profile(),
            "peak_layers": t.peak_layers(),
            **t.to_dict(),
        }
        for i, (r, t) in enumerate(zip(requests, traces, strict=True))
    ]
    doc = {
        "schema": RUN_SCHEMA,
        "kind": "trace",
        "config": config,
        "provenance": R.provenance(
            model=lm.provenance(), requests_sha256=None if cfg.prompt else R.file_hash(cfg.requests)
        ),
        "settings": traces[0].settings,
        "association_profile": association_profile(traces),
        "traces": items,
    }
    with atomic_dir(out, "trace-run") as tmp:
        for item, t in zip(items, traces, strict=True):
            atomic_write_text(tmp / item["svg"], trace_svg(t))
        atomic_write_text(tmp / TRACES_FILE, json.dumps(doc, indent=1, ensure_ascii=False))
    return doc
