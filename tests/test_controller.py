"""The fleet controller without Ray: the undecorated class, driven in asyncio, with fakes for
its effects (Serve's replica counts, the models' replicas, free memory, metrics).

Each case runs in milliseconds; the same behaviour is tested end to end with real replicas in
test_memory_controller.py and test_faults.py.
"""

from __future__ import annotations

import asyncio
from collections import defaultdict
from typing import Any

import pytest

from deployments.controller import Controller, Effects
from deployments.model_server import LoadReport, ReplicaState
from policies.config import LOCAL_NODE, AppConfig, ModelEntry, placement_name
from policies.errors import ApiError
from policies.kv import KvAsk
from policies.ledger import Status

GB = 10**9
RUNNING = "RUNNING"


class Meter:
    """A metric that records nothing."""

    def inc(self, *args: Any, **kwargs: Any) -> None: ...

    set = observe = inc


class Call:
    """`handle.method.remote()`, answered by a coroutine function of the fake replica."""

    def __init__(self, method):
        self.remote = method


class Replica:
    """A model deployment's replica: absent, up without weights, loading, or loaded."""

    def __init__(self, model_id: str, cost: int):
        self.model_id, self.cost = model_id, cost
        self.weights = "none"
        self.loads = 0
        self.leases: list[str] = []
        self.may_load = asyncio.Event()
        self.may_load.set()

    async def _load(self) -> LoadReport:
        self.weights = "loading"
        await self.may_load.wait()
        self.loads += 1
        self.weights = "loaded"
        return self._report()

    def _report(self) -> LoadReport:
        return LoadReport(self.model_id, 0.01, self.cost // 2, self.cost, 0, replica=f"{self.model_id}-1")

    async def _state(self) -> ReplicaState:
        report = self._report() if self.weights == "loaded" else None
        return ReplicaState(self.weights, report, list(self.leases))

    @property
    def load(self) -> Call:
        return Call(self._load)

    @property
    def state(self) -> Call:
        return Call(self._state)


class Scaler:
    """Serve's replica counts per deployment, set at once."""

    RUNNING = RUNNING
    STOPPING = "STOPPING"

    def __init__(self, replicas: dict[str, Replica]):
        self.replicas = replicas  # by deployment name
        self.counts: dict[str, int] = defaultdict(int)
        self.calls: list[tuple[str, int]] = []

    async def scale(self, deployment: str, count: int) -> None:
        await self.scale_all({deployment: count})

    async def scale_all(self, counts: dict[str, int]) -> None:
        for deployment, count in counts.items():
            if self.counts[deployment] != count:
                self.calls.append((deployment, count))
            if count == 0:
                self.replicas[deployment].weights = "none"
            self.counts[deployment] = count

    async def scale_and_wait(self, deployment: str, count: int, timeout: float = 0) -> float:
        await self.scale(deployment, count)
        return 0.0

    async def replica_states(self) -> dict[str, dict[str, int]]:
        return {name: {RUNNING: count} for name, count in self.counts.items() if count}

    async def running(self) -> dict[str, int]:
        return dict(self.counts)

    async def wait_until_app_settled(self) -> None: ...


class Fleet:
    """A controller over fake replicas: `costs` {model id: bytes}, a `limit` budget."""

    def __init__(self, costs: dict[str, int], limit: int = 3 * GB, pinned: tuple[str, ...] = (), **args: Any):
        self.config = AppConfig.model_validate(
            {
                "models": [{"id": m, "path": f"/models/{m}", "memory": c, "pinned": m in pinned} for m, c in costs.items()],
                "memory_limit": limit,
                "warm_workers": False,
                "load_wait_timeout": "1s",
                **args,
            }
        )
        self.catalog = [
            ModelEntry(id=m, deployment=m, path=f"/models/{m}", type="text-generation", family="llama",
                       pinned=m in pinned, memory_bytes=c)
            for m, c in costs.items()
        ]
        self.replicas = {m: Replica(m, c) for m, c in costs.items()}
        self.scaler = Scaler({placement_name(m, LOCAL_NODE): r for m, r in self.replicas.items()})
        self.free = 100 * GB

    def start(self) -> Controller:
        effects = Effects(
            scaler=self.scaler,
            free_memory=lambda: self.free,
            memory_limit=lambda limit: limit,
            metrics=defaultdict(Meter),
            warm=None,
        )
        handles = {m: {LOCAL_NODE: replica} for m, replica in self.replicas.items()}
        return Controller.func_or_class(self.config, self.catalog, handles, effects=effects)

    def replicas_of(self, model_id: str) -> int:
        return self.scaler.counts[placement_name(model_id, LOCAL_NODE)]


def run(case) -> None:
    asyncio.run(asyncio.wait_for(case(), 10))


def statuses(controller: Controller) -> dict[str, str]:
    return {m: r.status.value for m, r in controller.ledger.models.items()}


def test_a_request_loads_its_model_and_gets_a_lease():
    fleet = Fleet({"a": GB})

    async def case():
        controller = fleet.start()
        lease = await controller.acquire("a")
        assert (lease.model, statuses(controller)["a"], fleet.replicas_of("a")) == ("a", "loaded", 1)
        assert fleet.replicas["a"].loads == 1

    run(case)


def test_concurrent_requests_for_one_model_load_it_once():
    fleet = Fleet({"a": GB})

    async def case():
        controller = fleet.start()
        fleet.replicas["a"].may_load.clear()
        waiting = [asyncio.ensure_future(controller.acquire("a")) for _ in range(5)]
        await asyncio.sleep(0.05)
        assert controller.ledger["a"].waiting == 5 and not any(w.done() for w in waiting)
        fleet.replicas["a"].may_load.set()
        leases = await asyncio.gather(*waiting)
        assert fleet.replicas["a"].loads == 1 and len({lease.id for lease in leases}) == 5

    run(case)


def test_a_load_evicts_the_least_recently_used_idle_model():
    fleet = Fleet({"old": GB, "new": GB, "next": 2 * GB})

    async def case():
        controller = fleet.start()
        for model_id in ("old", "new"):
            await controller.release((await controller.acquire(model_id)).id)
        await controller.acquire("next")
        assert statuses(controller) == {"old": "unloaded", "new": "loaded", "next": "loaded"}
        assert fleet.replicas_of("old") == 0 and controller.ledger["old"].evictions == 1

    run(case)


def test_a_load_waits_for_a_busy_model_and_takes_its_room_once_it_is_idle():
    fleet = Fleet({"busy": 2 * GB, "next": 2 * GB})

    async def case():
        controller = fleet.start()
        lease = await controller.acquire("busy")
        waiting = asyncio.ensure_future(controller.acquire("next"))
        await asyncio.sleep(0.1)
        assert not waiting.done() and statuses(controller)["next"] == "unloaded"
        await controller.release(lease.id)
        await waiting
        assert statuses(controller) == {"busy": "unloaded", "next": "loaded"}

    run(case)


def test_a_load_still_blocked_after_load_wait_timeout_is_refused_and_may_retry():
    fleet = Fleet({"busy": 2 * GB, "next": 2 * GB})

    async def case():
        controller = fleet.start()
        await controller.acquire("busy")
        with pytest.raises(ApiError) as refused:
            await controller.acquire("next")
        assert (refused.value.status, refused.value.code) == (503, "insufficient_memory")
        assert refused.value.headers == {"retry-after": "5"} and "still busy after 1 s" in refused.value.message
        assert statuses(controller) == {"busy": "loaded", "next": "unloaded"}

    run(case)


def test_what_cannot_fit_beside_pinned_models_is_refused_at_once_and_evicts_nothing():
    fleet = Fleet({"pinned": 2 * GB, "idle": GB, "huge": 2 * GB}, pinned=("pinned",))

    async def case():
        controller = fleet.start()
        await controller.release((await controller.acquire("idle")).id)
        with pytest.raises(ApiError) as refused:
            await controller.acquire("huge")
        assert refused.value.headers == {"x-should-retry": "false"}
        assert refused.value.message == "need 2.0 GB, only 1.0 GB available after eviction"
        assert statuses(controller) == {"pinned": "loaded", "idle": "loaded", "huge": "unloaded"}

    run(case)


def test_kv_growth_evicts_an_idle_model_and_a_final_ask_behind_a_busy_one_is_refused():
    fleet = Fleet({"chat": GB, "idle": GB, "busy": GB})

    async def case():
        controller = fleet.start()
        await controller.acquire("chat")
        await controller.release((await controller.acquire("idle")).id)
        await controller.acquire("busy")
        assert await controller.hold("chat", KvAsk(GB // 2, GB // 2, patience=0.5)) == GB // 2
        assert statuses(controller)["idle"] == "unloaded"
        # Now only the busy model stands in the way: a patient ask waits and gets None back.
        assert await controller.hold("chat", KvAsk(2 * GB, 2 * GB, patience=0.1)) is None
        with pytest.raises(ApiError) as refused:
            await controller.hold("chat", KvAsk(2 * GB, 2 * GB, patience=0.1, final=True))
        assert refused.value.message.endswith("(for the KV cache of a request): the models in the way were still busy after 1 s")
        assert controller.ledger["chat"].held == GB // 2

    run(case)


def test_a_restarted_controller_adopts_loaded_replicas_with_their_leases_and_finishes_starting_ones():
    fleet = Fleet({"loaded": GB, "starting": GB, "absent": GB})

    async def case():
        first = fleet.start()
        await first.acquire("loaded")
        fleet.replicas["loaded"].leases = ["lease-1"]
        # The old controller had asked for a replica of `starting` and died before its load.
        await fleet.scaler.scale(placement_name("starting", LOCAL_NODE), 1)
        restarted = fleet.start()
        await restarted._ready.wait()
        assert restarted.ledger["loaded"].status == Status.LOADED
        assert "lease-1" in restarted.ledger["loaded"].leases
        lease = await restarted.acquire("starting")
        assert lease.model == "starting" and fleet.replicas["starting"].loads == 1
        assert (statuses(restarted)["absent"], fleet.replicas_of("absent")) == ("unloaded", 0)

    run(case)
