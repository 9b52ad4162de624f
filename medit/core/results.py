"""The run directory's files and their schema, with provenance for reproduction.

A run directory holds:

* ``results.json`` — :class:`RunResults`: what was run (config), on what (provenance), aggregate
  metrics before and after the edit under both protocols, and what the edit changed;
* ``samples.jsonl`` — one line per request: the request, its pre- and post-edit evaluation states
  (generations, probabilities) and its edit diagnostics;
* ``artifact/`` — the edit artifact (batch and sequential modes), loadable by ``medit generate``.
"""

from __future__ import annotations

import hashlib
import json
import platform
import resource
import shlex
import subprocess
import sys
import time
from collections.abc import Iterable
from importlib import metadata
from pathlib import Path
from typing import Any, TypedDict

from medit.core.errors import UserError

SCHEMA = "medit.results/1"
RESULTS_FILE = "results.json"
SAMPLES_FILE = "samples.jsonl"

_LIBRARIES = ("torch", "transformers", "peft", "safetensors", "accelerate", "numpy", "gguf")


class RunResults(TypedDict):
    schema: str  #: "medit.results/1"
    kind: str  #: "edit"
    config: dict[str, Any]  #: the RunConfig, hparams resolved for the model
    provenance: dict[str, Any]  #: versions, commit, model hash, device, dtype, seed, command
    metrics: dict[str, Any]  #: {"pre": aggregate, "post": aggregate}, each per protocol
    edit: dict[str, Any]  #: method, mode, tensors touched and update norms, timings, memory
    artifact: str | None  #: relative path of the edit artifact, if written
    saved_model: str | None  #: directory of the saved edited model, if asked


def medit_version() -> str:
    try:
        return metadata.version("medit")
    except metadata.PackageNotFoundError:
        return "unknown"


def git_commit() -> str | None:
    """Commit of the medit source tree, with '-dirty' when it has uncommitted changes."""
    root = Path(__file__).resolve().parent.parent
    if not (root / ".git").exists():
        return None
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=root,
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=root,
            capture_output=True,
            text=True,
            timeout=5,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return sha + ("-dirty" if dirty else "")


def library_versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in _LIBRARIES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return out


def command_line() -> str:
    """The command as a shell runs it again: ``medit ...`` (shell-quoted) for the CLI."""
    head = Path(sys.argv[0]).name if sys.argv else ""
    if head in ("medit", "__main__.py"):
        return shlex.join(["medit", *sys.argv[1:]])
    return shlex.join(sys.argv)


def provenance(**extra: Any) -> dict[str, Any]:
    return {
        "medit_version": medit_version(),
        "git_commit": git_commit(),
        "libraries": library_versions(),
        "platform": platform.platform(),
        "command": command_line(),
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        **extra,
    }


def file_hash(path: str | Path) -> str | None:
    p = Path(path)
    return hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else None


def peak_memory_mb(device: Any) -> dict[str, float]:
    """Peak memory so far: GPU allocator peak on CUDA, and the process's peak resident set."""
    out = {"process_peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    if getattr(device, "type", None) == "cuda":
        import torch

        out["cuda_peak_allocated_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
    return out


def jsonl(records: Iterable[dict[str, Any]]) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)


def read_json_object(path: str | Path) -> dict[str, Any]:
    """A JSON file holding an object; a user error naming the file (and line) otherwise."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8-sig"))
    except UnicodeDecodeError:
        raise UserError(f"{path}: not UTF-8 text") from None
    except json.JSONDecodeError as exc:
        raise UserError(f"{path}: invalid JSON at line {exc.lineno}: {exc.msg}") from None
    except OSError as exc:
        raise UserError(f"{path}: cannot read ({exc.strerror or exc})") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def read_results(run_dir: str | Path) -> RunResults:
    path = Path(run_dir) / RESULTS_FILE
    if not path.is_file():
        raise UserError(f"{run_dir} is not a medit run directory (no {RESULTS_FILE})")
    data = read_json_object(path)
    if data.get("schema") != SCHEMA:
        raise UserError(f"{path}: unknown schema {data.get('schema')!r} (expected {SCHEMA})")
    return data


def format_summary(res: dict[str, Any]) -> str:
    """A few lines: before -> after for the headline metrics of each protocol."""
    pre, post = res["metrics"]["pre"], res["metrics"]["post"]
    lines = [
        f"{res['config']['method']} ({res['config']['mode']}), {post['n']} requests, "
        f"{res['edit']['seconds_per_edit']:.2f} s/edit"
    ]
    rows = [
        ("teacher_forced", "efficacy"),
        ("teacher_forced", "generality"),
        ("teacher_forced", "locality_mean"),
        ("generation", "efficacy_contains"),
        ("generation", "generality_contains"),
        ("generation", "locality_mean"),
        ("generation", "fluency"),
    ]
    for proto, key in rows:
        if proto in post and post[proto].get(key) is not None:
            before = pre.get(proto, {}).get(key)
            b = "  -  " if before is None else f"{before:.3f}"
            lines.append(f"  {proto:15s} {key:20s} {b} -> {post[proto][key]:.3f}")
    return "\n".join(lines)


# -- the verdict --------------------------------------------------------------------------------
#: pass-rate thresholds a run is judged against, unless the run declared its own
DEFAULT_THRESHOLDS = {"efficacy": 0.8, "generality": 0.5, "locality": 0.8}
_THRESHOLD_METRICS = {
    "efficacy": ("generation", "efficacy_contains", "generation-based efficacy (target stated)"),
    "generality": (
        "generation",
        "generality_contains",
        "generation-based generality (paraphrases)",
    ),
    "locality": ("generation", "locality_mean", "generation-based locality (probes unchanged)"),
}


def verdict(results: dict[str, Any]) -> dict[str, Any]:
    """Judge an edit run against its declared thresholds (or the defaults)."""
    thresholds = results.get("config", {}).get("thresholds") or DEFAULT_THRESHOLDS
    post = results["metrics"]["post"]
    checks = []
    for key, minimum in thresholds.items():
        if key not in _THRESHOLD_METRICS:
            raise UserError(f"unknown threshold {key!r}; known: {', '.join(_THRESHOLD_METRICS)}")
        protocol, metric, label = _THRESHOLD_METRICS[key]
        value = post.get(protocol, {}).get(metric)
        checks.append(
            {
                "key": key,
                "label": label,
                "value": value,
                "threshold": minimum,
                "passed": value is not None and value >= minimum,
            }
        )
    return {"passed": all(c["passed"] for c in checks), "checks": checks}
