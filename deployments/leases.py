"""The ingress's side of leases.

An ingress holds one controller lease per model it is using, shared by its requests to that
model: the model cannot be evicted while any of them runs, and only the first request (or
the first after a quiet moment) asks the controller. Each request gets a `Hold` on the shared
lease, released exactly once; the lease itself goes back to the controller when the last
hold is gone for `LEASE_LINGER_SECONDS`. Held leases are renewed while in use; the controller
expires leases that stop being renewed, so whatever happens to this process a model is never
held longer than `lease_ttl` by requests that are gone.

A lease the controller no longer knows (its model's node left the cluster) is lost: calls
made under it (`guarded`) stop waiting for a replica that will not come.
"""

from __future__ import annotations

import asyncio
import contextvars
import time
import weakref
from dataclasses import dataclass, field
from typing import Any, Awaitable, TypeVar

from ray.exceptions import RayActorError
from ray.serve.handle import DeploymentHandle

from deployments.waiting import Abandoned, unless
from policies.errors import controller_unavailable, model_not_ready_in_time
from policies.ledger import Lease
from policies.logs import module_logger

logger = module_logger(__name__)

T = TypeVar("T")

RELEASE_ATTEMPTS = 3
CONTROLLER_RETRY_SECONDS = 0.5
# A lease kept this long after its last request, for the next one: back-to-back requests
# skip the controller, and an eviction of the model waits at most this much longer.
LEASE_LINGER_SECONDS = 0.25
# While a call waits this long for its model, the leases are renewed to learn whether the
# controller took them back (a node that left): such a call would otherwise wait for good.
WAITING_RENEW_SECONDS = 2.0


class LeaseLost(Exception):
    """The controller took the lease back: its model's node left, or it expired."""


def controller_gone(error: BaseException) -> bool:
    """The controller's replica died or restarts: a retry reaches its successor."""
    return isinstance(error, RayActorError)


@dataclass
class Hold:
    """One request's use of its model's lease."""

    lease: Lease
    released: bool = False

    @property
    def id(self) -> str:
        return self.lease.id

    @property
    def model(self) -> str:
        return self.lease.model

    @property
    def node(self) -> str:
        return self.lease.node


@dataclass
class _Shared:
    lease: Lease
    lost: asyncio.Future
    renewed: float  # monotonic time the controller last extended it
    holds: int = 0
    linger: asyncio.TimerHandle | None = field(default=None, repr=False)


class LeaseKeeper:
    def __init__(self, controller: DeploymentHandle, acquire_timeout: float, lease_ttl: float):
        self.controller = controller
        # A request may wait this long for its model, controller restarts included.
        self.acquire_timeout = acquire_timeout
        self.lease_ttl = lease_ttl
        self.renew_every = lease_ttl / 3
        self._shared: dict[str, _Shared] = {}  # by model id
        # One acquire per model (and kind: may load or not) at a time.
        self._granting: dict[tuple[str, bool], asyncio.Task] = {}
        self._renewer: asyncio.Task | None = None
        self._renewing: asyncio.Task | None = None  # one renewal at a time for waiting calls
        self._tasks: set[asyncio.Task] = set()  # the loop keeps only weak references
        self._loop = asyncio.get_running_loop()

    @property
    def held(self) -> int:
        return len(self._shared)

    async def acquire(self, model_id: str, may_load: bool = True) -> Hold:
        """A hold on the model's lease, once the model is loaded (without `may_load`, only if
        it is loaded already: else 503 model_not_loaded).

        If the request is cancelled (client gone) while a grant is on its way, the grant
        still arrives and is shared or given back, never lost. A request waits at most
        `acquire_timeout`, then gets 503 model_unavailable.
        """
        deadline = time.monotonic() + self.acquire_timeout
        while True:
            shared = self._shared.get(model_id)
            if shared is not None and time.monotonic() - shared.renewed > self.lease_ttl:
                # Not extended for a whole ttl: the controller has expired it by now.
                self._lose(shared, "its renewals failed for longer than its ttl")
                shared = None
            if shared is not None:
                self._keep_renewing()  # a watchdog: a renewer that died is started again
                return self._hold(shared)
            # A request that may not load must not join a grant that loads, nor the reverse.
            grant = self._granting.get((model_id, may_load))
            if grant is None:
                grant = self._spawn(self._grant(model_id, may_load))
                self._granting[(model_id, may_load)] = grant
            # A registered grant is never finished (it unregisters itself in its last step),
            # so this always suspends: a loop around a finished future would never yield.
            try:
                await asyncio.wait_for(asyncio.shield(grant), max(0.0, deadline - time.monotonic()))
            except asyncio.TimeoutError:
                raise model_not_ready_in_time(model_id, self.acquire_timeout) from None

    def release(self, hold: Hold) -> None:
        """End one request's hold (once: later calls do nothing) without making it wait."""
        if hold.released:
            return
        hold.released = True
        shared = self._shared.get(hold.model)
        if shared is None or shared.lease.id != hold.id:
            return  # the controller had expired that lease: nothing left to give back
        shared.holds -= 1
        if shared.holds == 0:
            shared.linger = self._loop.call_later(LEASE_LINGER_SECONDS, self._give_back, shared)

    async def guarded(self, hold: Hold, work: Awaitable[T]) -> T:
        """`work`'s result, unless the hold's lease is lost first: then `work` is cancelled
        and LeaseLost raised."""
        shared = self._shared.get(hold.model)
        if shared is None or shared.lease.id != hold.id:
            asyncio.ensure_future(work).cancel()
            raise LeaseLost(hold.id)
        try:
            return await unless(shared.lost, work, WAITING_RENEW_SECONDS, self._renew_soon)
        except Abandoned:
            raise LeaseLost(hold.id) from None

    def release_when_collected(self, owner: Any, hold: Hold) -> None:
        """Release the hold when `owner` is garbage: a response body that never ran its
        `finally` (the client left before the body started) still gives its hold back."""
        weakref.finalize(owner, self._loop.call_soon_threadsafe, self.release, hold)

    # -- internals ------------------------------------------------------------------------------

    def _hold(self, shared: _Shared) -> Hold:
        if shared.linger is not None:
            shared.linger.cancel()
            shared.linger = None
        shared.holds += 1
        return Hold(shared.lease)

    async def _grant(self, model_id: str, may_load: bool) -> None:
        """Ask the controller, then share the lease. The state changes in the task's own
        last step, not in a done-callback: a request arriving between the two would find a
        finished grant and no lease."""
        try:
            lease = await self._acquire(model_id, may_load)
        finally:
            del self._granting[(model_id, may_load)]
        if model_id in self._shared:  # the other kind of grant came first: share that one
            self._spawn(self._send_release(lease))
            return
        shared = _Shared(lease, self._loop.create_future(), renewed=time.monotonic())
        self._shared[model_id] = shared
        # Until a waiting request takes a hold, the lease lingers like an idle one.
        shared.linger = self._loop.call_later(LEASE_LINGER_SECONDS, self._give_back, shared)
        self._keep_renewing()

    def _keep_renewing(self) -> None:
        if self._renewer is None or self._renewer.done():
            self._renewer = self._spawn(self._renew_while_held())

    def _give_back(self, shared: _Shared) -> None:
        if shared.holds or self._shared.get(shared.lease.model) is not shared:
            return
        del self._shared[shared.lease.model]
        self._spawn(self._send_release(shared.lease))

    async def _acquire(self, model_id: str, may_load: bool) -> Lease:
        deadline = time.monotonic() + self.acquire_timeout
        while True:
            try:
                return await self.controller.acquire.remote(model_id, may_load)
            except Exception as error:
                if not controller_gone(error):
                    raise
                if time.monotonic() > deadline:
                    raise controller_unavailable(f"restarting for over {self.acquire_timeout:.0f} s") from None
                logger.warning("controller gone while acquiring model %s; retrying", model_id)
                await asyncio.sleep(CONTROLLER_RETRY_SECONDS)

    def _renew_soon(self) -> None:
        if self._renewing is None or self._renewing.done():
            self._renewing = self._spawn(self.renew())

    async def _renew_while_held(self) -> None:
        while self._shared:
            await asyncio.sleep(self.renew_every)
            await self.renew()

    async def renew(self) -> None:
        """Extend the held leases now; the ones the controller no longer knows are lost."""
        leases = {s.lease.id: model for model, s in self._shared.items()}
        if not leases:
            return
        sent = time.monotonic()  # the controller extends them from about now
        try:
            lost = await asyncio.wait_for(self.controller.renew.remote(leases), self.renew_every)
        except Exception as error:  # the next round tries again; expiry is far away
            logger.warning("renewing %d lease(s) failed: %r", len(leases), error)
            return
        for lease_id, model in leases.items():
            shared = self._shared.get(model)
            if shared is None or shared.lease.id != lease_id:
                continue
            if lease_id in lost:
                # The controller no longer knows it (expired while it was unreachable, or its
                # node left): the next request asks for a new one.
                self._lose(shared, "the controller no longer knows it")
            else:
                shared.renewed = sent

    def _lose(self, shared: _Shared, why: str) -> None:
        logger.warning("lease %s on model %s was lost (%s); taking a new one", shared.lease.id, shared.lease.model, why)
        if self._shared.get(shared.lease.model) is shared:
            del self._shared[shared.lease.model]
        if not shared.lost.done():
            shared.lost.set_result(None)

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
        # A fresh context: this work is shared (a grant every waiting request awaits, the
        # renewals, the releases), but in the context of the request that happens to start
        # it, its controller calls would be that request's children (Serve's request context,
        # Ray's task id) and be cancelled with it when its client goes: every other waiter
        # then got its CancelledError, which no handler catches (the proxy logged 499 and
        # uvicorn answered a bare 500).
        task = self._loop.create_task(work, context=contextvars.Context())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task
