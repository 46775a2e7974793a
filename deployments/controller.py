"""The memory-aware controller: one deployment that decides which models hold memory.

Its bookkeeping is `policies.ledger.Ledger` (statuses, costs, leases, admission); this
deployment does the slow work the ledger's decisions call for: scaling model deployments
between zero and one replica and loading their weights (`deployments.placements`), checking
on replicas, expiring leases.

An ingress holds a lease on a model while it has requests for it (they share it), from
`acquire` until shortly after the last one ends. Acquire returns once the model's replica is
up with its weights. A load evicts least recently used idle models,
waits (up to `load_wait_timeout`) for busy or loading ones, and answers 503
`insufficient_memory` only for what cannot fit even when every unpinned model is gone.

State is rebuilt from what Serve really runs whenever this replica (re)starts: models with
weights are adopted with the leases their replicas are serving, starting ones finish loading.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Any, Callable

import psutil
from ray import serve
from ray.serve.handle import DeploymentHandle

from deployments.fleet_metrics import fleet_metrics, publish_gauges
from deployments.logs import refusals_in_one_line
from deployments.nodes import NODE_CHECK_SECONDS, NodeMonitor, memory_limit_bytes
from deployments.placements import Placements
from deployments.replica_checks import REPLICA_CHECK_SECONDS, ReplicaChecks
from deployments.scaler import ReplicaScaler
from deployments.tasks import Changes, SingleFlight, every, spawn
from deployments.unloads import Unloads
from deployments.waiting import unless
from deployments.warm_workers import WarmWorkers, waiting_local_workers
from policies.adoption import adopt
from policies.config import CONTROLLER_NAME, AppConfig, ModelEntry
from policies.errors import ApiError, may_not_load, model_busy, model_load_failed, model_not_found, model_unload_failed
from policies.eviction import Evict, Insufficient
from policies.kv import KvAsk
from policies.ledger import Free, Lease, Ledger, Measured, ModelRecord, Status
from policies.logs import module_logger
from policies.memory import estimate_entry_bytes, format_gb
from policies.nodes import PresentNode
from policies.room import ClaimKind, NoNode, Unsized, Wait, eviction_failed, purpose, refusal, unsized

logger = module_logger(__name__)

# Ray's metrics agent drops a gauge value not set again within two export periods (20 s by
# default): re-set every gauge well inside that, so a scrape always sees the fleet's state.
GAUGE_REPUBLISH_SECONDS = 5.0


def failure(error: BaseException) -> str:
    """A failed load in words: the replica's own exception when Ray wrapped it."""
    cause = getattr(error, "cause", None) or error
    return f"{type(cause).__name__}: {cause}"


@dataclass
class Effects:
    """What the controller acts on and reads besides its ledger: Serve's replica counts, the
    memory the OS has free, the one machine's budget, metrics, warm workers. Built from Serve,
    Ray and the OS in a replica (`Effects.of_replica`); tests pass fakes."""

    scaler: Any  # ReplicaScaler's methods
    free_memory: Callable[[], int]  # one node: what the OS has free now
    memory_limit: Callable[[Any], int]  # one node: the config's limit in bytes
    metrics: dict[str, Any]
    warm: WarmWorkers | None

    @classmethod
    def of_replica(cls, config: AppConfig) -> "Effects":
        return cls(
            scaler=ReplicaScaler(serve.get_replica_context().app_name),
            free_memory=lambda: psutil.virtual_memory().available,
            memory_limit=memory_limit_bytes,
            metrics=fleet_metrics(),
            warm=WarmWorkers() if config.warm_workers else None,
        )


@serve.deployment(
    name=CONTROLLER_NAME,
    num_replicas=1,
    # Callers wait here while a model loads: never make them queue behind each other.
    max_ongoing_requests=100_000,
    ray_actor_options={"num_cpus": 0},
)
class Controller:
    def __init__(
        self,
        config: AppConfig,
        catalog: list[ModelEntry],
        models: dict[str, dict[str, DeploymentHandle]],
        effects: Effects | None = None,
    ):
        refusals_in_one_line()
        effects = effects or Effects.of_replica(config)
        self.config = config
        self.placements = Placements(effects.scaler, models)
        several = bool(config.nodes)
        self.ledger = Ledger(
            0 if several else effects.memory_limit(config.memory_limit),
            catalog,
            {entry.id: estimate_entry_bytes(entry, config.replica_overhead, config.gguf_dequantize) for entry in catalog},
            lease_ttl=config.lease_ttl,
            nodes=config.node_names if several else None,
        )
        # Several nodes: each is found, budgeted and watched by the monitor; resolved when a
        # node leaves (loads there stop waiting for it).
        self.monitor = (
            NodeMonitor(config.nodes, config.memory_limit, self._node_joined, self._node_lost)
            if several
            else None
        )
        self.warm = effects.warm
        self.metrics = effects.metrics
        # What each node's OS reports free: measured here on one machine, by the probes on several.
        self._free: Callable[[], Free] = (lambda: self.monitor.free) if self.monitor else effects.free_memory
        # Signalled whenever memory, leases or statuses change: waiters re-check.
        self.changes = Changes(self._update_gauges)
        self._loading = SingleFlight()
        self.unloads = Unloads(self.ledger, self.placements, self.metrics, self.changes)
        self.replicas = ReplicaChecks(self.ledger, self.placements, self.metrics, self.changes, self.unloads, self._reload)
        self._ready = asyncio.Event()
        ttls = [entry.idle_ttl for entry in catalog if entry.idle_ttl]
        rounds = [  # each runs once the controller is ready
            *([(self.monitor.check, NODE_CHECK_SECONDS)] if self.monitor else []),
            (self._expire_leases, config.lease_ttl / 4),
            (self.replicas.check_all, REPLICA_CHECK_SECONDS),
            # a local warm worker that was killed, or kept alive for too long
            *([(self.warm.keep_local, REPLICA_CHECK_SECONDS)] if self.warm and not self.monitor else []),
            (self._update_gauges, GAUGE_REPUBLISH_SECONDS),
            *([(self._expire_idle, max(0.5, min(ttls) / 4))] if ttls else []),
        ]
        self._background = [spawn(self._start())] + [
            spawn(every(work, seconds, after=self._ready)) for work, seconds in rounds
        ]

    def check_health(self) -> None:
        """Serve restarts this replica when a background task died; the restart adopts state."""
        for task in self._background:
            if task.done() and not task.cancelled() and task.exception() is not None:
                raise RuntimeError(f"controller task failed: {task.exception()!r}")

    # -- request path -------------------------------------------------------------------------

    async def acquire(self, model_id: str, may_load: bool = True) -> Lease:
        """A lease on the model once it is loaded, loading it if needed and `may_load`."""
        record = self._record(model_id)
        await self._ready.wait()
        if record.status != Status.LOADED and not may_load:
            raise may_not_load(model_id)
        if record.status != Status.LOADED:
            record.waiting += 1
            try:
                await self._loaded(record)
            finally:
                record.waiting -= 1
        return self.ledger.grant(model_id, time.time())

    async def release(self, lease_id: str) -> None:
        if self.ledger.release(lease_id, time.time()) is not None:
            await self.changes.notify()

    async def renew(self, leases: dict[str, str]) -> list[str]:
        """Extend the leases an ingress still uses ({lease id: model id}); the ones it has
        lost (expired, released) are returned. After a restart, only once the running
        replicas' leases are adopted: before, every lease would look lost."""
        await self._ready.wait()
        return self.ledger.renew(leases, time.time())

    async def hold(self, model_id: str, ask: KvAsk) -> int | None:
        """A loaded model's replica asks to hold `ask.held` bytes beyond its process (KV for
        the sequences it is about to run, and its prompt cache), as one claim of room
        (`_make_room`): granted at once if it fits, else after evicting idle models (unless
        `ask.may_evict` is False). While busy models stand in the way it waits up to
        `ask.patience` seconds and returns None: the replica asks again with what it needs by
        then, as its own sequences may have ended. 503 insufficient_memory when it cannot fit
        even once everything else is idle, or, on the `final` ask, when it would still wait."""
        record = self._record(model_id)
        await self._ready.wait()
        before = record.held
        granted = await self._make_room(
            ClaimKind.KV,
            model_id,
            lambda: self.ledger.hold(model_id, ask.held, self._free(), ask.may_evict, ask.alone),
            deadline=time.monotonic() + (0 if ask.final else ask.patience),
            refuse_when_late=ask.final,
        )
        if not granted:
            return None
        if ask.held != before:
            await self.changes.notify()
        return ask.held

    async def check_replica(self, model_id: str) -> None:
        """An ingress saw this model's replica fail: check it now rather than at the next round
        (first whether its node is still there)."""
        record = self._record(model_id)
        if record.entry.base is not None:  # an adapter's replica is its base's
            record = self.ledger[record.entry.base]
        if self.monitor and record.node and not await self.monitor.confirm(record.node):
            return  # the node is gone, and the model with it
        if record.status == Status.LOADED:
            await asyncio.shield(self.replicas.check(record.id))

    async def statuses(self) -> dict[str, dict[str, Any]]:
        return {r.id: {"status": r.status.value, "pinned": r.pinned} for r in self.ledger.models.values()}

    async def readiness(self) -> dict[str, Any]:
        """Ready once state is adopted and every pinned model is loaded."""
        pending = [
            r.id for r in self.ledger.models.values() if r.pinned and r.status != Status.LOADED
        ]
        return {"ready": self._ready.is_set() and not pending, "pinned_not_loaded": pending}

    # -- admin ----------------------------------------------------------------------------------

    async def admin_view(self) -> dict[str, Any]:
        view = self.ledger.view(time.time(), self._free())
        # This node's only: the ones on other nodes are started again as replicas take them.
        view["warm_workers"] = await asyncio.to_thread(waiting_local_workers) if self.warm else []
        return view

    async def preload(self, model_id: str, pin: bool = True) -> None:
        """Load a model now; pinned, it keeps its replica until unloaded through the admin API."""
        record = self._record(model_id)
        was_pinned = record.pinned
        record.pinned = record.pinned or pin
        try:
            await self._ready.wait()
            await self._loaded(record)
        except BaseException:
            record.pinned = was_pinned
            raise
        record.last_used = time.time()

    async def unload(self, model_id: str) -> None:
        """Unpin and scale to zero once the requests in flight have finished.

        Waits for them up to `load_wait_timeout`, then answers 503 (the model stays unpinned).
        """
        record = self._record(model_id)
        record.pinned = False
        await self._ready.wait()
        deadline = time.monotonic() + self.config.load_wait_timeout
        while True:
            for tasks in (self._loading, self.unloads):
                if model_id in tasks:  # its failure is not ours; its length is bounded here
                    await asyncio.wait([tasks[model_id]], timeout=max(0.0, deadline - time.monotonic()))
            if record.status in (Status.UNLOADED, Status.UNLOADING):
                return
            if self.ledger.begin_unload(model_id, "unloaded by an admin"):
                try:
                    await asyncio.shield(self.unloads.evict(model_id, "admin"))
                except Exception as error:
                    raise model_unload_failed(model_id, str(error)) from None
                return
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                doing = (
                    "is still loading" if model_id in self._loading
                    else "is still being unloaded" if model_id in self.unloads
                    else f"is still leased for requests by {len(record.leases)} ingress replica(s)"
                )
                raise model_busy(model_id, doing, self.config.load_wait_timeout)
            await self.changes.wait(remaining)

    # -- loading and eviction -------------------------------------------------------------------

    def _record(self, model_id: str) -> ModelRecord:
        if model_id not in self.ledger:
            raise model_not_found(model_id)
        return self.ledger[model_id]

    async def _loaded(self, record: ModelRecord) -> None:
        """Return once the model is loaded, loading it if needed (one load for all callers).

        Loops because a model loaded for us can be evicted again before we resume.
        """
        while record.status != Status.LOADED:
            await asyncio.shield(self._loading.join(record.id, self._load))

    async def _load(self, model_id: str) -> None:
        """Load a model into a replica of its own, or an adapter into its base's replica, the
        base first: while an adapter waits its base counts as busy (the adapter's `waiting`),
        so that it is not evicted in between."""
        record = self.ledger[model_id]
        base = self.ledger[record.entry.base] if record.entry.base else None
        started = time.perf_counter()
        waits = 1 if base is not None else 0  # the adapter's wait keeps its base busy
        record.waiting += waits
        try:
            while True:
                while model_id in self.unloads:  # an admin unload or an eviction is still running
                    await asyncio.wait([self.unloads[model_id]])
                if base is not None:
                    await self._loaded(base)
                if record.status == Status.LOADED:
                    return
                if record.status == Status.UNLOADED:
                    # Queue, don't refuse: while only busy or loading models stand in the way,
                    # wait for them (up to load_wait_timeout).
                    await self._make_room(
                        ClaimKind.LOAD,
                        model_id,
                        lambda: self.ledger.admit(model_id, self._free()),
                        deadline=time.monotonic() + self.config.load_wait_timeout,
                        refuse_when_late=True,
                    )
                # LOADING here: admitted just now, a starting replica adopted, or a replaced one.
                measured = await (self._into_base(record, base) if base else self._into_replica(record))
                if measured is not None:
                    break
        finally:
            record.waiting -= waits
        seconds = time.perf_counter() - started
        self.metrics["loads"].inc(tags={"model": model_id})
        self.metrics["load_seconds"].observe(seconds, tags={"model": model_id})
        logger.info(
            "loaded model %s%s in %.2f s: charged %s (%s); used %s of %s",
            model_id,
            f" on node {record.node}" if self.monitor else "",
            seconds,
            format_gb(record.cost),
            f"adapter in {base.id}'s replica" if base else
            f"measured process {format_gb(measured.process_bytes)}, weights {format_gb(measured.weights_bytes)}",
            format_gb(self.ledger.used(record.node)),
            format_gb(self.ledger.nodes[record.node].limit),
        )
        await self.changes.notify()

    async def _reload(self, model_id: str) -> None:
        """Load a model again whose replica Serve replaced without weights."""
        try:
            await asyncio.shield(self._loading.join(model_id, self._load))
        except ApiError as error:
            logger.error("reloading model %s failed: %s", model_id, error.message)

    async def _into_replica(self, record: ModelRecord) -> Measured | None:
        """Start the model's replica on the node it was admitted to and load its weights there;
        None when that node left meanwhile (the model is to be placed again)."""
        node = record.node
        if node is None:  # its node left while room was made there
            return None
        gone = self.monitor.gone(node) if self.monitor else asyncio.get_running_loop().create_future()
        try:
            await self.placements.start(record)
            if record.node != node:  # it left while the replica was being asked for
                return None
            report = await unless(gone, self.placements.load(record))
        except Exception as error:
            if record.node != node:  # the ledger has unloaded it with its node
                logger.warning("node %s left while model %s was loading there; placing it again", node, record.id)
                return None
            reason = failure(error)
            logger.error("loading model %s failed: %s", record.id, reason)
            self.ledger.fail_load(record.id, reason)
            await asyncio.wait([self.unloads.evict(record.id, "load_failed")])
            raise model_load_failed(record.id, reason) from None
        measured = report.measured()
        self.ledger.finish_load(record.id, measured, time.time())
        if report.usage is not None:
            self.ledger.report_usage(record.id, report.usage)
        if self.warm:
            node_id = self.ledger.nodes[node].node_id if self.monitor else None
            spawn(self.warm.replace(node_id, report.runtime_env, report.warm_worker))
        return measured

    async def _into_base(self, record: ModelRecord, base: ModelRecord) -> Measured | None:
        """Load an adapter into its base's replica; None when that replica went meanwhile
        (and the adapter with it)."""
        if record.status != Status.LOADING or base.status != Status.LOADED:
            return None
        try:
            loaded = await self.placements.load_adapter(record)
        except Exception as error:
            reason = failure(error)
            logger.error("loading adapter %s into %s failed: %s", record.id, base.id, reason)
            self.ledger.restore(record.id, Status.UNLOADED, f"load failed: {reason}")
            await self.changes.notify()
            raise model_load_failed(record.id, reason) from None
        measured = Measured(loaded, loaded, 0, base.measured.replica if base.measured else "")
        self.ledger.finish_load(record.id, measured, time.time())
        return measured

    async def _make_room(
        self,
        kind: ClaimKind,
        model_id: str,
        ask: Callable[[], Evict | Wait | Insufficient | Unsized | NoNode],
        deadline: float,
        refuse_when_late: bool,
    ) -> bool:
        """Run a claim's decisions (`policies.room`) until it holds: evict the idle models
        they name, wait while busy ones stand in the way, refuse what cannot fit. Past
        `deadline` a waiting claim is refused, or, unless `refuse_when_late`, False is
        returned (its claimant asks again with what it needs by then)."""
        while True:
            decision = ask()
            if isinstance(decision, Unsized):
                raise unsized(model_id, self.ledger[model_id].entry.path)
            if isinstance(decision, Wait):
                remaining = deadline - time.monotonic()
                if remaining > 0:
                    if kind == ClaimKind.LOAD:  # a KV claim waits in short turns: one line per load only
                        logger.info(
                            "model %s waits for busy models to finish (%s); up to %.0f s more",
                            model_id, decision.message, remaining,
                        )
                    await self.changes.wait(remaining)
                    continue
                if not refuse_when_late:
                    return False
            refused = refusal(kind, decision, self.config.load_wait_timeout)
            if refused is not None:
                self.metrics["refusals"].inc(tags={"model": model_id})
                logger.warning("refused model %s: %s (budget %s)", model_id, refused.message,
                               format_gb(self.ledger.limit))
                raise refused
            if not decision.victims:
                self._update_gauges()
                return True
            logger.info(
                "evicting %s (least recently used, idle) %s", ", ".join(decision.victims), purpose(kind, model_id)
            )
            failed = await self.unloads.evict_all(decision.victims, "lru")
            if failed:
                if kind == ClaimKind.LOAD:  # admitted with its victims: it is not loading after all
                    self.ledger.restore(model_id, Status.UNLOADED, f"could not make room: {failed}")
                    await self.changes.notify()
                raise eviction_failed(kind, model_id, failed)
            if kind == ClaimKind.LOAD:  # a load's room was claimed with its victims; KV asks again
                self._update_gauges()
                return True

    # -- start, restart and expiry --------------------------------------------------------------

    async def _start(self) -> None:
        """Adopt what Serve really runs, then load pinned models.

        Model deployments are declared with no replica, so a fresh start finds none. After
        a controller restart some replicas hold weights (adopted as loaded, with the leases
        of the requests they serve) and some are starting or loading for a request the
        previous controller took (their load finishes). Every other deployment is set to
        zero: nothing runs that the ledger does not charge. With several nodes, the nodes
        in the cluster are found first.
        """
        if self.monitor:
            await self.monitor.check()
        await self.placements.scaler.wait_until_app_settled()
        records = list(self.ledger.models.values())
        adopt(self.ledger, await self.placements.survey(records), time.time())
        await self.placements.keep_only(records)
        for record in records:
            if record.status == Status.LOADING:
                self._loading.join(record.id, self._load)
        logger.info(
            "controller ready: budget %s on %d node(s), adopted %s",
            format_gb(self.ledger.limit),
            sum(n.alive for n in self.ledger.nodes.values()),
            [r.id for r in records if r.holds_memory] or "no loaded models",
        )
        self._ready.set()
        await self.changes.notify()
        if self.warm:  # one on each node present (None: this machine)
            nodes = self.ledger.nodes.values()
            for node_id in [n.node_id for n in nodes if n.alive and n.node_id] if self.monitor else [None]:
                await self.warm.warm(node_id)
        await self._load_pinned()

    async def _load_pinned(self) -> None:
        for record in self.ledger.models.values():
            if record.pinned and record.status != Status.LOADED:
                try:
                    await self.preload(record.id)
                except ApiError as error:
                    logger.error("pinned model %s not loaded: %s", record.id, error.message)

    async def _expire_leases(self) -> None:
        expired = self.ledger.expire_leases(time.time())
        for lease in expired:
            self.metrics["expired_leases"].inc(tags={"model": lease.model})
            logger.warning(
                "lease %s on model %s expired: its holder stopped renewing it (ingress gone?)",
                lease.id,
                lease.model,
            )
        if expired:
            await self.changes.notify()

    async def _expire_idle(self) -> None:
        expired = self.ledger.take_idle(time.time())
        for model_id in expired:
            logger.info("model %s idle for over %.0f s", model_id, self.ledger[model_id].entry.idle_ttl)
        await self.unloads.evict_all(tuple(expired), "idle_ttl")

    # -- nodes ----------------------------------------------------------------------------------

    async def _node_joined(self, node: PresentNode, budget: int) -> None:
        self.ledger.join(node.name, node.node_id, node.labels, budget)
        await self.changes.notify()
        if self._ready.is_set():  # at start, `_start` loads them once every node is found
            if self.warm:
                spawn(self.warm.warm(node.node_id))
            spawn(self._load_pinned())

    async def _node_lost(self, name: str) -> None:
        """Its models are unloaded, their loads placed again elsewhere; their deployments
        there go to zero, so that a node coming back starts with nothing."""
        lost = self.ledger.lose(name, time.time())
        self.metrics["lost_nodes"].inc(tags={"node": name})
        for record in self.ledger.models.values():
            if record.entry.base is None and name in self.placements.nodes(record.id):
                spawn(self.placements.stop_on(record, name))
        if lost:
            logger.warning("models unloaded with node %s: %s", name, ", ".join(lost))
        await self.changes.notify()

    # -- accounting -----------------------------------------------------------------------------

    def _update_gauges(self) -> None:
        publish_gauges(self.metrics, self.ledger, several_nodes=self.monitor is not None)



