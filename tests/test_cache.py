"""The one content-keyed cache (medit.core.cache)."""

from __future__ import annotations

import pytest
import torch

from medit.core.cache import Cache, base_weights_sha256, clear_memory, mark_base_weights


@pytest.fixture(autouse=True)
def _own_cache(tmp_path, monkeypatch):
    """Each test starts from an empty cache folder (``make`` points $MEDIT_CACHE at a lasting one)."""
    monkeypatch.setenv("MEDIT_CACHE", str(tmp_path / "cache"))
    clear_memory()


def test_key_covers_name_version_and_parts():
    a, b = Cache("t-key", 1), Cache("t-key", 2)
    assert a.key("w", 1) == a.key("w", 1)
    assert a.key("w", 1) != b.key("w", 1)  # a new format version never reads old entries
    assert a.key("w", 1) != a.key("w", 2)
    assert a.key({"x": 1, "y": 2}) == a.key({"y": 2, "x": 1})


def test_json_values_round_trip_on_disk_atomically():
    cache = Cache("t-json", 1)
    key = cache.key("content")
    assert cache.get(key) is None
    cache.put(key, {"texts": ["a", "b"]})
    assert cache.get(key) == {"texts": ["a", "b"]}
    # only the value is there: no temporary file is left beside it
    assert [p.name for p in cache.root.iterdir()] == [cache.path(key).name]


def test_unreadable_entry_is_recomputed_not_trusted():
    cache = Cache("t-broken", 1)
    key = cache.key("content")
    cache.path(key).parent.mkdir(parents=True, exist_ok=True)
    cache.path(key).write_text('{"truncated": ')
    assert cache.get_or_compute(key, lambda: {"fresh": True}) == {"fresh": True}
    assert cache.get(key) == {"fresh": True}


def test_no_key_computes_without_storing():
    cache = Cache("t-none", 1)
    calls = []
    for _ in range(2):
        cache.get_or_compute(None, lambda: calls.append(1) or [1])
    assert len(calls) == 2
    assert not cache.root.exists()


def test_tensor_values_and_the_memory_layer():
    cache = Cache("t-tensors", 1, kind="tensors", memory=True)
    key = cache.key("c")
    value = {"sum": torch.randn(3, 3, dtype=torch.float64), "count": torch.tensor([7])}
    cache.put(key, value)
    assert cache.get(key) is value  # from memory
    clear_memory()
    got = cache.get(key)  # from disk
    assert got is not value and torch.equal(got["sum"], value["sum"])


def test_memory_only_cache_writes_nothing():
    cache = Cache("t-memory", 1, kind="memory")
    key = cache.key("c")
    assert cache.get_or_compute(key, lambda: (3, [0.5])) == (3, [0.5])
    assert cache.get(key) == (3, [0.5])
    assert not cache.root.exists()
    clear_memory()
    assert cache.get(key) is None


def test_base_weights_hash_is_read_in_one_place():
    model = torch.nn.Linear(2, 2)
    assert base_weights_sha256(model) is None  # not loaded by medit: nothing is cached
    mark_base_weights(model, "abc")
    assert base_weights_sha256(model) == "abc"
