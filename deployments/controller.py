"""The memory-aware controller: one deployment that owns which models hold memory.

Every request is bracketed by `acquire(model)` / `release(model)`. Acquire returns once the
model's replica is up with its weights loaded. A load first plans with
`policies.eviction`: least recently used, idle, unpinned models are scaled to zero replicas
(and gone) before the new model's deployment is scaled to one and loads. Concurrent first
requests share one load. When the model cannot fit even after evicting every candidate,
acquire raises 503 `insufficient_memory`.

State is rebuilt from Serve's real replica counts whenever this replica (re)starts.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import Any

import psutil
from ray import serve
from ray.serve.handle import DeploymentHandle
from ray.serve.metrics import Counter, Gauge, Histogram

from deployments.openai_types import ApiError, model_not_found
from deployments.scaler import ReplicaScaler
from policies.config import CONTROLLER_NAME, AppConfig, ModelEntry
from policies.eviction import Insufficient, Resident, headroom, plan
from policies.memory import estimate_model_bytes, format_gb, parse_limit

logger = logging.getLogger("ray.serve")

UNLOADED, LOADING, LOADED, UNLOADING = "unloaded", "loading", "loaded", "unloading"
HOLDS_MEMORY = (LOADING, LOADED, UNLOADING)


@dataclass
class ModelState:
    entry: ModelEntry
    estimated_bytes: int
    pinned: bool
    status: str = UNLOADED
    in_flight: int = 0  # requests between acquire and release
    waiting: int = 0  # acquirers waiting for this model's load
    last_used: float | None = None
    measured_bytes: int | None = None
    weights_bytes: int | None = None
    process_bytes: int | None = None
    loads: int = 0
    evictions: int = 0

    @property
    def cost(self) -> int:
        """Bytes the ledger charges: the override, else the last measurement, else the estimate."""
        if self.entry.memory_bytes is not None:
            return self.entry.memory_bytes
        return self.measured_bytes if self.measured_bytes is not None else self.estimated_bytes

    def resident(self, busy_counts: bool = True) -> Resident:
        return Resident(
            id=self.entry.id,
            bytes=self.cost,
            last_used=self.last_used or 0.0,
            pinned=self.pinned,
            in_flight=(self.in_flight + self.waiting) if busy_counts else 0,
            loading=self.status != LOADED,
        )


def memory_limit_bytes(limit: str | int) -> int:
    """The configured budget; on Apple Silicon never above Metal's recommended working set."""
    budget = parse_limit(limit, psutil.virtual_memory().total)
    try:
        import mlx.core as mx

        if mx.metal.is_available():
            working_set = mx.metal.device_info().get("max_recommended_working_set_size")
            if working_set:
                budget = min(budget, int(working_set))
    except Exception:  # no Metal here: the CPU backend uses ordinary memory
        pass
    return budget


def _metrics() -> dict[str, Any]:
    model = ("model",)
    return {
        "loaded": Gauge("fleet_models_loaded", "Models with weights in memory."),
        "model_bytes": Gauge("fleet_model_bytes", "Bytes the ledger charges a loaded model.", model),
        "budget": Gauge("fleet_memory_budget_bytes", "The memory limit models share."),
        "used": Gauge("fleet_memory_used_bytes", "Bytes held by loaded and loading models."),
        "loads": Counter("fleet_model_loads_total", "Model loads.", model),
        "evictions": Counter(
            "fleet_model_evictions_total", "Models scaled to zero.", ("model", "reason")
        ),
        "load_seconds": Histogram(
            "fleet_model_load_seconds",
            "Seconds from the decision to load to a loaded model.",
            boundaries=[0.5, 1, 2, 5, 10, 30, 60, 120, 300],
            tag_keys=model,
        ),
        "refusals": Counter(
            "fleet_insufficient_memory_total", "Requests answered 503 insufficient_memory.", model
        ),
    }


def _log_failure(task: asyncio.Task) -> None:
    if not task.cancelled() and task.exception() is not None:
        logger.error("controller background task failed", exc_info=task.exception())


@serve.deployment(
    name=CONTROLLER_NAME,
    num_replicas=1,
    # Callers wait here while a model loads: never make them queue behind each other.
    max_ongoing_requests=100_000,
    ray_actor_options={"num_cpus": 0},
    # A dead controller is noticed (and replaced, adopting real state) within seconds.
    health_check_period_s=2,
)
class Controller:
    def __init__(
        self, config: AppConfig, catalog: list[ModelEntry], models: dict[str, DeploymentHandle]
    ):
        self.config = config
        self.models = models
        self.limit = memory_limit_bytes(config.memory_limit)
        self.states = {
            entry.id: ModelState(
                entry=entry,
                estimated_bytes=estimate_model_bytes(
                    entry.path, config.replica_overhead_bytes, entry.memory_bytes
                ),
                pinned=entry.pinned,
            )
            for entry in catalog
        }
        self.scaler = ReplicaScaler(serve.get_replica_context().app_name)
        self.metrics = _metrics()
        self.metrics["budget"].set(self.limit)
        # Signalled whenever memory or business changes: waiters re-check their condition.
        self._changed = asyncio.Condition()
        self._loading: dict[str, asyncio.Task] = {}
        self._unloading: dict[str, asyncio.Task] = {}
        self._ready = asyncio.Event()
        loop = asyncio.get_running_loop()
        self._background = [loop.create_task(self._start()), loop.create_task(self._expire_idle())]
        for task in self._background:
            task.add_done_callback(_log_failure)

    def check_health(self) -> None:
        """Serve restarts this replica when its start failed; the restart adopts real state."""
        for task in self._background:
            if task.done() and not task.cancelled() and task.exception() is not None:
                raise RuntimeError(f"controller task failed: {task.exception()!r}")

    # -- request path -------------------------------------------------------------------------

    async def acquire(self, model_id: str) -> None:
        state = self._state(model_id)
        if state.status != LOADED or not self._ready.is_set():
            state.waiting += 1
            try:
                await self._loaded(state)
            finally:
                state.waiting -= 1
        state.in_flight += 1
        state.last_used = time.time()

    async def release(self, model_id: str) -> None:
        state = self._state(model_id)
        state.in_flight = max(0, state.in_flight - 1)
        state.last_used = time.time()
        await self._notify()

    async def statuses(self) -> dict[str, dict[str, Any]]:
        return {i: {"status": s.status, "pinned": s.pinned} for i, s in self.states.items()}

    # -- admin ----------------------------------------------------------------------------------

    async def admin_view(self) -> dict[str, Any]:
        return {
            "memory_limit_bytes": self.limit,
            "used_bytes": self._used(),
            "available_bytes": max(0, self._headroom()),
            "models": [
                {
                    "id": s.entry.id,
                    "type": s.entry.type,
                    "family": s.entry.family,
                    "status": s.status,
                    "pinned": s.pinned,
                    "memory_bytes": s.cost if s.status in HOLDS_MEMORY else None,
                    "estimated_bytes": s.estimated_bytes,
                    "weights_bytes": s.weights_bytes,
                    "process_bytes": s.process_bytes,
                    "last_used": s.last_used,
                    "in_flight": s.in_flight,
                    "loads": s.loads,
                    "evictions": s.evictions,
                }
                for s in self.states.values()
            ],
        }

    async def preload(self, model_id: str, pin: bool = True) -> None:
        """Load a model now; pinned, it keeps its replica until unloaded through the admin API."""
        state = self._state(model_id)
        was_pinned = state.pinned
        state.pinned = state.pinned or pin
        try:
            await self._loaded(state)
        except BaseException:
            state.pinned = was_pinned
            raise
        state.last_used = time.time()

    async def unload(self, model_id: str) -> None:
        """Unpin and scale to zero, after the requests in flight have finished."""
        state = self._state(model_id)
        state.pinned = False
        await self._ready.wait()
        if model_id in self._loading:
            await asyncio.shield(self._loading[model_id])
        async with self._changed:
            await self._changed.wait_for(lambda: state.in_flight == 0)
            if state.status != LOADED:
                return
            state.status = UNLOADING
        await self._evict(model_id, "admin")

    # -- loading and eviction -------------------------------------------------------------------

    def _state(self, model_id: str) -> ModelState:
        state = self.states.get(model_id)
        if state is None:
            raise model_not_found(model_id)
        return state

    async def _loaded(self, state: ModelState) -> None:
        """Return once the model is loaded, loading it if needed (one load for all callers).

        Loops because a model loaded for us can be evicted again before we resume.
        """
        await self._ready.wait()
        while state.status != LOADED:
            await asyncio.shield(self._single_flight_load(state.entry.id))

    def _single_flight_load(self, model_id: str) -> asyncio.Task:
        task = self._loading.get(model_id)
        if task is None:
            task = asyncio.get_running_loop().create_task(self._load(model_id))
            self._loading[model_id] = task
            task.add_done_callback(lambda _: self._loading.pop(model_id, None))
        return task

    async def _load(self, model_id: str) -> None:
        state = self.states[model_id]
        if model_id in self._unloading:  # an admin unload or an eviction is still running
            await self._unloading[model_id]
        started = time.perf_counter()
        victims = await self._reserve(state)
        if victims:
            await asyncio.gather(*(self._evict(victim, "lru") for victim in victims))
        try:
            await self.scaler.scale_and_wait(state.entry.deployment, 1)
            report = await self.models[model_id].load.remote()
        except Exception as error:
            state.status = UNLOADING
            await self._evict(model_id, "load_failed")
            cause = getattr(error, "cause", error)
            logger.error("loading model %s failed: %r", model_id, cause)
            raise ApiError(
                503,
                f"Model {model_id} failed to load: {type(cause).__name__}: {cause}",
                "model_load_failed",
                param="model",
            ) from None
        seconds = time.perf_counter() - started
        state.measured_bytes = report.bytes
        state.weights_bytes = report.weights_bytes
        state.process_bytes = report.process_bytes
        state.status = LOADED
        state.loads += 1
        state.last_used = time.time()
        self.metrics["loads"].inc(tags={"model": model_id})
        self.metrics["load_seconds"].observe(seconds, tags={"model": model_id})
        logger.info(
            "loaded model %s in %.2f s: charged %s (measured process %s, weights %s); used %s of %s",
            model_id,
            seconds,
            format_gb(state.cost),
            format_gb(report.process_bytes),
            format_gb(report.weights_bytes),
            format_gb(self._used()),
            format_gb(self.limit),
        )
        await self._notify()

    async def _reserve(self, state: ModelState) -> list[str]:
        """Plan room for `state`'s model and claim it; returns the models to evict.

        When only busy models stand in the way, wait for them (up to load_wait_timeout)
        rather than refuse: queue, don't refuse.
        """
        model_id = state.entry.id
        deadline = time.monotonic() + self.config.load_wait_seconds
        async with self._changed:
            while True:
                others = [s for s in self.states.values() if s.status in HOLDS_MEMORY]
                decision = plan(
                    [s.resident() for s in others], state.cost, self.limit, self._os_available()
                )
                if not isinstance(decision, Insufficient):
                    break
                if_idle = plan(
                    [s.resident(busy_counts=False) for s in others],
                    state.cost,
                    self.limit,
                    self._os_available(),
                )
                remaining = deadline - time.monotonic()
                if isinstance(if_idle, Insufficient) or remaining <= 0:
                    self._refuse(model_id, decision)
                logger.info(
                    "model %s waits for busy models to finish (%s); up to %.0f s more",
                    model_id,
                    decision.message,
                    remaining,
                )
                try:
                    await asyncio.wait_for(self._changed.wait(), remaining)
                except asyncio.TimeoutError:
                    pass
            for victim in decision.victims:
                self.states[victim].status = UNLOADING
            state.status = LOADING
            self._update_gauges()
            if decision.victims:
                logger.info(
                    "evicting %s (least recently used, idle) to fit model %s (%s)",
                    ", ".join(decision.victims),
                    model_id,
                    format_gb(state.cost),
                )
            return list(decision.victims)

    def _refuse(self, model_id: str, decision: Insufficient) -> None:
        self.metrics["refusals"].inc(tags={"model": model_id})
        logger.warning(
            "refused model %s: %s (budget %s)", model_id, decision.message, format_gb(self.limit)
        )
        raise ApiError(
            503,
            decision.message,
            "insufficient_memory",
            param="model",
            code="insufficient_memory",
            headers={"x-should-retry": "false"},
        )

    async def _evict(self, model_id: str, reason: str) -> None:
        """Scale a model (already marked UNLOADING) to zero and wait until its replica is gone."""
        state = self.states[model_id]
        task = asyncio.get_running_loop().create_task(
            self.scaler.scale_and_wait(state.entry.deployment, 0)
        )
        self._unloading[model_id] = task
        try:
            seconds = await task
        finally:
            self._unloading.pop(model_id, None)
            state.status = UNLOADED
            await self._notify()
        if reason != "load_failed":  # a failed load held no weights
            state.evictions += 1
            self.metrics["evictions"].inc(tags={"model": model_id, "reason": reason})
        logger.info(
            "unloaded model %s (%s) in %.2f s; used %s of %s",
            model_id,
            reason,
            seconds,
            format_gb(self._used()),
            format_gb(self.limit),
        )

    # -- start, restart and idle expiry ---------------------------------------------------------

    async def _start(self) -> None:
        """Adopt what Serve really runs, scale idle replicas to zero, load pinned models.

        At a fresh start every model deployment has one replica without weights. After a
        controller restart some replicas hold weights: they are adopted as loaded.
        """
        await self.scaler.wait_until_app_running()
        running = await self.scaler.running()
        for state in self.states.values():
            if running.get(state.entry.deployment, 0):
                report = await self.models[state.entry.id].report.remote()
                if report is not None:
                    state.status = LOADED
                    state.measured_bytes = report.bytes
                    state.weights_bytes = report.weights_bytes
                    state.process_bytes = report.process_bytes
                    state.last_used = time.time()
        idle = [
            s.entry.id
            for s in self.states.values()
            if s.status == UNLOADED and not s.pinned and running.get(s.entry.deployment, 0)
        ]
        # Replicas without weights: nothing to account for, only processes to stop.
        await asyncio.gather(
            *(self.scaler.scale_and_wait(self.states[i].entry.deployment, 0) for i in idle)
        )
        adopted = [s.entry.id for s in self.states.values() if s.status == LOADED]
        logger.info(
            "controller ready: budget %s, adopted %s, scaled %d idle replicas to zero",
            format_gb(self.limit),
            adopted or "no loaded models",
            len(idle),
        )
        self._ready.set()
        for state in self.states.values():
            if state.pinned and state.status != LOADED:
                try:
                    await self.preload(state.entry.id)
                except ApiError as error:
                    logger.error("pinned model %s not loaded: %s", state.entry.id, error.message)

    async def _expire_idle(self) -> None:
        ttls = [s.entry.idle_ttl for s in self.states.values() if s.entry.idle_ttl]
        if not ttls:
            return
        period = max(0.5, min(ttls) / 4)
        await self._ready.wait()
        while True:
            await asyncio.sleep(period)
            now = time.time()
            async with self._changed:
                expired = [
                    s.entry.id
                    for s in self.states.values()
                    if s.status == LOADED
                    and s.entry.idle_ttl
                    and not (s.pinned or s.in_flight or s.waiting)
                    and now - (s.last_used or now) > s.entry.idle_ttl
                ]
                for model_id in expired:
                    self.states[model_id].status = UNLOADING
            for model_id in expired:
                logger.info("model %s idle for over %.0f s", model_id, self.states[model_id].entry.idle_ttl)
            await asyncio.gather(*(self._evict(model_id, "idle_ttl") for model_id in expired))

    # -- accounting -----------------------------------------------------------------------------

    def _used(self) -> int:
        return sum(s.cost for s in self.states.values() if s.status in HOLDS_MEMORY)

    def _os_available(self) -> int:
        # Loading models have their bytes reserved here but not yet taken from the OS.
        pending = sum(s.cost for s in self.states.values() if s.status == LOADING)
        return psutil.virtual_memory().available - pending

    def _headroom(self) -> int:
        residents = [s.resident() for s in self.states.values() if s.status in HOLDS_MEMORY]
        return headroom(residents, self.limit, self._os_available())

    def _update_gauges(self) -> None:
        self.metrics["used"].set(self._used())
        self.metrics["loaded"].set(sum(s.status == LOADED for s in self.states.values()))
        for s in self.states.values():
            self.metrics["model_bytes"].set(
                s.cost if s.status in HOLDS_MEMORY else 0, tags={"model": s.entry.id}
            )

    async def _notify(self) -> None:
        self._update_gauges()
        async with self._changed:
            self._changed.notify_all()
