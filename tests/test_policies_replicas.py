"""The replica policy's decision (policies/replicas.py) and its reading of Serve's contexts
(deployments/replica_policy.py), without Ray: the controller's count is the only one that
moves a deployment."""

from __future__ import annotations

from dataclasses import dataclass

import deployments.replica_policy as replica_policy
from policies.replicas import replicas_to_set


def test_only_the_controller_moves_a_deployment():
    assert replicas_to_set(None, 0) is None  # it said nothing: left alone
    assert replicas_to_set(0, 0) is None  # at its count: left out (no cold-start fast path)
    assert replicas_to_set(1, 0) == 1
    assert replicas_to_set(0, 1) == 0
    assert replicas_to_set(1, 1) is None


@dataclass(frozen=True)
class DeploymentID:
    name: str
    app_name: str = "fleet"


@dataclass
class Context:
    target_num_replicas: int
    total_num_requests: float = 0.0


def test_the_policy_answers_only_for_deployments_to_change(monkeypatch):
    monkeypatch.setattr(replica_policy, "read_targets", lambda app: {"a": 1, "b": 0, "c": 0})
    contexts = {
        DeploymentID("a"): Context(0),  # wanted up
        DeploymentID("b"): Context(1, total_num_requests=1),  # wanted down: Serve's count is not asked
        DeploymentID("c"): Context(0, total_num_requests=2),  # evicted, stale metrics: left out
        DeploymentID("d"): Context(1),  # the controller said nothing
    }
    decisions, _ = replica_policy.fleet_replicas(contexts)
    assert decisions == {DeploymentID("a"): 1, DeploymentID("b"): 0}


def test_concurrent_counts_reach_the_store_in_order(ray_cluster):
    """The controller sets counts from several threads at once (an eviction's scale-down
    beside a load's scale-up): the stored counts are always the last ones set. A stale
    snapshot written last once left a model at 0 while its load waited for a replica."""
    import asyncio

    targets = replica_policy.ReplicaTargets("concurrent-counts-test")

    async def flip_many() -> None:
        await asyncio.gather(
            *(
                asyncio.to_thread(targets.set, {f"model-{i % 7}": round % 2})
                for round in range(4)
                for i in range(40)
            )
        )

    for _ in range(5):
        asyncio.run(flip_many())
        assert replica_policy.read_targets("concurrent-counts-test", cached=False) == targets.wanted
