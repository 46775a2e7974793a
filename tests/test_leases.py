"""The ingress's lease keeper against a controller that counts its calls (a stand-in for
the Ray handle; the keeper is what is under test): shared leases, holds released once,
lingering, lost leases replaced."""

from __future__ import annotations

import asyncio
import itertools

import deployments.leases as leases_module
from deployments.leases import LeaseKeeper
from policies.ledger import Lease


class Method:
    def __init__(self, fn):
        self.fn = fn

    def remote(self, *args):
        return self.fn(*args)


class Controller:
    def __init__(self):
        self.granted: list[Lease] = []
        self.released: list[str] = []
        self.lost: set[str] = set()
        self.ids = itertools.count()
        self.acquire = Method(self._acquire)
        self.release = Method(self._release)
        self.renew = Method(self._renew)

    async def _acquire(self, model: str) -> Lease:
        await asyncio.sleep(0.01)
        lease = Lease(f"lease-{next(self.ids)}", model, ttl=3)
        self.granted.append(lease)
        return lease

    async def _release(self, lease_id: str) -> None:
        self.released.append(lease_id)

    async def _renew(self, held: dict[str, str]) -> list[str]:
        return [lease_id for lease_id in held if lease_id in self.lost]


def run(test):
    async def main():
        controller = Controller()
        await test(controller, LeaseKeeper(controller, acquire_timeout=5, lease_ttl=0.3))
    asyncio.run(main())


def test_concurrent_requests_share_one_grant_and_release_it_once(monkeypatch):
    monkeypatch.setattr(leases_module, "LINGER_SECONDS", 0.05)

    async def test(controller, keeper):
        holds = await asyncio.gather(*(keeper.acquire("m") for _ in range(5)))
        assert len(controller.granted) == 1 and {h.id for h in holds} == {"lease-0"}
        for hold in holds:
            keeper.release(hold)
            keeper.release(hold)  # twice: nothing more
        await asyncio.sleep(0.02)
        assert controller.released == []  # still lingering for the next request
        again = await keeper.acquire("m")
        assert again.id == "lease-0" and len(controller.granted) == 1
        keeper.release(again)
        await asyncio.sleep(0.1)
        assert controller.released == ["lease-0"] and keeper.held == 0
        await keeper.acquire("m")
        assert len(controller.granted) == 2

    run(test)


def test_a_cancelled_waiter_leaves_the_grant_to_be_given_back(monkeypatch):
    monkeypatch.setattr(leases_module, "LINGER_SECONDS", 0.05)

    async def test(controller, keeper):
        waiter = asyncio.ensure_future(keeper.acquire("m"))
        await asyncio.sleep(0.001)
        waiter.cancel()
        await asyncio.sleep(0.2)
        assert [lease.id for lease in controller.granted] == controller.released == ["lease-0"]

    run(test)


def test_a_lease_the_controller_lost_is_replaced(monkeypatch):
    async def test(controller, keeper):
        hold = await keeper.acquire("m")
        controller.lost.add(hold.id)
        await asyncio.sleep(0.25)  # a renewal round (every ttl/3)
        fresh = await keeper.acquire("m")
        assert fresh.id != hold.id and len(controller.granted) == 2
        keeper.release(hold)  # the lost one: nothing to give back, no error
        keeper.release(fresh)

    run(test)
