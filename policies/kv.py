"""What a sequence's KV cache costs, and what a text model's replica holds beyond its weights.

A replica measures its model's `KvShape` once at load (the bytes one more token adds to
each layer's cache, and the window of sliding-window layers), so every family, dtype and
cache type is sized by what mlx-lm really allocates rather than by a formula per family.
"""

from __future__ import annotations

from dataclasses import dataclass

from policies.speculation import SpeculationCounts

# mlx-lm's KVCache grows its buffers by this many tokens at a time.
KV_STEP_TOKENS = 256


@dataclass(frozen=True)
class KvShape:
    """Per layer: bytes one token adds to its cache, and the most tokens it keeps (None: all)."""

    layers: tuple[tuple[int, int | None], ...]

    def bytes_for(self, tokens: int) -> int:
        """KV bytes of one sequence of `tokens` tokens, rounded up to whole growth steps."""
        allocated = -(-max(tokens, 0) // KV_STEP_TOKENS) * KV_STEP_TOKENS
        return sum(
            per_token * (allocated if window is None else min(allocated, window))
            for per_token, window in self.layers
        )

    @property
    def bytes_per_token(self) -> int:
        """Bytes a token adds to a sequence shorter than every window."""
        return sum(per_token for per_token, _ in self.layers)


@dataclass(frozen=True)
class KvAsk:
    """A text model's replica asking the controller to hold memory beyond its process: KV
    for the sequences it runs and is about to run, and its prompt cache."""

    held: int  # bytes to hold in all (a shrink is granted at once)
    alone: int  # what it would need for the new sequence once its others are done
    patience: float = 0.0  # seconds the controller may wait for busy models before answering None
    final: bool = False  # the last ask: still waiting is a refusal (503), not None
    may_evict: bool = True  # False: only what fits as things are (a saved cache is worth no eviction)


@dataclass(frozen=True)
class Usage:
    """What a text model's replica holds beyond its process, and what its decoding
    speculated, as it reports it."""

    prompt_cache_bytes: int = 0  # KV caches of finished requests kept for their next turn
    kv_bytes: int = 0  # KV reserved for the sequences running now (prompt + max_tokens each)
    sequences: int = 0
    held_bytes: int = 0  # what the controller granted: covers the two above
    process_bytes: int | None = None  # the process without those, when last measured idle
    kv_bytes_per_token: int = 0  # what a token adds to a sequence (shorter than any window)
    speculation: SpeculationCounts | None = None  # None: the model does not speculate
