"""The memory-aware controller end to end: a second application in the session's cluster
with a small budget and exact per-model memory overrides (tiny real models underneath)."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
import ray
from ray import serve

from tests.conftest import run_app, wait_for

APP = "mlx-fleet-mem"
KEY = "sekret"
ADMIN = {"Authorization": f"Bearer {KEY}"}
ARGS = {
    "memory_limit": "3GB",
    "admin_api_key": KEY,
    "load_wait_timeout": "30s",
    "models": [
        {"id": "pinned", "path": "models/tiny-mistral", "pinned": True, "memory": "0.5GB"},
        {"id": "a", "path": "models/bench-llama-20m", "memory": "1GB"},
        {"id": "b", "path": "models/tiny-qwen2", "memory": "1GB"},
        {"id": "c", "path": "models/tiny-gemma", "memory": "1GB"},
        {"id": "big", "path": "models/tiny-llama", "memory": "2GB"},
        {"id": "huge", "path": "models/tiny-llama", "memory": "10GB"},
        {"id": "ttl", "path": "models/tiny-llama", "memory": "0.1GB", "idle_ttl": "2s"},
    ],
}
UNPINNED = [m["id"] for m in ARGS["models"] if not m.get("pinned")]


@pytest.fixture(scope="module")
def mem_url(demo_models, serve_port, base_url) -> str:
    # After the default app (base_url), so both share the cluster; this one under /mem.
    url = run_app(ARGS, name=APP, route_prefix="/mem")
    wait_for(lambda: model_view(url, "pinned")["status"] == "loaded", "pinned model loaded at start")
    return url


@pytest.fixture
def mem(mem_url):
    """The memory app with every unpinned model unloaded."""
    with httpx.Client(base_url=mem_url, timeout=120, headers=ADMIN) as client:
        for model in client.get("/admin/models").json()["models"]:
            if model["id"] in UNPINNED and model["status"] != "unloaded":
                assert client.post(f"/admin/models/{model['id']}/unload").status_code == 200
        yield client


def model_view(url: str, model_id: str) -> dict:
    view = httpx.get(f"{url.rstrip('/')}/admin/models", headers=ADMIN, timeout=30).json()
    return next(m for m in view["models"] if m["id"] == model_id)


def statuses(client: httpx.Client) -> dict[str, str]:
    return {m["id"]: m["status"] for m in client.get("/admin/models").json()["models"]}


def serve_replicas(deployment: str) -> int:
    """Replicas Serve itself reports for a deployment of the memory app, in any state."""
    app = serve.status().applications[APP]
    return sum(app.deployments[deployment].replica_states.values())


def chat(client: httpx.Client, model: str, max_tokens: int = 2) -> httpx.Response:
    body = {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": max_tokens}
    return client.post("/v1/chat/completions", json=body)


def test_least_recently_used_model_is_evicted(mem):
    assert chat(mem, "a").status_code == 200
    assert chat(mem, "b").status_code == 200
    assert {k: v for k, v in statuses(mem).items() if v == "loaded"}.keys() == {"pinned", "a", "b"}

    assert chat(mem, "c").status_code == 200  # 0.5 + 1 + 1 + 1 > 3 GB: one model must go
    now = statuses(mem)
    assert (now["a"], now["b"], now["c"], now["pinned"]) == ("unloaded", "loaded", "loaded", "loaded")
    assert serve_replicas("a") == 0
    assert (serve_replicas("b"), serve_replicas("c"), serve_replicas("pinned")) == (1, 1, 1)
    cards = {m["id"]: m for m in mem.get("/v1/models").json()["data"]}
    assert cards["a"]["status"] == "unloaded" and cards["c"]["status"] == "loaded"

    assert chat(mem, "a").status_code == 200  # now b is the least recently used
    now = statuses(mem)
    assert (now["a"], now["b"], now["c"]) == ("loaded", "unloaded", "loaded")
    assert serve_replicas("b") == 0

    view = mem.get("/admin/models").json()
    assert view["memory_limit_bytes"] == 3 * 10**9
    assert view["used_bytes"] == 2_500_000_000
    assert view["available_bytes"] == 500_000_000
    b = next(m for m in view["models"] if m["id"] == "b")
    assert b["evictions"] >= 1 and b["memory_bytes"] is None and b["estimated_bytes"] == 10**9


def test_pinned_model_is_never_evicted(mem):
    pinned = model_view(str(mem.base_url), "pinned")
    assert pinned["pinned"] is True and pinned["status"] == "loaded"
    for model in ("a", "b", "c", "a", "b"):
        assert chat(mem, model).status_code == 200
    pinned_now = model_view(str(mem.base_url), "pinned")
    # It was the least recently used model all along, and it stayed.
    assert pinned_now["status"] == "loaded" and pinned_now["evictions"] == 0
    assert serve_replicas("pinned") == 1


def test_model_larger_than_the_budget_gets_503(mem, serve_port):
    assert chat(mem, "b").status_code == 200
    before = statuses(mem)
    response = chat(mem, "huge")
    assert response.status_code == 503
    assert response.headers["x-should-retry"] == "false"
    error = response.json()["error"]
    assert error["type"] == "insufficient_memory"
    assert error["message"] == "need 10.0 GB, only 2.5 GB available after eviction"

    client = openai.OpenAI(base_url=f"{str(mem.base_url).rstrip('/')}/v1", api_key="x", max_retries=3)
    with pytest.raises(openai.APIStatusError) as raised:
        client.chat.completions.create(model="huge", messages=[{"role": "user", "content": "hi"}])
    assert raised.value.status_code == 503

    assert statuses(mem) == before  # refusing evicts nothing
    assert chat(mem, "b").status_code == 200  # and the server keeps serving


def test_concurrent_first_requests_share_one_load(mem):
    loads_before = model_view(str(mem.base_url), "c")["loads"]
    with ThreadPoolExecutor(8) as pool:
        codes = list(pool.map(lambda _: chat(mem, "c").status_code, range(8)))
    assert codes == [200] * 8
    assert model_view(str(mem.base_url), "c")["loads"] == loads_before + 1


def test_stream_in_flight_is_not_cut_by_an_eviction(mem):
    """`big` (2 GB) needs `a`'s memory while `a` streams: it waits, `a`'s stream completes."""
    assert chat(mem, "a").status_code == 200
    streaming = threading.Event()
    stream_done_at = {}
    result = {}

    def stream_from_a():
        body = {"model": "a", "messages": [{"role": "user", "content": "go"}], "max_tokens": 150,
                "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}
        with mem.stream("POST", "/v1/chat/completions", json=body) as response:
            lines = []
            for line in response.iter_lines():
                streaming.set()
                if line:
                    lines.append(line)
        stream_done_at["t"] = time.monotonic()
        result["lines"] = lines

    thread = threading.Thread(target=stream_from_a)
    thread.start()
    assert streaming.wait(30)
    response = chat(mem, "big")
    big_done_at = time.monotonic()
    thread.join(60)

    lines = result["lines"]
    assert lines[-1] == "data: [DONE]"
    usage = httpx.Response(200, content=lines[-2][6:]).json()["usage"]
    assert usage["completion_tokens"] == 150
    assert response.status_code in (200, 503)
    if response.status_code == 200:
        assert big_done_at > stream_done_at["t"]
        assert statuses(mem)["a"] == "unloaded"


def test_admin_preload_and_unload(mem, mem_url):
    # Without the key, with a wrong key: 401 in the OpenAI envelope.
    non_ascii = {"Authorization": "Bearer sékret\u00ff".encode("latin-1")}
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}, non_ascii):
        response = httpx.post(f"{mem_url}/admin/models/c/load", headers=headers)
        assert response.status_code == 401
        assert response.json()["error"]["type"] == "authentication_error"
    assert httpx.get(f"{mem_url}/admin/models").status_code == 401

    loaded = mem.post("/admin/models/c/load").json()
    assert (loaded["status"], loaded["pinned"]) == ("loaded", True)
    assert serve_replicas("c") == 1
    for model in ("a", "b", "a", "b"):  # pressure that would evict an unpinned c
        assert chat(mem, model).status_code == 200
    assert statuses(mem)["c"] == "loaded"

    unloaded = mem.post("/admin/models/c/unload").json()
    assert (unloaded["status"], unloaded["pinned"]) == ("unloaded", False)
    assert serve_replicas("c") == 0

    loaded = mem.post("/admin/models/c/load", json={"pin": False}).json()
    assert (loaded["status"], loaded["pinned"]) == ("loaded", False)

    assert mem.post("/admin/models/nope/load").status_code == 404
    assert mem.post("/admin/models/c/load", json={"pin": "sometimes"}).status_code == 400
    response = mem.post("/admin/models/huge/load")
    assert response.status_code == 503 and "available after eviction" in response.json()["error"]["message"]


def test_idle_model_is_unloaded_after_its_ttl(mem):
    assert chat(mem, "ttl").status_code == 200
    wait_for(lambda: statuses(mem)["ttl"] == "unloaded", "ttl model unloaded", timeout=30)
    assert serve_replicas("ttl") == 0
    assert model_view(str(mem.base_url), "ttl")["evictions"] >= 1


def test_controller_restart_rebuilds_state_from_serve(mem):
    assert chat(mem, "b").status_code == 200
    before = statuses(mem)
    (name,) = [
        actor["name"]
        for actor in ray.util.list_named_actors(all_namespaces=True)
        if actor["name"].startswith(f"SERVE_REPLICA::{APP}#fleet-controller#")
    ]
    ray.kill(ray.get_actor(name, namespace="serve"), no_restart=True)

    def restarted():
        actors = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)]
        return any(a.startswith(f"SERVE_REPLICA::{APP}#fleet-controller#") and a != name for a in actors)

    wait_for(restarted, "a new controller replica", timeout=90)
    wait_for(lambda: statuses(mem) == before, "the new controller adopts the loaded models", timeout=60)
    b = model_view(str(mem.base_url), "b")
    assert b["memory_bytes"] == 10**9 and b["process_bytes"] > 0
    assert chat(mem, "b").status_code == 200
