"""Which saved prompt caches to keep on disk and which to load back: least recently used
goes first, both within the disk bound shared by all models and within a replica's
in-memory prompt cache budget."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class StoredFile:
    """One saved prompt cache entry (or a leftover of an interrupted save)."""

    path: str
    size: int  # bytes on disk
    used: float  # when its entry was last used, as a timestamp (files carry it as mtime)


def to_delete(files: list[StoredFile], limit_bytes: int) -> list[StoredFile]:
    """The least recently used files whose removal brings the rest within `limit_bytes`."""
    total = sum(f.size for f in files)
    doomed: list[StoredFile] = []
    for stored in sorted(files, key=lambda f: f.used):
        if total <= limit_bytes:
            break
        doomed.append(stored)
        total -= stored.size
    return doomed


def to_restore(files: list[StoredFile], budget_bytes: int, max_entries: int) -> list[StoredFile]:
    """The most recently used files that fit in `budget_bytes` (at most `max_entries`),
    oldest first: inserted in that order, a prompt cache keeps their LRU order."""
    chosen: list[StoredFile] = []
    total = 0
    for stored in sorted(files, key=lambda f: f.used, reverse=True):
        if len(chosen) == max_entries:
            break
        # An older, smaller entry may still fit where a newer, larger one did not.
        if total + stored.size <= budget_bytes:
            chosen.append(stored)
            total += stored.size
    return chosen[::-1]
