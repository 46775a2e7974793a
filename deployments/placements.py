"""The model deployments as Serve runs them: one per model and node, each with 0 or 1 replica.

The controller decides which run; this names each deployment, sets its replica count, loads
its weights and asks its replica what it holds. Scaling a deployment to zero makes Serve stop
its replica gracefully, and a text model's replica saves its prompt cache on the way out
(`TextModel.__del__`): `stop` waits for that too.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from ray.serve.handle import DeploymentHandle

from deployments.model_server import LoadReport, ReplicaState
from deployments.scaler import SCALE_TIMEOUT_SECONDS
from policies.adoption import Deployment
from policies.config import LOCAL_NODE, placement_name
from policies.generation import AdapterRef
from policies.ledger import ModelRecord
from policies.logs import module_logger

logger = module_logger(__name__)

# How long a replica's answer about its state may take.
REPLICA_ANSWER_SECONDS = 10.0


class Placements:
    def __init__(self, scaler: Any, models: dict[str, dict[str, DeploymentHandle]]):
        self.scaler = scaler  # ReplicaScaler's methods
        self.models = models  # {model id: {node: its deployment there}}

    def nodes(self, model_id: str) -> list[str]:
        """The nodes the model has a deployment on."""
        return list(self.models[model_id])

    def name(self, record: ModelRecord, node: str | None = None) -> str:
        """The deployment's name on `node` (default: where the ledger has the model)."""
        return placement_name(record.entry.deployment, node or record.node or LOCAL_NODE)

    async def start(self, record: ModelRecord) -> None:
        await self.scaler.scale(self.name(record), 1)

    async def load(self, record: ModelRecord) -> LoadReport:
        """Load the weights in the replica being started. The call waits in Serve's router
        until the replica can take it: no polling for it to run, the load starts when it does."""
        return await asyncio.wait_for(self._handle(record).load.remote(), SCALE_TIMEOUT_SECONDS)

    async def stop(self, record: ModelRecord) -> float:
        """Scale to zero and wait until the replica is gone (its prompt cache saved): seconds taken."""
        return await self.scaler.scale_and_wait(self.name(record), 0)

    async def load_adapter(self, record: ModelRecord) -> int:
        """Load a LoRA adapter into its base's replica: the bytes its matrices take."""
        adapter = AdapterRef(record.id, record.entry.path)
        return await asyncio.wait_for(self._handle(record).load_adapter.remote(adapter), SCALE_TIMEOUT_SECONDS)

    async def drop_adapter(self, record: ModelRecord, base_loaded: bool) -> float:
        """Take an adapter out of its base's replica (nothing to do when the base is going
        too): seconds taken. A replica that does not answer holds no adapter any more."""
        started = time.perf_counter()
        if base_loaded:
            try:
                await asyncio.wait_for(self._handle(record).unload_adapter.remote(record.id), REPLICA_ANSWER_SECONDS)
            except Exception as error:
                logger.warning("model %s's replica did not drop adapter %s: %r", record.entry.base, record.id, error)
        return time.perf_counter() - started

    async def stop_on(self, record: ModelRecord, node: str) -> None:
        """Scale the model's deployment on `node` to zero without waiting (the node left)."""
        await self.scaler.scale(self.name(record, node), 0)

    async def state(self, record: ModelRecord, node: str | None = None) -> ReplicaState | None:
        """What the model's replica on `node` (default: where the ledger has it) holds."""
        try:
            return await asyncio.wait_for(self._handle(record, node).state.remote(), REPLICA_ANSWER_SECONDS)
        except Exception as error:  # dead, restarting or stuck: the caller decides
            logger.info("model %s's replica did not answer: %r", record.id, error)
            return None

    async def is_running(self, record: ModelRecord) -> bool:
        return (await self.scaler.running()).get(self.name(record), 0) > 0

    async def survey(self, records: list[ModelRecord]) -> list[Deployment]:
        """Every model deployment on every node, and what its running replica holds."""
        replicas = await self.scaler.replica_states()
        found = [
            (record, node, replicas.get(self.name(record, node), {}))
            for record in records
            if record.entry.base is None  # an adapter has no deployment of its own
            for node in self.models[record.id]
        ]
        states = await asyncio.gather(
            *(
                self.state(record, node) if counts.get(self.scaler.RUNNING) else asyncio.sleep(0)
                for record, node, counts in found
            )
        )
        seen = []
        for (record, node, counts), state in zip(found, states):
            running = counts.get(self.scaler.RUNNING, 0)
            starting = sum(counts.values()) - running - counts.get(self.scaler.STOPPING, 0)
            if state is None:
                seen.append(Deployment(record.id, node, running, starting, None))
            else:
                measured = state.report.measured() if state.report else None
                seen.append(Deployment(record.id, node, running, starting, state.weights, measured, state.leases,
                                    state.usage, state.adapters))
        return seen

    async def keep_only(self, records: list[ModelRecord]) -> None:
        """One replica for each model where the ledger has it holding memory; none elsewhere."""
        await self.scaler.scale_all(
            {
                self.name(record, node): int(record.holds_memory and record.node == node)
                for record in records
                if record.entry.base is None
                for node in self.models[record.id]
            }
        )

    def _handle(self, record: ModelRecord, node: str | None = None) -> DeploymentHandle:
        return self.models[record.id][node or record.node or LOCAL_NODE]
