"""The fleet's own metrics (Ray's metrics agent exports them with Serve's; README "Metrics"):
counters the controller bumps as things happen, and gauges set from the ledger."""

from __future__ import annotations

from typing import Any

from ray.serve.metrics import Counter, Gauge, Histogram

from policies.config import LOCAL_NODE
from policies.ledger import Ledger, Status


def fleet_metrics() -> dict[str, Any]:
    model = ("model",)
    placed = ("model", "node")  # node: where the model is, or was last (a gauge keeps one series)
    node = ("node",)
    return {
        "loaded": Gauge("fleet_models_loaded", "Models with weights in memory."),
        "nodes": Gauge("fleet_nodes_alive", "The fleet's nodes in the cluster."),
        "model_bytes": Gauge("fleet_model_bytes", "Bytes the ledger charges a loaded model.", placed),
        "prompt_cache_bytes": Gauge(
            "fleet_model_prompt_cache_bytes", "Bytes of a text model's cached prompts.", placed
        ),
        "kv_bytes": Gauge(
            "fleet_model_kv_bytes", "KV bytes reserved for a text model's running sequences.", placed
        ),
        "sequences": Gauge("fleet_model_sequences", "Sequences a text model is generating.", placed),
        "weights_bytes": Gauge("fleet_model_weights_bytes", "Bytes a loaded model's weights took.", placed),
        "process_bytes": Gauge(
            "fleet_model_process_bytes", "A loaded model's replica process, weights included.", placed
        ),
        "proposed_tokens": Gauge(
            "fleet_model_speculative_proposed_tokens",
            "Tokens proposed to a text model's replica (by prompt lookup or its draft) since it started.",
            placed,
        ),
        "accepted_tokens": Gauge(
            "fleet_model_speculative_accepted_tokens",
            "Proposed tokens the model agreed with (acceptance rate: accepted / proposed).",
            placed,
        ),
        "budget": Gauge("fleet_memory_budget_bytes", "A node's memory limit (0: not in the cluster).", node),
        "used": Gauge("fleet_memory_used_bytes", "Bytes held by loaded and loading models on a node.", node),
        "loads": Counter("fleet_model_loads_total", "Model loads.", model),
        "evictions": Counter(
            "fleet_model_evictions_total", "Models scaled to zero.", ("model", "reason")
        ),
        "load_seconds": Histogram(
            "fleet_model_load_seconds",
            "Seconds from the decision to load to a loaded model.",
            boundaries=[0.5, 1, 2, 5, 10, 30, 60, 120, 300],
            tag_keys=model,
        ),
        "refusals": Counter(
            "fleet_insufficient_memory_total", "Requests answered 503 insufficient_memory.", model
        ),
        "expired_leases": Counter(
            "fleet_expired_leases_total", "Leases whose holder stopped renewing them.", model
        ),
        "lost_nodes": Counter("fleet_node_losses_total", "Nodes that left the cluster.", node),
    }


def publish_gauges(metrics: dict[str, Any], ledger: Ledger, several_nodes: bool) -> None:
    """Every gauge from the ledger's state now."""
    models = ledger.models.values()
    metrics["loaded"].set(sum(r.status == Status.LOADED for r in models))
    metrics["nodes"].set(sum(n.alive for n in ledger.nodes.values()))
    for node in ledger.nodes.values():
        metrics["budget"].set(node.limit if node.alive else 0, tags={"node": node.name})
        metrics["used"].set(ledger.used(node.name), tags={"node": node.name})
    for r in models:
        tags = {"model": r.id, "node": r.node or r.last_node or ("none" if several_nodes else LOCAL_NODE)}
        metrics["model_bytes"].set(r.cost if r.holds_memory else 0, tags=tags)
        metrics["prompt_cache_bytes"].set(r.usage.prompt_cache_bytes, tags=tags)
        metrics["kv_bytes"].set(r.usage.kv_bytes, tags=tags)
        metrics["sequences"].set(r.usage.sequences, tags=tags)
        speculation = r.usage.speculation
        metrics["proposed_tokens"].set(speculation.proposed if speculation else 0, tags=tags)
        metrics["accepted_tokens"].set(speculation.accepted if speculation else 0, tags=tags)
        measured = r.measured if r.holds_memory else None
        metrics["weights_bytes"].set(measured.weights_bytes if measured else 0, tags=tags)
        metrics["process_bytes"].set(r.process_bytes if measured else 0, tags=tags)
