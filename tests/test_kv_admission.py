"""Requests are admitted on the KV memory they will need, end to end: a third application in
the session's cluster whose budget leaves room for one long sequence of the bench model, not
two. Real Ray, real HTTP, real model processes measured as they run."""

from __future__ import annotations

import json
import threading
import time

import httpx
import psutil
import pytest

from policies.kv import KvShape
from tests.conftest import run_app, wait_for

APP = "mlx-fleet-kv"
KEY = "sekret"
ADMIN = {"Authorization": f"Bearer {KEY}"}
MB = 10**6
OTHER_BYTES = 150 * MB  # the idle model a sequence's KV may evict
ROOM = 190 * MB  # beyond the bench model's process: one long sequence fits, two do not
PROMPT = [{"role": "user", "content": "Tell me everything."}]


def admin(client: httpx.Client) -> dict:
    return client.get("/admin/models").json()


def model(client: httpx.Client, model_id: str) -> dict:
    return next(m for m in admin(client)["models"] if m["id"] == model_id)


def replica_pid(deployment: str) -> int:
    title = f"ray::ServeReplica:{APP}:{deployment}"
    (pid,) = [
        p.info["pid"]
        for p in psutil.process_iter(["pid", "cmdline"])
        if " ".join(p.info["cmdline"] or []).startswith(title)
    ]
    return pid


class Stream:
    """A streamed chat held open on a thread until `close()`: its status and first chunk."""

    def __init__(self, client: httpx.Client, max_tokens: int):
        self.status: int | None = None
        self.body: dict | None = None
        self.headers: httpx.Headers | None = None
        self.first = threading.Event()
        self._close = threading.Event()
        # Greedy: this prompt's answer runs past 1500 tokens, so the stream ends only when
        # closed (a sampled one could end early on an end-of-sequence token).
        body = {"model": "bench", "messages": PROMPT, "max_tokens": max_tokens, "temperature": 0, "stream": True}
        self._thread = threading.Thread(target=self._read, args=(client, body), daemon=True)
        self._thread.start()

    def _read(self, client: httpx.Client, body: dict) -> None:
        try:
            with client.stream("POST", "/v1/chat/completions", json=body) as response:
                self.status, self.headers = response.status_code, response.headers
                if response.status_code != 200:
                    self.body = json.loads(response.read())
                    return
                for line in response.iter_lines():
                    if line.startswith("data: "):
                        self.first.set()
                        if self._close.is_set():
                            return
                    if self._close.wait(0) and self.first.is_set():
                        return
        finally:
            self.first.set()

    def close(self) -> None:
        self._close.set()
        self._thread.join(timeout=30)


@pytest.fixture(scope="module")
def kv(demo_models, serve_port, base_url, http):
    # The bench model's process as the default application measured it (idle, loaded): the
    # budget below leaves ROOM beyond it.
    assert http.post("/admin/models/bench-llama-20m/load", json={"pin": False}).status_code == 200
    process = model(http, "bench-llama-20m")["process_bytes"]
    args = {
        "memory_limit": process + ROOM,
        "admin_api_key": KEY,
        "load_wait_timeout": "3s",
        "models": [
            {"id": "bench", "path": "models/bench-llama-20m"},
            {"id": "other", "path": "models/tiny-llama", "memory": OTHER_BYTES, "max_context": 1024},
        ],
    }
    url = run_app(args, name=APP, route_prefix="/kv")
    with httpx.Client(base_url=url, timeout=120, headers=ADMIN) as client:
        yield client


def test_context_limits_are_shown_and_enforced(kv):
    card = kv.get("/v1/models/other").json()
    assert card["context_length"] == 1024
    body = {"model": "other", "messages": PROMPT, "max_tokens": 1100}
    response = kv.post("/v1/chat/completions", json=body)
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "context_length_exceeded"


def test_an_answer_without_max_tokens_may_fill_the_rest_of_the_context(kv):
    # This app sets no default_max_tokens: as OpenAI and Anthropic do, the answer may run
    # to the end of the model's context (here max_context 1024), and says which cap applied.
    body = {"input": "Tell me everything.", "model": "other", "temperature": 0}
    response = kv.post("/v1/responses", json=body)
    assert response.status_code == 200, response.text
    answer = response.json()
    usage = answer["usage"]
    assert answer["status"] == "incomplete" and usage["input_tokens"] + usage["output_tokens"] == 1024
    assert answer["max_output_tokens"] == usage["output_tokens"]


def test_long_sequences_are_admitted_on_their_kv_and_the_budget_holds(kv):
    assert kv.post("/v1/chat/completions", json={"model": "bench", "messages": PROMPT, "max_tokens": 2}).status_code == 200
    assert kv.post("/v1/chat/completions", json={"model": "other", "messages": PROMPT, "max_tokens": 2}).status_code == 200
    view = admin(kv)
    bench = next(m for m in view["models"] if m["id"] == "bench")
    shape = KvShape(((bench["kv_bytes_per_token"], None),))
    room = view["memory_limit_bytes"] - bench["memory_bytes"]  # with `other` gone
    # One sequence takes most of the room (up to the model's context), so two cannot fit.
    tokens = min(8192 - 64, int(0.75 * room / shape.bytes_per_token))
    assert room < 2 * shape.bytes_for(tokens + 32), "the budget leaves room for two sequences"
    samples: list[dict] = []
    sampling = threading.Event()

    def sample() -> None:
        while not sampling.wait(0.2):
            samples.append(admin(kv))

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        first = Stream(kv, tokens)
        assert first.first.wait(60) and first.status == 200
        # Its KV did not fit beside the idle model: that model was evicted for it.
        assert model(kv, "other")["status"] == "unloaded"
        assert model(kv, "bench")["held_bytes"] >= shape.bytes_for(tokens)

        # A second long sequence waits for the first, then gives up: 503 with retry-after.
        second = Stream(kv, tokens)
        assert second.first.wait(60)
        assert second.status == 503, second.body
        assert second.body["error"]["type"] == "insufficient_memory"
        assert "retry-after" in second.headers

        # A third one waits, and runs as soon as the first is gone.
        third = Stream(kv, tokens)
        time.sleep(1)
        assert not third.first.is_set()
        first.close()
        assert third.first.wait(30) and third.status == 200
        third.close()
    finally:
        sampling.set()
        sampler.join()
    assert samples and all(s["used_bytes"] <= s["memory_limit_bytes"] for s in samples)
    # Given back once nothing runs: only the prompt cache stays held.
    wait_for(lambda: model(kv, "bench")["held_bytes"] < shape.bytes_for(tokens) / 4, "KV given back", timeout=15)


def test_the_ledger_charges_what_the_process_really_holds(kv):
    for _ in range(3):
        body = {"model": "bench", "messages": PROMPT, "max_tokens": 64}
        assert kv.post("/v1/chat/completions", json=body).status_code == 200
    real = psutil.Process(replica_pid("bench")).memory_info().rss

    def close_to_real() -> bool:
        charged = model(kv, "bench")["memory_bytes"]
        return abs(charged - real) <= 0.1 * real

    # Re-measured by the controller's periodic check of its replicas.
    wait_for(close_to_real, "the charge within 10 % of the process's memory", timeout=25)
