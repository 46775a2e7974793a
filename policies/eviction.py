"""Which loaded models to unload so that another one fits, or why it cannot fit."""

from __future__ import annotations

from dataclasses import dataclass

from policies.memory import format_gb


@dataclass(frozen=True)
class Resident:
    """A model that holds memory now (loaded or loading), as the planner sees it."""

    id: str
    bytes: int
    last_used: float
    pinned: bool = False
    in_flight: int = 0
    loading: bool = False
    adapter_of: str | None = None  # a LoRA adapter of this base: evicted before it at a tie

    @property
    def evictable(self) -> bool:
        return not (self.pinned or self.in_flight or self.loading)


@dataclass(frozen=True)
class Evict:
    """Unload these models, least recently used first; then the new model fits."""

    victims: tuple[str, ...]


@dataclass(frozen=True)
class Insufficient:
    """Even after unloading every candidate the model does not fit."""

    need: int
    available: int
    node: str | None = None  # where it came closest, when the fleet has several nodes

    @property
    def message(self) -> str:
        where = f" on node {self.node}" if self.node else ""
        return f"need {format_gb(self.need)}, only {format_gb(self.available)} available after eviction{where}"


def headroom(residents: list[Resident], limit: int, os_available: int | None = None) -> int:
    """Bytes a new model may take now: the budget left, but never more than the OS has free."""
    free = limit - sum(r.bytes for r in residents)
    return free if os_available is None else min(free, os_available)


def plan(
    residents: list[Resident], need: int, limit: int, os_available: int | None = None
) -> Evict | Insufficient:
    """Evict least-recently-used idle, unpinned models until `need` bytes fit.

    `os_available` is what the operating system reports free: memory other programs use
    counts against us too. Evicting a model frees its bytes in both accounts.
    """
    room = headroom(residents, limit, os_available)
    victims: list[str] = []
    for resident in sorted((r for r in residents if r.evictable), key=lambda r: (r.last_used, r.adapter_of is None)):
        if room >= need:
            break
        victims.append(resident.id)
        room += resident.bytes
    if room >= need:
        return Evict(tuple(victims))
    return Insufficient(need=need, available=max(0, room))
