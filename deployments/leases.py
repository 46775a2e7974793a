"""The ingress's side of leases: acquire one per request, renew them while responses run,
release each exactly once.

The controller expires leases that stop being renewed, so whatever happens to this process,
a model is never held longer than `lease_ttl` by a request that is gone.
"""

from __future__ import annotations

import asyncio
import logging
import time
import weakref
from typing import Any

from ray.exceptions import RayActorError
from ray.serve.handle import DeploymentHandle

from dialects.errors import ApiError
from policies.ledger import Lease

logger = logging.getLogger("ray.serve")

RELEASE_ATTEMPTS = 3
CONTROLLER_RETRY_SECONDS = 0.5


def controller_gone(error: BaseException) -> bool:
    """The controller's replica died or restarts: a retry reaches its successor."""
    return isinstance(error, RayActorError)


class LeaseKeeper:
    def __init__(self, controller: DeploymentHandle, acquire_timeout: float, lease_ttl: float):
        self.controller = controller
        # A request may wait this long for its model, controller restarts included.
        self.acquire_timeout = acquire_timeout
        self.renew_every = lease_ttl / 3
        self._held: dict[str, Lease] = {}
        self._renewer: asyncio.Task | None = None
        self._tasks: set[asyncio.Task] = set()  # the loop keeps only weak references
        self._loop = asyncio.get_running_loop()

    @property
    def held(self) -> int:
        return len(self._held)

    async def acquire(self, model_id: str) -> Lease:
        """A lease on the model, once it is loaded.

        If the request is cancelled (client gone) while the grant is on its way, the grant
        is released when it arrives instead of being lost.
        """
        grant = self._spawn(self._acquire(model_id))
        try:
            lease = await asyncio.shield(grant)
        except asyncio.CancelledError:
            grant.add_done_callback(self._release_late_grant)
            raise
        self._hold(lease)
        return lease

    def release(self, lease: Lease) -> None:
        """End the lease (once: later calls do nothing) without making the caller wait."""
        if self._held.pop(lease.id, None) is not None:
            self._spawn(self._send_release(lease))

    def release_when_collected(self, owner: Any, lease: Lease) -> None:
        """Release the lease when `owner` is garbage: a response body that never ran its
        `finally` (the client left before the body started) still gives its lease back."""
        weakref.finalize(owner, self._loop.call_soon_threadsafe, self.release, lease)

    # -- internals ------------------------------------------------------------------------------

    async def _acquire(self, model_id: str) -> Lease:
        deadline = time.monotonic() + self.acquire_timeout
        while True:
            try:
                return await self.controller.acquire.remote(model_id)
            except Exception as error:
                if not controller_gone(error) or time.monotonic() > deadline:
                    if controller_gone(error):
                        raise ApiError(
                            503,
                            "The fleet controller is restarting; retry in a few seconds",
                            "controller_unavailable",
                            code="controller_unavailable",
                            headers={"retry-after": "2"},
                        ) from None
                    raise
                logger.warning("controller gone while acquiring model %s; retrying", model_id)
                await asyncio.sleep(CONTROLLER_RETRY_SECONDS)

    def _release_late_grant(self, grant: asyncio.Task) -> None:
        if not grant.cancelled() and grant.exception() is None:
            self._spawn(self._send_release(grant.result()))

    def _hold(self, lease: Lease) -> None:
        self._held[lease.id] = lease
        if self._renewer is None or self._renewer.done():
            self._renewer = self._spawn(self._renew_while_held())

    async def _renew_while_held(self) -> None:
        while self._held:
            await asyncio.sleep(self.renew_every)
            held = {lease.id: lease.model for lease in self._held.values()}
            if not held:
                return
            try:
                await asyncio.wait_for(self.controller.renew.remote(held), self.renew_every)
            except Exception as error:  # the next round tries again; expiry is far away
                logger.warning("renewing %d lease(s) failed: %r", len(held), error)

    async def _send_release(self, lease: Lease) -> None:
        for attempt in range(RELEASE_ATTEMPTS):
            try:
                await self.controller.release.remote(lease.id)
                return
            except Exception as error:
                if attempt == RELEASE_ATTEMPTS - 1:
                    logger.warning(
                        "releasing lease %s on model %s failed (%r); it expires by itself",
                        lease.id,
                        lease.model,
                        error,
                    )
                else:
                    await asyncio.sleep(CONTROLLER_RETRY_SECONDS * (attempt + 1))

    def _spawn(self, work: Any) -> asyncio.Task:
        task = self._loop.create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task
