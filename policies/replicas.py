"""How many replicas a model deployment should have: what the fleet controller wants, as
Serve's autoscaler is told it (deployments/replica_policy.py runs this inside Serve).

The controller is the only one that decides, and it scales a model to zero only once no
lease is held on it (no request runs there). Serve's own request metrics are not consulted:
they lag by up to `look_back_period_s` (30 s by default) and, from a client that died, 10 s
more; holding a scale-down on them made every eviction ~2-30 s slower (measured: 28 s with
the defaults, 2.9 s with a 2 s look-back) while seeing no request the leases miss.
"""

from __future__ import annotations


def replicas_to_set(wanted: int | None, current_target: int) -> int | None:
    """The count to give Serve, or None to leave the deployment as it is.

    `wanted`: the controller's count (None: it has said nothing of this deployment yet);
    `current_target`: Serve's target now. A deployment left out of the policy's answer is
    left alone by Serve, its cold-start fast path included.
    """
    if wanted is None or wanted == current_target:
        return None
    return wanted
