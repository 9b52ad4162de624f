"""The same seed and inputs give bit-identical edits on CPU, per editor and architecture.

Each run gets a fresh model (built from the same seeded config) and a cache directory of its own,
and medit's in-process caches are emptied, so that everything an edit depends on — the context
templates and covariance corpus sampled from the model, the second moments, the causal traces —
is computed in both runs rather than read back from the first one. The per-method settings are
the contract's tuning table for tiny models (``tests/test_editors.py``) with fewer steps:
determinism does not need converged edits.
"""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from medit.core.cache import clear_memory
from medit.editors.registry import METHODS
from medit.runner import set_seed
from tests.conftest import _tiny
from tests.test_editors import _edit_tensors, _make, _reqs

#: fewer optimisation steps (and a smaller generated corpus, fewer traced prompts) than the
#: defaults; AdaLoRA still reallocates its rank budget (at steps 2, 4 and 6)
FAST = {
    "ft-l": {"steps": 4},
    "ft-m": {"steps": 4},
    "lora": {"steps": 4},
    "adalora": {"steps": 10, "tinit": 2, "tfinal": 3, "delta_t": 2},
    "medlasa": {"steps": 4},
    "rome": {"v_steps": 4, "trace_prompts": 2, "cov_samples_per_prompt": 1, "cov_new_tokens": 16},
    "memit": {"v_steps": 4, "cov_samples_per_prompt": 1, "cov_new_tokens": 16},
    "alphaedit": {"v_steps": 4, "cov_samples_per_prompt": 1, "cov_new_tokens": 16},
    "grace": {"steps": 4},
    "tpatcher": {"steps": 4, "memory_texts": 20},
    "ultraedit": {"iters": 2},
    "wise": {"steps": 10, "templates": 1},
    "scen": {"expert_steps": 4, "neuron_steps": 20, "negative_texts": 20},
    "mend": {},  # untrained: one gradient step through identity networks
    "serac": {},  # untrained scope classifier; the edit is its memory entry
}
#: editors whose result depends on the global seed: LoRA's and AdaLoRA's adapter initialisation
#: and LoRA dropout (peft, global RNG), MedLaSA's initialisation (a generator seeded from
#: ``torch.initial_seed()``). The others use no randomness but fixed-seed sampling of their
#: templates and corpus, in a forked RNG.
SEEDED = {"lora", "adalora", "medlasa"}
PROBES = ["The hormone insulin is produced by the", "The heart has four chambers and"]


def _cases():
    # every editor passes the contract on both tiny architectures (tests/test_editors.py)
    return [(m, a) for m in METHODS for a in ("llama", "gpt2")]


def _edit(method, arch, tok, seed, cache: Path, monkeypatch) -> dict:
    """Apply ``method``'s edit to a fresh tiny model with its own, empty cache; return what the
    edit produced: every weight, the edited tensors, adapters, editor state, probe logits, and
    the cache files the run wrote."""
    monkeypatch.setenv("MEDIT_CACHE", str(cache))
    clear_memory()  # templates, second moments, projectors, ROME's traced layer
    model = _tiny(arch, len(tok))
    # the edit prompts too: a codebook leaves every other input bit-identical
    prompts = PROBES + [r.prompt for r in _reqs(method)]
    probes = tok(prompts, return_tensors="pt", padding=True)
    with torch.no_grad():
        before = model(**probes).logits
    set_seed(seed)
    result = _make(method, **FAST[method]).apply(model, tok, _reqs(method))
    with torch.no_grad():
        logits = model(**probes).logits
    assert not torch.equal(logits, before), "the edit left the outputs unchanged"
    out = {
        "weights": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "edited": _edit_tensors(result),
        "state": dict(result.editor_state),
        "logits": logits,
        "cache": _cache_files(cache),
    }
    if result.method == "medlasa":  # its adapters, with their routing keys and scales
        out["adapters"] = [
            {
                **{f"A:{m}": a.A[m] for m in a.A},
                **{f"B:{m}": a.B[m] for m in a.B},
                "key": a.key,
                "scale": a.scale,
            }
            for a in result.patches
        ]
    return out


def _cache_files(root: Path) -> dict[str, object]:
    """Relative path -> content of each cache file (tensors, JSON without timings, or bytes)."""
    out: dict[str, object] = {}
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        name = str(path.relative_to(root))
        if path.suffix == ".safetensors":
            out[name] = load_file(str(path))
        elif path.suffix == ".json":
            doc = json.loads(path.read_text("utf-8"))
            if isinstance(doc, dict):
                doc.pop("seconds", None)  # a trace's wall time
            out[name] = doc
        else:
            out[name] = path.read_bytes()
    return out


def _same(a, b) -> bool:
    """Bit-identical: tensors by ``torch.equal`` (same dtype and shape), containers by item."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return (
            isinstance(a, torch.Tensor)
            and isinstance(b, torch.Tensor)
            and a.dtype == b.dtype
            and torch.equal(a, b)
        )
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    return a == b


def _differences(first: dict, second: dict) -> list[str]:
    return [k for k in first if not _same(first[k], second[k])]


@pytest.mark.parametrize(("method", "arch"), _cases())
def test_same_seed_gives_bit_identical_edits(method, arch, tokenizer, tmp_path, monkeypatch):
    runs = [
        _edit(method, arch, tokenizer, 7, tmp_path / f"cache-{i}", monkeypatch) for i in range(2)
    ]
    assert runs[0]["edited"], "the edit touched no tensor"
    if method in ("rome", "memit", "alphaedit", "medlasa"):
        # both runs computed their templates / corpus / second moments / traces themselves
        kinds = {Path(name).parts[0] for name in runs[0]["cache"]}
        expected = {"traces"} if method == "medlasa" else {"templates", "corpora", "covariance"}
        assert expected <= kinds, sorted(runs[0]["cache"])
    assert not _differences(runs[0], runs[1]), _differences(runs[0], runs[1])


@pytest.mark.parametrize(("method", "arch"), _cases())
def test_another_seed_changes_exactly_the_seeded_editors(
    method, arch, tokenizer, tmp_path, monkeypatch
):
    runs = [
        _edit(method, arch, tokenizer, seed, tmp_path / f"cache-{seed}", monkeypatch)
        for seed in (0, 1)
    ]
    differ = _differences(runs[0], runs[1])
    if method in SEEDED:
        assert {"edited", "weights" if method != "medlasa" else "adapters", "logits"} <= set(differ)
        assert "cache" not in differ  # what the edit reads from the base model is seed-free
    else:
        assert not differ, differ
