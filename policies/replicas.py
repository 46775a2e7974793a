"""How many replicas a model deployment should have: what the fleet controller wants, as
Serve's autoscaler is told it (deployments/replica_policy.py runs this inside Serve).

The controller is the only one that decides. Serve's own signals only ever delay a scale
to zero: a request Serve still counts (in flight, or a handle's metrics not yet updated)
keeps the replica until it is done, so no stream is cut by an eviction that raced it.
"""

from __future__ import annotations


def replicas_to_set(wanted: int | None, current_target: int, requests: float) -> int | None:
    """The count to give Serve, or None to leave the deployment as it is.

    `wanted`: the controller's count (None: it has said nothing of this deployment yet);
    `current_target`: Serve's target now; `requests`: what Serve counts in flight there.
    """
    if wanted is None or wanted == current_target:
        return None
    if wanted < current_target and requests > 0:
        return None  # scaled down once Serve's last request there is over
    return wanted
