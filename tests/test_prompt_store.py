"""Prompt caches to disk and back without Ray (deployments/prompt_store.py): entries, their
tokens and their LRU order survive; a damaged file or an interrupted save's leftover does not
get in the way."""

from __future__ import annotations

import time
from pathlib import Path

import mlx.core as mx
from mlx_lm.models.cache import KVCache, LRUPromptCache

from deployments.prompt_store import PromptStore, cache_entries, model_key


def kv_cache(tokens: int, layers: int = 2) -> list[KVCache]:
    cache = []
    for _ in range(layers):
        layer = KVCache()
        layer.update_and_fetch(mx.random.normal((1, 2, tokens, 8)), mx.random.normal((1, 2, tokens, 8)))
        cache.append(layer)
    return cache


def filled(*prompts: list[int]) -> LRUPromptCache:
    prompt_cache = LRUPromptCache(max_size=64, max_bytes=10**9)
    for tokens in prompts:
        prompt_cache.insert_cache(None, tokens, kv_cache(len(tokens)))
    return prompt_cache


def test_entries_come_back_in_their_lru_order(tmp_path: Path):
    prompts = [[1, 2, 3], [7, 8, 9, 10], [4, 5]]
    original = filled(*prompts)
    store = PromptStore(tmp_path, "m-0", disk_bytes=10**9)
    report = store.save(original, deadline=time.monotonic() + 10)
    assert (report.entries, report.written, report.left_out, report.deleted) == (3, 3, 0, 0)

    restored = LRUPromptCache(max_size=64, max_bytes=10**9)
    assert store.restore(restored, store.restorable(10**9, 64)).entries == 3
    assert [tokens for tokens, _ in cache_entries(restored)] == prompts
    for (_, before), (_, after) in zip(cache_entries(original), cache_entries(restored)):
        for a, b in zip(before, after):
            assert a.offset == b.offset and mx.array_equal(a.keys[..., : a.offset, :], b.keys[..., : b.offset, :])

    # Saved again: nothing is written twice; what left the cache leaves the disk.
    original.trim_to(n_sequences=2)
    again = store.save(original, deadline=time.monotonic() + 10)
    assert (again.entries, again.written) == (2, 0)


def test_past_the_deadline_only_what_is_on_disk_stays(tmp_path: Path):
    store = PromptStore(tmp_path, "m-0", disk_bytes=10**9)
    report = store.save(filled([1, 2], [3, 4]), deadline=time.monotonic() - 1)
    assert (report.entries, report.written, report.left_out) == (0, 0, 2)


def test_damaged_files_and_leftovers_are_skipped(tmp_path: Path):
    store = PromptStore(tmp_path, "m-0", disk_bytes=10**9)
    store.save(filled([1, 2, 3], [5, 6]), deadline=time.monotonic() + 10)
    damaged, _ = sorted(store.directory.iterdir())
    damaged.write_bytes(b"not a safetensors file")
    (store.directory / f".{'0' * 32}.safetensors").write_bytes(b"half written")

    restored = LRUPromptCache(max_size=64, max_bytes=10**9)
    report = store.restore(restored, store.restorable(10**9, 64))
    assert (report.entries, report.unreadable) == (1, 1) and not damaged.exists()
    assert len(restored) == 1


def test_the_key_changes_with_the_model_files(tmp_path: Path):
    (tmp_path / "model.safetensors").write_bytes(b"1")
    before = model_key("m", str(tmp_path))
    assert before.startswith("m-") and model_key("m", str(tmp_path)) == before
    (tmp_path / "model.safetensors").write_bytes(b"22")
    assert model_key("m", str(tmp_path)) != before
