"""The fleet's nodes as the controller sees them: which are in the cluster, their budgets and
the memory their operating systems report free.

One `NodeProbe` actor runs on each node present (no CPU, a few MB): it works out the node's
budget there (a percentage applies to that node's memory; Metal's working set bounds it) and
answers how much memory is free. Probes belong to the controller's replica and die with it.

A node is gone when Ray's GCS says so, or when its probe has not answered for
`NODE_SILENT_SECONDS` (the GCS takes tens of seconds to declare a node dead; a Mac that
lost power answers nothing at once).
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Awaitable, Callable

import psutil
import ray

from policies.config import NodeSpec, metal_backend
from policies.memory import parse_limit
from policies.nodes import PresentNode, present_nodes
from policies.logs import module_logger

logger = module_logger(__name__)

NODE_CHECK_SECONDS = 1.0
NODE_SILENT_SECONDS = 4.0
PROBE_ANSWER_SECONDS = 2.0
# A Ray node that went silent, or whose probe never answered, is not tried again for this
# long: Ray may list a dead node as alive for tens of seconds.
NODE_RETRY_SECONDS = 30.0


def memory_limit_bytes(limit: str | int) -> int:
    """The budget on this machine; on Apple Silicon never above Metal's recommended working set."""
    budget = parse_limit(limit, psutil.virtual_memory().total)
    if not metal_backend():  # the CPU backend uses ordinary memory; MLX stays unimported here
        return budget
    try:
        import mlx.core as mx

        if mx.metal.is_available():
            working_set = mx.metal.device_info().get("max_recommended_working_set_size")
            if working_set:
                budget = min(budget, int(working_set))
    except Exception:  # an MLX without Metal
        pass
    return budget


@ray.remote(num_cpus=0)
class NodeProbe:
    def budget(self, limit: str | int) -> int:
        return memory_limit_bytes(limit)

    def free(self) -> int:
        return psutil.virtual_memory().available


@dataclass
class _Watched:
    present: PresentNode
    probe: ray.actor.ActorHandle
    free: int
    answered_at: float


class NodeMonitor:
    """Finds the configured nodes in the cluster and tells the controller when one joins or
    leaves (`on_join(present, budget)`, `on_lose(name)`); `free` is each present node's free
    memory as last reported."""

    def __init__(
        self,
        specs: list[NodeSpec],
        default_limit: str | int,
        on_join: Callable[[PresentNode, int], Awaitable[None]],
        on_lose: Callable[[str], Awaitable[None]],
    ):
        self.specs = {spec.name: spec for spec in specs}
        self.default_limit = default_limit
        self.on_join = on_join
        self.on_lose = on_lose
        self._watched: dict[str, _Watched] = {}
        self._unreachable: dict[str, float] = {}  # Ray node id -> when it last failed us
        self._gone: dict[str, asyncio.Future] = {}

    @property
    def free(self) -> dict[str, int]:
        return {name: watched.free for name, watched in self._watched.items()}

    async def check(self) -> None:
        """One round: join the nodes that appeared, lose the ones that left or went silent."""
        now = time.monotonic()
        self._unreachable = {i: when for i, when in self._unreachable.items() if now - when < NODE_RETRY_SECONDS}
        listed = [n for n in await asyncio.to_thread(ray.nodes) if n["NodeID"] not in self._unreachable]
        known = {name: watched.present.node_id for name, watched in self._watched.items()}
        present = present_nodes(self.specs.values(), listed, known)
        for name, watched in list(self._watched.items()):
            now_there = present.get(name)
            if now_there is None or now_there.node_id != watched.present.node_id:
                await self.lose(name, "Ray no longer lists it" if now_there is None else "it restarted")
        await asyncio.gather(
            *(self._join(node) for name, node in present.items() if name not in self._watched),
            *(self._ask(name) for name in list(self._watched)),
        )

    def gone(self, name: str) -> asyncio.Future:
        """Resolved when node `name` leaves: a call waiting for a replica there would wait
        for good. The caller checks that it is there now."""
        return self._gone.setdefault(name, asyncio.get_running_loop().create_future())

    async def confirm(self, name: str) -> bool:
        """Whether the node still answers now (asked when a replica there died)."""
        if name not in self._watched:
            return False
        await self._ask(name, silent_after=0.0)
        return name in self._watched

    async def lose(self, name: str, why: str) -> None:
        watched = self._watched.pop(name, None)
        if watched is None:
            return
        logger.warning("node %s (%s) left the fleet: %s", name, watched.present.node_id, why)
        self._unreachable[watched.present.node_id] = time.monotonic()
        ray.kill(watched.probe)  # if it still lives somewhere, it must not linger
        gone = self._gone.pop(name, None)
        if gone is not None and not gone.done():
            gone.set_result(None)
        await self.on_lose(name)

    async def _join(self, node: PresentNode) -> None:
        spec = self.specs[node.name]
        probe = NodeProbe.options(label_selector={"ray.io/node-id": node.node_id}).remote()
        try:
            budget, free = await asyncio.wait_for(
                asyncio.gather(
                    probe.budget.remote(spec.memory_limit or self.default_limit), probe.free.remote()
                ),
                PROBE_ANSWER_SECONDS * 5,  # the probe's process starts first
            )
        except Exception as error:
            logger.warning(
                "node %s is in the cluster but its probe did not answer (%r); next try in %.0f s",
                node.name, error, NODE_RETRY_SECONDS,
            )
            self._unreachable[node.node_id] = time.monotonic()
            ray.kill(probe)
            return
        self._watched[node.name] = _Watched(node, probe, free, time.monotonic())
        await self.on_join(node, budget)

    async def _ask(self, name: str, silent_after: float = NODE_SILENT_SECONDS) -> None:
        watched = self._watched.get(name)
        if watched is None:
            return
        try:
            watched.free = await asyncio.wait_for(watched.probe.free.remote(), PROBE_ANSWER_SECONDS)
            watched.answered_at = time.monotonic()
        except Exception as error:
            silent = time.monotonic() - watched.answered_at
            if silent >= silent_after and self._watched.get(name) is watched:
                await self.lose(name, f"it has not answered for {silent:.1f} s ({type(error).__name__})")
