"""A text model's prompt cache on disk, so that a model scaled to zero comes back warm.

Before a replica goes (eviction, idle TTL, admin unload) its prompt cache is saved: one
mlx-lm `.safetensors` file per entry, the entry's tokens in the file's metadata. The next
load of the model reads back the most recent entries that fit its in-memory budget (and
the memory the controller lets it hold). Each
model version has its own folder (the model's name and a digest of its files' names, sizes
and times), so a changed model never reads a stale cache. A file's modification time is
when its entry was last used, as far as a save can tell; the disk bound, shared by all
models, removes the least recently used files first.

Everything here runs on the replica's MLX thread.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from policies.prompt_store import StoredFile, to_delete, to_restore
from policies.logs import module_logger

logger = module_logger(__name__)

# Entry files are named after a digest of their tokens; an interrupted save leaves the
# hidden name it writes to first. Nothing else in the folder is ever touched.
_ENTRY = re.compile(r"^\.?[0-9a-f]{32}\.safetensors$")
# Modification times one save gives its entries, oldest to newest, to keep their LRU order.
_ORDER_STEP_SECONDS = 0.001


@dataclass(frozen=True)
class SaveReport:
    entries: int  # this model's entries on disk after the save
    written: int  # of which written by this save (the others were there already)
    written_bytes: int
    left_out: int  # entries not saved: out of time, or beyond the disk bound
    deleted: int  # files of any model the disk bound removed
    seconds: float


@dataclass(frozen=True)
class RestoreReport:
    entries: int
    bytes: int
    unreadable: int  # files that failed to load (and were removed)
    seconds: float


def model_key(name: str, path: str) -> str:
    """`name` and a digest of the model's path and its files' names, sizes and times."""
    source = Path(path)
    digest = hashlib.sha256(str(source.resolve()).encode())
    for file in sorted(source.iterdir()) if source.is_dir() else [source]:
        if file.is_file():
            stat = file.stat()
            digest.update(f"{file.name}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    return f"{name}-{digest.hexdigest()[:16]}"


def cache_entries(prompt_cache: Any) -> list[tuple[list[int], list[Any]]]:
    """An mlx-lm `LRUPromptCache`'s entries (tokens, KV cache), least recently used first.

    mlx-lm has no public way to list them, so this reads its private LRU order (`_lru`)
    and trie (`_trie`), as of mlx-lm 0.32; nothing else does. The engine files every entry
    under one cache type, so the per-type queues joined keep the order. Only the base
    model's entries (filed under None): a LoRA adapter's stay in memory.
    """
    return [
        (tokens, prompt_cache._trie.get(model, tokens).prompt_cache)
        for queue in prompt_cache._lru._lrus.values()
        for model, tokens in queue
        if model is None
    ]


def _entry_name(tokens: list[int]) -> str:
    return hashlib.sha256(json.dumps(tokens).encode()).hexdigest()[:32] + ".safetensors"


def _stored(paths: list[Path]) -> list[StoredFile]:
    stored = []
    for path in paths:
        if not _ENTRY.match(path.name):
            continue
        try:
            stat = path.stat()
        except FileNotFoundError:  # another model's save removed it just now
            continue
        stored.append(StoredFile(str(path), stat.st_size, stat.st_mtime))
    return stored


class PromptStore:
    def __init__(self, root: Path, key: str, disk_bytes: int):
        self.root = root
        self.directory = root / key
        self.disk_bytes = disk_bytes

    def save(self, prompt_cache: Any, deadline: float) -> SaveReport:
        """Save the cache's entries, newest first, until `deadline` (time.monotonic()) or
        the disk bound; then drop this model's files of entries no longer cached, and the
        least recently used files of all models beyond the bound."""
        from mlx_lm.models.cache import save_prompt_cache

        started = time.perf_counter()
        entries = cache_entries(prompt_cache)
        self.directory.mkdir(parents=True, exist_ok=True)
        now = time.time()
        kept: set[str] = set()
        kept_bytes = written = written_bytes = 0
        for age, (tokens, cache) in enumerate(reversed(entries)):
            path = self.directory / _entry_name(tokens)
            if not path.exists():
                if time.monotonic() > deadline or kept_bytes + sum(c.nbytes for c in cache) > self.disk_bytes:
                    continue
                partial = path.with_name(f".{path.name}")
                save_prompt_cache(str(partial), cache, {"tokens": json.dumps(tokens)})
                os.replace(partial, path)
                written += 1
                written_bytes += path.stat().st_size
            used = now - age * _ORDER_STEP_SECONDS
            try:
                os.utime(path, (used, used))
                kept_bytes += path.stat().st_size
            except FileNotFoundError:  # another model's save removed it for the disk bound
                continue
            kept.add(path.name)
        for stale in _stored(list(self.directory.iterdir())):
            if Path(stale.path).name not in kept:
                Path(stale.path).unlink(missing_ok=True)
        doomed = to_delete(_stored(list(self.root.glob("*/*.safetensors"))), self.disk_bytes)
        for stored in doomed:
            Path(stored.path).unlink(missing_ok=True)
        return SaveReport(
            entries=len(self._committed()),
            written=written,
            written_bytes=written_bytes,
            left_out=len(entries) - len(kept),
            deleted=len(doomed),
            seconds=time.perf_counter() - started,
        )

    def restorable(self, budget_bytes: int, max_entries: int) -> list[StoredFile]:
        """The most recent saved entries that fit a prompt cache this large, oldest first."""
        return to_restore(self._committed(), budget_bytes, max_entries)

    def restore(self, prompt_cache: Any, files: list[StoredFile]) -> RestoreReport:
        """Read `files` (from `restorable`) into an empty prompt cache, in their order."""
        import mlx.core as mx
        from mlx_lm.models.cache import load_prompt_cache

        started = time.perf_counter()
        restored = restored_bytes = unreadable = 0
        for stored in files:
            try:
                cache, metadata = load_prompt_cache(stored.path, return_metadata=True)
                tokens = json.loads(metadata["tokens"])
                mx.eval([c.state for c in cache])  # read the file now, not at the first request
            except Exception as error:  # a file another version wrote, or a damaged one
                logger.warning("prompt cache file %s is unreadable (%r); removing it", stored.path, error)
                Path(stored.path).unlink(missing_ok=True)
                unreadable += 1
                continue
            prompt_cache.insert_cache(None, tokens, cache)
            restored += 1
            restored_bytes += sum(c.nbytes for c in cache)
        return RestoreReport(restored, restored_bytes, unreadable, time.perf_counter() - started)

    def _committed(self) -> list[StoredFile]:
        """This model's saved entries (not the leftovers of an interrupted save)."""
        if not self.directory.is_dir():
            return []
        return [s for s in _stored(list(self.directory.iterdir())) if not Path(s.path).name.startswith(".")]
