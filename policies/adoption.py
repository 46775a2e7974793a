"""What a (re)starting controller makes of a model deployment it finds running.

Serve keeps model replicas running while the controller restarts. For each deployment the
controller counts its replicas and asks a running one what it holds; this table says what
the ledger takes it for. Nothing found is absent, and its deployment is set to zero.
"""

from __future__ import annotations

from enum import Enum


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
