"""Room for a model: one rule for a load and for a loaded model's KV growth, and what a
refusal says.

A claim asks for `need` bytes on a node. It fits now, perhaps after evicting least recently
used idle models; or only busy and loading models stand in its way (it waits for them); or it
cannot fit even once everything that will finish has finished, and is refused. The ledger
builds the two views of a node (now and eventually) and applies the grant; the controller
runs one loop over these decisions (`Controller._make_room`) for both kinds of claim.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from policies.errors import ApiError, insufficient_memory, model_load_failed, node_unavailable
from policies.eviction import Evict, Insufficient, Resident, plan


class ClaimKind(str, Enum):
    LOAD = "load"  # an unloaded model's whole cost
    KV = "kv"  # a loaded text model's growth: KV for its sequences, its prompt cache


@dataclass(frozen=True)
class Space:
    """A node as a claim sees it: who holds memory there, its budget, what the OS has free."""

    residents: list[Resident]
    limit: int
    os_available: int | None = None


@dataclass(frozen=True)
class Wait:
    """Only busy or loading models stand in the way: wait for them to finish."""

    message: str  # why the claim does not fit now


@dataclass(frozen=True)
class Unsized:
    """Nothing says what the model will cost (its files are not on disk, no `memory:` set)."""


@dataclass(frozen=True)
class NoNode:
    """No node the model may run on is in the cluster."""

    message: str


def decide(
    now: Space,
    need: int,
    eventually: Space,
    eventually_need: int,
    may_evict: bool = True,
    node: str | None = None,
) -> Evict | Wait | Insufficient:
    """Fit `need` bytes now (evicting idle models if `may_evict`), else wait if it fits once
    `eventually` holds (every unpinned model idle, a claimant's own work done), else refuse
    with the room that best case leaves. `node` names where, when the fleet has several."""
    decision = plan(now.residents, need, now.limit, now.os_available)
    if isinstance(decision, Evict):
        if decision.victims and not may_evict:
            return Wait(f"would evict {', '.join(decision.victims)}")
        return decision
    settled = plan(eventually.residents, eventually_need, eventually.limit, eventually.os_available)
    if isinstance(settled, Insufficient):
        return Insufficient(need=need, available=settled.available, node=node)
    return Wait(Insufficient(decision.need, decision.available, node).message)


# -- what a refusal says ------------------------------------------------------------------------

_FOR = {ClaimKind.LOAD: "", ClaimKind.KV: " (for the KV cache of a request)"}


def refusal(kind: ClaimKind, decision: Evict | Wait | Insufficient | NoNode, waited: float) -> ApiError | None:
    """The error a decision refuses its claim with (a Wait: once the claim waited `waited`
    seconds for nothing); None for one that grants room."""
    if isinstance(decision, NoNode):
        return node_unavailable(decision.message)
    if isinstance(decision, Insufficient):
        return cannot_fit(kind, decision)
    if isinstance(decision, Wait):
        return still_busy(kind, decision, waited)
    return None


def purpose(kind: ClaimKind, model_id: str) -> str:
    """What the room is for, in a log line about evicting for it."""
    return f"to fit model {model_id}" if kind == ClaimKind.LOAD else f"for the KV cache of model {model_id}"


def cannot_fit(kind: ClaimKind, refusal: Insufficient) -> ApiError:
    """The claim cannot fit even in the best case. A load will never fit (no retry); a KV
    claim may once the request asks for fewer tokens or others end theirs."""
    return insufficient_memory(f"{refusal.message}{_FOR[kind]}", retry=kind == ClaimKind.KV)


def still_busy(kind: ClaimKind, wait: Wait, waited: float) -> ApiError:
    """The models in the way stayed busy for as long as the claim may wait."""
    return insufficient_memory(
        f"{wait.message}{_FOR[kind]}: the models in the way were still busy after {waited:.0f} s", retry=True
    )


def eviction_failed(kind: ClaimKind, model_id: str, failed: str) -> ApiError:
    """Room was granted but a model in it could not be unloaded."""
    if kind == ClaimKind.LOAD:
        return model_load_failed(model_id, f"could not unload {failed} to make room")
    return insufficient_memory(f"could not unload {failed} to make room", retry=True)


def unsized(model_id: str, path: str) -> ApiError:
    """Nothing says what the model would cost: its files are not here and no size is set."""
    return model_load_failed(
        model_id,
        f"its size is unknown: {path} is not on this machine yet. Download it first "
        f"(`hf download {path}`) or give the model a `memory:` size",
    )
