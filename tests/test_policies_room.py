"""One rule for room: a load and a KV growth are decided by `policies.room.decide`."""

from __future__ import annotations

from policies.eviction import Evict, Insufficient, Resident
from policies.room import ClaimKind, NoNode, Space, Wait, cannot_fit, decide, eviction_failed, refusal, still_busy

GB = 10**9
IDLE_OLD = Resident("old", 3 * GB, last_used=1.0)
IDLE_NEW = Resident("new", 3 * GB, last_used=2.0)
BUSY = Resident("busy", 3 * GB, last_used=0.5, in_flight=1)
PINNED = Resident("pinned", 3 * GB, last_used=0.1, pinned=True)


def room(*residents: Resident, limit: int = 10 * GB, os_available: int | None = None) -> Space:
    return Space(list(residents), limit, os_available)


def test_a_claim_that_fits_now_evicts_nothing():
    assert decide(room(IDLE_OLD), 2 * GB, room(IDLE_OLD), 2 * GB) == Evict(())


def test_idle_models_are_evicted_least_recently_used_first_and_only_as_many_as_needed():
    now = room(IDLE_NEW, IDLE_OLD, PINNED)
    assert decide(now, 3 * GB, now, 3 * GB) == Evict(("old",))
    assert decide(now, 6 * GB, now, 6 * GB) == Evict(("old", "new"))


def test_a_claim_that_may_not_evict_waits_instead():
    now = room(IDLE_OLD, IDLE_NEW, PINNED)
    decision = decide(now, 3 * GB, now, 3 * GB, may_evict=False)
    assert isinstance(decision, Wait) and "would evict old" in decision.message


def test_busy_models_in_the_way_mean_wait_when_they_would_make_room():
    now = room(BUSY, PINNED, IDLE_OLD)
    eventually = room(Resident("busy", 3 * GB, 0.5), PINNED, IDLE_OLD)
    decision = decide(now, 6 * GB, eventually, 6 * GB)
    assert isinstance(decision, Wait) and "need 6.0 GB" in decision.message


def test_what_cannot_fit_even_eventually_is_refused_with_the_best_cases_room():
    now = room(BUSY, PINNED)
    eventually = room(Resident("busy", 3 * GB, 0.5), PINNED)
    decision = decide(now, 9 * GB, eventually, 9 * GB, node="mini")
    assert decision == Insufficient(need=9 * GB, available=7 * GB, node="mini")
    assert decision.message.endswith("after eviction on node mini")


def test_what_the_os_has_free_bounds_the_room_in_both_views():
    now = room(IDLE_OLD, os_available=1 * GB)
    assert decide(now, 2 * GB, now, 2 * GB) == Evict(("old",))  # evicting frees its bytes in both accounts
    assert isinstance(decide(now, 5 * GB, now, 5 * GB), Insufficient)


def test_the_eventual_need_may_differ_from_the_need_now():
    # A KV claim: growth now, what it would hold alone once its other sequences are done.
    now = room(BUSY, limit=4 * GB)
    eventually = room(Resident("busy", 1 * GB, 0.5, pinned=True), limit=4 * GB)
    assert isinstance(decide(now, 2 * GB, eventually, 2 * GB), Wait)
    assert isinstance(decide(now, 2 * GB, eventually, 4 * GB), Insufficient)


def test_refusals_by_kind():
    refusal = Insufficient(need=9 * GB, available=7 * GB)
    load, kv = cannot_fit(ClaimKind.LOAD, refusal), cannot_fit(ClaimKind.KV, refusal)
    assert load.headers == {"x-should-retry": "false"} and "KV" not in load.message
    assert kv.headers == {"retry-after": "5"} and kv.message.endswith("(for the KV cache of a request)")
    late = still_busy(ClaimKind.LOAD, Wait("need 6.0 GB, only 4.0 GB available after eviction"), 30)
    assert late.code == "insufficient_memory" and late.message.endswith("still busy after 30 s")
    assert eviction_failed(ClaimKind.LOAD, "m", "old").code == "model_load_failed"
    assert eviction_failed(ClaimKind.KV, "m", "old").code == "insufficient_memory"


def test_each_decision_refuses_with_its_own_error_or_grants():
    assert refusal(ClaimKind.LOAD, NoNode("no node labelled gpu"), 30).code == "node_unavailable"
    assert refusal(ClaimKind.KV, Insufficient(need=9 * GB, available=7 * GB), 30).code == "insufficient_memory"
    assert refusal(ClaimKind.LOAD, Wait("busy"), 30).message.endswith("still busy after 30 s")
    assert refusal(ClaimKind.LOAD, Evict(("old",)), 30) is None
