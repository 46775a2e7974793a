"""Sets and watches a model deployment's replica count (0 or 1).

The count is the fleet controller's alone: it is written where the application's
autoscaling policy reads it (`deployments.replica_policy`), and Serve's next control-loop
tick applies it. Whether replicas run is read from `serve.status()`, only while a scale
waits (a scale-up needs no polling: the load call waits in Serve's router until the
replica runs).
"""

from __future__ import annotations

import asyncio
import time

from ray import serve
from ray.serve._private.common import ReplicaState
from ray.serve.schema import ApplicationStatus

from deployments.replica_policy import ReplicaTargets

POLL_SECONDS = 0.2
# A replica start is seconds; a model deployment that has not reached its count in this long
# will not (its constructor fails, or the cluster has no room): the caller gets an error.
SCALE_TIMEOUT_SECONDS = 120.0
# How long a (re)starting controller waits for Serve to finish deploying before adopting.
SETTLE_TIMEOUT_SECONDS = 120.0


class ScalingError(RuntimeError):
    """A deployment did not reach the replica count it was scaled to."""


class ReplicaScaler:
    RUNNING = ReplicaState.RUNNING.value
    STOPPING = ReplicaState.STOPPING.value

    def __init__(self, app_name: str):
        self.app_name = app_name
        self.targets = ReplicaTargets(app_name)

    async def scale(self, deployment: str, replicas: int) -> None:
        await self.scale_all({deployment: replicas})

    async def scale_all(self, counts: dict[str, int]) -> None:
        await asyncio.to_thread(self.targets.set, counts)

    async def replica_states(self) -> dict[str, dict[str, int]]:
        """For each deployment of the application, how many replicas are in which state."""
        status = await asyncio.to_thread(serve.status)
        app = status.applications.get(self.app_name)
        if app is None:
            return {}
        return {
            name: {str(getattr(state, "value", state)): count for state, count in d.replica_states.items()}
            for name, d in app.deployments.items()
        }

    async def running(self) -> dict[str, int]:
        states = await self.replica_states()
        return {name: counts.get(self.RUNNING, 0) for name, counts in states.items()}

    async def scale_and_wait(
        self, deployment: str, replicas: int, timeout: float = SCALE_TIMEOUT_SECONDS
    ) -> float:
        """Scale, then wait until exactly `replicas` run and none start or stop. Seconds taken."""
        started = time.perf_counter()
        await self.scale(deployment, replicas)
        while True:
            counts = (await self.replica_states()).get(deployment, {})
            running = counts.get(self.RUNNING, 0)
            if running == replicas and sum(counts.values()) == replicas:
                return time.perf_counter() - started
            if time.perf_counter() - started > timeout:
                raise ScalingError(
                    f"deployment {deployment} did not reach {replicas} replica(s) in {timeout:.0f} s "
                    f"(now: {counts})"
                )
            await asyncio.sleep(POLL_SECONDS)

    async def wait_until_app_settled(self) -> None:
        """Wait until Serve has deployed the application (running, or failed to)."""
        deadline = time.monotonic() + SETTLE_TIMEOUT_SECONDS
        settled = (ApplicationStatus.RUNNING, ApplicationStatus.DEPLOY_FAILED, ApplicationStatus.UNHEALTHY)
        while time.monotonic() < deadline:
            status = await asyncio.to_thread(serve.status)
            app = status.applications.get(self.app_name)
            if app is not None and app.status in settled:
                return
            await asyncio.sleep(POLL_SECONDS * 5)
