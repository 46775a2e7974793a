"""The OpenAI surface end to end: real Ray, real HTTP, real tiny MLX models, the openai client."""

from __future__ import annotations

import json
import time

import httpx
import pytest

from policies.families import adapter_for, render_chat
from tests.conftest import ROOT, default_app_args

TEXT_MODELS = ["tiny-llama", "tiny-qwen2", "tiny-mistral", "tiny-gemma"]
USER = [{"role": "user", "content": "What is the capital of France?"}]


def test_list_models_shows_the_catalog(client, http):
    models = client.models.list()
    ids = [m.id for m in models.data]
    assert ids == [m["id"] for m in default_app_args()["models"]]
    cards = {card["id"]: card for card in http.get("/v1/models").json()["data"]}
    families = {m: cards[m]["family"] for m in TEXT_MODELS}
    assert families == {"tiny-llama": "llama", "tiny-qwen2": "qwen", "tiny-mistral": "mistral", "tiny-gemma": "gemma"}
    for card in cards.values():
        assert card["object"] == "model"
        kinds = {"all-MiniLM-L6-v2": "embeddings", "tiny-qwen2-vl": "vision"}
        assert card["type"] == kinds.get(card["id"], "text-generation")
        assert card["status"] in ("loaded", "loading", "unloaded")
        assert card["pinned"] is False
    assert http.get("/v1/models/tiny-qwen2").json()["id"] == "tiny-qwen2"


@pytest.mark.parametrize("model", TEXT_MODELS)
def test_each_family_answers_a_chat(client, model):
    reply = client.chat.completions.create(model=model, messages=USER, max_tokens=6, temperature=0)
    choice = reply.choices[0]
    assert reply.object == "chat.completion"
    assert reply.model == model
    assert choice.message.role == "assistant"
    assert choice.message.content.strip()
    # The demo models never pick EOS greedily, so greedy decoding runs to max_tokens.
    assert choice.finish_reason == "length"
    assert reply.usage.completion_tokens == 6
    assert reply.usage.prompt_tokens > 5
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + 6


@pytest.mark.parametrize("model", TEXT_MODELS)
def test_each_family_answers_a_chat_with_a_system_message(client, http, model):
    from mlx_lm.tokenizer_utils import load as load_tokenizer

    messages = [{"role": "system", "content": "Answer in one word."}, *USER]
    reply = client.chat.completions.create(model=model, messages=messages, max_tokens=4, temperature=0)
    assert reply.choices[0].message.content
    # The server rendered exactly the family's adapted template: same prompt, same tokens.
    family = http.get(f"/v1/models/{model}").json()["family"]
    tokenizer = load_tokenizer(ROOT / "models" / model)
    prompt = render_chat(adapter_for(family), tokenizer, messages)
    assert "Answer in one word." in prompt
    assert reply.usage.prompt_tokens == len(tokenizer.encode(prompt, add_special_tokens=False))


def test_model_status_becomes_loaded_after_use(client, http):
    client.chat.completions.create(model="tiny-llama", messages=USER, max_tokens=1)
    card = http.get("/v1/models/tiny-llama").json()
    assert card["status"] == "loaded"


def test_streaming_chat_matches_non_streaming(client, http):
    kwargs = dict(model="tiny-qwen2", messages=USER, max_tokens=12, temperature=0)
    whole = client.chat.completions.create(**kwargs)
    chunks = list(client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kwargs))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert chunks[0].choices[0].delta.role == "assistant"
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == ["length"]
    assert chunks[-1].choices == []
    assert chunks[-1].usage.completion_tokens == 12
    assert chunks[-1].usage.prompt_tokens == whole.usage.prompt_tokens
    assert len({c.id for c in chunks}) == 1

    with http.stream("POST", "/v1/chat/completions", json={**kwargs, "stream": True}) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in response.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    assert all(line.startswith("data: ") for line in lines)
    assert all(json.loads(line[6:]).get("usage") is None for line in lines[:-1])


def test_completions_plain_and_streaming(client):
    kwargs = dict(model="tiny-gemma", prompt="Once upon a time", max_tokens=7, temperature=0)
    whole = client.completions.create(**kwargs)
    assert whole.object == "text_completion"
    assert whole.choices[0].finish_reason == "length"
    assert whole.usage.completion_tokens == 7
    chunks = list(client.completions.create(stream=True, **kwargs))
    assert "".join(c.choices[0].text for c in chunks) == whole.choices[0].text
    assert chunks[-1].choices[0].finish_reason == "length"


def test_same_seed_reproduces_sampled_text(client):
    def sample(seed):
        reply = client.chat.completions.create(
            model="tiny-llama", messages=USER, max_tokens=16, temperature=1.0, seed=seed
        )
        return reply.choices[0].message.content

    assert sample(1234) == sample(1234)
    # Seeds matter: three other seeds cannot all reproduce the same sampled text.
    assert len({sample(1234), sample(1), sample(2), sample(3)}) > 1


def test_temperature_zero_is_greedy_not_default(client):
    texts = {
        client.chat.completions.create(
            model="tiny-mistral", messages=USER, max_tokens=10, temperature=0, seed=seed
        ).choices[0].message.content
        for seed in (1, 2, 3)
    }
    assert len(texts) == 1


def test_stop_sequence_cuts_the_text(client):
    kwargs = dict(model="tiny-llama", messages=USER, temperature=0)
    full = client.chat.completions.create(max_tokens=12, **kwargs).choices[0].message.content
    words = full.split()
    stop = words[len(words) // 2]
    cut = client.chat.completions.create(max_tokens=12, stop=[stop], **kwargs).choices[0]
    assert cut.finish_reason == "stop"
    assert cut.message.content == full[: full.index(stop)]
    streamed = client.chat.completions.create(max_tokens=12, stop=stop, stream=True, **kwargs)
    assert "".join(c.choices[0].delta.content or "" for c in streamed) == cut.message.content


def test_max_completion_tokens_is_honoured(client):
    reply = client.chat.completions.create(model="tiny-llama", messages=USER, max_completion_tokens=3, temperature=0)
    assert reply.usage.completion_tokens == 3


def test_health(http):
    assert http.get("/health").json() == {"status": "ok"}


def test_the_ingress_serves_http_itself_and_serves_proxy_answers_the_same(http, serve_port):
    # Direct ingress (ops/fleet.env): the suite's requests reach the ingress replica on its own
    # port; Serve's proxy port, one hop longer, answers the same API and streams the same way.
    assert http.base_url.port != serve_port
    with httpx.Client(base_url=f"http://127.0.0.1:{serve_port}", timeout=60) as proxied:
        assert proxied.get("/v1/models").json() == http.get("/v1/models").json()
        body = {"model": "tiny-llama", "messages": USER, "max_tokens": 4, "temperature": 0, "stream": True}
        direct, through_proxy = (streamed_text(server, body) for server in (http, proxied))
        assert direct and direct == through_proxy


def streamed_text(server: httpx.Client, body: dict) -> str:
    with server.stream("POST", "/v1/chat/completions", json=body) as response:
        chunks = [json.loads(line[6:]) for line in response.iter_lines() if line.startswith("data: {")]
    return "".join(chunk["choices"][0]["delta"].get("content") or "" for chunk in chunks if chunk["choices"])


def test_concurrent_requests_are_batched_and_match_sequential_answers(client):
    from concurrent.futures import ThreadPoolExecutor

    topics = ["cats", "ships", "rain", "bread", "Paris", "robots"]

    def ask(topic):
        reply = client.chat.completions.create(
            model="tiny-qwen2", messages=[{"role": "user", "content": f"Tell me about {topic}"}],
            max_tokens=12, temperature=0,
        )
        return reply.choices[0].message.content, reply.usage.completion_tokens

    sequential = [ask(topic) for topic in topics]
    with ThreadPoolExecutor(len(topics)) as pool:
        concurrent = list(pool.map(ask, topics))
    assert concurrent == sequential
    assert all(tokens == 12 for _, tokens in concurrent)


def test_client_that_disconnects_mid_stream_frees_the_model(http):
    body = {"model": "tiny-llama", "messages": USER, "max_tokens": 4000, "temperature": 0, "stream": True}
    with http.stream("POST", "/v1/chat/completions", json=body) as response:
        for _, _line in zip(range(3), response.iter_lines()):
            pass
    # The abandoned generation stops; the model is free and serves the next request.
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        model = next(m for m in http.get("/admin/models").json()["models"] if m["id"] == "tiny-llama")
        if model["in_flight"] == 0:
            break
        time.sleep(0.2)
    else:
        raise AssertionError(f"the disconnected request still counts as in flight: {model}")
    reply = http.post("/v1/chat/completions", json={**body, "stream": False, "max_tokens": 3})
    assert reply.json()["usage"]["completion_tokens"] == 3


def test_next_turn_reuses_the_prompt_cache_and_answers_the_same(client):
    """A second turn starts from the first turn's cached prefix; answers equal a cold read."""
    long_user = [{"role": "user", "content": "Tell me everything about the sea and the mountains. " * 20}]
    first = client.chat.completions.create(model="tiny-gemma", messages=long_user, max_tokens=8, temperature=0)
    again = client.chat.completions.create(model="tiny-gemma", messages=long_user, max_tokens=8, temperature=0)
    assert again.choices[0].message.content == first.choices[0].message.content
    turn2 = long_user + [
        {"role": "assistant", "content": first.choices[0].message.content},
        {"role": "user", "content": "And then?"},
    ]
    warm = client.chat.completions.create(model="tiny-gemma", messages=turn2, max_tokens=8, temperature=0)
    # A seeded request runs alone without the cache: greedy text must not depend on it.
    cold = client.chat.completions.create(model="tiny-gemma", messages=turn2, max_tokens=8, temperature=0, seed=1)
    assert warm.choices[0].message.content == cold.choices[0].message.content
    assert warm.usage.prompt_tokens == cold.usage.prompt_tokens
    # The client sees how much of the prompt came from the cache.
    assert first.usage.prompt_tokens <= warm.usage.prompt_tokens_details.cached_tokens < warm.usage.prompt_tokens
    assert cold.usage.prompt_tokens_details.cached_tokens == 0


def test_openapi_declares_every_request_body(http):
    import jsonschema

    document = http.get("/openapi.json").json()
    bodies = {
        "/v1/chat/completions": {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3},
        "/v1/completions": {"model": "m", "prompt": "hi"},
        "/v1/embeddings": {"model": "m", "input": [[1, 2], [3]]},
        "/v1/responses": {"model": "m", "input": "hi", "tools": [{"type": "web_search"}]},
        "/v1/messages": {"model": "m", "max_tokens": 3, "messages": [{"role": "user", "content": "hi"}]},
        "/v1/messages/count_tokens": {"model": "m", "messages": [{"role": "user", "content": "hi"}]},
    }
    for path, body in bodies.items():
        schema = document["paths"][path]["post"]["requestBody"]["content"]["application/json"]["schema"]
        root = {**document, **schema}  # refs resolve against the whole document
        jsonschema.validate(body, root)
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate({"messages": 3}, root)  # no model: never valid
