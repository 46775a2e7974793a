"""Warm workers: one idle Ray worker per node that has already imported MLX, mlx-lm and the
model servers, so that a model replica scaled 0 -> 1 starts in it instead of in a new
process (a new worker costs ~3 s here before the replica's constructor runs: interpreter,
Ray, MLX, mlx-lm, Serve's replica code).

Two pieces of Ray make it: a model replica's runtime env names `prepare_worker` as the
worker setup hook (the variable `ray.init(runtime_env={"worker_process_setup_hook": ...})`
sets), so any worker started for that runtime env imports everything before it runs
anything; and the raylet's PrestartWorkers call starts such a worker ahead of need, for a
job and a runtime env, kept alive for a while. Ray gives the next actor of that job and
runtime env an idle worker that fits, so the next model replica on that node takes it. Only
model replicas import MLX: Serve's proxy and controller, the ingress and the fleet
controller stay as small as Ray makes them.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from dataclasses import dataclass
from typing import Any

from policies.logs import module_logger

logger = module_logger(__name__)

# What Ray's worker_process_setup_hook becomes in a runtime env (ray_constants.py); an
# actor's runtime env can carry it only as this variable.
SETUP_HOOK_ENV = "__RAY_WORKER_PROCESS_SETUP_HOOK_ENV_VAR"
SETUP_HOOK = "deployments.warm_workers.prepare_worker"
# The raylet keeps a prestarted worker at least this long; the controller starts another
# when a replica took it, or when it is gone (a check every few seconds on this machine).
KEEP_ALIVE_SECONDS = 24 * 3600
# When this process was warmed by the hook (time.time()), or None: not a model's worker.
warmed_at: float | None = None
# A worker Ray starts for a replica runs the hook just before the replica; one that waited
# longer than this before its replica was prestarted.
PRESTARTED_AFTER_SECONDS = 1.0
READY_TITLE = "ray::IDLE:mlx-fleet-warm-worker"
# A worker importing for longer than this (its imports take ~3 s here) is not counted on.
STARTING_GRACE_SECONDS = 30.0


def prestarted() -> bool:
    """Whether this process waited, warm, for the replica it runs."""
    return warmed_at is not None and time.time() - warmed_at > PRESTARTED_AFTER_SECONDS


def prepare_worker() -> None:
    """Ray's setup hook in a model replica's worker: import what a model replica imports."""
    global warmed_at
    import ray._raylet

    started = time.perf_counter()
    from deployments import mlx_runtime  # noqa: F401  (first: it chooses MLX's BLAS)
    import ray.serve._private.replica  # noqa: F401
    import deployments.registry  # noqa: F401  (every model server module)

    warmed_at = time.time()
    # Ray titled the process idle before the hook ran; this title says it is ready (Ray
    # titles it again when it runs a replica).
    ray._raylet.setproctitle(READY_TITLE)
    logger.info("warm worker %d ready in %.2f s", os.getpid(), time.perf_counter() - started)


def model_runtime_env(base: dict[str, Any] | None = None) -> dict[str, Any]:
    """A model replica's runtime env: `base` (its deployment's, if any) with the setup hook."""
    base = dict(base or {})
    base["env_vars"] = {**base.get("env_vars", {}), SETUP_HOOK_ENV: SETUP_HOOK}
    return base


def serialized_model_runtime_env(own: str) -> str:
    """The runtime env a model replica gets, from the fleet controller's own (`own`): both
    inherit the application's, the model's adds the hook. The raylet matches workers on this
    exact string, which Ray's core worker writes compact with sorted keys when it merges a
    deployment's runtime env into its parent's."""
    merged = model_runtime_env(json.loads(own or "{}"))
    return json.dumps(merged, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


@dataclass(frozen=True)
class Raylet:
    address: str  # host:port of the node's raylet
    node_id: str


def raylet_of(node_id: str) -> Raylet | None:
    import ray

    for node in ray.nodes():
        if node["NodeID"] == node_id and node["Alive"]:
            return Raylet(f"{node['NodeManagerAddress']}:{node['NodeManagerPort']}", node_id)
    return None


def prestart(raylet: Raylet, job_id: str, serialized_runtime_env: str) -> None:
    """Ask the raylet to start one idle worker for this job and runtime env (blocking)."""
    from ray._private.grpc_utils import init_grpc_channel
    from ray.core.generated import common_pb2, node_manager_pb2, node_manager_pb2_grpc
    from ray.core.generated.runtime_environment_pb2 import RuntimeEnvInfo

    channel = init_grpc_channel(raylet.address)
    try:
        node_manager_pb2_grpc.NodeManagerServiceStub(channel).PrestartWorkers(
            node_manager_pb2.PrestartWorkersRequest(
                language=common_pb2.PYTHON,
                job_id=bytes.fromhex(job_id),
                runtime_env_info=RuntimeEnvInfo(serialized_runtime_env=serialized_runtime_env),
                keep_alive_duration_secs=KEEP_ALIVE_SECONDS,
                num_workers=1,
            ),
            timeout=10,
        )
    finally:
        channel.close()


def waiting_local_workers() -> list[dict[str, Any]]:
    """This node's workers started for model replicas of this cluster that run no replica:
    children of this process's raylet whose environment has the hook and whose title is not
    a replica's. `ready`: idle with everything imported (else still importing)."""
    import psutil

    raylet = psutil.Process().parent()
    found = []
    for child in raylet.children() if raylet else []:
        try:
            title = (child.cmdline() or [""])[0]
            if title.startswith("ray::ServeReplica") or child.environ().get(SETUP_HOOK_ENV) != SETUP_HOOK:
                continue
            found.append({
                "pid": child.pid,
                "ready": title.startswith(READY_TITLE),
                "rss_bytes": child.memory_info().rss,
                "age_s": time.time() - child.create_time(),
            })
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return found


def stop_waiting_local_workers() -> None:
    import psutil

    for worker in waiting_local_workers():
        try:
            psutil.Process(worker["pid"]).kill()
        except psutil.NoSuchProcess:
            pass


class WarmWorkers:
    """The fleet controller's side: one warm worker per node, started again when a model
    replica took it or it is gone."""

    def __init__(self) -> None:
        import ray

        context = ray.get_runtime_context()
        self.job_id = context.get_job_id()
        self.runtime_env = serialized_model_runtime_env(context.get_runtime_env_string())
        self.local_node_id = context.get_node_id()

    async def keep_local(self) -> None:
        """Start a warm worker on this node unless one waits already (or is starting, and
        not for so long that it never will be ready)."""
        waiting = await asyncio.to_thread(waiting_local_workers)
        if not any(w["ready"] or w["age_s"] < STARTING_GRACE_SECONDS for w in waiting):
            await self._start(self.local_node_id)

    async def warm(self, node_id: str | None) -> None:
        """A warm worker on `node_id` (None: this node): here unless one waits already;
        elsewhere (whose workers this process cannot see) one more."""
        if node_id is None or node_id == self.local_node_id:
            await self.keep_local()
        else:
            await self._start(node_id)

    async def replace(self, node_id: str | None, runtime_env: str, took_one: bool) -> None:
        """After a model replica started on `node_id` (None: this node), in the runtime env it
        reports: a warm worker for the next one there."""
        if runtime_env and runtime_env != self.runtime_env:
            logger.warning(
                "model replicas run in runtime env %s, not %s as expected: warm workers follow it",
                runtime_env, self.runtime_env,
            )
            self.runtime_env = runtime_env
            await asyncio.to_thread(stop_waiting_local_workers)  # no replica will take them
        local = node_id is None or node_id == self.local_node_id
        if local or took_one:
            await self.warm(node_id)

    async def _start(self, node_id: str) -> None:
        try:
            raylet = await asyncio.to_thread(raylet_of, node_id)
            if raylet is not None:
                await asyncio.to_thread(prestart, raylet, self.job_id, self.runtime_env)
        except Exception as error:  # a cold load is slower, not broken
            logger.warning("could not start a warm worker on node %s: %r", node_id, error)
