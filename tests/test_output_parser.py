"""Generated text split into answer, reasoning and tool calls as it streams
(policies/output_parser.py), on what real models write: any cut of the text into pieces
gives the same events as the whole text."""

from __future__ import annotations

import json
from dataclasses import dataclass

import pytest
from hypothesis import given, settings, strategies as st

from policies.events import Content, Reasoning, ToolCall
from policies.output_parser import OutputParser
from policies.tool_calls import FORMATS

THINK = ("<think>", "</think>")


@dataclass(frozen=True)
class Sample:
    name: str
    text: str
    expected: list
    format: str | None = None
    think: tuple[str, str] | None = None
    in_reasoning: bool = False


def call(name: str, arguments: dict) -> ToolCall:
    return ToolCall(name, json.dumps(arguments, ensure_ascii=False, separators=(",", ":")))


SAMPLES = [
    Sample(
        "qwen2.5 one call",
        '<tool_call>\n{"name": "get_current_temperature", "arguments": {"location": "San Francisco, CA, USA", '
        '"unit": "celsius"}}\n</tool_call>',
        [call("get_current_temperature", {"location": "San Francisco, CA, USA", "unit": "celsius"})],
        "hermes",
    ),
    Sample(
        "qwen2.5 two parallel calls",
        '<tool_call>\n{"name": "get_current_temperature", "arguments": {"location": "San Francisco, CA, USA"}}\n'
        '</tool_call>\n<tool_call>\n{"name": "get_temperature_date", "arguments": {"location": "San Francisco, '
        'CA, USA", "date": "2024-10-01"}}\n</tool_call>',
        [
            call("get_current_temperature", {"location": "San Francisco, CA, USA"}),
            call("get_temperature_date", {"location": "San Francisco, CA, USA", "date": "2024-10-01"}),
        ],
        "hermes",
    ),
    Sample(
        "qwen2.5 content, then a call with nested unicode arguments",
        "I'll look that up for you.\n<tool_call>\n"
        '{"name": "search_web", "arguments": {"query": "Zürich Wetter morgen 明天天气 🌦", '
        '"filters": {"lang": ["de", "zh"], "safe": true, "max_results": 5, "near": {"lat": 47.37, "lon": 8.54}}}}\n'
        "</tool_call>",
        [
            Content("I'll look that up for you.\n"),
            call(
                "search_web",
                {
                    "query": "Zürich Wetter morgen 明天天气 🌦",
                    "filters": {"lang": ["de", "zh"], "safe": True, "max_results": 5, "near": {"lat": 47.37, "lon": 8.54}},
                },
            ),
        ],
        "hermes",
    ),
    Sample(
        "qwen2.5 plain answer that mentions the markers' characters",
        "Use <b>bold</b> or <tool> tags; a JSON object looks like {\"a\": 1}.",
        [Content("Use <b>bold</b> or <tool> tags; a JSON object looks like {\"a\": 1}.")],
        "hermes",
    ),
    Sample(
        "qwen2.5 call cut short by max_tokens",
        'Checking.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Par',
        [Content('Checking.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Par')],
        "hermes",
    ),
    Sample(
        "qwen2.5 block that is not a call",
        "<tool_call>\nget_weather(city='Paris')\n</tool_call>\nSorry.",
        [Content("<tool_call>\nget_weather(city='Paris')\n</tool_call>\nSorry.")],
        "hermes",
    ),
    Sample(
        "qwen3 thinks, then calls",
        "<think>\nOkay, the user wants the weather in Tokyo. I should call get_weather with "
        '<tool_call> for city "Tokyo".\n</think>\n\n<tool_call>\n{"name": "get_weather", "arguments": '
        '{"city": "Tokyo"}}\n</tool_call>',
        [
            Reasoning(
                'Okay, the user wants the weather in Tokyo. I should call get_weather with <tool_call> for city "Tokyo".\n'
            ),
            call("get_weather", {"city": "Tokyo"}),
        ],
        "hermes",
        THINK,
    ),
    Sample(
        "qwen3 thinks, then answers",
        "<think>\nThe user greets me. Reply briefly.\n</think>\n\nHello! How can I help you today?",
        [Reasoning("The user greets me. Reply briefly.\n"), Content("Hello! How can I help you today?")],
        "hermes",
        THINK,
    ),
    Sample(
        "qwen3 with thinking off (empty think block in the prompt)",
        "Hello! <think> is just a word here.",
        [Content("Hello! <think> is just a word here.")],
        "hermes",
        THINK,
    ),
    Sample(
        "deepseek-r1 distill, think opened by the template",
        "Okay, so I need to add 2 and 2. That's 4.\n</think>\n\nThe answer is **4**.",
        [Reasoning("Okay, so I need to add 2 and 2. That's 4.\n"), Content("The answer is **4**.")],
        None,
        THINK,
        True,
    ),
    Sample(
        "deepseek-r1 distill cut short while thinking",
        "\nHmm, let me think about </thi",
        [Reasoning("Hmm, let me think about </thi")],
        None,
        THINK,
        True,
    ),
    Sample(
        "llama3.1 bare JSON call",
        '{"name": "get_current_conditions", "parameters": {"location": "San Francisco, CA", "unit": "Fahrenheit"}}',
        [call("get_current_conditions", {"location": "San Francisco, CA", "unit": "Fahrenheit"})],
        "llama3",
    ),
    Sample(
        "llama3.1 python_tag call",
        '<|python_tag|>{"name": "get_weather", "parameters": {"city": "São Paulo", "days": [1, 2]}}',
        [call("get_weather", {"city": "São Paulo", "days": [1, 2]})],
        "llama3",
    ),
    Sample(
        "llama3.1 two calls separated by ';'",
        '{"name": "get_weather", "parameters": {"city": "Paris"}}; {"name": "get_weather", "arguments": '
        '{"city": "London", "options": {"units": "metric"}}}',
        [call("get_weather", {"city": "Paris"}), call("get_weather", {"city": "London", "options": {"units": "metric"}})],
        "llama3",
    ),
    Sample(
        "llama3.1 plain answer",
        "I don't have access to real-time weather data, but you can check a weather website.",
        [Content("I don't have access to real-time weather data, but you can check a weather website.")],
        "llama3",
    ),
    Sample(
        "llama3.1 JSON answer that is not a call",
        '{"answer": 42, "unit": "none"}',
        [Content('{"answer": 42, "unit": "none"}')],
        "llama3",
    ),
    Sample(
        "llama3.1 call followed by prose is an answer, not a call",
        '{"name": "get_weather", "parameters": {"city": "Paris"}} I hope this helps!',
        [Content('{"name": "get_weather", "parameters": {"city": "Paris"}} I hope this helps!')],
        "llama3",
    ),
    Sample(
        "llama3.1 built-in tool call is given back as text",
        '<|python_tag|>brave_search.call(query="weather in Menlo Park")',
        [Content('<|python_tag|>brave_search.call(query="weather in Menlo Park")')],
        "llama3",
    ),
    Sample(
        "mistral-7b-v0.3 one call",
        '[TOOL_CALLS] [{"name": "get_current_weather", "arguments": {"location": "Paris, France", "format": "celsius"}}]',
        [call("get_current_weather", {"location": "Paris, France", "format": "celsius"})],
        "mistral",
    ),
    Sample(
        "mistral-7b-v0.3 two parallel calls",
        '[TOOL_CALLS] [{"name": "get_current_weather", "arguments": {"location": "Paris, France", "format": '
        '"celsius"}}, {"name": "get_current_weather", "arguments": {"location": "東京", "format": "celsius"}}]',
        [
            call("get_current_weather", {"location": "Paris, France", "format": "celsius"}),
            call("get_current_weather", {"location": "東京", "format": "celsius"}),
        ],
        "mistral",
    ),
    Sample(
        "mistral later tokenizers, name[ARGS]",
        'Let me check.[TOOL_CALLS]get_weather[ARGS]{"city": "Paris", "when": {"day": "today"}}',
        [Content("Let me check."), call("get_weather", {"city": "Paris", "when": {"day": "today"}})],
        "mistral",
    ),
    Sample(
        "no tool format: markers are text",
        '<tool_call>\n{"name": "f", "arguments": {}}\n</tool_call>',
        [Content('<tool_call>\n{"name": "f", "arguments": {}}\n</tool_call>')],
    ),
]


def merged(events: list) -> list:
    """Adjacent pieces of content (or of reasoning) as one: how a client would read them."""
    out: list = []
    for event in events:
        if out and type(event) in (Content, Reasoning) and type(out[-1]) is type(event):
            out[-1] = type(event)(out[-1].text + event.text)
        else:
            out.append(event)
    return out


def parse(sample: Sample, pieces: list[str]) -> list:
    parser = OutputParser(FORMATS[sample.format] if sample.format else None, sample.think, sample.in_reasoning)
    events = [event for piece in pieces for event in parser.feed(piece)]
    return merged(events + parser.finish())


def cut(text: str, points: list[int]) -> list[str]:
    bounds = [0, *sorted(points), len(text)]
    return [text[a:b] for a, b in zip(bounds, bounds[1:])]


@pytest.mark.parametrize("sample", SAMPLES, ids=[s.name for s in SAMPLES])
def test_whole_text(sample):
    assert parse(sample, [sample.text]) == sample.expected


@pytest.mark.parametrize("sample", SAMPLES, ids=[s.name for s in SAMPLES])
def test_every_single_cut_and_character_by_character(sample):
    for point in range(len(sample.text) + 1):
        assert parse(sample, cut(sample.text, [point])) == sample.expected, point
    assert parse(sample, list(sample.text)) == sample.expected


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_any_pieces_give_the_events_of_the_whole_text(data):
    sample = data.draw(st.sampled_from(SAMPLES), label="sample")
    points = data.draw(st.lists(st.integers(0, len(sample.text)), max_size=25), label="cuts")
    assert parse(sample, cut(sample.text, points)) == sample.expected


@settings(max_examples=300, deadline=None)
@given(
    st.lists(st.sampled_from(["<tool_call>", "</tool_call>", "<think>", "</think>", "\n", " ", "{", "}", "x", "<", "é"])),
    st.lists(st.integers(0, 200), max_size=10),
)
def test_marker_soup_streams_like_whole_and_loses_no_text(parts, points):
    text = "".join(parts)
    pieces = cut(text, [p for p in points if p <= len(text)])
    for think in (THINK, None):
        sample = Sample("soup", text, [], "hermes", think)
        whole = parse(sample, [text])
        assert parse(sample, pieces) == whole
    # Without reasoning, text that holds no call is given back as it was.
    if not any(isinstance(event, ToolCall) for event in whole):
        assert "".join(event.text for event in whole) == text


def test_split_marker_is_found():
    parser = OutputParser(FORMATS["hermes"], None)
    assert parser.feed("Sure.<tool") == [Content("Sure.")]
    assert parser.feed('_call>\n{"name": "f", "arguments": {"x": 1}}\n</tool_') == []
    assert parser.feed("call>") == [call("f", {"x": 1})]
    assert parser.finish() == []


def test_held_back_text_is_released_when_it_is_no_marker():
    parser = OutputParser(FORMATS["hermes"], THINK)
    assert parser.feed("<thi") == []
    assert parser.feed("ngs to do") == [Content("<things to do")]
    assert parser.feed(" <tool") == [Content(" ")]
    assert parser.feed("s>") == [Content("<tools>")]


def test_llama_bare_call_waits_for_the_whole_answer():
    parser = OutputParser(FORMATS["llama3"], None)
    assert parser.feed('{"name": "f", ') == []
    assert parser.feed('"parameters": {}}') == []
    assert parser.finish() == [ToolCall("f", "{}")]


def test_streamed_arguments_are_byte_identical_to_whole():
    sample = SAMPLES[2]
    streamed = parse(sample, list(sample.text))
    assert [e.arguments for e in streamed if isinstance(e, ToolCall)] == [
        e.arguments for e in parse(sample, [sample.text]) if isinstance(e, ToolCall)
    ]
    assert '"query":"Zürich Wetter morgen 明天天气 🌦"' in streamed[1].arguments
