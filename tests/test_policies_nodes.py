"""A fleet of several nodes in the ledger (policies/ledger.py) and the matching of Ray nodes to
configured ones (policies/nodes.py): placement, per-node eviction, a node that leaves or joins."""

from __future__ import annotations

from dataclasses import replace

from policies.config import NodeSpec
from policies.eviction import Evict, Insufficient
from policies.ledger import Ledger, Measured, NoNode, Status, Wait
from policies.nodes import present_nodes
from tests.test_policies_ledger import GB, PLENTY, entry


def fleet(*entries, budgets: dict[str, int] | None = None) -> Ledger:
    budgets = budgets or {"a": 3 * GB, "b": 2 * GB}
    book = Ledger(0, list(entries), {e.id: e.memory_bytes for e in entries}, lease_ttl=10, nodes=list(budgets))
    for name, budget in budgets.items():
        book.join(name, f"id-{name}", {"mlx-fleet/node": name}, budget)
    return book


def place(book: Ledger, model_id: str, now: float = 0, free=PLENTY) -> str:
    decision = book.admit(model_id, free)
    assert isinstance(decision, Evict), decision
    book.finish_load(model_id, Measured(GB, GB // 2, GB // 2), now)
    return book[model_id].node


def test_a_load_goes_where_most_room_is_left_and_the_budgets_are_per_node():
    book = fleet(entry("x"), entry("y"), entry("z"))
    assert place(book, "x") == "a"  # 2 GB left there against 1 GB on b
    assert place(book, "y") in ("a", "b")  # 1 GB left either way: by name
    assert place(book, "z") == "b"
    view = book.view(now=0, os_available=PLENTY)
    nodes = {n["name"]: n for n in view["nodes"]}
    assert nodes["a"]["used_bytes"] + nodes["b"]["used_bytes"] == 3 * GB == view["used_bytes"]
    assert view["memory_limit_bytes"] == 5 * GB
    assert {m["id"]: m["node"] for m in view["models"]} == {"x": "a", "y": "a", "z": "b"}
    assert nodes["a"]["models"] == ["x", "y"] and nodes["a"]["node_id"] == "id-a"


def test_the_fewest_evictions_win_over_room_and_eviction_stays_on_that_node():
    book = fleet(entry("x", 2 * GB), entry("y", 2 * GB), entry("big", 2 * GB))
    assert place(book, "x", now=1) == "a"
    assert place(book, "y", now=2) == "b"
    # a has 1 GB left, b none: either way one idle model goes; a keeps the most room after.
    decision = book.admit("big", PLENTY)
    assert decision == Evict(("x",)) and book["big"].node == "a"
    assert book["y"].status == Status.LOADED


def test_a_model_prefers_the_node_it_last_ran_on():
    book = fleet(entry("x"))
    assert place(book, "x") == "a"
    book.begin_unload("x", "test")
    book.finish_unload("x", "test", evicted=True)
    book.join("a", "id-a", {}, GB)  # a shrank: it still fits there, with less room than on b
    assert place(book, "x") == "a"


def test_memory_other_programs_use_is_counted_on_each_node():
    book = fleet(entry("x"))
    assert place(book, "x", free={"a": GB // 2, "b": PLENTY}) == "b"


def test_a_model_bound_to_a_node_goes_there_or_nowhere():
    book = fleet(replace(entry("x"), node="b"), entry("filler", 2 * GB, pinned=True))
    assert place(book, "filler") == "a"
    assert place(book, "x") == "b"
    book.lose("b", now=1)
    refused = book.admit("x", PLENTY)
    assert isinstance(refused, NoNode) and "its node b is not in the cluster" in refused.message


def test_refusal_names_the_node_that_came_closest():
    book = fleet(entry("pinned", 2 * GB, pinned=True), entry("huge", 4 * GB))
    assert place(book, "pinned") == "a"
    refused = book.admit("huge", PLENTY)
    assert refused == Insufficient(need=4 * GB, available=2 * GB, node="b")
    assert refused.message == "need 4.0 GB, only 2.0 GB available after eviction on node b"


def test_busy_models_make_a_load_wait_on_the_node_where_it_would_fit():
    book = fleet(entry("x", 3 * GB), entry("y", 3 * GB), budgets={"a": 3 * GB, "b": GB})
    assert place(book, "x") == "a"
    book.grant("x", now=1)
    assert isinstance(book.admit("y", PLENTY), Wait)  # only a can ever take it, once x is idle


def test_a_node_that_leaves_takes_its_models_and_their_leases_and_can_come_back():
    book = fleet(entry("x"), entry("y"), budgets={"a": GB, "b": GB})
    place(book, "x")
    place(book, "y")
    on_b, on_a = ("x", "y") if book["x"].node == "b" else ("y", "x")
    lease = book.grant(on_b, now=1)
    book.grant(on_a, now=1)
    assert lease.node == "b"
    assert book.lose("b", now=2) == [on_b]
    assert book[on_b].status == Status.UNLOADED and book[on_b].node is None
    assert book.renew({lease.id: on_b}, now=3) == [lease.id]  # its holder must stop using it
    assert isinstance(book.admit(on_b, PLENTY), Wait)  # a could take it once its model is idle
    assert book.view(now=3, os_available=PLENTY)["memory_limit_bytes"] == GB
    book.join("b", "id-b2", {}, GB)
    assert place(book, on_b) == "b"


def test_kv_growth_is_charged_to_the_models_node():
    book = fleet(entry("x", memory=None), entry("y"), budgets={"a": 3 * GB, "b": 3 * GB})
    book.models["x"].estimated_bytes = GB
    assert place(book, "x") == "a"
    assert place(book, "y") == "b"
    book.grant("x", now=1)  # a request runs: it is what asks for KV
    assert book.hold("x", 2 * GB, PLENTY) == Evict(())  # 1 + 2 fits a's 3 GB; y on b does not count
    assert isinstance(book.hold("x", 3 * GB, PLENTY), Insufficient)


def test_configured_nodes_are_found_by_their_labels():
    specs = [NodeSpec(name="studio"), NodeSpec(name="mini", labels={"rack": "2"})]
    ray_nodes = [
        {"NodeID": "h", "Alive": True, "Labels": {"ray.io/node-id": "h"}},
        {"NodeID": "s-old", "Alive": False, "Labels": {"mlx-fleet/node": "studio"}},
        {"NodeID": "s", "Alive": True, "Labels": {"mlx-fleet/node": "studio"}},
        {"NodeID": "m", "Alive": True, "Labels": {"rack": "2", "mlx-fleet/node": "other"}},
    ]
    found = present_nodes(specs, ray_nodes)
    assert {name: node.node_id for name, node in found.items()} == {"studio": "s", "mini": "m"}
    assert present_nodes(specs, ray_nodes[:2]) == {}
    restarted = [*ray_nodes, {"NodeID": "s-new", "Alive": True, "Labels": {"mlx-fleet/node": "studio"}}]
    assert present_nodes(specs, restarted, known={"studio": "s"})["studio"].node_id == "s"
    assert present_nodes(specs, restarted, known={"studio": "s-new"})["studio"].node_id == "s-new"
