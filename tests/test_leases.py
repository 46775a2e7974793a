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

    async def _acquire(self, model: str, may_load: bool = True) -> Lease:
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
    monkeypatch.setattr(leases_module, "LEASE_LINGER_SECONDS", 0.05)

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
    monkeypatch.setattr(leases_module, "LEASE_LINGER_SECONDS", 0.05)

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


def _finishes(test, timeout: float = 5.0) -> bool:
    """Run `test` (as `run` does) on a thread of its own: an event loop that spins without
    ever suspending cannot be timed out from inside, only from outside."""
    import threading

    done = threading.Event()

    def main():
        run(test)
        done.set()

    threading.Thread(target=main, daemon=True).start()
    return done.wait(timeout)


def test_a_request_arriving_as_the_grant_completes_waits_instead_of_spinning():
    """The wedge of issue 27: a request entering `acquire` in the loop iteration in which the
    grant's task finished, before the task's done-callbacks ran, found the finished task
    still registered; awaiting a finished future never suspends, so it looped for good and
    starved the event loop (renewals stopped, every request hung)."""

    async def test(controller, keeper):
        granted = asyncio.get_running_loop().create_future()

        async def slow_acquire(model, may_load=True):
            lease = await granted
            controller.granted.append(lease)
            return lease

        controller.acquire = Method(slow_acquire)
        first = asyncio.ensure_future(keeper.acquire("m"))
        await asyncio.sleep(0.01)  # the grant is on its way
        granted.set_result(Lease("lease-0", "m", ttl=3))
        # Scheduled right behind the grant task's last step, ahead of its done-callbacks.
        second = asyncio.ensure_future(keeper.acquire("m"))
        holds = await asyncio.wait_for(asyncio.gather(first, second), 2)
        assert {hold.id for hold in holds} == {"lease-0"} and len(controller.granted) == 1

    assert _finishes(test), "acquire spun without suspending (event loop starved)"


def test_a_lease_whose_renewals_keep_failing_is_replaced_after_its_ttl():
    async def test(controller, keeper):
        hold = await keeper.acquire("m")

        async def unreachable(held):
            raise ConnectionError("controller unreachable")

        controller.renew = Method(unreachable)
        await asyncio.sleep(0.4)  # longer than the ttl (0.3 s) without one renewal
        fresh = await keeper.acquire("m")
        assert fresh.id != hold.id and len(controller.granted) == 2
        keeper.release(hold)
        keeper.release(fresh)

    run(test)


def test_a_request_waits_for_its_model_at_most_acquire_timeout():
    from policies.errors import ApiError

    async def test(controller, keeper):
        async def never(model, may_load=True):
            await asyncio.sleep(3600)

        controller.acquire = Method(never)
        keeper.acquire_timeout = 0.2
        try:
            await asyncio.wait_for(keeper.acquire("m"), 2)
        except ApiError as error:
            assert error.status == 503 and error.code == "model_unavailable"
        else:
            raise AssertionError("acquire returned without a lease")

    run(test)
