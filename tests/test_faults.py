"""Fault injection: real processes killed with SIGKILL, clients that vanish, bodies that
trickle, bursts over the budget, bad requests among good ones. Each case asserts that
nothing hangs, nothing is lost, and the fleet keeps serving.

A third application in the session's cluster, under /faults: four models of 1 GB (by
override) in a budget that fits two, short leases, a short body deadline, and a pinned model
whose weights are broken.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import psutil
import pytest

from tests.conftest import app_url, run_app, wait_for

APP = "mlx-fleet-faults"
LEASE_TTL_S = 3
CHAT_MODELS = ("llama", "qwen", "gemma")
OK_CHAT = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}


def faults_args(broken_path: str) -> dict:
    return {
        "memory_limit": "2.2GB",
        "lease_ttl": f"{LEASE_TTL_S}s",
        "load_wait_timeout": "60s",
        "request_body_timeout": "2s",
        "allow_download": True,  # for "not-downloaded", which no test ever lets download
        "models": [
            {"id": "slow", "path": "models/bench-llama-20m", "memory": "1GB"},
            {"id": "llama", "path": "models/tiny-llama", "memory": "1GB"},
            {"id": "qwen", "path": "models/tiny-qwen2", "memory": "1GB"},
            {"id": "gemma", "path": "models/tiny-gemma", "memory": "1GB"},
            {"id": "minilm", "path": "models/all-MiniLM-L6-v2", "memory": "1GB"},
            {"id": "broken", "path": broken_path, "pinned": True, "memory": "0.1GB"},
            {"id": "not-downloaded", "path": "nobody/not-downloaded"},
        ],
    }


@pytest.fixture(scope="module")
def faults_app(demo_models, serve_port, base_url, tmp_path_factory) -> None:
    broken = tmp_path_factory.mktemp("broken-model")
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(demo_models / "tiny-llama" / name, broken / name)
    (broken / "model.safetensors").write_bytes(b"\x00" * 64)  # not weights
    url = run_app(faults_args(str(broken)), name=APP, route_prefix="/faults")
    wait_for(lambda: httpx.get(f"{url}/admin/models").status_code == 200, "faults app answers")


@pytest.fixture
def faults(faults_app):
    """The faults app with nothing loaded and no lease left by an earlier case."""
    with httpx.Client(base_url=app_url(APP, "/faults"), timeout=120) as client:
        wait_for(lambda: client.get("/health").status_code == 200, "ingress answers", timeout=60)
        for model in admin(client)["models"]:
            if model["status"] != "unloaded":
                assert client.post(f"/admin/models/{model['id']}/unload").status_code == 200
        yield client
        wait_for(lambda: leases_left(client) == 0, "every lease released after the case", timeout=LEASE_TTL_S + 10)


# -- helpers ---------------------------------------------------------------------------------


def admin(client: httpx.Client) -> dict:
    return client.get("/admin/models").json()


def model(client: httpx.Client, model_id: str) -> dict:
    return next(m for m in admin(client)["models"] if m["id"] == model_id)


def leases_left(client: httpx.Client) -> int:
    return sum(m["in_flight"] for m in admin(client)["models"])


def chat(client: httpx.Client, model_id: str, **extra) -> httpx.Response:
    return client.post("/v1/chat/completions", json={"model": model_id, **OK_CHAT, **extra})


def replica_pids(deployment: str, app: str = APP) -> list[int]:
    """Processes of a deployment's replicas, by the title Ray gives them."""
    title = f"ray::ServeReplica:{app}:{deployment}"
    pids = []
    for process in psutil.process_iter(["pid", "cmdline"]):
        command = " ".join(process.info["cmdline"] or [])
        if command.startswith(title) and command[len(title) : len(title) + 1] in ("", ".", " "):
            pids.append(process.info["pid"])
    return pids


def kill_replica(deployment: str) -> int:
    (pid,) = replica_pids(deployment)
    os.kill(pid, signal.SIGKILL)
    return pid


def wait_for_new_replica(deployment: str, dead_pid: int, timeout: float = 90) -> None:
    wait_for(lambda: [p for p in replica_pids(deployment) if p != dead_pid], f"a new {deployment} replica", timeout)


class Stream:
    """A streamed chat read on a thread: its SSE events, whether it ended with [DONE]."""

    def __init__(self, client: httpx.Client, model_id: str, max_tokens: int, close_after_first: bool = False):
        self.events: list[dict] = []
        self.done = False
        self.error: BaseException | None = None
        self.first = threading.Event()
        self.finished = threading.Event()
        body = {
            "model": model_id,
            "messages": [{"role": "user", "content": "Tell me everything."}],
            "max_tokens": max_tokens,
            "temperature": 0,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        self._thread = threading.Thread(target=self._read, args=(client, body, close_after_first), daemon=True)
        self._thread.start()

    def _read(self, client: httpx.Client, body: dict, close_after_first: bool) -> None:
        try:
            with client.stream("POST", "/v1/chat/completions", json=body) as response:
                self.status = response.status_code
                for line in response.iter_lines():
                    if not line.startswith("data: "):
                        continue
                    if line == "data: [DONE]":
                        self.done = True
                        continue
                    self.events.append(json.loads(line[6:]))
                    self.first.set()
                    if close_after_first:
                        return
        except httpx.HTTPError as error:
            self.error = error
        finally:
            self.first.set()
            self.finished.set()

    def wait(self, timeout: float) -> "Stream":
        assert self.finished.wait(timeout), f"stream still open after {timeout} s"
        return self

    @property
    def errors(self) -> list[dict]:
        return [event["error"] for event in self.events if "error" in event]

    @property
    def completion_tokens(self) -> int | None:
        usage = [event["usage"] for event in self.events if event.get("usage")]
        return usage[-1]["completion_tokens"] if usage else None


# -- the request path never hangs and never leaks -------------------------------------------


def test_seed_minus_one_among_good_requests_fails_alone(http):
    bodies = [
        {"model": "tiny-llama", "messages": [{"role": "user", "content": f"story {i}"}], "max_tokens": 16, "temperature": 0}
        for i in range(4)
    ]
    alone = [http.post("/v1/chat/completions", json=body).json()["choices"][0]["message"]["content"] for body in bodies]
    bad = {**bodies[0], "seed": -1}
    with ThreadPoolExecutor(5) as pool:
        futures = [pool.submit(http.post, "/v1/chat/completions", json=body) for body in [*bodies[:2], bad, *bodies[2:]]]
        responses = [future.result() for future in futures]
    refused = responses.pop(2)
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "seed"
    assert [r.status_code for r in responses] == [200] * 4
    assert [r.json()["choices"][0]["message"]["content"] for r in responses] == alone
    for seed in (2**64, -(2**63)):
        assert http.post("/v1/chat/completions", json={**bodies[0], "seed": seed}).status_code == 400
    assert http.post("/v1/chat/completions", json={**bodies[0], "seed": 2**64 - 1}).status_code == 200


def test_a_broken_image_among_good_ones_fails_alone(http):
    from tests.test_vision import data_url, png

    def body(url: str) -> dict:
        content = [{"type": "text", "text": "What is this?"}, {"type": "image_url", "image_url": {"url": url}}]
        return {"model": "tiny-qwen2-vl", "messages": [{"role": "user", "content": content}], "max_tokens": 8, "temperature": 0}

    good = [body(data_url(png(32 + 8 * i, 32))) for i in range(3)]
    alone = [http.post("/v1/chat/completions", json=b).json()["choices"][0]["message"]["content"] for b in good]
    broken = body("data:image/png;base64,not-an-image")
    with ThreadPoolExecutor(4) as pool:
        responses = list(pool.map(lambda b: http.post("/v1/chat/completions", json=b), [good[0], broken, *good[1:]]))
    refused = responses.pop(1)
    assert refused.status_code == 400 and "Image 1" in refused.json()["error"]["message"]
    assert [r.json()["choices"][0]["message"]["content"] for r in responses] == alone


def test_json_nested_too_deep_or_with_nan_is_400(http):
    deep = b'{"model": "tiny-llama", "messages": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    response = http.post("/v1/chat/completions", content=deep, headers={"content-type": "application/json"})
    assert response.status_code == 400 and "levels deep" in response.json()["error"]["message"]
    nested: dict = {"model": "tiny-llama", "messages": [{"role": "user", "content": "x"}]}
    for _ in range(64):  # within what json parses, beyond what any request needs
        nested = {"model": "tiny-llama", "messages": nested["messages"], "metadata": nested}
    response = http.post("/v1/chat/completions", json=nested)
    assert response.status_code == 400 and "levels deep" in response.json()["error"]["message"]
    nan = b'{"model": "tiny-llama", "messages": [{"role": "user", "content": "x"}], "temperature": NaN}'
    response = http.post("/v1/chat/completions", content=nan, headers={"content-type": "application/json"})
    assert response.status_code == 400 and "NaN" in response.json()["error"]["message"]


def test_a_body_that_trickles_gets_408(faults):
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", faults.base_url.port), timeout=30) as sock:
        sock.sendall(
            b"POST /faults/v1/chat/completions HTTP/1.1\r\nHost: localhost\r\n"
            b"Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n{\"model\": "
        )
        answer = b""
        while b"\r\n\r\n" not in answer:
            chunk = sock.recv(65536)
            if not chunk:
                break
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
    assert time.monotonic() - started < 15
    assert chat(faults, "llama").status_code == 200


def test_readiness_waits_for_pinned_models_and_a_broken_model_fails_cleanly(faults, http):
    assert http.get("/health/ready").json() == {"status": "ready"}
    response = faults.get("/health/ready")
    assert response.status_code == 503
    assert "broken" in response.json()["error"]["message"]

    used_before = admin(faults)["used_bytes"]
    response = chat(faults, "broken")
    assert response.status_code == 503
    error = response.json()["error"]
    assert error["type"] == "model_load_failed" and "broken failed to load" in error["message"]
    broken = model(faults, "broken")
    assert broken["status"] == "unloaded" and broken["memory_bytes"] is None
    assert admin(faults)["used_bytes"] == used_before
    assert chat(faults, "llama").status_code == 200


def test_a_model_of_unknown_size_is_refused_not_charged_zero(faults):
    response = chat(faults, "not-downloaded")
    assert response.status_code == 503
    error = response.json()["error"]
    assert error["type"] == "model_load_failed"
    assert "size is unknown" in error["message"] and "hf download nobody/not-downloaded" in error["message"]
    assert model(faults, "not-downloaded")["status"] == "unloaded"


# -- processes that die ------------------------------------------------------------------------


def test_killed_replica_mid_stream_errors_then_the_model_reloads(faults):
    stream = Stream(faults, "slow", max_tokens=2000)
    assert stream.first.wait(60) and stream.events
    loads = model(faults, "slow")["loads"]
    dead = kill_replica("slow")
    stream.wait(timeout=20)
    assert not stream.done
    assert stream.errors and stream.errors[0]["code"] == "model_unavailable"

    response = chat(faults, "slow")  # waits for Serve's new replica, which loads for it
    assert response.status_code == 200 and response.json()["choices"][0]["finish_reason"] in ("stop", "length")
    assert dead not in replica_pids("slow")
    wait_for(lambda: model(faults, "slow")["loads"] == loads + 1, "the controller counts the reload", timeout=30)
    assert model(faults, "slow")["status"] == "loaded"


def test_killed_controller_while_idle_adopts_loaded_models(faults):
    assert chat(faults, "llama").status_code == 200
    statuses = {m["id"]: m["status"] for m in admin(faults)["models"]}
    llama = model(faults, "llama")
    (replica,) = replica_pids("llama")
    dead = kill_replica("fleet-controller")
    wait_for_new_replica("fleet-controller", dead)
    wait_for(lambda: {m["id"]: m["status"] for m in admin(faults)["models"]} == statuses,
             "the new controller adopts what runs", timeout=60)
    assert chat(faults, "llama").status_code == 200
    # The same replica, with the measurement of its one load: nothing was loaded again.
    assert replica_pids("llama") == [replica]
    assert model(faults, "llama")["process_bytes"] == llama["process_bytes"]


def test_killed_controller_during_a_stream_keeps_the_stream_and_its_lease(faults):
    stream = Stream(faults, "slow", max_tokens=600)
    assert stream.first.wait(60) and stream.events
    dead = kill_replica("fleet-controller")
    wait_for_new_replica("fleet-controller", dead)
    if not stream.finished.is_set():
        wait_for(lambda: model(faults, "slow")["in_flight"] == 1 or stream.finished.is_set(),
                 "the new controller knows the stream's lease", timeout=60)
        if not stream.finished.is_set():
            # Longer than a lease lives: the lease is renewed, not just adopted.
            time.sleep(LEASE_TTL_S + 1)
            assert stream.finished.is_set() or model(faults, "slow")["in_flight"] == 1
    stream.wait(timeout=120)
    assert stream.done and not stream.errors
    assert stream.completion_tokens == 600
    wait_for(lambda: model(faults, "slow")["in_flight"] == 0, "lease released", timeout=10)


def test_killed_controller_during_a_load_the_request_still_succeeds(faults):
    replicas_seen: set[int] = set()
    with ThreadPoolExecutor(1) as pool:
        pending = pool.submit(chat, faults, "qwen")
        wait_for(lambda: model(faults, "qwen")["status"] == "loading", "qwen loading", timeout=30)
        dead = kill_replica("fleet-controller")
        while not pending.done():
            replicas_seen.update(replica_pids("qwen"))
            time.sleep(0.05)
        response = pending.result()
    assert response.status_code == 200, response.text
    replicas_seen.update(replica_pids("qwen"))
    assert len(replicas_seen) == 1  # one replica loaded it: the new controller did not start over
    wait_for_new_replica("fleet-controller", dead)
    assert model(faults, "qwen")["status"] == "loaded"


def test_killed_ingress_frees_its_leases_and_requests_resume(faults):
    stream = Stream(faults, "slow", max_tokens=2000)
    assert stream.first.wait(60) and stream.events
    dead = kill_replica("fleet-ingress")
    stream.wait(timeout=30)
    assert not stream.done
    wait_for_new_replica("fleet-ingress", dead)
    faults.base_url = app_url(APP, "/faults")
    wait_for(lambda: faults.get("/health").status_code == 200, "a new ingress answers", timeout=60)
    # The dead ingress renews nothing: its lease expires.
    wait_for(lambda: model(faults, "slow")["in_flight"] == 0, "the dead ingress's lease expired", timeout=LEASE_TTL_S + 10)
    started = time.monotonic()
    assert faults.post("/admin/models/slow/unload").status_code == 200
    assert time.monotonic() - started < 30
    assert chat(faults, "slow").status_code == 200


# -- clients that vanish and bursts ------------------------------------------------------------


def test_dropped_streams_leave_no_lease(faults):
    assert chat(faults, "llama").status_code == 200
    streams = [Stream(faults, "llama", max_tokens=200, close_after_first=True) for _ in range(30)]
    for stream in streams:
        stream.wait(timeout=60)

    # Dropped while their model is still loading: the client gives up before any byte.
    with httpx.Client(base_url=str(faults.base_url), timeout=0.3) as impatient:
        def give_up(_):
            with pytest.raises(httpx.TimeoutException):
                chat(impatient, "qwen", max_tokens=50)
        with ThreadPoolExecutor(30) as pool:
            list(pool.map(give_up, range(30)))

    wait_for(lambda: leases_left(faults) == 0, "no lease left", timeout=LEASE_TTL_S + 5)
    wait_for(lambda: model(faults, "qwen")["status"] == "loaded", "qwen loaded anyway", timeout=60)
    for model_id in ("llama", "qwen"):
        started = time.monotonic()
        assert faults.post(f"/admin/models/{model_id}/unload").status_code == 200
        assert time.monotonic() - started < 10


def test_a_burst_over_the_budget_is_served_in_turn(faults):
    """40 chats and 10 embeddings over 4 models, with room for 2 at a time: all served."""
    rng = random.Random(7)
    requests = [("chat", CHAT_MODELS[i % 3]) for i in range(40)] + [("embed", "minilm")] * 10
    rng.shuffle(requests)

    def send(request: tuple[str, str]) -> httpx.Response:
        kind, model_id = request
        if kind == "embed":
            return faults.post("/v1/embeddings", json={"model": model_id, "input": ["a burst", "of texts"]})
        return chat(faults, model_id)

    with ThreadPoolExecutor(len(requests)) as pool:
        responses = list(pool.map(send, requests))
    assert [r.status_code for r in responses] == [200] * len(requests), [r.text for r in responses if r.status_code != 200]
    view = admin(faults)
    assert view["used_bytes"] <= view["memory_limit_bytes"]
    assert sum(m["evictions"] for m in view["models"]) >= 2
    # The ingress keeps each lease a moment for a next request (LEASE_LINGER_SECONDS), then no more.
    wait_for(lambda: leases_left(faults) == 0, "no lease left after the burst", timeout=5)


def test_unload_with_a_live_stream_waits_then_answers(faults):
    stream = Stream(faults, "slow", max_tokens=40)
    assert stream.first.wait(60)
    started = time.monotonic()
    response = faults.post("/admin/models/slow/unload")
    assert response.status_code == 200 and response.json()["status"] == "unloaded"
    assert stream.wait(timeout=60).done and stream.completion_tokens == 40
    assert time.monotonic() - started < 60



# -- what listens ------------------------------------------------------------------------------


def test_ray_and_serve_listen_on_loopback_only(base_url):
    """Every socket of this session's cluster listens on 127.0.0.1, except Serve's
    inter-replica gRPC server, one per replica, which Ray 2.60 binds to [::] in code."""
    cluster = psutil.Process().children(recursive=True)
    exposed = []
    for process in cluster:
        try:
            listening = [c for c in process.net_connections(kind="inet") if c.status == psutil.CONN_LISTEN]
            title = " ".join(process.cmdline())
        except psutil.NoSuchProcess:
            continue
        public = [c.laddr for c in listening if c.laddr.ip not in ("127.0.0.1", "::ffff:127.0.0.1", "::1")]
        if title.startswith("ray::ServeReplica:") and len(public) == 1 and public[0].ip == "::":
            continue
        exposed += [(title[:60], f"{a.ip}:{a.port}") for a in public]
    assert len(cluster) > 5 and exposed == []
