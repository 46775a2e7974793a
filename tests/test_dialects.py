"""The dialects' translations without Ray: requests into one GenerationRequest, events into
each dialect's answer, whole and streamed (the stream adds up to the whole)."""

from __future__ import annotations

import json

import pytest

from dialects import anthropic, openai, responses
from dialects.errors import anthropic_error_body
from policies.errors import ApiError
from policies.events import Content, Finish, Logprobs, Reasoning, TokenLogprob, ToolCall, TopLogprob

EVENTS = [
    Reasoning("Thinking it over."),
    Content("It is "),
    Content("sunny."),
    ToolCall("get_weather", '{"city":"Paris"}'),
    Finish("tool_calls", prompt_tokens=12, completion_tokens=9, cached_tokens=5),
]
TOOL = {"name": "get_weather", "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}}}


def sse_events(lines: list[str]) -> list[dict]:
    return [json.loads(line.split("data: ", 1)[1]) for line in lines if "data: " in line and "[DONE]" not in line]


# -- Anthropic ---------------------------------------------------------------------------------


def test_anthropic_conversation_becomes_one_chat():
    body = anthropic.MessagesRequest.model_validate({
        "model": "m", "max_tokens": 10, "system": [{"type": "text", "text": "Be brief."}],
        "tools": [TOOL], "tool_choice": {"type": "any"}, "stop_sequences": ["END"], "top_k": 5,
        "thinking": {"type": "enabled", "budget_tokens": 100},
        "messages": [
            {"role": "user", "content": "Weather?"},
            {"role": "assistant", "content": [{"type": "text", "text": "Checking."},
                                              {"type": "tool_use", "id": "t1", "name": "get_weather", "input": {"city": "Paris"}}]},
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t1", "content": "Sunny"},
                                         {"type": "text", "text": "Thanks"}]},
        ],
    })
    job = body.to_generation(vision=False, images=[])
    assert [m["role"] for m in job.messages] == ["system", "user", "assistant", "tool", "user"]
    assert job.messages[2]["tool_calls"][0]["function"] == {"name": "get_weather", "arguments": {"city": "Paris"}}
    assert job.messages[3] == {"role": "tool", "tool_call_id": "t1", "content": "Sunny"}
    assert (job.sampling.max_tokens, job.sampling.top_k, job.sampling.stop) == (10, 5, ["END"])
    assert job.template_kwargs == {"enable_thinking": True}
    assert job.constraint is not None and job.constraint.tools and job.constraint.tool is None
    assert body.needs() == {"tools": "tools"}
    assert body.wishes() == {"reasoning": "thinking"}  # thinking is used where the model can think


def test_anthropic_reply_whole_and_streamed_agree():
    whole = anthropic.Reply("m").full(EVENTS)
    assert [b["type"] for b in whole["content"]] == ["thinking", "text", "tool_use"]
    assert whole["content"][1]["text"] == "It is sunny." and whole["content"][2]["input"] == {"city": "Paris"}
    # Anthropic counts the prompt tokens read from the cache apart from the others.
    usage = {"input_tokens": 7, "output_tokens": 9, "cache_read_input_tokens": 5}
    assert (whole["stop_reason"], whole["usage"]) == ("tool_use", usage)

    reply = anthropic.Reply("m")
    lines = reply.opening() + reply.batch(EVENTS[:2]) + reply.batch(EVENTS[2:]) + reply.closing()
    assert all(line.startswith("event: ") for line in lines)
    events = sse_events(lines)
    kinds = [e["type"] for e in events]
    assert kinds[:2] == ["message_start", "ping"] and kinds[-2:] == ["message_delta", "message_stop"]
    starts = [e["content_block"]["type"] for e in events if e["type"] == "content_block_start"]
    assert starts == ["thinking", "text", "tool_use"]
    assert kinds.count("content_block_start") == kinds.count("content_block_stop") == 3
    text = "".join(e["delta"]["text"] for e in events if e["type"] == "content_block_delta" and e["delta"]["type"] == "text_delta")
    arguments = "".join(
        e["delta"]["partial_json"] for e in events
        if e["type"] == "content_block_delta" and e["delta"]["type"] == "input_json_delta"
    )
    assert text == "It is sunny." and json.loads(arguments) == {"city": "Paris"}
    assert events[-2]["delta"]["stop_reason"] == "tool_use" and events[-2]["usage"] == usage


def test_anthropic_stop_sequence_and_errors():
    reply = anthropic.Reply("m").full([Content("a"), Finish("stop", 1, 1, stop_sequence="END")])
    assert (reply["stop_reason"], reply["stop_sequence"]) == ("stop_sequence", "END")
    assert anthropic_error_body(ApiError(404, "no such model")) == {
        "type": "error", "error": {"type": "not_found_error", "message": "no such model"}}
    assert anthropic_error_body(ApiError(503, "busy"))["error"]["type"] == "overloaded_error"
    with pytest.raises(ApiError) as error:
        anthropic.MessagesRequest.model_validate({"model": "m", "max_tokens": 1, "messages": [{"role": "user", "content": "x"}],
                                                  "tools": [TOOL], "tool_choice": {"type": "tool", "name": "nope"}})
    assert error.value.param == "tool_choice"


# -- Responses ---------------------------------------------------------------------------------


def test_responses_items_become_one_chat_after_the_stored_one():
    body = responses.ResponsesRequest.model_validate({
        "model": "m", "instructions": "Be brief.", "max_output_tokens": 7,
        "tools": [{"type": "function", "name": "get_weather", "parameters": {"type": "object"}}],
        "input": [
            {"role": "user", "content": [{"type": "input_text", "text": "Weather?"}]},
            {"type": "function_call", "call_id": "c1", "name": "get_weather", "arguments": '{"city": "Paris"}'},
            {"type": "function_call", "call_id": "c2", "name": "get_weather", "arguments": '{"city": "Rome"}'},
            {"type": "function_call_output", "call_id": "c1", "output": "Sunny"},
            {"type": "reasoning", "id": "rs_1", "summary": []},
        ],
    })
    earlier = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    chat = body.chat(body.conversation(earlier, vision=False))
    assert [m["role"] for m in chat] == ["system", "user", "assistant", "user", "assistant", "tool"]
    assert [c["id"] for c in chat[4]["tool_calls"]] == ["c1", "c2"]  # consecutive calls, one turn
    job = body.to_generation(chat, images=[])
    assert job.sampling.max_tokens == 7 and job.tools[0]["function"]["name"] == "get_weather"
    with pytest.raises(ApiError):
        responses.ResponsesRequest.model_validate({"model": "m", "input": "x", "tool_choice": "required"})


def test_responses_reply_whole_and_streamed_agree():
    body = responses.ResponsesRequest.model_validate({"model": "m", "input": "x"})
    whole = responses.Reply("m", body).full(EVENTS)
    assert [i["type"] for i in whole["output"]] == ["reasoning", "message", "function_call"]
    assert whole["output"][1]["content"][0]["text"] == "It is sunny." and whole["status"] == "completed"
    assert whole["usage"]["total_tokens"] == 21 and whole["usage"]["input_tokens_details"] == {"cached_tokens": 5}

    reply = responses.Reply("m", body)
    lines = reply.opening() + reply.batch(EVENTS[:2]) + reply.batch(EVENTS[2:]) + reply.closing()
    events = sse_events(lines)
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    assert events[0]["type"] == "response.created" and events[-1]["type"] == "response.completed"
    added = [e["output_index"] for e in events if e["type"] == "response.output_item.added"]
    done = [e["output_index"] for e in events if e["type"] == "response.output_item.done"]
    assert added == done == [0, 1, 2]
    final = events[-1]["response"]
    assert [i["id"] for i in final["output"]] == [e["item"]["id"] for e in events if e["type"] == "response.output_item.done"]
    text = "".join(e["delta"] for e in events if e["type"] == "response.output_text.delta")
    assert text == final["output"][1]["content"][0]["text"] == "It is sunny."
    incomplete = responses.Reply("m", body).full([Content("a"), Finish("length", 1, 1)])
    assert incomplete["status"] == "incomplete" and incomplete["incomplete_details"] == {"reason": "max_output_tokens"}


def test_responses_turns_for_the_store_keep_the_ids_the_client_was_given():
    body = responses.ResponsesRequest.model_validate({"model": "m", "input": "x"})
    reply = responses.Reply("m", body)
    sent = reply.full(EVENTS)
    (turn,) = reply.turns()
    assert turn["content"] == "It is sunny." and turn["tool_calls"][0]["function"]["arguments"] == {"city": "Paris"}
    assert turn["tool_calls"][0]["id"] == sent["output"][2]["call_id"]


# -- OpenAI ------------------------------------------------------------------------------------


def test_openai_chunks_add_up_to_the_whole_reply():
    token = TokenLogprob("It", -0.1, list(b"It"), [TopLogprob("It", -0.1, list(b"It"))])
    events = [Logprobs([token]), *EVENTS]
    whole = openai.Reply("m", chat=True, logprobs=True).full(events)
    message = whole["choices"][0]["message"]
    assert (message["content"], message["reasoning_content"]) == ("It is sunny.", "Thinking it over.")
    assert message["tool_calls"][0]["function"] == {"name": "get_weather", "arguments": '{"city":"Paris"}'}
    assert whole["choices"][0]["finish_reason"] == "tool_calls"
    assert whole["usage"] == {
        "prompt_tokens": 12, "completion_tokens": 9, "total_tokens": 21, "prompt_tokens_details": {"cached_tokens": 5},
        "completion_tokens_details": {"reasoning_tokens": 0},
    }

    reply = openai.Reply("m", chat=True, logprobs=True, include_usage=True)
    lines = reply.opening() + reply.batch(events) + reply.closing()
    assert lines[-1] == "data: [DONE]\n\n"
    chunks = sse_events(lines)
    deltas = [c["choices"][0]["delta"] for c in chunks if c["choices"]]
    assert "".join(d.get("content", "") for d in deltas) == "It is sunny."
    calls = [call for d in deltas for call in d.get("tool_calls", [])]
    assert calls[0]["function"]["name"] == "get_weather" and calls[0]["index"] == 0
    assert "".join(c["function"]["arguments"] for c in calls) == '{"city":"Paris"}'
    assert chunks[-1]["usage"] == whole["usage"] and chunks[-1]["choices"] == []


# -- what agent clients send (Claude Code, Codex) ------------------------------------------------


def test_anthropic_system_messages_inside_the_conversation_join_the_system_prompt():
    body = anthropic.MessagesRequest.model_validate({
        "model": "m", "max_tokens": 5, "system": [{"type": "text", "text": "You are Claude Code."}],
        "messages": [
            {"role": "user", "content": "hi"},
            {"role": "system", "content": [{"type": "text", "text": "Agents: explore, plan."}]},
            {"role": "user", "content": "go"},
        ],
    })
    chat = body.chat(vision=False)
    assert [m["role"] for m in chat] == ["system", "user", "user"]
    assert chat[0]["content"] == "You are Claude Code.\n\nAgents: explore, plan."


def test_anthropic_server_tools_are_left_out_with_a_warning_and_thinking_is_a_wish():
    body = anthropic.MessagesRequest.model_validate({
        "model": "m", "max_tokens": 5, "thinking": {"type": "adaptive"},
        "tools": [TOOL, {"type": "web_search_20250305", "name": "web_search", "max_uses": 5}],
        "messages": [{"role": "user", "content": "hi"}],
    })
    assert [t["function"]["name"] for t in body.tools_offered] == ["get_weather"]
    assert body.needs() == {"tools": "tools"} and body.wishes() == {"reasoning": "thinking"}
    assert any("web_search" in note for note in body.ignored())


def test_anthropic_tool_results_with_images_and_documents_become_text():
    body = anthropic.MessagesRequest.model_validate({
        "model": "m", "max_tokens": 5,
        "messages": [
            {"role": "assistant", "content": [{"type": "tool_use", "id": "t1", "name": "read", "input": {}}]},
            {"role": "user", "content": [
                {"type": "tool_result", "tool_use_id": "t1", "content": [
                    {"type": "text", "text": "page 1"},
                    {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "AAAA"}},
                    {"type": "document", "source": {"type": "text", "media_type": "text/plain", "data": "notes"}},
                ]},
                {"type": "document", "source": {"type": "base64", "media_type": "application/pdf", "data": "AAAA"}},
            ]},
        ],
    })
    chat = body.chat(vision=False)
    assert chat[1] == {"role": "tool", "tool_call_id": "t1", "content": "page 1[image]notes"}
    assert "application/pdf" in chat[2]["content"]
    assert body.image_urls() == [] and any("tool_result" in note for note in body.ignored())


def test_a_required_tool_call_wins_over_an_output_schema_in_both_dialects():
    schema = {"type": "object", "properties": {"a": {"type": "string"}}}
    messages = anthropic.MessagesRequest.model_validate({
        "model": "m", "max_tokens": 5, "tools": [TOOL], "tool_choice": {"type": "any"},
        "output_config": {"format": {"type": "json_schema", "schema": schema}},
        "messages": [{"role": "user", "content": "hi"}],
    })
    assert messages.constraint.tools and messages.constraint.schema is None
    assert "structured_output" not in messages.needs() and messages.ignored()
    response = responses.ResponsesRequest.model_validate({
        "model": "m", "input": "x", "tool_choice": {"type": "function", "name": "get_weather"},
        "tools": [{"type": "function", "name": "get_weather", "parameters": {"type": "object"}}],
        "text": {"format": {"type": "json_schema", "name": "out", "schema": schema}},
    })
    assert response.constraint.tool == "get_weather" and response.constraint.schema is None
    assert "structured_output" not in response.needs()


def test_anthropic_words_a_context_overflow_as_claude_code_parses_it():
    from policies.errors import ContextOverflow

    both = ContextOverflow("m", 1600, 32000, 8192)
    assert anthropic_error_body(both)["error"]["message"] == (
        "input length and `max_tokens` exceed context limit: 1600 + 32000 > 8192, "
        "decrease input length or `max_tokens` and try again")
    prompt = ContextOverflow("m", 50000, None, 8192)
    assert anthropic_error_body(prompt)["error"]["message"] == "prompt is too long: 50000 tokens > 8192 maximum"
    assert both.body()["error"]["code"] == "context_length_exceeded"
    assert "maximum context length is 8192 tokens" in both.body()["error"]["message"]
    import pickle

    again = pickle.loads(pickle.dumps(both))  # as it crosses Ray from a replica
    assert (type(again), again.requested, again.message) == (ContextOverflow, 32000, both.message)


CODEX_TOOLS = [
    {"type": "function", "name": "shell", "parameters": {"type": "object", "properties": {"cmd": {"type": "string"}}}},
    {"type": "namespace", "name": "mcp__files", "description": "file tools",
     "tools": [{"type": "function", "name": "read", "parameters": {"type": "object"}}]},
    {"type": "custom", "name": "apply_patch", "description": "patch files",
     "format": {"type": "grammar", "syntax": "lark", "definition": "start: /.+/"}},
    {"type": "custom", "name": "calc", "description": "arithmetic",
     "format": {"type": "grammar", "syntax": "lark", "definition": 'start: e\ne: "(" e ")" | "1"'}},
    {"type": "custom", "name": "line", "description": "one line",
     "format": {"type": "grammar", "syntax": "lark", "definition": "start: /[a-z]+$/"}},
    {"type": "web_search", "external_web_access": False},
    {"type": "local_shell"},
]


def test_responses_flattens_namespaces_keeps_custom_tools_and_leaves_hosted_tools_out():
    body = responses.ResponsesRequest.model_validate({"model": "m", "input": "x", "tools": CODEX_TOOLS})
    names = [t["function"]["name"] for t in body.tools_offered]
    assert names == ["shell", "mcp__files.read", "apply_patch", "calc", "line"]
    patch, calc, line = (tool["function"]["parameters"] for tool in body.tools_offered[2:])
    assert patch["required"] == ["input"] and patch["properties"]["input"]["x-lark"] == "start: /.+/"
    assert calc["properties"]["input"]["x-lark"] == CODEX_TOOLS[3]["format"]["definition"]  # recursive, enforced
    assert line["properties"]["input"] == {"type": "string"}
    notes = body.ignored()
    assert any("web_search" in n for n in notes) and any("local_shell" in n for n in notes)
    assert [n for n in notes if "grammar" in n] == [
        "custom tool 'line': its input grammar is not enforced (a regex in it uses an anchor, which has no escaped form here)"]


def test_responses_calls_come_back_named_as_the_client_declared_its_tools():
    body = responses.ResponsesRequest.model_validate({"model": "m", "input": "x", "tools": CODEX_TOOLS})
    events = [ToolCall("mcp__files.read", '{"path":"a"}'), ToolCall("apply_patch", '{"input":"*** Begin Patch"}'),
              Finish("tool_calls", 3, 4)]
    whole = responses.Reply("m", body).full(events)
    namespaced, custom = whole["output"]
    assert (namespaced["type"], namespaced["name"], namespaced["namespace"]) == ("function_call", "read", "mcp__files")
    assert (custom["type"], custom["name"], custom["input"]) == ("custom_tool_call", "apply_patch", "*** Begin Patch")
    reply = responses.Reply("m", body)
    streamed = sse_events(reply.opening() + reply.batch(events))
    kinds = [e["type"] for e in streamed]
    assert "response.custom_tool_call_input.done" in kinds and "response.function_call_arguments.done" in kinds
    # The next request continues with the ids and names it was given.
    later = responses.ResponsesRequest.model_validate({"model": "m", "tools": CODEX_TOOLS, "input": [
        {**namespaced, "id": None}, {"type": "function_call_output", "call_id": namespaced["call_id"],
                                     "output": [{"type": "input_text", "text": "contents"}]},
        {**custom}, {"type": "custom_tool_call_output", "call_id": custom["call_id"], "output": "Done"},
        {"type": "web_search_call", "status": "completed"},
    ]})
    chat = later.conversation([], vision=False)
    assert chat[0]["tool_calls"][0]["function"]["name"] == "mcp__files.read"
    assert chat[1] == {"role": "tool", "tool_call_id": namespaced["call_id"], "content": "contents"}
    assert chat[2]["tool_calls"][0]["function"]["arguments"] == {"input": "*** Begin Patch"}
    assert any("web_search_call" in n for n in later.ignored())


def test_usage_counts_reasoning_tokens_and_the_cap_that_applied():
    finish = Finish("length", prompt_tokens=4, completion_tokens=6, reasoning_tokens=2, token_limit=6)
    body = responses.ResponsesRequest.model_validate({"model": "m", "input": "x"})
    whole = responses.Reply("m", body).full([Reasoning("hm"), Content("a"), finish])
    assert whole["usage"]["output_tokens_details"] == {"reasoning_tokens": 2} and whole["max_output_tokens"] == 6
    chat = openai.Reply("m", chat=True).full([Content("a"), finish])
    assert chat["usage"]["completion_tokens_details"] == {"reasoning_tokens": 2}
