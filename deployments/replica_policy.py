"""The application's autoscaling policy: Serve applies the fleet controller's replica counts.

Model deployments are declared with zero replicas (`autoscaling_config` min 0, initial 0,
max 1), so a start runs no model process. Serve calls this policy (serve_config.yaml,
`autoscaling_policy`) in its control loop, inside the Serve controller's process; it reads
the counts the fleet controller wrote into Ray's GCS key-value store (`ReplicaTargets`) and
returns only the deployments whose count must change. A deployment left out of the answer
is left alone: Serve's cold-start fast path (0 replicas and a request counted -> 1) applies
only to deployments in it, so stale request metrics can never undo an eviction.
"""

from __future__ import annotations

import json
import threading
import time
from typing import Any

from policies.logs import module_logger
from policies.replicas import replicas_to_set

logger = module_logger(__name__)

POLICY_FUNCTION = "deployments.replica_policy:fleet_replicas"
KV_NAMESPACE = "mlx-fleet"
# Serve's loop runs every RAY_SERVE_CONTROL_LOOP_INTERVAL_S; one read serves a tick.
READ_EVERY_SECONDS = 0.05


def targets_key(app_name: str) -> bytes:
    return f"replica-targets/{app_name}".encode()


class ReplicaTargets:
    """The fleet controller's side: its wanted count per deployment, kept in the GCS (it
    outlives a restart of either controller)."""

    def __init__(self, app_name: str):
        self.app_name = app_name
        self.wanted: dict[str, int] = read_targets(app_name, cached=False)
        # Sets come from several threads at once (an eviction's scale-down beside a load's
        # scale-up): a snapshot taken before another set's must never be written after it.
        self._writing = threading.Lock()

    def set(self, counts: dict[str, int]) -> None:
        """Set these deployments' counts (one write, whatever their number)."""
        from ray.experimental import internal_kv

        with self._writing:
            self.wanted.update(counts)
            value = json.dumps(self.wanted).encode()
            internal_kv._internal_kv_put(targets_key(self.app_name), value, overwrite=True, namespace=KV_NAMESPACE)


_read: dict[str, tuple[float, dict[str, int]]] = {}


def read_targets(app_name: str, cached: bool = True) -> dict[str, int]:
    """The counts the fleet controller wants; {} before it wrote any. A failed read keeps
    the last good counts: the policy never guesses."""
    now = time.monotonic()
    last = _read.get(app_name)
    if cached and last is not None and now - last[0] < READ_EVERY_SECONDS:
        return last[1]
    try:
        from ray.experimental import internal_kv

        raw = internal_kv._internal_kv_get(targets_key(app_name), namespace=KV_NAMESPACE)
        targets = json.loads(raw) if raw else {}
    except Exception:  # a policy must never raise inside Serve's control loop
        logger.exception("mlx-fleet: reading the replica targets failed; keeping the last ones")
        targets = last[1] if last is not None else {}
    _read[app_name] = (now, targets)
    return targets


def fleet_replicas(contexts: dict[Any, Any]) -> tuple[dict[Any, int], dict]:
    """Serve's application-level policy: {deployment id: count} for the ones to change."""
    if not contexts:
        return {}, {}
    wanted = read_targets(next(iter(contexts)).app_name)
    decisions = {}
    for deployment, ctx in contexts.items():
        count = replicas_to_set(wanted.get(deployment.name), ctx.target_num_replicas)
        if count is not None:
            decisions[deployment] = count
    return decisions, {}


def zero_replicas() -> dict[str, Any]:
    """A model deployment's autoscaling config: no replica until the controller wants one,
    and no delay in either direction (the controller decides when)."""
    return {
        "min_replicas": 0,
        "initial_replicas": 0,
        "max_replicas": 1,
        "upscale_delay_s": 0,
        "downscale_delay_s": 0,
        "downscale_to_zero_delay_s": 0,
    }
