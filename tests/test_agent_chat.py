"""Agent-ready chat through the official openai client: capabilities, structured output and
forced tool calls by constrained decoding (valid even from random-weight models), tool
history, reasoning content, logprobs, and 400s for what a model cannot do."""

from __future__ import annotations

import json

import openai
import pytest

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather in a city",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "enum": ["Paris", "Rome", "Oslo"]},
                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
            },
            "required": ["city", "unit"],
            "additionalProperties": False,
        },
    },
}
TIME = {
    "type": "function",
    "function": {
        "name": "get_time",
        "parameters": {
            "type": "object",
            "properties": {"zone": {"type": "string", "enum": ["UTC", "CET"]}, "seconds": {"type": "boolean"}},
            "required": ["zone", "seconds"],
            "additionalProperties": False,
        },
    },
}
SCHEMA = {
    "type": "object",
    "properties": {
        "answer": {"type": "string", "enum": ["yes", "no", "maybe"]},
        "confidence": {"type": "integer", "minimum": 0, "maximum": 100},
        "tags": {"type": "array", "items": {"type": "string", "enum": ["a", "b"]}, "maxItems": 3},
    },
    "required": ["answer", "confidence", "tags"],
    "additionalProperties": False,
}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


def check(value: dict, schema: dict) -> None:
    """The few JSON-schema rules these tests use: required properties, no others, types,
    enums, integer bounds, array items."""
    assert set(value) == set(schema["required"])
    for key, rule in schema["properties"].items():
        item = value[key]
        if rule["type"] == "string":
            assert isinstance(item, str) and item in rule.get("enum", [item])
        elif rule["type"] == "integer":
            assert isinstance(item, int) and rule.get("minimum", item) <= item <= rule.get("maximum", item)
        elif rule["type"] == "boolean":
            assert isinstance(item, bool)
        elif rule["type"] == "array":
            assert isinstance(item, list) and len(item) <= rule.get("maxItems", len(item))
            assert all(i in rule["items"]["enum"] for i in item)


def assemble(stream) -> tuple[str, list[dict], str | None, str]:
    """Content, tool calls (name, arguments), finish reason and reasoning of a stream."""
    content, reasoning, calls, finish = "", "", {}, None
    for chunk in stream:
        if not chunk.choices:
            continue
        choice = chunk.choices[0]
        delta = choice.delta
        content += delta.content or ""
        reasoning += getattr(delta, "reasoning_content", None) or ""
        for call in delta.tool_calls or []:
            entry = calls.setdefault(call.index, {"name": "", "arguments": ""})
            if call.function.name:
                entry["name"] += call.function.name
            entry["arguments"] += call.function.arguments or ""
        finish = choice.finish_reason or finish
    return content, [calls[i] for i in sorted(calls)], finish, reasoning


def test_models_list_their_capabilities(client):
    cards = {m.id: m.model_dump() for m in client.models.list()}
    qwen = cards["tiny-qwen2"]["capabilities"]
    assert qwen == {
        "chat": True, "completions": True, "embeddings": False, "vision": False, "tools": True,
        "structured_output": True, "reasoning": False, "logprobs": True,
    }
    assert cards["tiny-qwen2"]["context_length"] == 32768
    assert cards["tiny-qwen3"]["capabilities"]["reasoning"] is True
    # Their templates render no tools: they get the generic tool format.
    assert cards["tiny-mistral"]["capabilities"]["tools"] is True
    assert cards["smollm2-135m-instruct"]["capabilities"]["tools"] is True
    assert cards["smollm2-135m-instruct"]["context_length"] == 8192
    vision = cards["tiny-qwen2-vl"]["capabilities"]
    assert vision["vision"] and not (vision["tools"] or vision["structured_output"] or vision["logprobs"])
    assert cards["all-MiniLM-L6-v2"]["capabilities"]["embeddings"] is True


@pytest.mark.parametrize("model", ["tiny-qwen2", "tiny-llama", "smollm2-135m-instruct"])
def test_json_schema_output_is_valid_plain_and_streamed(client, model):
    response_format = {"type": "json_schema", "json_schema": {"name": "verdict", "schema": SCHEMA, "strict": True}}
    reply = client.chat.completions.create(
        model=model, messages=ASK, response_format=response_format, temperature=0, max_tokens=200
    )
    text = reply.choices[0].message.content
    check(json.loads(text), SCHEMA)
    assert reply.choices[0].finish_reason == "stop"  # the grammar completed, then end of sequence
    stream = client.chat.completions.create(
        model=model, messages=ASK, response_format=response_format, temperature=0, max_tokens=200, stream=True
    )
    assert assemble(stream)[0] == text


def test_json_object_output_is_an_object(client):
    reply = client.chat.completions.create(
        model="tiny-qwen2", messages=ASK, response_format={"type": "json_object"}, temperature=0.9, seed=3,
        max_tokens=300,
    )
    if reply.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(reply.choices[0].message.content), dict)
    else:  # a random model may still be inside a string at max_tokens: a prefix of an object
        assert reply.choices[0].message.content.lstrip().startswith("{")


def test_required_tool_call_is_made_and_streams_identically(client):
    kwargs = dict(model="tiny-qwen2", messages=ASK, tools=[WEATHER, TIME], tool_choice="required",
                  temperature=0, max_tokens=200)
    reply = client.chat.completions.create(**kwargs)
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls"
    calls = [{"name": c.function.name, "arguments": c.function.arguments} for c in choice.message.tool_calls]
    assert calls and all(c.id.startswith("call_") and c.type == "function" for c in choice.message.tool_calls)
    for call in calls:
        schema = {"get_weather": WEATHER, "get_time": TIME}[call["name"]]["function"]["parameters"]
        check(json.loads(call["arguments"]), schema)
    content, streamed, finish, _ = assemble(client.chat.completions.create(**kwargs, stream=True))
    assert streamed == calls and finish == "tool_calls"
    assert (content or None) == choice.message.content


def test_a_named_tool_is_called_once_without_parallel_calls(client):
    reply = client.chat.completions.create(
        model="tiny-qwen2", messages=ASK, tools=[WEATHER, TIME], parallel_tool_calls=False,
        tool_choice={"type": "function", "function": {"name": "get_time"}}, temperature=0.8, seed=11,
        max_tokens=200,
    )
    (call,) = reply.choices[0].message.tool_calls
    assert call.function.name == "get_time"
    check(json.loads(call.function.arguments), TIME["function"]["parameters"])


def test_tool_results_are_rendered_by_the_template(client):
    first = client.chat.completions.create(model="tiny-qwen2", messages=ASK, max_tokens=5)
    history = ASK + [
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris", "unit": "celsius"}'}},
        ]},
        {"role": "tool", "tool_call_id": "call_1", "content": "Sunny, 21 degrees."},
    ]
    second = client.chat.completions.create(model="tiny-qwen2", messages=history, tools=[WEATHER], max_tokens=5)
    assert second.usage.prompt_tokens > first.usage.prompt_tokens + 20  # the call, the result, the tools


def test_reasoning_goes_to_reasoning_content(client):
    """tiny-qwen3's template opens <think> for the model: a random model never closes it, so
    its whole answer is reasoning; with thinking off it is the content."""
    kwargs = dict(model="tiny-qwen3", messages=ASK, temperature=0, max_tokens=12)
    thinking = client.chat.completions.create(**kwargs)
    message = thinking.choices[0].message
    assert message.reasoning_content and not message.content
    _, _, _, streamed_reasoning = assemble(client.chat.completions.create(**kwargs, stream=True))
    assert streamed_reasoning == message.reasoning_content
    plain = client.chat.completions.create(**kwargs, reasoning_effort="none")
    assert plain.choices[0].message.content and not getattr(plain.choices[0].message, "reasoning_content", None)
    assert plain.usage.prompt_tokens > thinking.usage.prompt_tokens  # the empty think block
    off = client.chat.completions.create(**kwargs, extra_body={"chat_template_kwargs": {"enable_thinking": False}})
    assert off.choices[0].message.content == plain.choices[0].message.content


def test_logprobs_come_from_the_sampling_step(client):
    kwargs = dict(model="tiny-llama", messages=ASK, temperature=0, max_tokens=8, logprobs=True, top_logprobs=3)
    reply = client.chat.completions.create(**kwargs)
    entries = reply.choices[0].logprobs.content
    assert len(entries) == reply.usage.completion_tokens
    for entry in entries:
        assert len(entry.top_logprobs) == 3
        best = entry.top_logprobs[0]
        assert best.token == entry.token and best.logprob == pytest.approx(entry.logprob)  # greedy: top-1
        assert entry.logprob <= 0 and entry.bytes == list(entry.token.encode())
    # mlx-lm's detokenizer drops the answer's leading space; tokens are as generated.
    assert "".join(e.token for e in entries).lstrip() == reply.choices[0].message.content
    streamed = [e for chunk in client.chat.completions.create(**kwargs, stream=True)
                if chunk.choices and chunk.choices[0].logprobs for e in chunk.choices[0].logprobs.content]
    assert [(e.token, round(e.logprob, 5)) for e in streamed] == [(e.token, round(e.logprob, 5)) for e in entries]

    completion = client.completions.create(model="tiny-llama", prompt="Once upon", max_tokens=5, temperature=0, logprobs=2)
    logprobs = completion.choices[0].logprobs
    assert len(logprobs.tokens) == len(logprobs.token_logprobs) == len(logprobs.top_logprobs) == 5
    assert all(len(top) == 2 for top in logprobs.top_logprobs)
    assert "".join(logprobs.tokens).lstrip() == completion.choices[0].text
    assert logprobs.text_offset[0] == 0


@pytest.mark.parametrize(
    "model, extra, param, words",
    [
        ("tiny-qwen2-vl", {"tools": [WEATHER]}, "tools", "does not support tools"),
        ("tiny-qwen2", {"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}},
         "tool_choice", "nope"),
        ("tiny-qwen2", {"tools": [{"type": "function", "function": {"description": "no name"}}]},
         "tools.0.function.name", "Field required"),
        ("tiny-qwen2", {"tool_choice": "required"}, "tool_choice", "needs tools"),
        ("tiny-qwen2", {"tools": [WEATHER], "tool_choice": "sometimes"}, "tool_choice", ""),
        ("tiny-qwen2", {"response_format": {"type": "xml"}}, "response_format", ""),
        ("tiny-qwen2", {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "objekt"}}}},
         "response_format.json_schema.schema", "objekt"),
        ("tiny-qwen2-vl", {"response_format": {"type": "json_object"}}, "response_format", "structured output"),
        ("tiny-qwen2-vl", {"logprobs": True}, "logprobs", "does not support logprobs"),
        ("tiny-qwen2", {"logprobs": True, "top_logprobs": 21}, "top_logprobs", ""),
        ("tiny-qwen2", {"top_logprobs": 2}, "top_logprobs", "needs logprobs"),
    ],
)
def test_what_a_model_cannot_do_is_a_400_naming_the_field(http, model, extra, param, words):
    response = http.post("/v1/chat/completions", json={"model": model, "messages": ASK, **extra})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param and words in error["message"]


@pytest.mark.parametrize(
    "model, extra, warning",
    [
        # A reasoning effort is a hint a model that cannot think answers without.
        ("tiny-llama", {"reasoning_effort": "high"}, "reasoning_effort ignored: model tiny-llama does not support reasoning"),
        # A required call is the answer: its arguments follow the tool's schema, not response_format.
        ("tiny-qwen2", {"tools": [WEATHER], "tool_choice": "required", "response_format": {"type": "json_object"}},
         "response_format ignored"),
    ],
)
def test_what_the_answer_leaves_out_is_a_warning_not_a_400(http, model, extra, warning):
    response = http.post("/v1/chat/completions", json={"model": model, "messages": ASK, "max_tokens": 200, **extra})
    assert response.status_code == 200, response.text
    assert warning in response.headers["warning"] and response.headers["warning"].startswith('299 mlx-fleet "')
    if "tools" in extra:
        assert response.json()["choices"][0]["message"]["tool_calls"]


def test_a_wish_the_client_insists_on_is_a_need(http):
    body = {"model": "tiny-llama", "max_tokens": 5, "messages": ASK, "thinking": {"type": "enabled", "budget_tokens": 64}}
    insisted = http.post("/v1/messages", json=body, headers={"x-mlx-fleet-require": "reasoning"})
    assert insisted.status_code == 400 and "does not support reasoning" in insisted.json()["error"]["message"]
    assert http.post("/v1/messages", json=body).status_code == 200


def test_tool_message_without_its_call_id_is_400(http):
    messages = [*ASK, {"role": "tool", "content": "sunny"}]
    response = http.post("/v1/chat/completions", json={"model": "tiny-qwen2", "messages": messages})
    assert response.status_code == 400 and response.json()["error"]["param"] == "messages.1"
    assert "tool_call_id" in response.json()["error"]["message"]


def test_the_openai_client_raises_bad_request_for_unsupported_tools(client):
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="tiny-qwen2-vl", messages=ASK, tools=[WEATHER])


REAL = "smollm2-135m-instruct"


def test_smollm2_gets_tools_through_the_generic_format(client):
    # Its template renders no tools: the server writes them into the system prompt, and a
    # forced call comes back with valid arguments, plain and streamed alike.
    body = dict(model=REAL, messages=ASK, tools=[WEATHER, TIME], tool_choice="required", temperature=0, max_tokens=100,
                parallel_tool_calls=False)
    message = client.chat.completions.create(**body).choices[0].message
    assert message.tool_calls and not message.content
    for call in message.tool_calls:
        schema = WEATHER if call.function.name == "get_weather" else TIME
        check(json.loads(call.function.arguments), schema["function"]["parameters"])
    content, calls, finish, _ = assemble(client.chat.completions.create(**body, stream=True))
    assert finish == "tool_calls"
    assert calls == [{"name": c.function.name, "arguments": c.function.arguments} for c in message.tool_calls]
    # With tool_choice auto the answer is text or valid calls, never broken markup.
    auto = client.chat.completions.create(**{**body, "tool_choice": "auto"}).choices[0]
    assert "<tool_call>" not in (auto.message.content or "")
    for call in auto.message.tool_calls or []:
        check(json.loads(call.function.arguments), WEATHER["function"]["parameters"] if call.function.name == "get_weather"
              else TIME["function"]["parameters"])


def test_a_forced_call_cut_by_max_tokens_is_no_markup(client):
    choice = client.chat.completions.create(
        model="tiny-qwen2", messages=ASK, tools=[WEATHER], tool_choice="required", max_tokens=4
    ).choices[0]
    assert choice.finish_reason == "length" and not choice.message.tool_calls
    assert "<tool_call>" not in (choice.message.content or "")
