"""Replicas that die: Serve restarts a model's dead replica without its weights. Each loaded
model's replica is asked, every round and when an ingress saw it fail, whether it still holds
them: the model is loaded again when it does not, and a replacement that already loaded them
for a request is taken note of.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any, Awaitable, Callable

from deployments.placements import Placements
from deployments.tasks import Changes, SingleFlight
from policies.ledger import Ledger, Status

# How often loaded models' replicas are asked whether they still hold their weights.
REPLICA_CHECK_SECONDS = 10.0


class ReplicaChecks(SingleFlight):
    """The checks running, by model id (one at a time per model). `unloading`: the models on
    their way out, left alone; `reload` loads a model again."""

    def __init__(
        self, ledger: Ledger, placements: Placements, metrics: dict[str, Any], changes: Changes,
        unloading: SingleFlight, reload: Callable[[str], Awaitable[None]],
    ):
        super().__init__()
        self.ledger, self.placements, self.metrics, self.changes = ledger, placements, metrics, changes
        self.unloading, self.reload = unloading, reload

    async def check_all(self) -> None:
        """Every loaded model's replica (an adapter's is its base's)."""
        loaded = [r.id for r in self.ledger.models.values()
                  if r.status == Status.LOADED and r.id not in self.unloading and r.entry.base is None]
        await asyncio.gather(*(self.check(model_id) for model_id in loaded))

    def check(self, model_id: str) -> asyncio.Task:
        return self.join(model_id, self._check)

    async def _check(self, model_id: str) -> None:
        record = self.ledger[model_id]
        state = await self.placements.state(record)
        if state is None or record.status != Status.LOADED:
            return  # no answer yet (a replica restarting answers later), or nothing to do
        if state.usage is not None:
            self.ledger.report_usage(model_id, state.usage)
            self.changes.on_change()
        if state.weights == "loaded":
            known = record.measured.replica if record.measured else None
            if state.report.replica != known:
                self.ledger.replica_replaced(model_id, state.report.measured(), time.time())
                self.metrics["loads"].inc(tags={"model": model_id})
            return
        self.ledger.begin_reload(model_id, "its replica was replaced without weights (it died?)")
        await self.changes.notify()
        await self.reload(model_id)
