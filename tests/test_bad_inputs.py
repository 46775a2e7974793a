"""Bad requests get the right status and the OpenAI error envelope; the server keeps serving."""

from __future__ import annotations

import json
from pathlib import Path

import openai
import pytest

from tests.conftest import wait_for

CHAT = "/v1/chat/completions"
OK_CHAT = {"model": "tiny-llama", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}


def assert_envelope(response, status, param=None, code=None, words=""):
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert isinstance(error["message"], str) and words in error["message"]
    if param is not None:
        assert error["param"] == param
    if code is not None:
        assert error["code"] == code
    return error


@pytest.mark.parametrize(
    "body, param, words",
    [
        ({"model": "tiny-llama"}, "messages", "Field required"),
        ({"model": "tiny-llama", "messages": []}, "messages", "at least 1"),
        ({**OK_CHAT, "max_tokens": -1}, "max_tokens", "greater than or equal to 1"),
        ({**OK_CHAT, "max_tokens": 10**12}, "max_tokens", "less than or equal"),
        ({**OK_CHAT, "temperature": 5}, "temperature", ""),
        ({**OK_CHAT, "n": 2}, "n", "only n=1"),
        ({**OK_CHAT, "stop": ["a", "b", "c", "d", "e"]}, "stop", "at most 4"),
        ({**OK_CHAT, "messages": [{"role": "wizard", "content": "hi"}]}, "messages.0.role", ""),
        ({**OK_CHAT, "messages": [{"role": "user", "content": [{"type": "audio", "x": 1}]}]}, None, "audio"),
        ({**OK_CHAT, "messages": "hello"}, "messages", "valid list"),
        ({"model": "tiny-llama", "prompt": ["a", "b"]}, None, "exactly one prompt"),
    ],
)
def test_schema_errors_are_400(http, body, param, words):
    path = "/v1/completions" if "prompt" in body else CHAT
    assert_envelope(http.post(path, json=body), 400, param=param, words=words)


def test_malformed_json(http):
    response = http.post(CHAT, content=b'{"model": "tiny-llama", "messages": [', headers={"content-type": "application/json"})
    assert_envelope(response, 400, words="not valid JSON")
    assert_envelope(http.post(CHAT, json=[1, 2]), 400, words="JSON object")


def test_wrong_content_type(http):
    response = http.post(CHAT, content=b"model=tiny-llama", headers={"content-type": "application/x-www-form-urlencoded"})
    assert_envelope(response, 400, words="Content-Type must be application/json")


def test_unknown_model_is_404_model_not_found(client, http):
    assert_envelope(http.post(CHAT, json={**OK_CHAT, "model": "gpt-17"}), 404, "model", "model_not_found", "gpt-17")
    with pytest.raises(openai.NotFoundError) as error:
        client.chat.completions.create(model="gpt-17", messages=OK_CHAT["messages"])
    assert error.value.code == "model_not_found"


def test_body_over_the_size_limit_is_413(http):
    huge = b'{"model": "tiny-llama", "messages": [{"role": "user", "content": "' + b"a" * 33_000_000 + b'"}]}'
    assert_envelope(http.post(CHAT, content=huge, headers={"content-type": "application/json"}), 413, code="request_too_large")


def test_image_to_a_text_model_is_refused(http):
    body = {
        **OK_CHAT,
        "messages": [{"role": "user", "content": [
            {"type": "text", "text": "what is this?"},
            {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}},
        ]}],
    }
    error = assert_envelope(http.post(CHAT, json=body), 400)
    assert error["message"] == "Model tiny-llama does not support vision"


def test_context_overflow_is_400(http):
    error = assert_envelope(http.post(CHAT, json={**OK_CHAT, "max_tokens": 8192}), 400, code="context_length_exceeded")
    assert "8192" in error["message"]


def test_template_refusal_is_400_also_when_streaming(http):
    # Mistral's template refuses a conversation that opens with the assistant; the error
    # must come before any stream starts.
    messages = [{"role": "assistant", "content": "a"}, {"role": "user", "content": "b"}]
    for stream in (False, True):
        body = {"model": "tiny-mistral", "messages": messages, "stream": stream, "max_tokens": 2}
        assert_envelope(http.post(CHAT, json=body), 400, param="messages", words="alternate")


def test_unknown_route_uses_the_envelope(http):
    assert_envelope(http.get("/v1/nothing-here"), 404, words="/v1/nothing-here")


def test_server_keeps_serving_after_bad_inputs(http):
    for _ in range(3):
        http.post(CHAT, content=b"{", headers={"content-type": "application/json"})
        http.post(CHAT, json={**OK_CHAT, "model": "nope"})
    response = http.post(CHAT, json=OK_CHAT)
    assert response.status_code == 200
    assert response.json()["usage"]["completion_tokens"] == 2


@pytest.mark.parametrize("path", [CHAT, "/v1/messages", "/v1/responses", "/v1/embeddings"])
def test_a_lone_surrogate_is_400_on_every_text_endpoint(http, path):
    body = {"model": "tiny-llama", "max_tokens": 2, "messages": [{"role": "user", "content": "a\ud800b"}],
            "input": "a\ud800b"}
    if path == "/v1/embeddings":
        body["model"] = "all-MiniLM-L6-v2"
    raw = json.dumps(body)  # json.dumps writes the lone surrogate as the escape \ud800
    response = http.post(path, content=raw, headers={"content-type": "application/json"})
    assert response.status_code == 400, response.text
    assert "surrogate" in response.text


def serve_log_text() -> str:
    import ray

    folder = Path(ray._private.worker._global_node.get_session_dir_path()) / "logs" / "serve"
    return "".join(p.read_text(errors="replace") for p in sorted(folder.glob("*.log")))


def test_refusals_are_logged_in_one_line_without_a_traceback(http):
    before = serve_log_text().count("Traceback")
    overflow = {**OK_CHAT, "max_tokens": 9000}  # refused by the model's replica, across Ray
    refusals = [
        http.post(CHAT, json=overflow),
        http.post("/v1/messages", json={**overflow, "stream": True}),
        http.post(CHAT, json={**OK_CHAT, "model": "nope"}),
    ]
    assert [r.status_code for r in refusals] == [400, 400, 404]
    ids = [r.headers["x-request-id"] for r in refusals]

    def logged() -> bool:
        text = serve_log_text()
        return all(f"{i} -- " in text and "refused: 40" in text for i in ids)

    wait_for(logged, "the refusals in the serve logs", timeout=20)
    text = serve_log_text()
    assert text.count("Traceback") == before
    for request_id in ids:
        lines = [line for line in text.splitlines() if request_id in line and "refused" in line]
        assert lines and all(" ERROR " not in line and "ray::" not in line for line in lines), lines
