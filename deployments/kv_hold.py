"""A text model replica's hold on memory beyond its process: KV for the sequences it runs
and its prompt cache, granted by the controller before a sequence starts.

A sequence reserves its prompt plus `max_tokens` worth of KV before it runs; the replica
asks the controller only when the grant does not cover it (the controller may evict idle
models, wait for busy ones, or answer 503), so back-to-back requests cost no round trip.
When nothing has run for GRANT_LINGER_SECONDS the grant shrinks back to the prompt cache.
"""

from __future__ import annotations

import asyncio
import contextvars
import time
from contextlib import asynccontextmanager
from typing import AsyncIterator, Awaitable, Callable

from policies.errors import ApiError
from policies.kv import KvAsk, Usage
from policies.speculation import SpeculationCounts
from policies.logs import module_logger

logger = module_logger(__name__)

# An idle replica keeps its grant this long for the next request before giving it back.
GRANT_LINGER_SECONDS = 2.0


class KvHold:
    def __init__(
        self,
        ask: Callable[[KvAsk], Awaitable[int | None]],
        prompt_cache_bytes: Callable[[], int],
        shrink_prompt_cache: Callable[[int], Awaitable[None]],
        free_unused: Callable[[], Awaitable[None]],
        wait_seconds: float,
    ):
        # The controller's answer to "hold this many bytes": granted, None (still busy after
        # the patience given), or a 503 (cannot fit; or, on the final ask, waited too long).
        self._ask = ask
        self.wait_seconds = wait_seconds
        self._prompt_cache_bytes = prompt_cache_bytes
        self._shrink_prompt_cache = shrink_prompt_cache
        self._free_unused = free_unused
        self.granted = 0
        self.reserved = 0
        self.sequences = 0
        self._lock = asyncio.Lock()
        self._release: asyncio.TimerHandle | None = None
        self._giving_back: asyncio.Task | None = None

    def usage(self, process_bytes: int | None, kv_bytes_per_token: int, speculation: SpeculationCounts | None) -> Usage:
        return Usage(
            prompt_cache_bytes=self._prompt_cache_bytes(),
            kv_bytes=self.reserved,
            sequences=self.sequences,
            held_bytes=self.granted,
            process_bytes=process_bytes,
            kv_bytes_per_token=kv_bytes_per_token,
            speculation=speculation,
        )

    @asynccontextmanager
    async def reserve(self, kv_bytes: int) -> AsyncIterator[None]:
        """Hold `kv_bytes` for one sequence while it runs."""
        if self._release is not None:
            self._release.cancel()
            self._release = None
        try:
            await self._cover(kv_bytes)
        except BaseException:
            # The request left (or was refused) while asking: the controller may have
            # granted it already.
            self._linger()
            raise
        self.reserved += kv_bytes
        self.sequences += 1
        try:
            yield
        finally:
            self.reserved -= kv_bytes
            self.sequences -= 1
            self._linger()

    async def admit_prompt_cache(self, cache_bytes: int) -> bool:
        """Hold `cache_bytes` more of prompt cache (a saved one read back at load) if they fit
        as things are: a cache is worth no eviction and no wait."""
        async with self._lock:
            try:
                return await self._grant(cache_bytes, 0.0, may_evict=False)
            except ApiError:  # it could not fit at all, or the controller is away
                return False

    def _linger(self) -> None:
        if self.sequences or self._release is not None:
            return
        # In a fresh context: Serve would cancel the call along with the request that ended.
        self._release = asyncio.get_running_loop().call_later(
            GRANT_LINGER_SECONDS, self._start_give_back, context=contextvars.Context()
        )

    def _start_give_back(self) -> None:
        self._release = None
        # Kept: the loop holds only a weak reference to a task.
        self._giving_back = asyncio.ensure_future(self._give_back())

    async def _cover(self, kv_bytes: int) -> None:
        deadline = time.monotonic() + self.wait_seconds
        async with self._lock:
            if self._covered(kv_bytes):
                return
            if await self._grant(kv_bytes, 0.0, may_evict=False):
                return
            # It does not fit as things are. Our own prompt cache is the cheapest room: drop
            # its oldest entries before anything is evicted or waited for (a running
            # sequence's KV is never dropped for a cache).
            await self._shrink_prompt_cache(max(0, self.granted - self.reserved - kv_bytes))
            while not self._covered(kv_bytes):
                # Asked again every second: our own sequences ending make room the
                # controller does not see.
                remaining = deadline - time.monotonic()
                if await self._grant(kv_bytes, min(1.0, max(0.0, remaining)), final=remaining <= 0):
                    return

    def _covered(self, kv_bytes: int) -> bool:
        return self.reserved + kv_bytes + self._prompt_cache_bytes() <= self.granted

    async def _grant(self, kv_bytes: int, patience: float, final: bool = False, may_evict: bool = True) -> bool:
        """Ask to hold enough for the running sequences, the prompt cache and `kv_bytes` more."""
        cache = self._prompt_cache_bytes()
        granted = await self._ask(KvAsk(self.reserved + kv_bytes + cache, kv_bytes + cache, patience, final, may_evict))
        if granted is None:
            return False
        self.granted = granted
        return True

    async def _give_back(self) -> None:
        async with self._lock:
            if self.sequences:
                return
            # Buffers of finished sequences go back to the system before their grant does.
            await self._free_unused()
            if self._prompt_cache_bytes() != self.granted:
                try:
                    await self._grant(0, 0.0)
                except Exception as error:  # the controller is restarting: the next time
                    logger.info("could not give back KV memory yet: %r", error)
