"""API keys (`api_keys`): every dialect refuses a request without a valid key (401 in its own
envelope), a key sees only its models, a key with `may_load: false` is served only by loaded
models, `max_concurrent` answers 429 past its limit, keys may be given as SHA-256 digests,
and the admin key stays separate. An application of its own under /keys, in the session's
cluster; the default application (no keys) is the rest of the suite."""

from __future__ import annotations

import hashlib
import threading

import anthropic
import httpx
import openai
import pytest

from tests.conftest import run_app, wait_for

APP = "mlx-fleet-keys"
ADMIN_KEY = "admin-secret"
ALICE, BOB = "alice-key", "bob-key"
ARGS = {
    "admin_api_key": ADMIN_KEY,
    "default_max_tokens": 8,
    "models": [{"id": "chat", "path": "models/tiny-llama"}, {"id": "other", "path": "models/tiny-qwen2"}],
    "api_keys": [
        {"name": "alice", "key": ALICE},
        # Bob's config holds only the digest of his key.
        {"name": "bob", "key_sha256": hashlib.sha256(BOB.encode()).hexdigest(), "models": ["ch*"],
         "may_load": False, "max_concurrent": 1},
    ],
}
CHAT = {"model": "chat", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}


@pytest.fixture(scope="module")
def keys_url(demo_models, serve_port, base_url) -> str:
    return run_app(ARGS, name=APP, route_prefix="/keys")


@pytest.fixture
def http(keys_url):
    with httpx.Client(base_url=keys_url, timeout=120) as client:
        yield client


def as_(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def admin(http: httpx.Client) -> dict:
    return http.get("/admin/models", headers=as_(ADMIN_KEY)).raise_for_status().json()


def unload(http: httpx.Client, model_id: str) -> None:
    http.post(f"/admin/models/{model_id}/unload", headers=as_(ADMIN_KEY)).raise_for_status()


@pytest.mark.parametrize(
    "headers, presented",
    [
        ({}, False),
        (as_("wrong"), True),
        ({"x-api-key": "wrong"}, True),
        ({"Authorization": "Bearer ключ".encode()}, True),  # bytes no key can match
        (as_(ADMIN_KEY), True),  # the admin key is no API key
    ],
)
def test_every_dialect_refuses_a_request_without_a_valid_key(http, headers, presented):
    wording = "is not valid" if presented else "needs an API key"
    for path, body in (
        ("/v1/chat/completions", CHAT),
        ("/v1/responses", {"model": "chat", "input": "hi"}),
        ("/v1/embeddings", {"model": "chat", "input": "hi"}),
    ):
        response = http.post(path, json=body, headers=headers)
        assert response.status_code == 401, (path, response.text)
        error = response.json()["error"]
        assert (error["type"], error["code"]) == ("authentication_error", "invalid_api_key") and wording in error["message"]
    response = http.post("/v1/messages", json=CHAT, headers=headers)
    assert response.status_code == 401
    assert response.json()["type"] == "error" and response.json()["error"]["type"] == "authentication_error"
    assert http.get("/v1/models", headers=headers).status_code == 401


def test_the_official_clients_use_their_own_headers(keys_url):
    client = openai.OpenAI(base_url=f"{keys_url}/v1", api_key=ALICE, max_retries=0)
    assert client.chat.completions.create(**CHAT).choices[0].message.content
    claude = anthropic.Anthropic(base_url=keys_url, api_key=ALICE, max_retries=0)  # x-api-key
    assert claude.messages.create(**CHAT).content[0].text
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{keys_url}/v1", api_key="nope", max_retries=0).models.list()


def test_a_key_sees_only_its_models(http):
    assert [m["id"] for m in http.get("/v1/models", headers=as_(BOB)).json()["data"]] == ["chat"]
    assert [m["id"] for m in http.get("/v1/models", headers=as_(ALICE)).json()["data"]] == ["chat", "other"]
    for response in (
        http.post("/v1/chat/completions", json={**CHAT, "model": "other"}, headers=as_(BOB)),
        http.get("/v1/models/other", headers=as_(BOB)),
    ):
        assert response.status_code == 404 and response.json()["error"]["code"] == "model_not_found"
        assert "does not exist" in response.json()["error"]["message"]


def test_a_key_that_may_not_load_is_served_only_by_loaded_models(http):
    unload(http, "chat")
    refused = http.post("/v1/chat/completions", json=CHAT, headers=as_(BOB))
    assert refused.status_code == 503, refused.text
    assert refused.json()["error"]["code"] == "model_not_loaded" and "may_load: false" in refused.json()["error"]["message"]
    assert refused.headers["x-should-retry"] == "false"
    assert {m["id"]: m["status"] for m in admin(http)["models"]}["chat"] == "unloaded"  # it loaded nothing
    assert http.post("/v1/chat/completions", json=CHAT, headers=as_(ALICE)).status_code == 200  # alice may load
    assert http.post("/v1/chat/completions", json=CHAT, headers=as_(BOB)).status_code == 200


def test_max_concurrent_answers_429_past_the_limit_and_counts_per_key(http, keys_url):
    http.post("/v1/chat/completions", json=CHAT, headers=as_(ALICE)).raise_for_status()  # loaded for bob
    before = {k["name"]: k for k in admin(http)["api_keys"]}
    streaming, done = threading.Event(), threading.Event()

    def long_stream() -> None:
        body = {**CHAT, "max_tokens": 4000, "stream": True}
        with httpx.Client(base_url=keys_url, timeout=120) as client:
            with client.stream("POST", "/v1/chat/completions", json=body, headers=as_(BOB)) as response:
                for _ in response.iter_lines():
                    streaming.set()
                    if done.is_set():
                        break

    thread = threading.Thread(target=long_stream)
    thread.start()
    try:
        assert streaming.wait(60)
        second = http.post("/v1/chat/completions", json=CHAT, headers=as_(BOB))
        assert second.status_code == 429 and second.headers["retry-after"] == "1"
        assert second.json()["error"]["code"] == "rate_limit_exceeded"
        during = {k["name"]: k for k in admin(http)["api_keys"]}
        assert during["bob"]["active"] == 1 and during["bob"]["max_concurrent"] == 1
        assert http.post("/v1/chat/completions", json=CHAT, headers=as_(ALICE)).status_code == 200  # another key
    finally:
        done.set()
        thread.join(60)
    wait_for(lambda: {k["name"]: k for k in admin(http)["api_keys"]}["bob"]["active"] == 0, "bob's stream counted out")
    assert http.post("/v1/chat/completions", json=CHAT, headers=as_(BOB)).status_code == 200
    after = {k["name"]: k for k in admin(http)["api_keys"]}
    assert after["bob"]["requests"] - before["bob"]["requests"] == 2  # the stream and the last one, not the 429
    assert "key" not in str(after).replace("api_keys", "")  # names only, never a key
    assert BOB not in str(after) and ALICE not in str(after)


def test_the_admin_key_stays_separate(http):
    assert http.get("/admin/models", headers=as_(ALICE)).status_code == 401
    assert http.get("/admin/models", headers=as_(ADMIN_KEY)).status_code == 200
