"""The controller: one deployment that owns which models are loaded.

Every request is bracketed by `acquire(model)` / `release(model)`. Acquire returns once the
model's replica has its weights loaded; concurrent first requests share one load.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass

from ray import serve
from ray.serve.handle import DeploymentHandle

from deployments.openai_types import ApiError
from policies.config import CONTROLLER_NAME, ModelEntry

logger = logging.getLogger("ray.serve")

UNLOADED, LOADING, LOADED = "unloaded", "loading", "loaded"


@dataclass
class ModelState:
    status: str = UNLOADED
    in_flight: int = 0
    last_used: float = 0.0
    loads: int = 0


@serve.deployment(
    name=CONTROLLER_NAME,
    num_replicas=1,
    # Callers wait here while a model loads: never make them queue behind each other.
    max_ongoing_requests=100_000,
    ray_actor_options={"num_cpus": 0},
)
class Controller:
    def __init__(self, catalog: list[ModelEntry], models: dict[str, DeploymentHandle]):
        self.catalog = {entry.id: entry for entry in catalog}
        self.models = models
        self.states = {entry.id: ModelState() for entry in catalog}
        self._loading: dict[str, asyncio.Task] = {}

    async def acquire(self, model_id: str) -> None:
        state = self.states[model_id]
        state.in_flight += 1
        try:
            if state.status != LOADED:
                await asyncio.shield(self._single_flight_load(model_id))
        except BaseException:
            state.in_flight -= 1
            raise
        state.last_used = time.time()

    async def release(self, model_id: str) -> None:
        state = self.states[model_id]
        state.in_flight = max(0, state.in_flight - 1)
        state.last_used = time.time()

    async def statuses(self) -> dict[str, dict]:
        return {
            model_id: {"status": s.status, "in_flight": s.in_flight, "loads": s.loads}
            for model_id, s in self.states.items()
        }

    def _single_flight_load(self, model_id: str) -> asyncio.Task:
        task = self._loading.get(model_id)
        if task is None:
            task = asyncio.create_task(self._load(model_id))
            self._loading[model_id] = task
            task.add_done_callback(lambda _: self._loading.pop(model_id, None))
        return task

    async def _load(self, model_id: str) -> None:
        state = self.states[model_id]
        state.status = LOADING
        try:
            report = await self.models[model_id].load.remote()
        except Exception as error:
            state.status = UNLOADED
            cause = getattr(error, "cause", error)
            logger.error("loading model %s failed: %r", model_id, cause)
            raise ApiError(
                503,
                f"Model {model_id} failed to load: {type(cause).__name__}: {cause}",
                "model_load_failed",
                param="model",
            ) from None
        state.status = LOADED
        state.loads += 1
        logger.info("model %s ready (%.2f s)", model_id, report.seconds)
