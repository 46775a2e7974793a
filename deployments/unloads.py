"""Models on their way out of memory: scaling a model's deployment to zero (or an adapter out
of its base's replica), one task per model, each ending with the ledger settled on what Serve
really runs.

Scaling a text model's deployment to zero is also when its replica saves its prompt cache: Serve
calls `TextModel.__del__` on the way out, so an eviction lasts as long as that write.
"""

from __future__ import annotations

import asyncio
from typing import Any

from deployments.placements import Placements
from deployments.tasks import Changes, SingleFlight
from policies.ledger import Ledger, Status
from policies.logs import module_logger
from policies.memory import format_gb

logger = module_logger(__name__)


class Unloads(SingleFlight):
    """The unloads running, by model id (a load of the same model waits for its unload)."""

    def __init__(self, ledger: Ledger, placements: Placements, metrics: dict[str, Any], changes: Changes):
        super().__init__()
        self.ledger, self.placements, self.metrics, self.changes = ledger, placements, metrics, changes

    async def evict_all(self, model_ids: tuple[str, ...] | list[str], reason: str) -> str:
        """Evict models concurrently; the ones that could not be unloaded, in words."""
        tasks = [self.evict(model_id, reason) for model_id in model_ids]
        results = await asyncio.gather(*tasks, return_exceptions=True)
        return ", ".join(
            f"{model_id} ({result})"
            for model_id, result in zip(model_ids, results)
            if isinstance(result, BaseException)
        )

    def evict(self, model_id: str, reason: str) -> asyncio.Task:
        """Scale a model (already marked unloading) to zero; the task ends when it is gone."""
        # Registered at once, so that a load of the same model always finds it and waits.
        return self.start(model_id, self._scale_to_zero(model_id, reason))

    async def _scale_to_zero(self, model_id: str, reason: str) -> None:
        """Stop the model's replica (a text model's saves its prompt cache on the way out).
        If Serve does not get there, the ledger takes what Serve really runs."""
        record = self.ledger[model_id]
        try:
            if record.entry.base is None:
                seconds = await self.placements.stop(record)
            else:  # out of its base's replica, unless the base is on its way out too
                seconds = await self.placements.drop_adapter(record, self.ledger[record.entry.base].status == Status.LOADED)
            if record.status != Status.UNLOADING:
                return  # its node left meanwhile, and the ledger let it go with it
        except Exception as error:
            logger.error("unloading model %s failed: %r", model_id, error)
            # The ledger takes what Serve runs: loaded if a replica still holds the weights.
            why = f"scaling to zero failed: {error}"
            state = await self.placements.state(record) if await self.placements.is_running(record) else None
            if state is not None and state.weights == "loaded":
                self.ledger.restore(model_id, Status.LOADED, f"{why}; its replica still holds the weights")
            else:
                self.ledger.restore(model_id, Status.UNLOADED, f"{why}; no replica holds the weights")
            raise
        else:
            # A failed load held no weights: not an eviction.
            evicted = reason != "load_failed"
            self.ledger.finish_unload(model_id, reason, evicted)
            if evicted:
                self.metrics["evictions"].inc(tags={"model": model_id, "reason": reason})
            logger.info(
                "unloaded model %s (%s) in %.2f s; used %s of %s",
                model_id,
                reason,
                seconds,
                format_gb(self.ledger.used()),
                format_gb(self.ledger.limit),
            )
        finally:
            await self.changes.notify()
