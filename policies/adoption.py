"""What a (re)starting controller makes of a model deployment it finds running.

Serve keeps model replicas running while the controller restarts. For each deployment the
controller counts its replicas and asks a running one what it holds; this table says what
the ledger takes it for. Nothing found is absent, and its deployment is set to zero.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum

from policies.kv import Usage
from policies.ledger import Ledger, Measured, Status


class Found(str, Enum):
    LOADED = "loaded"  # a replica with weights: adopted with the leases it serves
    LOADING = "loading"  # a replica reading its weights: adopted, its load finishes
    STARTING = "starting"  # a replica without weights yet, for a request the old controller took
    ABSENT = "absent"


def found(running: int, starting: int, weights: str | None) -> Found:
    """`running` and `starting` replicas (stopping ones left out); `weights` is what a running
    replica said it holds ("loaded", "loading", "none"), None if none answered."""
    if weights == "loaded":
        return Found.LOADED
    if weights == "loading":
        return Found.LOADING
    if running or starting:
        return Found.STARTING
    return Found.ABSENT


@dataclass(frozen=True)
class Deployment:
    """One model deployment on one node, as a (re)starting controller finds it."""

    model: str
    node: str
    running: int  # replicas up
    starting: int  # replicas on their way up
    weights: str | None  # what a running replica said it holds; None: none answered
    measured: Measured | None = None  # what its replica measured at load
    leases: list[str] = field(default_factory=list)  # leases of the requests it serves
    usage: Usage | None = None
    adapters: dict[str, int] = field(default_factory=dict)  # LoRA adapters it holds: {id: bytes}


def adopt(ledger: Ledger, deployments: list[Deployment], now: float) -> None:
    """Take into the ledger what Serve runs: a model with weights as loaded (with the leases
    its replica serves, and the adapters it holds); one reading them, or starting for a
    request the previous controller took, as loading (the caller finishes its load). The
    first node a model is found on wins; a node the ledger does not have alive is skipped.
    Whatever is not taken stays unloaded."""
    for seen in deployments:
        record = ledger[seen.model]
        if record.status != Status.UNLOADED or not ledger.nodes[seen.node].alive:
            continue
        kind = found(seen.running, seen.starting, seen.weights)
        if kind in (Found.LOADED, Found.LOADING):
            status = Status.LOADED if kind == Found.LOADED else Status.LOADING
            ledger.adopt(seen.model, status, seen.measured, seen.leases, now, seen.node)
            if seen.usage is not None:
                ledger.report_usage(seen.model, seen.usage)
            replica = seen.measured.replica if seen.measured else ""
            for adapter, size in seen.adapters.items() if status == Status.LOADED else ():
                if adapter in ledger and ledger[adapter].entry.base == seen.model:
                    ledger.adopt(adapter, Status.LOADED, Measured(size, size, 0, replica), [], now, seen.node)
        elif kind == Found.STARTING:  # the load a previous controller began finishes here
            ledger.adopt(seen.model, Status.LOADING, None, [], now, seen.node)
