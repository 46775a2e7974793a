"""Several nodes, one fleet (issue 16): a Ray cluster of a head and two labelled nodes, a and
b, on this one machine (`bench/multinode_driver.py`, its own subprocess and cluster,
independent of the session's), serving tiny demo models with exact `memory:` costs so that
every placement is decided by the rules, not by measurements.

The tests share the cluster and run in file order, each starting from the state the one
before left (written at the top of each). Budgets: a 3.5 GB, b 2.7 GB; every model 1 GB but
the pinned `p` (0.5 GB, only on b) and `huge` (4 GB, fits nowhere).
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
import pytest

from tests.conftest import wait_for
from bench.multinode import Driver, session_processes

KEY = "sekret"
ADMIN = {"Authorization": f"Bearer {KEY}"}
NODE_LABEL = "mlx-fleet/node"
GB = 10**9
ARGS = {
    "admin_api_key": KEY,
    "load_wait_timeout": "20s",
    "nodes": [{"name": "a", "memory_limit": "3.5GB"}, {"name": "b", "memory_limit": "2.7GB"}],
    "models": [
        {"id": "p", "path": "models/tiny-mistral", "memory": "0.5GB", "pinned": True, "node": "b"},
        {"id": "m1", "path": "models/tiny-qwen2", "memory": "1GB"},
        # Greedy tiny-llama does not stop before max_tokens: m2 is the model streamed from.
        {"id": "m2", "path": "models/tiny-llama", "memory": "1GB"},
        {"id": "m3", "path": "models/tiny-gemma", "memory": "1GB"},
        {"id": "m4", "path": "models/tiny-qwen3", "memory": "1GB"},
        {"id": "m5", "path": "models/tiny-llama", "memory": "1GB"},
        {"id": "bonly", "path": "models/tiny-mistral", "memory": "1GB", "node": "b"},
        {"id": "huge", "path": "models/tiny-llama", "memory": "4GB"},
    ],
}
LIMITS = {"a": 3_500_000_000, "b": 2_700_000_000}


@pytest.fixture(scope="module")
def driver(demo_models, tmp_path_factory):
    fleet = Driver({"nodes": ["a", "b"], "num_cpus": 2, "args": ARGS}, tmp_path_factory.mktemp("multinode"))
    try:
        fleet.start()
        yield fleet
    finally:
        fleet.quit()


@pytest.fixture(scope="module")
def admin(driver):
    with httpx.Client(base_url=driver.url, timeout=60, headers=ADMIN) as client:
        yield client


@pytest.fixture(scope="module")
def client(driver):
    return openai.OpenAI(base_url=f"{driver.url}/v1", api_key="unused", max_retries=0, timeout=60)


def view(admin: httpx.Client) -> dict:
    response = admin.get("/admin/models")
    response.raise_for_status()
    return response.json()


def models(admin: httpx.Client) -> dict[str, dict]:
    return {m["id"]: m for m in view(admin)["models"]}


def nodes(admin: httpx.Client) -> dict[str, dict]:
    return {n["name"]: n for n in view(admin)["nodes"]}


def placement(admin: httpx.Client) -> dict[str, str | None]:
    """{model: the node it is loaded on} for the loaded models."""
    return {m["id"]: m["node"] for m in view(admin)["models"] if m["status"] == "loaded"}


def assert_nothing_left_in_flight(admin: httpx.Client) -> None:
    # Within a few seconds: the ingress keeps a lease a quarter second after its last request
    # for the next one; one leaked would stay until lease_ttl (20 s).
    wait_for(
        lambda: all(m["in_flight"] == 0 and m["waiting"] == 0 for m in models(admin).values()),
        "no request counted in flight or waiting",
        timeout=5,
    )


def chat(client: openai.OpenAI, model: str) -> None:
    reply = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "hi"}], max_tokens=2, temperature=0
    )
    assert reply.choices[0].finish_reason in ("length", "stop")


def test_nodes_are_listed_and_the_pinned_model_loads_on_its_node(driver, admin):
    wait_for(lambda: models(admin)["p"]["status"] == "loaded", "pinned p loaded at start", timeout=60)
    state = view(admin)
    by_id = {m["id"]: m for m in state["models"]}
    assert by_id["p"]["node"] == "b" and by_id["p"]["pinned"] is True
    assert all(m["node"] is None for m in state["models"] if m["id"] != "p")

    listed = {n["name"]: n for n in state["nodes"]}
    assert set(listed) == {"a", "b"}
    for name, node in listed.items():
        assert node["node_id"] == driver.node_ids[name]
        assert node["alive"] is True
        assert node["labels"].get(NODE_LABEL) == name
        assert node["memory_limit_bytes"] == LIMITS[name]
    assert (listed["a"]["used_bytes"], listed["b"]["used_bytes"]) == (0, GB // 2)
    assert listed["a"]["available_bytes"] == 3_500_000_000
    assert listed["b"]["available_bytes"] == 2_200_000_000
    assert (listed["a"]["models"], listed["b"]["models"]) == ([], ["p"])


def test_loads_go_to_the_node_with_the_most_headroom(admin, client):
    # Free: a 3.5, b 2.2 GB. Each 1 GB model goes where more is left after it (m5: only b has
    # room without evicting).
    for model, expected in (("m1", "a"), ("m3", "a"), ("m2", "b"), ("m4", "a"), ("m5", "b")):
        chat(client, model)
        assert models(admin)[model]["node"] == expected, f"{model} should have gone to node {expected}"
    assert placement(admin) == {"p": "b", "m1": "a", "m2": "b", "m3": "a", "m4": "a", "m5": "b"}
    listed = nodes(admin)
    assert (listed["a"]["used_bytes"], listed["b"]["used_bytes"]) == (3 * GB, 2_500_000_000)
    assert (listed["a"]["available_bytes"], listed["b"]["available_bytes"]) == (GB // 2, 200_000_000)
    assert sorted(listed["a"]["models"]) == ["m1", "m3", "m4"]
    assert sorted(listed["b"]["models"]) == ["m2", "m5", "p"]


def test_mlx_fleet_ps_shows_each_node_and_where_each_model_runs(driver):
    shown = subprocess.run(
        [sys.executable, "-m", "fleet_cli", "ps", "--url", driver.url, "--admin-key", KEY],
        capture_output=True, text=True, check=True, timeout=60,
    ).stdout.splitlines()
    assert shown[0] == "node a: 3.0 GB used of 3.5 GB budget, 500 MB available for another model"
    assert shown[1] == "node b: 2.5 GB used of 2.7 GB budget, 200 MB available for another model"
    header = shown[3].split()
    assert header[:6] == ["NAME", "TYPE", "FAMILY", "STATUS", "PINNED", "NODE"]
    rows = {line.split()[0]: line.split() for line in shown[4:]}
    assert {name: row[5] for name, row in rows.items()} == {
        "p": "b", "m1": "a", "m2": "b", "m3": "a", "m4": "a", "m5": "b"
    }


def test_eviction_is_least_recently_used_on_that_node_only(admin, client):
    # a: m1, m3, m4 (0.5 GB free); b: p (pinned), m2, m5 (0.2 GB free). bonly may only use b.
    before = models(admin)
    chat(client, "bonly")
    after = models(admin)
    assert placement(admin) == {"p": "b", "m1": "a", "m3": "a", "m4": "a", "m5": "b", "bonly": "b"}
    assert after["m2"]["status"] == "unloaded" and after["m2"]["node"] is None
    assert after["m2"]["evictions"] == before["m2"]["evictions"] + 1
    for model in ("m1", "m3", "m4", "m5", "p"):  # a's models, b's more recent one, the pinned one
        assert after[model]["evictions"] == before[model]["evictions"]
    listed = nodes(admin)
    assert sorted(listed["b"]["models"]) == ["bonly", "m5", "p"]
    assert listed["b"]["used_bytes"] == 2_500_000_000


def test_a_reload_goes_back_to_the_node_it_last_ran_on(admin, client):
    # a: m1, m3, m4 (0.5 GB free); b: p, m5, bonly (0.2 GB free). m2 needs one eviction on
    # either node; a would keep more headroom, but m2 returns to b, where it ran, and evicts
    # b's least recently used, m5.
    chat(client, "m2")
    assert placement(admin) == {"p": "b", "m1": "a", "m3": "a", "m4": "a", "bonly": "b", "m2": "b"}


def test_the_pinned_model_is_never_evicted(admin):
    # p was b's least recently used model through two evictions there.
    p = models(admin)["p"]
    assert (p["status"], p["node"], p["evictions"], p["loads"]) == ("loaded", "b", 0, 1)


def test_a_model_no_node_can_fit_gets_503_naming_the_best_node(admin, client):
    before = placement(admin)
    with pytest.raises(openai.APIStatusError) as raised:
        chat(client, "huge")
    error = raised.value
    assert error.status_code == 503 and error.code == "insufficient_memory"
    assert error.response.headers.get("x-should-retry") == "false"
    # a, once every unpinned model is gone, has 3.5 GB; b has 2.2 GB beside the pinned p.
    assert re.search(r"need 4\.0 GB, only 3\.5 GB available after eviction on node a\b", error.message), error.message
    assert placement(admin) == before  # nothing was evicted for a load that cannot happen
    assert models(admin)["huge"]["node"] is None
    assert_nothing_left_in_flight(admin)


def test_a_node_that_leaves_mid_stream(driver, admin, client):
    # a: m1, m3, m4 (0.5 GB free); b: p, bonly, m2.
    assert models(admin)["m2"]["node"] == "b"
    stream = client.with_options(timeout=httpx.Timeout(60, read=20)).chat.completions.create(
        model="m2",
        messages=[{"role": "user", "content": "hi"}],
        max_tokens=8000,
        temperature=0,
        stream=True,
    )
    chunks, finish, outcome, removed_at = 0, None, None, None
    try:
        for chunk in stream:
            chunks += 1
            if chunk.choices and chunk.choices[0].finish_reason:
                finish = chunk.choices[0].finish_reason
            if chunks == 20:
                driver.remove("b")  # SIGKILL b's raylet and its workers, m2's replica with them
                removed_at = time.monotonic()
        outcome = "ended"
    except openai.APITimeoutError:
        outcome = "hung"
    except (openai.APIError, httpx.HTTPError) as error:  # an SSE error event, or a cut stream
        outcome = f"error: {error!r}"
    print(f"stream from the removed node: {outcome} after {chunks} chunks")
    assert removed_at is not None, f"the stream ended after {chunks} chunks, before b was removed"
    assert outcome.startswith("error") or (outcome == "ended" and finish is None), (outcome, finish)
    assert time.monotonic() - removed_at < 20

    wait_for(lambda: nodes(admin)["b"]["alive"] is False, "node b seen dead", timeout=30)
    wait_for(
        lambda: all(models(admin)[m]["status"] == "unloaded" for m in ("p", "bonly", "m2")),
        "b's models unloaded",
        timeout=30,
    )
    state = models(admin)
    assert all(state[m]["node"] is None for m in ("p", "bonly", "m2"))
    b = nodes(admin)["b"]
    assert (b["models"], b["used_bytes"], b["node_id"]) == ([], 0, None)

    # m2 may use a: it loads there, in place of a's least recently used model, m1.
    chat(client, "m2")
    assert placement(admin) == {"m3": "a", "m4": "a", "m2": "a"}
    # bonly may only use b, which is gone: it cannot load anywhere.
    with pytest.raises(openai.APIStatusError) as raised:
        chat(client, "bonly")
    assert (raised.value.status_code, raised.value.code) == (503, "node_unavailable")
    assert "its node b is not in the cluster" in raised.value.message
    assert_nothing_left_in_flight(admin)


def test_a_node_that_rejoins_is_used_again(driver, admin, client):
    # a: m3, m4, m2 (0.5 GB free); b: dead.
    driver.add("b")
    wait_for(lambda: nodes(admin)["b"]["alive"] is True, "node b back", timeout=30)
    b = nodes(admin)["b"]
    assert b["node_id"] == driver.node_ids["b"]
    chat(client, "m5")  # a would have to evict; b has room
    chat(client, "bonly")
    loaded = placement(admin)
    assert (loaded["m5"], loaded["bonly"], loaded["m3"], loaded["m4"], loaded["m2"]) == ("b", "b", "a", "a", "a")
    # The pinned p comes back with its node (0.5 + 1 + 1 GB fit b's 2.7).
    wait_for(lambda: placement(admin).get("p") == "b", "pinned p loaded again on b", timeout=30)


def controller_pids(driver) -> list[int]:
    """The fleet controller's replica processes in the driver's cluster (not the session's)."""
    title = "ray::ServeReplica:mlx-fleet:fleet-controller"
    found = []
    for pid in session_processes(driver.sid):
        try:
            if Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode().startswith(title):
                found.append(pid)
        except FileNotFoundError:
            pass
    return found


def test_a_restarted_controller_finds_every_model_on_its_node(driver, admin, client):
    before = placement(admin)
    ids = {name: node["node_id"] for name, node in nodes(admin).items()}
    (dead,) = controller_pids(driver)
    os.kill(dead, signal.SIGKILL)
    wait_for(lambda: [p for p in controller_pids(driver) if p != dead], "a new controller", timeout=60)
    wait_for(lambda: placement(admin) == before, "every model adopted where it runs", timeout=60)
    assert {name: node["node_id"] for name, node in nodes(admin).items()} == ids
    assert all(node["alive"] for node in nodes(admin).values())
    chat(client, "m5")  # served where it was, not loaded again
    assert models(admin)["m5"]["node"] == before["m5"]


def test_quit_leaves_no_process_behind(driver):
    assert driver.quit() == 0
    assert driver.leftovers == []
