"""The controller's ledger (policies/ledger.py): every status transition, admission, leases,
adoption, idle expiry, and properties that must hold whatever happens in between."""

from __future__ import annotations

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from policies.config import ModelEntry
from policies.eviction import Evict, Insufficient
from policies.kv import Usage
from policies.ledger import Ledger, LedgerError, Measured, Status, Unsized, Wait

GB = 10**9
PLENTY = 100 * GB  # what the OS reports free, unless a test says otherwise


def entry(model_id: str, memory: int | None = GB, pinned: bool = False, idle_ttl: float | None = None):
    return ModelEntry(
        id=model_id,
        deployment=model_id,
        path=f"/models/{model_id}",
        type="text-generation",
        family="llama",
        pinned=pinned,
        memory_bytes=memory,
        idle_ttl=idle_ttl,
    )


def ledger(*entries: ModelEntry, limit: int = 3 * GB, ttl: float = 10) -> Ledger:
    return Ledger(limit, list(entries), {e.id: e.memory_bytes or GB for e in entries}, lease_ttl=ttl)


def load(book: Ledger, model_id: str, now: float = 0) -> None:
    decision = book.admit(model_id, PLENTY)
    assert isinstance(decision, Evict) and not decision.victims
    book.finish_load(model_id, Measured(GB, GB // 2, GB // 2), now)


# -- transitions ------------------------------------------------------------------------------


def test_load_then_evict_walks_the_statuses():
    book = ledger(entry("a"))
    assert book["a"].status == Status.UNLOADED and book.used() == 0
    assert book.admit("a", PLENTY) == Evict(())
    assert book["a"].status == Status.LOADING and book.used() == GB
    book.finish_load("a", Measured(GB, 1, 2), now=5)
    assert (book["a"].status, book["a"].loads, book["a"].last_used) == (Status.LOADED, 1, 5)
    assert book.begin_unload("a", "admin")
    assert book["a"].status == Status.UNLOADING and book.used() == GB
    book.finish_unload("a", "admin", evicted=True)
    assert (book["a"].status, book["a"].evictions, book.used()) == (Status.UNLOADED, 1, 0)


def test_failed_load_frees_its_claim_and_is_not_an_eviction():
    book = ledger(entry("a"))
    book.admit("a", PLENTY)
    book.fail_load("a", "files missing")
    assert book["a"].status == Status.UNLOADING
    book.finish_unload("a", "load_failed", evicted=False)
    assert (book["a"].status, book["a"].evictions, book["a"].loads, book.used()) == (Status.UNLOADED, 0, 0, 0)


def test_illegal_transitions_raise():
    book = ledger(entry("a"))
    with pytest.raises(LedgerError):
        book.finish_load("a", Measured(1, 1, 1), 0)  # unloaded -> loaded needs a load or adoption
    with pytest.raises(LedgerError):
        book.finish_unload("a", "x", evicted=True)  # unloaded -> unloaded
    load(book, "a")
    with pytest.raises(LedgerError):
        book.admit("a", PLENTY)  # already loaded


def test_replaced_replica_reloads_keeping_the_charge_and_the_leases():
    book = ledger(entry("a"))
    load(book, "a")
    lease = book.grant("a", now=1)
    book.begin_reload("a", "replica replaced")
    assert book["a"].status == Status.LOADING and book.used() == GB
    assert book["a"].leases == {lease.id}
    with pytest.raises(LedgerError):
        book.grant("a", now=2)  # new requests wait for the reload
    book.finish_load("a", Measured(GB, 1, 1), now=3)
    assert book["a"].loads == 2


def test_a_replacement_that_reloaded_for_a_request_is_counted():
    book = ledger(entry("a", memory=None))
    book.admit("a", PLENTY)
    book.finish_load("a", Measured(GB, 1, 1, replica="r1"), now=0)
    book.replica_replaced("a", Measured(2 * GB, 1, 1, replica="r2"), now=5)
    assert (book["a"].status, book["a"].loads, book["a"].measured.replica) == (Status.LOADED, 2, "r2")
    assert book.used() == 2 * GB  # the new measurement is what is charged


def test_restore_after_failed_scaling_takes_what_serve_runs():
    book = ledger(entry("a"), entry("b"))
    load(book, "a")
    assert book.begin_unload("a", "lru")
    book.restore("a", Status.LOADED, "scale down timed out, weights still there")
    assert book["a"].status == Status.LOADED
    book.admit("b", PLENTY)
    book.restore("b", Status.UNLOADED, "could not make room")
    assert book["b"].status == Status.UNLOADED and book.used() == GB


# -- admission ---------------------------------------------------------------------------------


def test_admission_evicts_the_least_recently_used_idle_model():
    book = ledger(entry("a"), entry("b"), entry("c"), entry("d"), limit=3 * GB)
    for t, model in enumerate("abc"):
        load(book, model, now=t)
    decision = book.admit("d", PLENTY)
    assert decision == Evict(("a",))
    assert (book["a"].status, book["d"].status) == (Status.UNLOADING, Status.LOADING)
    assert book.used() == 4 * GB  # a still holds its memory until its replica is gone
    book.finish_unload("a", "lru", evicted=True)
    assert book.used() == 3 * GB


def test_busy_and_loading_models_make_a_load_wait_not_fail():
    book = ledger(entry("a"), entry("b"), entry("c"), limit=2 * GB)
    load(book, "a")
    lease = book.grant("a", now=1)
    assert book.admit("b", PLENTY) == Evict(())  # b is loading now
    decision = book.admit("c", PLENTY)
    assert isinstance(decision, Wait)
    assert decision.message == "need 1.0 GB, only 0.0 GB available after eviction"
    assert book["c"].status == Status.UNLOADED  # waiting claims nothing
    book.finish_load("b", Measured(GB, 1, 1), now=2)
    book.release(lease.id, now=3)
    # Both idle now; b (loaded at 2) was used less recently than a (released at 3).
    assert book.admit("c", PLENTY) == Evict(("b",))


def test_waiting_acquirers_make_a_model_busy():
    book = ledger(entry("a"), entry("b"), limit=GB)
    load(book, "a")
    book["a"].waiting = 1
    assert isinstance(book.admit("b", PLENTY), Wait)
    book["a"].waiting = 0
    assert book.admit("b", PLENTY) == Evict(("a",))


def test_only_what_cannot_fit_without_every_unpinned_model_is_refused():
    book = ledger(entry("p", pinned=True), entry("a"), entry("huge", memory=10 * GB), limit=3 * GB)
    load(book, "p")
    load(book, "a")
    book.grant("a", now=1)
    assert book.admit("huge", PLENTY) == Insufficient(need=10 * GB, available=2 * GB)  # a would go
    assert book["huge"].status == Status.UNLOADED


def test_memory_other_programs_use_counts_and_loading_claims_are_subtracted():
    book = ledger(entry("a"), entry("b"), limit=10 * GB)
    assert book.admit("a", os_available=GB + GB // 2) == Evict(())
    # a's gigabyte is claimed but not yet taken from the OS: only half a GB is really left.
    assert book.available(os_available=GB + GB // 2) == GB // 2
    assert isinstance(book.admit("b", os_available=GB + GB // 2), Wait)


# -- leases ------------------------------------------------------------------------------------


def test_lease_lifecycle_release_is_exactly_once():
    book = ledger(entry("a"), ttl=10)
    with pytest.raises(LedgerError):
        book.grant("a", now=0)
    load(book, "a")
    lease = book.grant("a", now=1)
    assert (lease.model, lease.ttl) == ("a", 10)
    assert book["a"].busy and not book.begin_unload("a", "admin")
    assert book.release(lease.id, now=2) == lease
    assert book.release(lease.id, now=3) is None
    assert not book["a"].leases and book["a"].last_used == 2
    assert book.begin_unload("a", "admin")


def test_leases_expire_unless_renewed():
    book = ledger(entry("a"), ttl=10)
    load(book, "a")
    kept, lost = book.grant("a", now=0), book.grant("a", now=0)
    assert book.renew({kept.id: "a"}, now=8) == []
    assert book.expire_leases(now=9.9) == []
    assert book.expire_leases(now=10) == [lost]
    assert book["a"].leases == {kept.id}
    assert book.expire_leases(now=18) == [kept]
    assert not book["a"].busy


def test_renewal_brings_back_unknown_leases_but_never_released_ones():
    book = ledger(entry("a"), entry("b"), ttl=10)
    load(book, "a")
    # Granted by a controller that died before the request reached its replica.
    assert book.renew({"granted-before-restart": "a"}, now=1) == []
    assert book["a"].leases == {"granted-before-restart"}
    released = book.grant("a", now=1)
    book.release(released.id, now=2)
    assert book.renew({released.id: "a"}, now=3) == [released.id]  # the release won the race
    assert book.renew({"x": "b"}, now=3) == ["x"]  # b is not loaded
    assert book.renew({"y": "nope"}, now=3) == ["y"]
    assert book["a"].leases == {"granted-before-restart"}


def test_admin_view_lists_live_leases():
    book = ledger(entry("a"), ttl=10)
    load(book, "a")
    lease = book.grant("a", now=100)
    view = book.view(now=104, os_available=PLENTY)
    (a,) = view["models"]
    assert a["in_flight"] == 1 and a["status"] == "loaded"
    assert a["leases"] == [{"id": lease.id, "age_s": 4, "expires_in_s": 6}]
    assert (view["used_bytes"], view["available_bytes"]) == (GB, 2 * GB)


# -- adoption and idle expiry ------------------------------------------------------------------


def test_adoption_restores_loaded_models_with_their_leases():
    book = ledger(entry("a"), entry("b"), ttl=10)
    book.adopt("a", Status.LOADED, Measured(GB, 1, 2), ["l1", "l2"], now=50)
    book.adopt("b", Status.LOADING, None, [], now=50)
    assert book["a"].status == Status.LOADED and book["a"].leases == {"l1", "l2"}
    assert book["b"].status == Status.LOADING
    assert not book.begin_unload("a", "lru")  # its requests are still running
    assert [lease.id for lease in book.expire_leases(now=60)] == ["l1", "l2"]


def idle_candidates() -> Ledger:
    """Four loaded models with a 5 s idle TTL or none: idle, busy, pinned, and forever."""
    book = ledger(
        entry("idle", idle_ttl=5), entry("busy", idle_ttl=5), entry("pinned", pinned=True, idle_ttl=5),
        entry("forever"), limit=10 * GB,
    )
    for model in ("idle", "busy", "pinned", "forever"):
        load(book, model, now=0)
    book.grant("busy", now=0)
    return book


def test_idle_models_expire_but_not_pinned_or_busy_ones():
    book = idle_candidates()
    assert book.take_idle(now=4) == []
    assert book.take_idle(now=6) == ["idle"]
    assert book["idle"].status == Status.UNLOADING


def test_admin_view_counts_down_to_an_idle_unload_only_where_one_would_happen():
    book = idle_candidates()
    left = {m["id"]: m["idle_unload_in_s"] for m in book.view(now=3.5, os_available=PLENTY)["models"]}
    assert left == {"idle": 1.5, "busy": None, "pinned": None, "forever": None}
    overdue = book.view(now=9, os_available=PLENTY)["models"][0]
    assert overdue["idle_unload_in_s"] == 0


# -- properties --------------------------------------------------------------------------------


class LedgerMachine(RuleBasedStateMachine):
    """Random admissions, loads, leases, expiries and unloads: the books stay consistent."""

    MODELS = ("p", "a", "b", "c", "d")

    def __init__(self):
        super().__init__()
        sizes = {"p": GB, "a": GB, "b": 2 * GB, "c": GB // 2, "d": 3 * GB}
        self.book = Ledger(
            4 * GB,
            [entry(m, memory=sizes[m], pinned=m == "p") for m in self.MODELS],
            sizes,
            lease_ttl=10,
        )
        self.now = 0.0
        self.leases: list[str] = []

    @rule(model=st.sampled_from(MODELS))
    def admit(self, model):
        if self.book[model].status != Status.UNLOADED:
            return
        busy_before = {m for m in self.MODELS if self.book[m].busy or self.book[m].status != Status.LOADED}
        decision = self.book.admit(model, PLENTY)
        if isinstance(decision, Evict):
            assert not set(decision.victims) & busy_before
            assert "p" not in decision.victims
            for victim in decision.victims:
                self.book.finish_unload(victim, "lru", evicted=True)
            assert self.book.used() <= self.book.limit

    @rule(model=st.sampled_from(MODELS), ok=st.booleans())
    def finish_loading(self, model, ok):
        if self.book[model].status == Status.LOADING:
            if ok:
                self.book.finish_load(model, Measured(self.book[model].cost, 1, 1), self.now)
            else:
                self.book.fail_load(model, "broken")
                self.book.finish_unload(model, "load_failed", evicted=False)

    @rule(model=st.sampled_from(MODELS))
    def grant(self, model):
        if self.book[model].status == Status.LOADED:
            self.leases.append(self.book.grant(model, self.now).id)

    @rule(index=st.integers(0, 50))
    def release(self, index):
        if self.leases:
            self.book.release(self.leases[index % len(self.leases)], self.now)

    @rule(seconds=st.floats(0, 8))
    def time_passes(self, seconds):
        self.now += seconds
        self.book.expire_leases(self.now)

    @rule(model=st.sampled_from(MODELS))
    def unload(self, model):
        if self.book.begin_unload(model, "admin"):
            self.book.finish_unload(model, "admin", evicted=True)

    @invariant()
    def books_balance(self):
        book = self.book
        assert book.used() == sum(r.cost for r in book.models.values() if r.holds_memory)
        assert book.used() <= book.limit
        for record in book.models.values():
            if record.leases:
                assert record.status in (Status.LOADED, Status.LOADING)
        live = {lease_id for r in book.models.values() for lease_id in r.leases}
        assert live == set(book._leases)
        assert all(lease.expires_at > self.now for lease in book._leases.values())


LedgerMachine.TestCase.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)
test_ledger_stays_consistent = LedgerMachine.TestCase


def test_a_model_without_a_known_size_is_not_admitted():
    unsized = entry("hub", memory=None)
    book = Ledger(3 * GB, [unsized, entry("sized", memory=None)], {"hub": None, "sized": GB}, lease_ttl=10)
    assert isinstance(book.admit("hub", PLENTY), Unsized)
    assert book["hub"].status == Status.UNLOADED and book.used() == 0
    assert book.admit("sized", PLENTY) == Evict(())


def test_a_refusal_counts_the_room_busy_models_would_leave():
    book = ledger(entry("a"), entry("huge", memory=10 * GB), limit=3 * GB)
    load(book, "a")
    book.grant("a", now=1)  # busy now, evictable later: its room counts
    assert book.admit("huge", PLENTY) == Insufficient(need=10 * GB, available=3 * GB)


# -- what loaded models hold beyond their process ------------------------------------------------


def measured_ledger(limit: int = 3 * GB) -> Ledger:
    """Models without a `memory:` override: charged their process plus what they hold."""
    entries = [entry(m, memory=None) for m in ("a", "b", "c")]
    book = Ledger(limit, entries, {e.id: GB for e in entries}, lease_ttl=10)
    for model_id in ("a", "b"):
        load(book, model_id, now={"a": 1, "b": 2}[model_id])
    return book


def test_holding_kv_is_charged_and_shrinking_is_always_granted():
    book = measured_ledger()
    book.grant("a", 3)
    assert book.hold("a", GB // 2, PLENTY) == Evict(())
    assert book["a"].cost == GB + GB // 2 and book.used() == 2 * GB + GB // 2
    assert book.hold("a", GB // 4, PLENTY) == Evict(())
    assert book.used() == 2 * GB + GB // 4


def test_kv_growth_evicts_idle_models_then_waits_then_refuses():
    book = measured_ledger()
    book.grant("a", 3)
    decision = book.hold("a", 2 * GB, PLENTY)  # 1 + 1 + 2 > 3: idle b must go
    assert decision == Evict(("b",)) and book["b"].status == Status.UNLOADING
    assert book["a"].held == 0  # nothing granted while b still holds its memory
    book.finish_unload("b", "lru", evicted=True)
    assert book.hold("a", 2 * GB, PLENTY) == Evict(())
    assert book.used() == 3 * GB

    book = measured_ledger()
    book.grant("a", 3)
    book.grant("b", 3)
    assert isinstance(book.hold("a", 2 * GB, PLENTY), Wait)  # b is busy: it will finish
    assert book["a"].held == 0 and book.used() == 2 * GB

    book = measured_ledger()
    book.grant("a", 3)
    refused = book.hold("a", 3 * GB, PLENTY)  # more than the budget leaves even for a alone
    assert isinstance(refused, Insufficient) and refused.need == 3 * GB
    assert refused.available == 2 * GB


def test_kv_growth_waits_for_the_models_own_sequences():
    book = measured_ledger(limit=4 * GB)
    book.grant("a", 3)
    book.grant("b", 3)
    assert book.hold("a", GB + GB // 2, PLENTY) == Evict(())
    # Another sequence of a wants 1.5 GB more: only once a's first one is done.
    assert isinstance(book.hold("a", 3 * GB, PLENTY, alone=GB + GB // 2), Wait)
    # One that would not fit even alone (1 GB process + 3.5 GB > 4 GB) is refused now.
    refused = book.hold("a", 5 * GB, PLENTY, alone=3 * GB + GB // 2)
    assert isinstance(refused, Insufficient) and book["a"].held == GB + GB // 2


def test_reported_usage_replaces_the_load_measurement_and_a_restart_learns_the_hold():
    book = measured_ledger()
    book.report_usage("a", Usage(prompt_cache_bytes=10, held_bytes=100, process_bytes=GB + 5))
    assert book["a"].cost == GB + 5 + 100
    view = next(m for m in book.view(0, PLENTY)["models"] if m["id"] == "a")
    assert (view["process_bytes"], view["prompt_cache_bytes"], view["held_bytes"]) == (GB + 5, 10, 100)
    assert book.begin_unload("a", "lru")
    # Its replica, on its way out, gives back what it held: harmless; asking for more is a bug.
    assert book.hold("a", 0, PLENTY) == Evict(())
    with pytest.raises(LedgerError):
        book.hold("a", 10**9, PLENTY)
    book.finish_unload("a", "lru", evicted=True)
    assert book["a"].held == 0 and book["a"].usage == Usage()


class HoldMachine(LedgerMachine):
    """Loads, leases and KV holds at random: what is held never takes the books past the budget."""

    def __init__(self):
        RuleBasedStateMachine.__init__(self)
        sizes = {"p": GB, "a": GB, "b": 2 * GB, "c": GB // 2, "d": GB}
        self.book = Ledger(
            4 * GB, [entry(m, memory=None, pinned=m == "p") for m in self.MODELS], sizes, lease_ttl=10
        )
        self.now = 0.0
        self.leases: list[str] = []

    @rule(model=st.sampled_from(LedgerMachine.MODELS), held=st.integers(0, 4 * GB))
    def hold(self, model, held):
        record = self.book[model]
        if record.status != Status.LOADED or not record.busy:
            return
        decision = self.book.hold(model, held, PLENTY)
        if isinstance(decision, Evict):
            for victim in decision.victims:
                assert not self.book[victim].busy and victim != "p"
                self.book.finish_unload(victim, "lru", evicted=True)
            if decision.victims:
                assert self.book.hold(model, held, PLENTY) == Evict(())
            assert record.held == held

    @invariant()
    def held_bytes_fit(self):
        assert self.book.used() <= self.book.limit


HoldMachine.TestCase.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)
test_holds_never_exceed_the_budget = HoldMachine.TestCase


# -- LoRA adapters ------------------------------------------------------------------------------


def adapter(model_id: str, base: str, memory: int) -> ModelEntry:
    from dataclasses import replace

    return replace(entry(model_id, memory), deployment=base, base=base)


def test_adapters_load_into_a_loaded_base_and_go_before_it():
    book = ledger(entry("base"), adapter("a1", "base", GB // 2), adapter("a2", "base", GB // 2), entry("other"),
                  limit=2 * GB)
    assert book.admit("a1", PLENTY) == Wait("its base base is unloaded")
    load(book, "base", now=1)
    for now, model_id in ((2, "a1"), (3, "a2")):
        assert book.admit(model_id, PLENTY) == Evict(())
        book.finish_load(model_id, Measured(GB // 2, GB // 2, 0), now)
    assert book.used() == 2 * GB and book["base"].node == book["a1"].node
    # A busy adapter keeps its base: only the idle adapter is a candidate.
    lease = book.grant("a2", now=4)
    assert book.admit("other", PLENTY) == Wait("need 1.0 GB, only 0.5 GB available after eviction")
    book.release(lease.id, now=5)
    # Idle: the adapters go first, oldest first, even though the base was loaded earliest.
    assert book.admit("other", PLENTY) == Evict(("a1", "a2"))
    assert book["base"].status == Status.LOADED


def test_a_base_that_goes_takes_its_adapters_and_their_leases_along():
    book = ledger(entry("base"), adapter("a1", "base", GB // 2))
    load(book, "base")
    book.admit("a1", PLENTY)
    book.finish_load("a1", Measured(GB // 2, GB // 2, 0), now=1)
    book.grant("a1", now=2)
    assert not book.begin_unload("base", "admin")  # its adapter is busy
    book.begin_reload("base", "its replica was replaced without weights")
    assert book["a1"].status == Status.UNLOADED and not book["a1"].leases
    assert book.used() == GB
