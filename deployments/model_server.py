"""What every model deployment shares: cheap start, explicit load, leased requests, one MLX
thread.

MLX streams are thread-local, so every MLX call of a replica (load, generate) runs on
one dedicated worker thread; the asyncio loop only waits for it. That keeps the replica
answering health checks and queueing concurrent requests while a generation runs.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections import Counter
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Callable, Iterator, Literal

import psutil
import ray
from ray import serve

from deployments import warm_workers
from deployments.logs import refusals_in_one_line
from policies.config import AppConfig, ModelEntry
from policies.kv import Usage
from policies.ledger import Measured
from policies.logs import module_logger

logger = module_logger(__name__)


@dataclass
class LoadReport:
    model: str
    seconds: float
    weights_bytes: int  # MLX memory the weights took (active-memory delta)
    process_bytes: int  # resident memory of the whole replica process after load
    process_before_bytes: int  # the same before loading
    replica: str = ""  # the replica that loaded it
    usage: Usage | None = None  # what a text model holds beyond its process, right after load
    warm_worker: bool = False  # the replica started in a warm worker (deployments.warm_workers)
    runtime_env: str = ""  # the replica's runtime env as Ray serialized it

    @property
    def bytes(self) -> int:
        """What the loaded model costs before any request: its process, weights included.

        On the CPU backend the weights are in the process's resident memory; Metal buffers
        may not be, so the weights are also added to the process size before loading.
        """
        return max(self.process_bytes, self.process_before_bytes + self.weights_bytes)

    def measured(self) -> Measured:
        return Measured(self.bytes, self.weights_bytes, self.process_bytes, self.replica)


@dataclass
class ReplicaState:
    """What a replica tells a controller that (re)starts, or checks on it."""

    weights: Literal["none", "loading", "loaded"]
    report: LoadReport | None
    leases: list[str]  # leases of the requests this replica is serving now
    usage: Usage | None = None  # what a text model holds beyond its process
    adapters: dict[str, int] = field(default_factory=dict)  # LoRA adapters loaded: {id: bytes}


class ModelServer:
    """Base of the per-type deployment classes. Subclasses implement `_load` (MLX thread).

    Every request names the lease the controller granted for it. A replica that Serve
    started in place of a dead one has no weights: the first leased request loads them
    (the ledger still charges the model, so the memory is accounted for).
    """

    def __init__(self, entry: ModelEntry, config: AppConfig):
        # Models are local files or the local hub cache; nothing downloads unless the operator
        # allowed it. Set before mlx-lm (and so huggingface_hub) is imported, on first load.
        os.environ["HF_HUB_OFFLINE"] = "0" if config.allow_download else "1"
        from deployments import mlx_runtime  # before any MLX import: it chooses MLX's BLAS

        refusals_in_one_line()
        self.blas = mlx_runtime.BLAS
        self.entry = entry
        self._mlx = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"mlx-{entry.deployment}")
        self._load_lock = asyncio.Lock()
        self._report: LoadReport | None = None
        self._leases: Counter[str] = Counter()
        self._process_start_bytes = psutil.Process().memory_info().rss
        self.replica = serve.get_replica_context().replica_id.unique_id
        self.warm_worker = warm_workers.prestarted()
        # A replica runs only when the controller wants the model loaded (or Serve replaced
        # one that was): the weights start loading as soon as the constructor (a subclass's
        # too) is done, while Serve still marks the replica running and tells the
        # controller; `load` waits for them.
        self._weights: Future[LoadReport] | None = None
        asyncio.get_running_loop().call_soon(self._begin_loading)

    # -- lifecycle ----------------------------------------------------------------------------

    async def load(self) -> LoadReport:
        """Load the weights (idempotent) and report what they cost."""
        async with self._load_lock:
            if self._report is None:
                self._begin_loading()
                weights, self._weights = self._weights, None  # a failed load is tried afresh
                report = await asyncio.wrap_future(weights)
                logger.info(
                    "loaded model %s in %.2f s%s: weights %.1f MB, process %.1f MB, BLAS %s",
                    self.entry.id,
                    report.seconds,
                    " (in a warm worker)" if self.warm_worker else "",
                    report.weights_bytes / 1e6,
                    report.process_bytes / 1e6,
                    self.blas or "bundled",
                )
                self._report = await self._after_load(report)
            return self._report

    def state(self) -> ReplicaState:
        if self._report is not None:
            weights = "loaded"
        else:
            loading = self._load_lock.locked() or (self._weights is not None and not self._weights.done())
            weights = "loading" if loading else "none"
        return ReplicaState(weights, self._report, list(self._leases), self.usage())

    def usage(self) -> Usage | None:
        return None

    def resident_bytes(self) -> int:
        """The process's memory now: resident pages, or on Metal, what MLX holds on top of
        the process as it started (GPU buffers may not count as resident)."""
        import mlx.core as mx

        mlx_bytes = mx.get_active_memory() + mx.get_cache_memory()
        return max(psutil.Process().memory_info().rss, self._process_start_bytes + mlx_bytes)

    @asynccontextmanager
    async def serving(self, lease_id: str) -> AsyncIterator[None]:
        """Count a leased request as running here; load the weights if this replica has none."""
        self._leases[lease_id] += 1
        try:
            if self._report is None:
                logger.warning(
                    "model %s: a leased request found this replica without weights "
                    "(it replaced one that died); loading them",
                    self.entry.id,
                )
                await self.load()
            yield
        finally:
            self._leases[lease_id] -= 1
            if not self._leases[lease_id]:
                del self._leases[lease_id]

    def _begin_loading(self) -> None:
        if self._weights is None and self._report is None:
            self._weights = self._mlx.submit(self._load_measured)

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

    # -- to implement -------------------------------------------------------------------------

    def _load(self) -> None:
        raise NotImplementedError

    async def _after_load(self, report: LoadReport) -> LoadReport:
        """What the load still does once the weights are in (measured without it), before
        the model counts as loaded; the report as it stands then."""
        return report

    # -- internals (MLX thread) ---------------------------------------------------------------

    def _load_measured(self) -> LoadReport:
        import mlx.core as mx

        logger.info("loading model %s from %s", self.entry.id, self.entry.path)
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
            replica=self.replica,
            usage=self.usage(),
            warm_worker=self.warm_worker,
            runtime_env=ray.get_runtime_context().get_runtime_env_string(),
        )
