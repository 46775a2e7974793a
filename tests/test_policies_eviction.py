"""The eviction planner (policies/eviction.py), example-based and property-based."""

from hypothesis import given, strategies as st

from policies.eviction import Evict, Insufficient, Resident, headroom, plan

GB = 10**9


def test_lru_victim_first():
    residents = [Resident("a", GB, last_used=1), Resident("b", GB, last_used=2)]
    assert plan(residents, GB, limit=2 * GB) == Evict(("a",))
    assert plan(residents, GB, limit=3 * GB) == Evict(())
    assert plan(residents, 2 * GB, limit=2 * GB) == Evict(("a", "b"))


def test_pinned_and_busy_models_are_never_victims():
    residents = [
        Resident("pinned", GB, last_used=0, pinned=True),
        Resident("busy", GB, last_used=1, in_flight=2),
        Resident("loading", GB, last_used=1.5, loading=True),
        Resident("idle", GB, last_used=3),
    ]
    assert plan(residents, GB, limit=4 * GB) == Evict(("idle",))
    assert plan(residents, 2 * GB, limit=4 * GB) == Insufficient(need=2 * GB, available=GB)


def test_insufficient_message_form():
    result = plan([Resident("p", 500_000_000, 0, pinned=True)], 4_200_000_000, limit=1_800_000_000)
    assert result.message == "need 4.2 GB, only 1.3 GB available after eviction"


def test_other_programs_memory_counts():
    residents = [Resident("a", GB, last_used=1)]
    # The budget has room for 9 GB more, but the OS has only 0.5 GB free.
    assert headroom(residents, 10 * GB, os_available=GB // 2) == GB // 2
    assert plan(residents, GB, limit=10 * GB, os_available=GB // 2) == Evict(("a",))
    assert plan(residents, 2 * GB, limit=10 * GB, os_available=GB // 2) == Insufficient(2 * GB, GB + GB // 2)


residents_strategy = st.lists(
    st.builds(
        Resident,
        id=st.uuids().map(str),
        bytes=st.integers(0, 8 * GB),
        last_used=st.floats(0, 1e6, allow_nan=False),
        pinned=st.booleans(),
        in_flight=st.integers(0, 2),
        loading=st.booleans(),
    ),
    max_size=8,
    unique_by=lambda r: r.id,
)


@given(residents_strategy, st.integers(1, 16 * GB), st.integers(0, 40 * GB), st.none() | st.integers(0, 40 * GB))
def test_plan_properties(residents, need, limit, os_available):
    result = plan(residents, need, limit, os_available)
    by_id = {r.id: r for r in residents}
    candidates = sorted((r for r in residents if r.evictable), key=lambda r: r.last_used)

    def room_without(evicted_ids):
        # Evicted models give their bytes back to the budget and to the OS alike.
        freed = sum(by_id[i].bytes for i in evicted_ids)
        remaining = [r for r in residents if r.id not in evicted_ids]
        return headroom(remaining, limit, None if os_available is None else os_available + freed)

    if isinstance(result, Evict):
        victims = [by_id[v] for v in result.victims]
        # Never a pinned, busy or loading victim.
        assert all(v.evictable for v in victims)
        # After the plan the new model fits within the budget and within what the OS has.
        remaining = [r for r in residents if r.id not in result.victims]
        assert room_without(result.victims) >= need
        assert sum(r.bytes for r in remaining) + need <= limit
        # Victims are the least recently used candidates, and no more than needed.
        assert victims == candidates[: len(victims)]
        if victims:
            assert room_without(result.victims[:-1]) < need
    else:
        assert isinstance(result, Insufficient)
        every_candidate = [r.id for r in candidates]
        assert result.available == max(0, room_without(every_candidate))
        assert result.available < need
