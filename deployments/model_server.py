"""What every model deployment shares: cheap start, explicit load/unload, one MLX thread.

MLX streams are thread-local, so every MLX call of a replica (load, generate, free) runs on
one dedicated worker thread; the asyncio loop only waits for it. That keeps the replica
answering health checks and queueing concurrent requests while a generation runs.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, AsyncIterator, Callable, Iterator

import psutil

from policies.config import AppConfig, ModelEntry

logger = logging.getLogger("ray.serve")


@dataclass
class LoadReport:
    model: str
    seconds: float
    weights_bytes: int  # MLX memory the weights took (active-memory delta)
    process_bytes: int  # resident memory of the whole replica process after load
    process_before_bytes: int  # the same before loading
    reserved_bytes: int = 0  # what the server may still grow into (its prompt cache budget)

    @property
    def bytes(self) -> int:
        """What the model costs: its process, weights included, and what it may grow into.

        On the CPU backend the weights are in the process's resident memory; Metal buffers
        may not be, so the weights are also added to the process size before loading.
        """
        measured = max(self.process_bytes, self.process_before_bytes + self.weights_bytes)
        return measured + self.reserved_bytes


class ModelServer:
    """Base of the per-type deployment classes. Subclasses implement `_load` and `_loaded`."""

    def __init__(self, entry: ModelEntry, config: AppConfig):
        # Models are local files or the local hub cache; nothing downloads unless the operator
        # allowed it. Set before mlx-lm (and so huggingface_hub) is imported, on first load.
        os.environ["HF_HUB_OFFLINE"] = "0" if config.allow_download else "1"
        self.entry = entry
        self._mlx = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"mlx-{entry.deployment}")
        self._load_lock = asyncio.Lock()
        self._report: LoadReport | None = None
        self.reserved_bytes = 0

    # -- lifecycle ----------------------------------------------------------------------------

    async def load(self) -> LoadReport:
        """Load the weights (idempotent) and report what they cost."""
        async with self._load_lock:
            if self._report is None:
                logger.info("loading model %s from %s", self.entry.id, self.entry.path)
                self._report = await self.run_mlx(self._load_measured)
                logger.info(
                    "loaded model %s in %.2f s: weights %.1f MB, process %.1f MB",
                    self.entry.id,
                    self._report.seconds,
                    self._report.weights_bytes / 1e6,
                    self._report.process_bytes / 1e6,
                )
            return self._report

    async def unload(self) -> None:
        async with self._load_lock:
            if self._report is not None:
                await self.run_mlx(self._free)
                self._report = None
                logger.info("unloaded model %s", self.entry.id)

    def report(self) -> LoadReport | None:
        """What the loaded weights cost, or None when nothing is loaded (controller restarts)."""
        return self._report

    # -- helpers for subclasses ---------------------------------------------------------------

    async def run_mlx(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._mlx, fn, *args)

    async def iterate_mlx(self, make_iterator: Callable[[], Iterator[Any]]) -> AsyncIterator[Any]:
        """Run a blocking iterator on the MLX thread and yield its items here as they come.

        When the consumer stops early (client gone), the iterator is closed on its thread
        before the next item, so an abandoned generation stops spending compute.
        """
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        cancelled = False
        done = object()

        def produce() -> None:
            iterator = None
            try:
                iterator = make_iterator()
                for item in iterator:
                    if cancelled:
                        break
                    loop.call_soon_threadsafe(queue.put_nowait, (item, None))
            except BaseException as error:  # re-raised on the consumer's side
                loop.call_soon_threadsafe(queue.put_nowait, (done, error))
                return
            finally:
                close = getattr(iterator, "close", None)
                if close:
                    close()
            loop.call_soon_threadsafe(queue.put_nowait, (done, None))

        future = loop.run_in_executor(self._mlx, produce)
        try:
            while True:
                item, error = await queue.get()
                if error is not None:
                    raise error
                if item is done:
                    break
                yield item
        finally:
            cancelled = True
            await asyncio.shield(future)

    def require_loaded(self) -> None:
        if self._report is None:
            raise RuntimeError(f"model {self.entry.id} is not loaded; acquire it first")

    # -- to implement -------------------------------------------------------------------------

    def _load(self) -> None:
        raise NotImplementedError

    def _release_weights(self) -> None:
        raise NotImplementedError

    # -- internals (MLX thread) ---------------------------------------------------------------

    def _load_measured(self) -> LoadReport:
        import mlx.core as mx

        process = psutil.Process()
        started = time.perf_counter()
        rss_before = process.memory_info().rss
        before = mx.get_active_memory()
        self._load()
        return LoadReport(
            model=self.entry.id,
            seconds=time.perf_counter() - started,
            weights_bytes=max(0, mx.get_active_memory() - before),
            process_bytes=process.memory_info().rss,
            process_before_bytes=rss_before,
            reserved_bytes=self.reserved_bytes,
        )

    def _free(self) -> None:
        import mlx.core as mx

        self._release_weights()
        # MLX keeps freed buffers in its cache: without clear_cache unload frees nothing.
        gc.collect()
        mx.clear_cache()
