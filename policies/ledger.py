"""The controller's bookkeeping: which models hold memory, what they cost, who is using them.

Pure: no Ray, no I/O, no clock (callers pass `now`). The controller deployment owns one
`Ledger` and does the slow work its decisions call for (scaling replicas, loading weights).

- A model's status changes only through `_move`, which checks the transition and logs it.
- An ingress holds a `Lease` on a model while it has requests for it there (its requests
  share it; it lingers a moment after the last one ends). Leases
  expire unless renewed, so a holder that died frees its model within `lease_ttl`; a
  released lease cannot come back through a late renewal.
- Loads are admitted by `admit`: evict least recently used idle models, wait for busy or
  loading ones, or refuse what cannot fit even when everything unpinned is gone.
- A loaded text model also holds what its replica was granted by `hold` for the KV of the
  sequences it runs and for its prompt cache; growth is admitted like a load.
- A LoRA adapter is a model of its own whose memory is its matrices, in its base's replica:
  it loads only into a loaded base, on the base's node. Its base is busy while it is, is
  evicted only after it (adapters go first), and takes it along when unloaded or replaced.
- Each node has its own budget. A load is placed on the node where it fits after the fewest
  evictions (then the node it last ran on, then the most room left); eviction, KV growth and
  memory other programs use are counted per node. A node that leaves takes its models along.
"""

from __future__ import annotations

import uuid
from collections import OrderedDict
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Mapping, Sequence

from policies.config import LOCAL_NODE, ModelEntry
from policies.eviction import Evict, Insufficient, Resident, headroom
from policies.speculation import SpeculationCounts
from policies.kv import Usage
from policies.room import NoNode, Space, Unsized, Wait, decide
from policies.logs import module_logger

logger = module_logger(__name__)

# Released lease ids remembered so that a renewal racing the release cannot revive them.
RELEASED_MEMORY = 100_000

# What the operating system reports free: one figure for every node (they share one machine),
# or one per node; a node missing from the mapping is bounded by its budget alone.
Free = int | Mapping[str, int]


class Status(str, Enum):
    UNLOADED = "unloaded"
    LOADING = "loading"
    LOADED = "loaded"
    UNLOADING = "unloading"


HOLDS_MEMORY = (Status.LOADING, Status.LOADED, Status.UNLOADING)

ALLOWED = {
    (Status.UNLOADED, Status.LOADING),  # admitted, or a starting replica adopted
    (Status.UNLOADED, Status.LOADED),  # a replica with weights adopted after a restart
    (Status.LOADING, Status.LOADED),
    (Status.LOADING, Status.UNLOADING),  # the load failed: its replica must go
    (Status.LOADING, Status.UNLOADED),  # the load failed and no replica is left
    (Status.LOADED, Status.LOADING),  # the replica was replaced without weights: reload
    (Status.LOADED, Status.UNLOADING),  # evicted, unloaded by an admin, or idle too long
    (Status.LOADED, Status.UNLOADED),  # its node left the cluster, replica and all
    (Status.UNLOADING, Status.UNLOADED),
    (Status.UNLOADING, Status.LOADED),  # scaling down failed and the weights are still there
}


class LedgerError(RuntimeError):
    """A caller asked for something the ledger's state does not allow (a bug, not input)."""


@dataclass(frozen=True)
class Measured:
    """What a replica measured after loading its model."""

    bytes: int  # the process with its weights, before any request
    weights_bytes: int
    process_bytes: int
    replica: str = ""  # which replica measured it: a different one means it was replaced


@dataclass(frozen=True)
class Lease:
    """An ingress's claim on a loaded model for its requests; `ttl` seconds unless renewed."""

    id: str
    model: str
    ttl: float
    node: str = LOCAL_NODE  # where the model runs: the request goes to its deployment there


@dataclass
class _LeaseRecord:
    lease: Lease
    granted_at: float
    expires_at: float


@dataclass
class NodeRecord:
    """A node of the fleet: its own budget, and whether Ray has it now."""

    name: str
    limit: int
    alive: bool
    node_id: str | None = None
    labels: dict[str, str] = field(default_factory=dict)
    joins: int = 0
    losses: int = 0


@dataclass
class ModelRecord:
    entry: ModelEntry
    estimated_bytes: int | None  # None: no files on disk to estimate from
    pinned: bool
    status: Status = Status.UNLOADED
    node: str | None = None  # where it holds memory
    last_node: str | None = None  # where it was placed last: its prompt cache is saved there
    leases: set[str] = field(default_factory=set)
    waiting: int = 0  # acquirers waiting for this model's load
    last_used: float | None = None
    measured: Measured | None = None
    usage: Usage = field(default_factory=Usage)  # what its replica reported last
    held: int = 0  # bytes granted beyond the process: KV of running sequences, prompt cache
    loads: int = 0
    evictions: int = 0

    @property
    def id(self) -> str:
        return self.entry.id

    @property
    def sized(self) -> bool:
        return self.entry.memory_bytes is not None or self.measured is not None or self.estimated_bytes is not None

    @property
    def cost(self) -> int:
        """Bytes charged: the override (the whole cost, exactly), else the process as last
        measured plus what its replica holds, else the estimate.

        An unsized model is never admitted; one adopted while loading costs 0 until measured.
        """
        if self.entry.memory_bytes is not None:
            return self.entry.memory_bytes
        if self.measured is not None:
            return self.process_bytes + self.held
        return self.estimated_bytes or 0

    @property
    def process_bytes(self) -> int | None:
        """The replica's process, weights included: as re-measured idle, else at load."""
        if self.measured is None:
            return None
        return self.usage.process_bytes or self.measured.bytes

    @property
    def holds_memory(self) -> bool:
        return self.status in HOLDS_MEMORY

    @property
    def busy(self) -> bool:
        return bool(self.leases or self.waiting)

    def idle_left(self, now: float) -> float | None:
        """Seconds until its idle TTL unloads it (negative: overdue); None: no countdown runs."""
        if self.status != Status.LOADED or not self.entry.idle_ttl or self.pinned or self.busy:
            return None
        idle_since = self.last_used if self.last_used is not None else now
        return self.entry.idle_ttl - (now - idle_since)


class Ledger:
    def __init__(
        self,
        limit: int,
        entries: list[ModelEntry],
        estimates: dict[str, int | None],
        lease_ttl: float,
        nodes: Sequence[str] | None = None,
    ):
        """`limit` is the one node's budget; with `nodes`, each is absent with no budget
        until it `join`s with its own."""
        self.lease_ttl = lease_ttl
        self.several_nodes = nodes is not None
        self.nodes = (
            {name: NodeRecord(name, 0, alive=False) for name in nodes}
            if nodes is not None
            else {LOCAL_NODE: NodeRecord(LOCAL_NODE, limit, alive=True)}
        )
        self.models = {
            entry.id: ModelRecord(entry, estimates[entry.id], entry.pinned) for entry in entries
        }
        self._leases: dict[str, _LeaseRecord] = {}
        self._released: OrderedDict[str, None] = OrderedDict()

    def __getitem__(self, model_id: str) -> ModelRecord:
        return self.models[model_id]

    def __contains__(self, model_id: str) -> bool:
        return model_id in self.models

    # -- status -----------------------------------------------------------------------------

    def _move(self, record: ModelRecord, status: Status, reason: str) -> None:
        """The one place a model's status changes."""
        if (record.status, status) not in ALLOWED:
            raise LedgerError(f"model {record.id}: {record.status.value} -> {status.value} ({reason})")
        logger.info("model %s: %s -> %s (%s)", record.id, record.status.value, status.value, reason)
        record.status = status

    def admit(self, model_id: str, os_available: Free) -> Evict | Wait | Insufficient | Unsized | NoNode:
        """Decide whether an unloaded model may load now, and on which node; on `Evict`, claim
        its room there (the model's `node`).

        Claiming marks the victims unloading and the model loading in one step, so two
        admissions can never plan with the same free bytes.
        """
        record = self.models[model_id]
        if record.status != Status.UNLOADED:
            raise LedgerError(f"model {model_id} is {record.status.value}, not unloaded")
        if not record.sized:
            return Unsized()
        nodes = [n for n in self.nodes.values() if n.alive and record.entry.node in (None, n.name)]
        if record.entry.base is not None:
            base = self.models[record.entry.base]
            if base.status != Status.LOADED:  # its replica is being replaced, or its node left
                return Wait(f"its base {base.id} is {base.status.value}")
            nodes = [self.nodes[base.node]]
        if not nodes:
            where = f"its node {record.entry.node} is not" if record.entry.node else "none of the fleet's nodes is"
            return NoNode(f"model {model_id} cannot load: {where} in the cluster now")
        placements, waits, refusals = [], [], []
        for node in nodes:
            residents = self._residents(node.name)
            available = self._os_available(os_available, node.name)
            # Busy and loading models finish in time; only pinned ones stay for good.
            decision = decide(
                Space(residents, node.limit, available),
                record.cost,
                Space(self._residents(node.name, eventually_idle=True), node.limit, available),
                record.cost,
                node=node.name if self.several_nodes else None,
            )
            if isinstance(decision, Evict):
                left = headroom(
                    [r for r in residents if r.id not in decision.victims], node.limit, available
                ) - record.cost
                preference = (len(decision.victims), node.name != record.last_node, -left, node.name)
                placements.append((preference, node.name, decision))
            elif isinstance(decision, Wait):
                waits.append(decision)
            else:
                refusals.append(decision)
        if placements:
            _, node_name, decision = min(placements)
            for victim in decision.victims:
                self._move(self.models[victim], Status.UNLOADING, f"evicted to fit {model_id}")
            record.node = record.last_node = node_name
            evicted = f" after evicting {', '.join(decision.victims)}" if decision.victims else ""
            on_node = f" on node {node_name}" if self.several_nodes else ""
            self._move(record, Status.LOADING, f"admitted{on_node}{evicted}")
            return decision
        # What cannot fit on any node is refused with the room the best one leaves once every
        # unpinned model there is gone.
        return waits[0] if waits else max(refusals, key=lambda refusal: refusal.available)

    def finish_load(self, model_id: str, measured: Measured, now: float) -> None:
        record = self.models[model_id]
        if record.status != Status.LOADING:
            raise LedgerError(f"model {model_id} is {record.status.value}: no load to finish")
        record.measured = measured
        record.loads += 1
        record.last_used = now
        self._move(record, Status.LOADED, "loaded")

    def replica_replaced(self, model_id: str, measured: Measured, now: float) -> None:
        """A loaded model's replica died and its replacement already loaded the weights again
        (for a request that reached it first): count the load, take its measurement."""
        record = self.models[model_id]
        logger.warning(
            "model %s: replica %s replaced by %s, which reloaded the weights",
            model_id,
            record.measured.replica if record.measured else "?",
            measured.replica,
        )
        record.measured = measured
        record.held, record.usage = 0, Usage()  # the new replica holds nothing yet
        record.loads += 1
        record.last_used = now
        self._drop_adapters(record, f"its base {model_id}'s replica was replaced", now)

    def _drop_adapters(self, base: ModelRecord, reason: str, now: float | None = None) -> None:
        """The base's replica is gone or replaced: its adapters with it, their leases too (a
        request under one would reach a replica without the adapter)."""
        for record in self.adapters_of(base):
            if not record.holds_memory:
                continue
            for lease_id in list(record.leases):
                self.release(lease_id, now if now is not None else record.last_used or 0.0)
            record.held, record.usage, record.node = 0, Usage(), None
            self._move(record, Status.UNLOADED, reason)

    def adapters_of(self, base: ModelRecord) -> list[ModelRecord]:
        return [r for r in self.models.values() if r.entry.base == base.id]

    def fail_load(self, model_id: str, reason: str) -> None:
        """The load failed; its replica must still be scaled down (`finish_unload`)."""
        self._move(self.models[model_id], Status.UNLOADING, f"load failed: {reason}")

    def begin_reload(self, model_id: str, reason: str) -> None:
        record = self.models[model_id]
        record.held, record.usage = 0, Usage()  # its replica, and what it held, are gone
        self._move(record, Status.LOADING, reason)
        self._drop_adapters(record, f"its base {model_id} reloads: {reason}")

    def begin_unload(self, model_id: str, reason: str) -> bool:
        """Mark a loaded model unloading if nothing uses it; False if it is busy or not loaded."""
        record = self.models[model_id]
        if record.status != Status.LOADED or record.busy or any(a.busy for a in self.adapters_of(record)):
            return False
        self._move(record, Status.UNLOADING, reason)
        return True

    def finish_unload(self, model_id: str, reason: str, evicted: bool) -> None:
        record = self.models[model_id]
        if evicted:
            record.evictions += 1
        record.held, record.usage, record.node = 0, Usage(), None
        self._move(record, Status.UNLOADED, reason)
        self._drop_adapters(record, f"its base {model_id} was unloaded")

    def restore(self, model_id: str, status: Status, reason: str) -> None:
        """Set what Serve really runs after a scaling call failed or timed out."""
        record = self.models[model_id]
        if status == Status.UNLOADED:
            record.node = None
        if record.status != status:
            self._move(record, status, reason)
        if status == Status.UNLOADED:
            self._drop_adapters(record, f"its base {model_id} is not loaded")

    def adopt(
        self,
        model_id: str,
        status: Status,
        measured: Measured | None,
        lease_ids: list[str],
        now: float,
        node: str = LOCAL_NODE,
    ) -> None:
        """Take over a model a previous controller left running on `node`, with its live
        requests."""
        record = self.models[model_id]
        record.measured = measured or record.measured
        record.last_used = now
        record.node = record.last_node = node
        self._move(record, status, "adopted from a running replica" + (f" on node {node}" if self.several_nodes else ""))
        for lease_id in lease_ids:
            self._add_lease(Lease(lease_id, model_id, self.lease_ttl, node), now)

    def take_idle(self, now: float) -> list[str]:
        """Models unused for longer than their idle TTL, marked unloading."""
        expired = [
            r.id
            for r in self.models.values()
            if (r.idle_left(now) or 0) < 0 and not any(a.busy for a in self.adapters_of(r))
        ]
        for model_id in expired:
            self._move(self.models[model_id], Status.UNLOADING, "idle_ttl")
        return expired

    # -- what a loaded model holds ------------------------------------------------------------

    def hold(
        self, model_id: str, held: int, os_available: Free, evict: bool = True, alone: int | None = None
    ) -> Evict | Wait | Insufficient:
        """A loaded model's replica asks to hold `held` bytes beyond its process (KV of its
        sequences and its prompt cache): granted on `Evict(())`; on `Evict(victims)` the
        victims are claimed, and the caller asks again once they are gone (nothing is
        granted while they still hold their memory).

        `alone` is what the model would hold for the new sequence once its others are done
        (default: `held`). Shrinking is always granted. Without `evict`, growth that needs evictions waits (the
        caller has cheaper room to make first). Growth waits while busy models (this one's other
        sequences among them) stand in the way, and is refused only when it cannot fit even
        with every other unpinned model gone and this model's sequences finished.
        """
        record = self.models[model_id]
        if record.status not in (Status.LOADED, Status.LOADING):
            if held <= record.held:  # a replica on its way out giving back: nothing to do
                return Evict(())
            raise LedgerError(f"model {model_id} is {record.status.value}; only loaded models hold KV")
        growth = held - record.held
        if growth <= 0:
            record.held = held
            return Evict(())
        node = self.nodes[record.node]
        others = self._holding(node.name)
        available = self._os_available(os_available, node.name)
        # Once everything else is idle and this model's own sequences are done, only its
        # process and prompt cache stay (and it is no candidate for eviction itself).
        settled = record.cost - record.held + record.usage.prompt_cache_bytes
        eventually = Space(
            [
                self._resident(r, eventually_idle=True) if r is not record else Resident(r.id, settled, 0.0, pinned=True)
                for r in others
            ],
            node.limit,
            None if available is None else available + record.held - record.usage.prompt_cache_bytes,
        )
        decision = decide(
            Space([self._resident(r) for r in others], node.limit, available),
            growth,
            eventually,
            (held if alone is None else alone) - record.usage.prompt_cache_bytes,
            may_evict=evict,
            node=node.name if self.several_nodes else None,
        )
        if not isinstance(decision, Evict):
            return decision
        for victim in decision.victims:
            self._move(self.models[victim], Status.UNLOADING, f"evicted to fit KV of {model_id}")
        if not decision.victims:
            record.held = held
        return decision

    def report_usage(self, model_id: str, usage: Usage) -> None:
        """What a loaded model's replica says it holds (its periodic answer, or a restart's).

        The process measurement replaces the load-time one: memory the process took since
        (allocator caches, fragmentation) is charged too.
        """
        record = self.models[model_id]
        record.usage = usage
        if not record.held:
            # A controller that restarted learns here what the replica was granted before.
            record.held = usage.held_bytes

    # -- leases -----------------------------------------------------------------------------

    def grant(self, model_id: str, now: float) -> Lease:
        record = self.models[model_id]
        if record.status != Status.LOADED:
            raise LedgerError(f"model {model_id} is {record.status.value}; leases need it loaded")
        lease = Lease(uuid.uuid4().hex, model_id, self.lease_ttl, record.node)
        self._add_lease(lease, now)
        return lease

    def renew(self, leases: dict[str, str], now: float) -> list[str]:
        """Extend leases their holder still uses ({lease id: model id}); returns the ones it
        could not, which their holder must stop counting on.

        A lease this ledger does not know (granted before a controller restart, before its
        request reached the replica) comes back if its model is loaded and it was never
        released or expired here.
        """
        lost = []
        for lease_id, model_id in leases.items():
            record = self._leases.get(lease_id)
            if record is not None:
                record.expires_at = now + self.lease_ttl
            elif (
                lease_id not in self._released
                and model_id in self.models
                and self.models[model_id].status == Status.LOADED
            ):
                self._add_lease(Lease(lease_id, model_id, self.lease_ttl, self.models[model_id].node), now)
            else:
                lost.append(lease_id)
        return lost

    def release(self, lease_id: str, now: float) -> Lease | None:
        """End a lease; None if it had already ended (releasing twice is harmless)."""
        record = self._leases.pop(lease_id, None)
        self._remember_released(lease_id)
        if record is None:
            return None
        model = self.models[record.lease.model]
        model.leases.discard(lease_id)
        self._used(model, now)
        return record.lease

    def expire_leases(self, now: float) -> list[Lease]:
        """End leases whose holder stopped renewing them (a dead ingress, a lost release)."""
        expired = [r.lease for r in self._leases.values() if r.expires_at <= now]
        for lease in expired:
            self.release(lease.id, now)
        return expired

    def _add_lease(self, lease: Lease, now: float) -> None:
        self._leases[lease.id] = _LeaseRecord(lease, now, now + lease.ttl)
        record = self.models[lease.model]
        record.leases.add(lease.id)
        self._used(record, now)

    def _used(self, record: ModelRecord, now: float) -> None:
        """A use of an adapter is a use of its base too (its idle countdown, its recency)."""
        record.last_used = now
        if record.entry.base is not None:
            self.models[record.entry.base].last_used = now

    def _remember_released(self, lease_id: str) -> None:
        self._released[lease_id] = None
        if len(self._released) > RELEASED_MEMORY:
            self._released.popitem(last=False)

    # -- nodes ------------------------------------------------------------------------------

    def join(self, name: str, node_id: str | None, labels: dict[str, str], limit: int) -> None:
        """A node of the fleet is in the cluster (again), with this budget."""
        node = self.nodes[name]
        node.alive, node.node_id, node.labels, node.limit = True, node_id, dict(labels), limit
        node.joins += 1
        logger.info("node %s (%s) joined: budget %.1f GB", name, node_id, limit / 1e9)

    def lose(self, name: str, now: float) -> list[str]:
        """A node left the cluster: its models are unloaded, with their leases (the requests
        they served failed with their replicas). Returns those models."""
        node = self.nodes[name]
        node.alive, node.node_id, node.labels = False, None, {}
        node.losses += 1
        lost = [r for r in self.models.values() if r.node == name and r.status != Status.UNLOADED]
        for record in lost:
            for lease_id in list(record.leases):
                self.release(lease_id, now)
            record.held, record.usage, record.node = 0, Usage(), None
            self._move(record, Status.UNLOADED, f"node {name} left the cluster")
        logger.warning("node %s left: %s unloaded", name, [r.id for r in lost] or "no models")
        return [r.id for r in lost]

    # -- memory -----------------------------------------------------------------------------

    @property
    def limit(self) -> int:
        """The budget of the nodes in the cluster, together."""
        return sum(n.limit for n in self.nodes.values() if n.alive)

    def used(self, node: str | None = None) -> int:
        return sum(r.cost for r in self._holding(node))

    def available(self, os_available: Free, node: str | None = None) -> int:
        """Bytes a new model may take now on `node`; on all nodes in the cluster, together."""
        if node is None:
            return sum(self.available(os_available, n.name) for n in self.nodes.values() if n.alive)
        residents = self._residents(node)
        return max(0, headroom(residents, self.nodes[node].limit, self._os_available(os_available, node)))

    def _holding(self, node: str | None) -> list[ModelRecord]:
        """The models holding memory on `node`; on every node when None."""
        return [r for r in self.models.values() if r.holds_memory and node in (None, r.node)]

    def _residents(self, node: str, eventually_idle: bool = False) -> list[Resident]:
        return [self._resident(r, eventually_idle) for r in self._holding(node)]

    def _os_available(self, os_available: Free, node: str) -> int | None:
        free = os_available if isinstance(os_available, int) else os_available.get(node)
        if free is None:
            return None
        # Loading models have their bytes claimed here but not yet taken from the OS.
        return free - sum(
            r.cost for r in self.models.values() if r.status == Status.LOADING and r.node == node
        )

    def _resident(self, record: ModelRecord, eventually_idle: bool = False) -> Resident:
        """A model as the planner sees it. A base is busy while one of its adapters is (or
        waits to load), stays while one is pinned, and was used when one was last: so its
        adapters are always evicted before it."""
        loaded = [a for a in self.adapters_of(record) if a.holds_memory]
        waiting = [record, *self.adapters_of(record)]
        return Resident(
            id=record.id,
            bytes=record.cost,
            last_used=max(r.last_used or 0.0 for r in [record, *loaded]),
            pinned=record.pinned or any(a.pinned for a in loaded),
            in_flight=0 if eventually_idle else sum(len(r.leases) + r.waiting for r in waiting),
            loading=not eventually_idle and record.status != Status.LOADED,
            adapter_of=record.entry.base,
        )

    # -- views ------------------------------------------------------------------------------

    def view(self, now: float, os_available: Free) -> dict[str, Any]:
        return {
            "memory_limit_bytes": self.limit,
            "used_bytes": self.used(),
            "available_bytes": self.available(os_available),
            "nodes": [
                {
                    "name": n.name,
                    "node_id": n.node_id,
                    "alive": n.alive,
                    "labels": n.labels,
                    "memory_limit_bytes": n.limit,
                    "used_bytes": self.used(n.name),
                    "available_bytes": self.available(os_available, n.name) if n.alive else 0,
                    "models": [r.id for r in self._holding(n.name)],
                    "joins": n.joins,
                    "losses": n.losses,
                }
                for n in self.nodes.values()
            ],
            "models": [self._model_view(r, now) for r in self.models.values()],
        }

    def _model_view(self, r: ModelRecord, now: float) -> dict[str, Any]:
        idle_left = r.idle_left(now)
        leases = sorted(
            (self._leases[i] for i in r.leases), key=lambda record: record.granted_at
        )
        return {
            "id": r.id,
            "base": r.entry.base,
            "type": r.entry.type,
            "family": r.entry.family,
            "status": r.status.value,
            "node": r.node,
            "pinned": r.pinned,
            "memory_bytes": r.cost if r.holds_memory else None,
            "estimated_bytes": r.estimated_bytes,
            "weights_bytes": r.measured.weights_bytes if r.measured else None,
            "process_bytes": r.process_bytes,
            "prompt_cache_bytes": r.usage.prompt_cache_bytes if r.holds_memory else None,
            "kv_bytes": r.usage.kv_bytes if r.holds_memory else None,
            "held_bytes": r.held if r.holds_memory else None,
            "sequences": r.usage.sequences,
            "kv_bytes_per_token": r.usage.kv_bytes_per_token or None,
            "speculation": speculation_view(r.usage.speculation),
            "last_used": r.last_used,
            "idle_unload_in_s": None if idle_left is None else round(max(0.0, idle_left), 1),
            "in_flight": len(r.leases),
            "waiting": r.waiting,
            "leases": [
                {
                    "id": record.lease.id,
                    "age_s": round(now - record.granted_at, 3),
                    "expires_in_s": round(record.expires_at - now, 3),
                }
                for record in leases
            ],
            "loads": r.loads,
            "evictions": r.evictions,
        }


def speculation_view(counts: SpeculationCounts | None) -> dict[str, Any] | None:
    """A replica's speculation as /admin/models shows it (None: it does not speculate)."""
    if counts is None:
        return None
    return {
        "proposed_tokens": counts.proposed,
        "accepted_tokens": counts.accepted,
        "acceptance_rate": counts.acceptance_rate,
        "passes": counts.passes,
    }
