"""Anthropic's Messages API through the official `anthropic` client: plain and streamed
answers, tool use (forced calls by constrained decoding), tool results, thinking,
count_tokens, and errors in Anthropic's shape. Real SmolLM2 for content, tiny models for the
rest."""

from __future__ import annotations

import base64
import json

import anthropic
import pytest

from tests.test_vision import png

REAL = "smollm2-135m-instruct"
WEATHER = {
    "name": "get_weather",
    "description": "Current weather in a city",
    "input_schema": {
        "type": "object",
        "properties": {"city": {"type": "string", "enum": ["Paris", "Rome"]}, "celsius": {"type": "boolean"}},
        "required": ["city", "celsius"],
        "additionalProperties": False,
    },
}
ASK = [{"role": "user", "content": "What is the capital of France?"}]


def prompt_tokens(usage) -> int:
    """The whole prompt: Anthropic counts the part read from the prompt cache apart."""
    return usage.input_tokens + usage.cache_read_input_tokens


@pytest.fixture(scope="module")
def claude(base_url):
    return anthropic.Anthropic(base_url=base_url, api_key="unused", max_retries=0, timeout=120)


def test_a_real_answer_plain_and_streamed(claude):
    message = claude.messages.create(model=REAL, max_tokens=40, messages=ASK, extra_body={"temperature": 0})
    assert message.type == "message" and message.role == "assistant" and message.id.startswith("msg_")
    assert message.stop_reason == "end_turn" and message.stop_sequence is None
    (block,) = message.content
    assert block.type == "text" and "Paris" in block.text
    assert prompt_tokens(message.usage) > 10 and message.usage.output_tokens > 0

    with claude.messages.stream(model=REAL, max_tokens=40, messages=ASK, extra_body={"temperature": 0}) as stream:
        pieces = list(stream.text_stream)
        final = stream.get_final_message()
    assert "".join(pieces) == block.text == final.content[0].text
    assert final.stop_reason == "end_turn" and final.usage.output_tokens == message.usage.output_tokens
    assert prompt_tokens(final.usage) == prompt_tokens(message.usage)
    assert final.usage.cache_read_input_tokens > 0  # the same prompt again: read from the cache


def test_system_stop_sequences_and_max_tokens(claude):
    system = claude.messages.create(model=REAL, max_tokens=5, messages=ASK, extra_body={"temperature": 0},
                                    system=[{"type": "text", "text": "Answer in French.", "cache_control": {"type": "ephemeral"}}])
    assert system.stop_reason == "max_tokens" and system.usage.output_tokens == 5
    no_system = claude.messages.create(model=REAL, max_tokens=5, messages=ASK, extra_body={"temperature": 0})
    assert prompt_tokens(system.usage) != prompt_tokens(no_system.usage)
    stopped = claude.messages.create(model=REAL, max_tokens=40, messages=ASK, extra_body={"temperature": 0}, stop_sequences=["France"])
    assert stopped.stop_reason == "stop_sequence" and stopped.stop_sequence == "France"
    assert "France" not in stopped.content[0].text


def test_forced_tool_use_plain_and_streamed(claude):
    kwargs = dict(model="tiny-qwen2", max_tokens=200, messages=ASK, tools=[WEATHER], extra_body={"temperature": 0},
                  tool_choice={"type": "tool", "name": "get_weather", "disable_parallel_tool_use": True})
    message = claude.messages.create(**kwargs)
    assert message.stop_reason == "tool_use"
    (call,) = [b for b in message.content if b.type == "tool_use"]
    assert call.name == "get_weather" and call.id.startswith("toolu_")
    assert set(call.input) == {"city", "celsius"} and call.input["city"] in ("Paris", "Rome")
    with claude.messages.stream(**kwargs) as stream:
        final = stream.get_final_message()
    (streamed,) = [b for b in final.content if b.type == "tool_use"]
    assert (streamed.name, streamed.input) == (call.name, call.input) and final.stop_reason == "tool_use"


def test_any_tool_and_tool_results_in_history(claude):
    message = claude.messages.create(model="tiny-qwen2", max_tokens=200, messages=ASK, tools=[WEATHER],
                                     tool_choice={"type": "any", "disable_parallel_tool_use": True}, extra_body={"temperature": 0.7})
    calls = [b for b in message.content if b.type == "tool_use"]
    assert calls and message.stop_reason == "tool_use"
    history = [*ASK, {"role": "assistant", "content": [c.model_dump() for c in calls]},
               {"role": "user", "content": [{"type": "tool_result", "tool_use_id": c.id, "content": "Sunny."} for c in calls]}]
    follow_up = claude.messages.create(model="tiny-qwen2", max_tokens=5, messages=history, tools=[WEATHER])
    assert prompt_tokens(follow_up.usage) > prompt_tokens(message.usage)


def test_thinking_blocks(claude):
    kwargs = dict(model="tiny-qwen3", max_tokens=10, messages=ASK, extra_body={"temperature": 0})
    thinking = claude.messages.create(**kwargs, thinking={"type": "enabled", "budget_tokens": 1024})
    assert [b.type for b in thinking.content] == ["thinking"] and thinking.content[0].thinking
    with claude.messages.stream(**kwargs, thinking={"type": "enabled", "budget_tokens": 1024}) as stream:
        final = stream.get_final_message()
    assert final.content[0].type == "thinking" and final.content[0].thinking == thinking.content[0].thinking
    plain = claude.messages.create(**kwargs, thinking={"type": "disabled"})
    assert [b.type for b in plain.content] == ["text"]


def test_structured_output_plain_and_streamed(claude):
    schema = WEATHER["input_schema"]
    kwargs = dict(model="tiny-qwen2", max_tokens=100, messages=ASK, extra_body={"temperature": 0},
                  output_config={"format": {"type": "json_schema", "schema": schema}})
    message = claude.messages.create(**kwargs)
    value = json.loads(message.content[0].text)
    assert set(value) == {"city", "celsius"} and isinstance(value["celsius"], bool)
    with claude.messages.stream(**kwargs) as stream:
        assert "".join(stream.text_stream) == message.content[0].text
    with pytest.raises(anthropic.BadRequestError) as refused:
        claude.messages.create(model="tiny-qwen2-vl", max_tokens=5, messages=ASK,
                               output_config={"format": {"type": "json_schema", "schema": schema}})
    assert "structured output" in refused.value.body["error"]["message"]


def test_count_tokens_matches_the_prompt_of_a_generation(claude):
    counted = claude.messages.count_tokens(model=REAL, messages=ASK)
    message = claude.messages.create(model=REAL, max_tokens=1, messages=ASK)
    assert counted.input_tokens == prompt_tokens(message.usage)
    with_tools = claude.messages.count_tokens(model="tiny-qwen2", messages=ASK, tools=[WEATHER])
    without = claude.messages.count_tokens(model="tiny-qwen2", messages=ASK)
    assert with_tools.input_tokens > without.input_tokens


def test_errors_come_in_anthropic_shape(claude, http):
    with pytest.raises(anthropic.NotFoundError) as missing:
        claude.messages.create(model="claude-9", max_tokens=5, messages=ASK)
    assert missing.value.body["type"] == "error" and missing.value.body["error"]["type"] == "not_found_error"
    with pytest.raises(anthropic.BadRequestError) as no_tools:
        claude.messages.create(model="tiny-qwen2-vl", max_tokens=5, messages=ASK, tools=[WEATHER])
    assert "does not support tools" in no_tools.value.body["error"]["message"]
    response = http.post("/v1/messages", json={"model": REAL, "messages": ASK},
                         headers={"x-api-key": "anything", "anthropic-version": "2023-06-01"})
    assert response.status_code == 400
    assert response.json()["type"] == "error" and "max_tokens" in response.json()["error"]["message"]
    assert http.post("/v1/messages", content=b"{", headers={"content-type": "application/json"}).json()["type"] == "error"
    unknown_tool = {"model": "tiny-qwen2", "max_tokens": 5, "messages": ASK, "tools": [WEATHER],
                    "tool_choice": {"type": "tool", "name": "nope"}}
    assert http.post("/v1/messages", json=unknown_tool).json()["error"]["type"] == "invalid_request_error"


def test_images_go_through_the_safe_image_path(claude):
    image = {"type": "image", "source": {"type": "base64", "media_type": "image/png",
                                          "data": base64.b64encode(png(32, 32)).decode()}}
    message = claude.messages.create(model="tiny-qwen2-vl", max_tokens=5,
                                     messages=[{"role": "user", "content": [image, {"type": "text", "text": "What is it?"}]}])
    assert message.content[0].type == "text"
    bad = {"type": "image", "source": {"type": "url", "url": "http://169.254.169.254/latest/meta-data"}}
    with pytest.raises(anthropic.BadRequestError) as refused:
        claude.messages.create(model="tiny-qwen2-vl", max_tokens=5, messages=[{"role": "user", "content": [bad]}])
    assert "Image 1" in refused.value.body["error"]["message"]
