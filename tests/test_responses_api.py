"""OpenAI's Responses API through the official `openai` client (`client.responses`): plain
and streamed answers, function calls and their outputs, text.format, reasoning items,
stored responses continued with previous_response_id, GET and DELETE."""

from __future__ import annotations

import json
import re

import openai
import pytest

from policies.input_grammar import input_grammar
from tests.conftest import ROOT
from tests.test_input_grammar import accepts

REAL = "smollm2-135m-instruct"
WEATHER = {
    "type": "function",
    "name": "get_weather",
    "description": "Current weather in a city",
    "parameters": {
        "type": "object",
        "properties": {"city": {"type": "string", "enum": ["Paris", "Rome"]}, "celsius": {"type": "boolean"}},
        "required": ["city", "celsius"],
        "additionalProperties": False,
    },
}
QUESTION = "What is the capital of France?"


def test_a_real_answer_plain_and_streamed(client):
    response = client.responses.create(model=REAL, input=QUESTION, temperature=0, max_output_tokens=40)
    assert response.status == "completed" and response.id.startswith("resp_")
    assert "Paris" in response.output_text
    (item,) = response.output
    assert item.type == "message" and item.role == "assistant" and item.content[0].type == "output_text"
    assert response.usage.input_tokens > 10 and response.usage.total_tokens == (
        response.usage.input_tokens + response.usage.output_tokens
    )

    events = list(client.responses.create(model=REAL, input=QUESTION, temperature=0, max_output_tokens=40, stream=True))
    kinds = [e.type for e in events]
    assert kinds[:2] == ["response.created", "response.in_progress"] and kinds[-1] == "response.completed"
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == response.output_text
    assert events[-1].response.output_text == response.output_text

    with client.responses.stream(model=REAL, input=QUESTION, temperature=0, max_output_tokens=40) as stream:
        final = stream.get_final_response()
    assert final.output_text == response.output_text


def test_instructions_and_max_output_tokens(client):
    short = client.responses.create(model=REAL, input=QUESTION, instructions="Answer in French.", max_output_tokens=3)
    assert short.status == "incomplete" and short.incomplete_details.reason == "max_output_tokens"
    assert short.usage.output_tokens == 3 and short.instructions == "Answer in French."


def test_function_calls_plain_and_streamed_and_their_outputs(client):
    kwargs = dict(model="tiny-qwen2", input=QUESTION, tools=[WEATHER], tool_choice="required", temperature=0,
                  parallel_tool_calls=False, max_output_tokens=200)
    response = client.responses.create(**kwargs)
    (call,) = [item for item in response.output if item.type == "function_call"]
    arguments = json.loads(call.arguments)
    assert call.name == "get_weather" and set(arguments) == {"city", "celsius"} and call.call_id

    events = list(client.responses.create(**kwargs, stream=True))
    done = [e for e in events if e.type == "response.function_call_arguments.done"]
    assert [(d.name, d.arguments) for d in done] == [(call.name, call.arguments)]
    assert "".join(e.delta for e in events if e.type == "response.function_call_arguments.delta") == call.arguments
    with client.responses.stream(**kwargs) as stream:
        final = stream.get_final_response()
    assert [(i.name, i.arguments) for i in final.output if i.type == "function_call"] == [(call.name, call.arguments)]

    follow_up = client.responses.create(
        model="tiny-qwen2", tools=[WEATHER], max_output_tokens=5,
        input=[{"role": "user", "content": QUESTION},
               {"type": "function_call", "call_id": call.call_id, "name": call.name, "arguments": call.arguments},
               {"type": "function_call_output", "call_id": call.call_id, "output": "Sunny, 21 degrees."}],
    )
    assert follow_up.usage.input_tokens > response.usage.input_tokens


def test_text_format_json_schema_plain_and_streamed(client):
    text = {"format": {"type": "json_schema", "name": "weather", "schema": WEATHER["parameters"], "strict": True}}
    response = client.responses.create(model="tiny-qwen2", input=QUESTION, text=text, temperature=0, max_output_tokens=100)
    value = json.loads(response.output_text)
    assert set(value) == {"city", "celsius"} and value["city"] in ("Paris", "Rome")
    with client.responses.stream(model="tiny-qwen2", input=QUESTION, text=text, temperature=0, max_output_tokens=100) as stream:
        assert stream.get_final_response().output_text == response.output_text
    as_object = client.responses.create(model=REAL, input=QUESTION, text={"format": {"type": "json_object"}},
                                        temperature=0, max_output_tokens=100)
    assert isinstance(json.loads(as_object.output_text), dict)


def test_reasoning_items(client):
    response = client.responses.create(model="tiny-qwen3", input=QUESTION, temperature=0, max_output_tokens=10)
    (reasoning,) = response.output
    assert reasoning.type == "reasoning" and reasoning.content[0].text
    plain = client.responses.create(model="tiny-qwen3", input=QUESTION, temperature=0, max_output_tokens=10,
                                    reasoning={"effort": "none"})
    assert [item.type for item in plain.output] == ["message"]


def test_stored_conversations_continue_and_can_be_fetched_and_deleted(client):
    first = client.responses.create(model=REAL, input="My name is Ada. Remember it.", temperature=0, max_output_tokens=20)
    second = client.responses.create(model=REAL, input="What is my name?", previous_response_id=first.id,
                                     temperature=0, max_output_tokens=20)
    alone = client.responses.create(model=REAL, input="What is my name?", temperature=0, max_output_tokens=20, store=False)
    assert second.previous_response_id == first.id
    assert second.usage.input_tokens > alone.usage.input_tokens + first.usage.output_tokens  # the earlier turns

    fetched = client.responses.retrieve(first.id)
    assert fetched.id == first.id and fetched.output_text == first.output_text
    client.responses.delete(first.id)
    with pytest.raises(openai.NotFoundError) as gone:
        client.responses.retrieve(first.id)
    assert gone.value.body["code"] == "response_not_found"
    with pytest.raises(openai.NotFoundError) as unknown:
        client.responses.create(model=REAL, input="Hi", previous_response_id="resp_never")
    assert unknown.value.body["param"] == "previous_response_id"
    with pytest.raises(openai.NotFoundError):
        client.responses.create(model=REAL, input="Hi", previous_response_id=alone.id)  # store=False


def test_what_a_model_cannot_do_is_a_400(client):
    with pytest.raises(openai.BadRequestError) as no_tools:
        client.responses.create(model="tiny-qwen2-vl", input=QUESTION, tools=[WEATHER])
    assert no_tools.value.body["param"] == "tools"
    with pytest.raises(openai.BadRequestError) as bad_schema:
        client.responses.create(model="tiny-qwen2", input=QUESTION,
                                text={"format": {"type": "json_schema", "name": "x", "schema": {"type": "objekt"}}})
    assert bad_schema.value.body["param"] == "text.format.schema"


CODEX_PATCH_GRAMMAR = (ROOT / "tests" / "fixtures" / "codex_apply_patch.lark").read_text()
CODEX_TOOLS = [
    WEATHER,
    {"type": "namespace", "name": "multi_agent_v1", "description": "Sub-agents.",
     "tools": [{"type": "function", "name": "spawn_agent", "description": "Start one.", "strict": False,
                "parameters": {"type": "object", "properties": {"task": {"type": "string", "enum": ["explore", "plan"]}},
                               "required": ["task"], "additionalProperties": False}}]},
    {"type": "custom", "name": "apply_patch", "description": "Edit files with a patch.",
     "format": {"type": "grammar", "syntax": "lark", "definition": CODEX_PATCH_GRAMMAR}},
    {"type": "web_search", "external_web_access": False},
]


def test_a_codex_shaped_request_is_served_and_says_what_it_left_out(http):
    # What Codex sends: developer messages, a namespace, a custom tool, a hosted tool, a
    # reasoning summary, no max_output_tokens, store false, its own extra fields.
    body = {
        "model": "tiny-qwen2", "stream": False, "store": False, "tools": CODEX_TOOLS, "tool_choice": "auto",
        "parallel_tool_calls": True, "reasoning": {"summary": "auto", "effort": "medium"},
        "include": ["reasoning.encrypted_content"], "prompt_cache_key": "k", "client_metadata": {"thread": "t"},
        "input": [{"type": "message", "role": "developer", "content": [{"type": "input_text", "text": "Be helpful."}]},
                  {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "say hello"}]}],
    }
    response = http.post("/v1/responses", json=body)
    assert response.status_code == 200, response.text
    warning = response.headers["warning"]
    assert "web_search" in warning and "reasoning.effort ignored" in warning
    assert "apply_patch" not in warning  # its grammar is enforced
    answer = response.json()
    assert answer["max_output_tokens"] == 512  # the cap that applied (this suite's default_max_tokens)
    forced = http.post("/v1/responses", json={**body, "tool_choice": {"type": "function", "name": "multi_agent_v1.spawn_agent"},
                                              "parallel_tool_calls": False})
    (call,) = forced.json()["output"]
    assert (call["type"], call["name"], call["namespace"]) == ("function_call", "spawn_agent", "multi_agent_v1")
    assert set(json.loads(call["arguments"])) == {"task"}
    patch = http.post("/v1/responses", json={**body, "tool_choice": {"type": "function", "name": "apply_patch"},
                                             "parallel_tool_calls": False}).json()
    # A random-weight model may write the free-form input until the cap: then nothing is a call.
    assert [item["type"] for item in patch["output"]] in (["custom_tool_call"], [])
    assert patch["status"] == ("completed" if patch["output"] else "incomplete")
    if patch["output"]:
        assert accepts(input_grammar(CODEX_TOOLS[2]["format"]), patch["output"][0]["input"])


CALC = {"type": "custom", "name": "calc", "description": "Arithmetic on two numbers.",
        "format": {"type": "grammar", "syntax": "lark",
                   "definition": 'start: OP " " NUM " " NUM\nOP: "add" | "mul"\nNUM: /[0-9]{1,3}/'}}


@pytest.mark.parametrize("stream", [False, True])
def test_a_forced_custom_tool_call_follows_its_grammar(http, stream):
    body = {"model": "tiny-qwen2", "input": "Add 2 and 3.", "tools": [CALC], "stream": stream,
            "tool_choice": {"type": "custom", "name": "calc"}, "parallel_tool_calls": False,
            "max_output_tokens": 300}  # the call's markup alone is some 45 of tiny-qwen2's tokens
    response = http.post("/v1/responses", json=body)
    assert response.status_code == 200, response.text
    assert "warning" not in response.headers
    if stream:
        events = [json.loads(line[6:]) for line in response.text.splitlines() if line.startswith("data: ")]
        streamed = "".join(e["delta"] for e in events if e["type"] == "response.custom_tool_call_input.delta")
        answer = events[-1]["response"]
        assert events[-1]["type"] == "response.completed", events
        assert answer["output"][0]["input"] == streamed
    else:
        answer = response.json()
    assert len(answer["output"]) == 1, answer
    (call,) = answer["output"]
    assert (call["type"], call["name"]) == ("custom_tool_call", "calc")
    assert re.fullmatch(r"(add|mul) [0-9]{1,3} [0-9]{1,3}", call["input"]), call["input"]


ARITHMETIC = {"type": "custom", "name": "arithmetic", "description": "Evaluates one arithmetic expression.",
              "format": {"type": "grammar", "syntax": "lark",
                         "definition": 'start: expr\nexpr: NUM | "(" expr OP expr ")"\nOP: " + " | " * "\nNUM: /[0-9]+/'}}


def balanced_expression(text: str) -> bool:
    while re.search(r"\([0-9]+ [+*] [0-9]+\)", text):
        text = re.sub(r"\([0-9]+ [+*] [0-9]+\)", "0", text)
    return re.fullmatch(r"[0-9]+", text) is not None


def test_a_recursive_custom_tool_grammar_is_enforced(http):
    response = http.post("/v1/responses", json={
        "model": REAL, "input": "Use the arithmetic tool to compute 2 plus 3 times 4.", "tools": [ARITHMETIC],
        "tool_choice": {"type": "custom", "name": "arithmetic"}, "parallel_tool_calls": False,
        "max_output_tokens": 200, "temperature": 0})
    assert response.status_code == 200, response.text
    assert "warning" not in response.headers
    (call,) = response.json()["output"]
    assert call["type"] == "custom_tool_call" and balanced_expression(call["input"]), call


def test_a_custom_tool_grammar_that_does_not_compile_is_a_400(client):
    broken = {**CALC, "format": {"type": "grammar", "syntax": "lark", "definition": "start: ((("}}
    with pytest.raises(openai.BadRequestError) as error:
        client.responses.create(model="tiny-qwen2", input="x", tools=[broken])
    assert error.value.body["param"] == "tools.0.format"
    assert "Lark grammar does not compile" in error.value.body["message"]


def test_a_tool_call_continues_through_previous_response_id(client):
    first = client.responses.create(model="tiny-qwen2", input="Weather in Paris?", tools=[WEATHER],
                                    tool_choice="required", parallel_tool_calls=False, max_output_tokens=100)
    (call,) = [item for item in first.output if item.type == "function_call"]
    # Only the output goes back, naming the call by the id the client was given.
    second = client.responses.create(
        model="tiny-qwen2", previous_response_id=first.id, tools=[WEATHER], max_output_tokens=5,
        input=[{"type": "function_call_output", "call_id": call.call_id, "output": "Sunny, 21 C"}],
    )
    assert second.status in ("completed", "incomplete")
    assert second.usage.input_tokens > first.usage.input_tokens + first.usage.output_tokens
