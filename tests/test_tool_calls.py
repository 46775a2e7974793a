"""Tool-call formats (policies/tool_calls): recognised from chat templates, parsed from what
real models write, and forced by llguidance grammars that even a random walk over a real
tokenizer's vocabulary cannot leave."""

from __future__ import annotations

import codecs
import functools
import json
import math
import random
import re
from dataclasses import dataclass
from pathlib import Path

import jsonschema
import numpy as np
import pytest
from llguidance import LLMatcher, LLTokenizer
from llguidance.numpy import allocate_token_bitmask, fill_next_token_bitmask

from policies.events import Content, ToolCall
from policies.output_parser import OutputParser
from policies.tool_calls import FORMATS, format_for

# ---------------------------------------------------------------------------------------
# Parsing one tool-call block (the text between the markers).


@pytest.mark.parametrize(
    ("fmt", "body", "expected"),
    [
        (
            "hermes",
            '\n{"name": "get_current_temperature", "arguments": {"location": "San Francisco, CA, USA", "unit": "celsius"}}\n',
            [ToolCall("get_current_temperature", '{"location":"San Francisco, CA, USA","unit":"celsius"}')],
        ),
        # Arguments rendered as a JSON string are decoded to the object they hold.
        ("hermes", '{"name": "f", "arguments": "{\\"a\\": [1, {\\"b\\": null}]}"}', [ToolCall("f", '{"a":[1,{"b":null}]}')]),
        ("llama3", '{"name": "get_weather", "parameters": {"city": "Kraków"}}', [ToolCall("get_weather", '{"city":"Kraków"}')]),
        (
            "llama3",
            '{"name": "a", "parameters": {"x": 1.5}}; {"name": "b", "arguments": {}};',
            [ToolCall("a", '{"x":1.5}'), ToolCall("b", "{}")],
        ),
        ("llama3", '{"name": "ping"}', [ToolCall("ping", "{}")]),
        (
            "mistral",
            ' [{"name": "get_current_weather", "arguments": {"location": "Paris, France", "format": "celsius"}, "id": "abc123XYZ"}]',
            [ToolCall("get_current_weather", '{"location":"Paris, France","format":"celsius"}')],
        ),
        ("mistral", 'f[ARGS]{"q": "✓"}', [ToolCall("f", '{"q":"✓"}')]),
    ],
)
def test_parse(fmt, body, expected):
    assert FORMATS[fmt].parse(body) == expected


@pytest.mark.parametrize(
    ("fmt", "body"),
    [
        ("hermes", "get_weather(city='Paris')"),
        ("hermes", '{"name": 3, "arguments": {}}'),
        ("hermes", '{"name": "f", "arguments": [1]}'),
        ("hermes", "[]"),
        ("hermes", '{"name": "f", "arguments": {"x": NaN}}'),
        ("llama3", ""),
        ("llama3", '{"name": "f", "parameters": {}} and more'),
        ("llama3", '{"name": "f", "parameters": {}}; [1]'),
        ("llama3", '{"answer": 42}'),
        ("mistral", '{"name": "f", "arguments": {}}'),
        ("mistral", '[{"name": "f", "arguments": {"x": 1}'),
    ],
)
def test_parse_refuses_what_is_no_call(fmt, body):
    with pytest.raises(ValueError):
        FORMATS[fmt].parse(body)


def test_markers_are_mlx_lm_s():
    from mlx_lm.tool_parsers import json_tools, mistral

    assert (FORMATS["hermes"].start, FORMATS["hermes"].end) == (json_tools.tool_call_start, json_tools.tool_call_end)
    assert (FORMATS["mistral"].start, FORMATS["mistral"].end) == (mistral.tool_call_start, mistral.tool_call_end)
    assert (FORMATS["llama3"].start, FORMATS["llama3"].end, FORMATS["llama3"].bare) == ("<|python_tag|>", "", True)


# ---------------------------------------------------------------------------------------
# Recognising the format from the chat template.

QWEN25_TEMPLATE = """{%- if tools %}
    {{- '<|im_start|>system\\n' }}
    {{- "\\n\\n# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\nYou are provided with function signatures within <tools></tools> XML tags:\\n<tools>" }}
    {%- for tool in tools %}
        {{- "\\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\"name\\": <function-name>, \\"arguments\\": <args-json-object>}\\n</tool_call><|im_end|>\\n" }}
{%- endif %}
{%- for message in messages %}
    {%- if message.role == "assistant" %}
        {%- for tool_call in message.tool_calls %}
            {%- if tool_call.function is defined %}{%- set tool_call = tool_call.function %}{%- endif %}
            {{- '\\n<tool_call>\\n{"name": "' }}
            {{- tool_call.name }}
            {{- '", "arguments": ' }}
            {{- tool_call.arguments | tojson }}
            {{- '}\\n</tool_call>' }}
        {%- endfor %}
    {%- endif %}
{%- endfor %}"""

QWEN3_TEMPLATE = QWEN25_TEMPLATE + """
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
    {%- if enable_thinking is defined and enable_thinking is false %}
        {{- '<think>\\n\\n</think>\\n\\n' }}
    {%- endif %}
{%- endif %}"""

QWEN3_CODER_TEMPLATE = """{%- for tool_call in message.tool_calls %}
    {{- '\\n<tool_call>\\n<function=' + tool_call.name + '>\\n' }}
    {%- for args_name, args_value in tool_call.arguments|items %}
        {{- '<parameter=' + args_name + '>\\n' }}{{- args_value }}{{- '\\n</parameter>\\n' }}
    {%- endfor %}
    {{- '</function>\\n</tool_call>' }}
{%- endfor %}"""

LLAMA31_TEMPLATE = """{%- if tools_in_user_message and not tools is none %}
    {{- "Given the following functions, please respond with a JSON for a function call with its proper arguments that best answers the given prompt.\\n\\n" }}
    {{- 'Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}.' }}
    {{- "Do not use variables.\\n\\n" }}
    {%- for t in tools %}
        {{- t | tojson(indent=4) }}
        {{- "\\n\\n" }}
    {%- endfor %}
    {{- first_user_message + "<|eot_id|>"}}
{%- endif %}
{%- for message in messages %}
    {%- if 'tool_calls' in message %}
        {%- set tool_call = message.tool_calls[0].function %}
        {%- if builtin_tools is defined and tool_call.name in builtin_tools %}
            {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' -}}
            {{- "<|python_tag|>" + tool_call.name + ".call(" }}
        {%- else %}
            {{- '{"name": "' + tool_call.name + '", ' }}
            {{- '"parameters": ' }}
            {{- tool_call.arguments | tojson }}
            {{- "}" }}
        {%- endif %}
    {%- endif %}
{%- endfor %}"""

# Llama 3.3 70B's JSON instructions, without the built-in tools part.
LLAMA33_JSON_ONLY_TEMPLATE = """{{- 'Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}.' }}
{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'+ message['content'] | trim + '<|eot_id|>' }}"""

MISTRAL_V03_TEMPLATE = """{%- for message in loop_messages %}
    {%- if message["role"] == "user" %}
        {%- if tools is not none and (message == user_messages[-1]) %}
            {{- "[AVAILABLE_TOOLS] [" }}
            {%- for tool in tools %}{{- tool|tojson }}{%- endfor %}
            {{- "[/AVAILABLE_TOOLS]" }}
        {%- endif %}
        {{- "[INST] " + message["content"] + "[/INST]" }}
    {%- elif message.tool_calls is defined and message.tool_calls is not none %}
        {{- "[TOOL_CALLS] [" }}
        {%- for tool_call in message.tool_calls %}
            {%- set out = tool_call.function|tojson %}
            {{- out[:-1] }}
            {{- ', "id": "' + tool_call.id + '"}' }}
        {%- endfor %}
        {{- "]" + eos_token }}
    {%- endif %}
{%- endfor %}"""

LLAMA3_TEMPLATE_WITHOUT_TOOLS = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + "
    "message['role'] + '<|end_header_id|>\\n\\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
    "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)

GEMMA3_TEMPLATE = (
    "{{ bos_token }}{%- if messages[0]['role'] == 'system' -%}{%- set first_user_prefix = messages[0]['content'] + "
    "'\\n\\n' -%}{%- endif -%}{%- for message in loop_messages -%}{{ '<start_of_turn>' + role + '\\n' + "
    "(first_user_prefix if loop.first else \"\") }}{{ message['content'] | trim }}{{ '<end_of_turn>\\n' }}"
    "{%- endfor -%}{%- if add_generation_prompt -%}{{'<start_of_turn>model\\n'}}{%- endif -%}"
)

CHATML_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + "
    "'\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


@pytest.mark.parametrize(
    ("template", "expected"),
    [
        (QWEN25_TEMPLATE, "hermes"),
        (QWEN3_TEMPLATE, "hermes"),
        (LLAMA31_TEMPLATE, "llama3"),
        (LLAMA33_JSON_ONLY_TEMPLATE, "llama3"),
        (MISTRAL_V03_TEMPLATE, "mistral"),
        (QWEN3_CODER_TEMPLATE, None),
        (LLAMA3_TEMPLATE_WITHOUT_TOOLS, None),
        (GEMMA3_TEMPLATE, None),
        (CHATML_TEMPLATE, None),
        ("", None),
        (None, None),
    ],
    ids=[
        "qwen2.5",
        "qwen3",
        "llama3.1",
        "llama3.3-json",
        "mistral-v0.3",
        "qwen3-coder-xml",
        "llama3.0-no-tools",
        "gemma3",
        "chatml-no-tools",
        "empty",
        "none",
    ],
)
def test_format_for_template(template, expected):
    fmt = format_for(template)
    assert (fmt.name if fmt else None) == expected


# ---------------------------------------------------------------------------------------
# Grammars that force a call.

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Current weather in a city.",
            "parameters": {
                "type": "object",
                "properties": {
                    "city": {"type": "string", "description": "City name, e.g. Paris"},
                    "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
                },
                "required": ["city", "unit"],
                "additionalProperties": False,
            },
        },
    },
    {
        "type": "function",
        "function": {
            "name": "create_event",
            "description": "Put an event in the calendar.",
            "parameters": {
                "type": "object",
                "properties": {
                    "title": {"type": "string", "maxLength": 40},
                    "when": {
                        "type": "object",
                        "properties": {
                            "date": {"type": "string", "pattern": "^[0-9]{4}-[0-9]{2}-[0-9]{2}$"},
                            "hour": {"type": "integer", "minimum": 0, "maximum": 23},
                        },
                        "required": ["date", "hour"],
                        "additionalProperties": False,
                    },
                    "attendees": {
                        "type": "array",
                        "items": {
                            "type": "object",
                            "properties": {"email": {"type": "string"}, "optional": {"type": "boolean"}},
                            "required": ["email"],
                            "additionalProperties": False,
                        },
                        "maxItems": 3,
                    },
                    "priority": {"enum": ["low", "high", 1, 2, None]},
                },
                "required": ["title", "when", "attendees"],
                "additionalProperties": False,
            },
        },
    },
    # Pydantic-style: $defs at the root of the parameters, which must still resolve.
    {
        "type": "function",
        "function": {
            "name": "lookup",
            "parameters": {
                "$defs": {"Id": {"type": "integer", "minimum": 1}},
                "type": "object",
                "properties": {"ids": {"type": "array", "items": {"$ref": "#/$defs/Id"}, "minItems": 1}},
                "required": ["ids"],
                "additionalProperties": False,
            },
        },
    },
    # No parameters at all: any object.
    {"type": "function", "function": {"name": "ping", "description": "Is the service up?"}},
]
SCHEMAS = {tool["function"]["name"]: tool["function"].get("parameters", {"type": "object"}) for tool in TOOLS}
MARKERS = ("<tool_call>", "</tool_call>", "<|python_tag|>", "[TOOL_CALLS]")


@dataclass(frozen=True)
class Tokenizer:
    ll: LLTokenizer
    closing: np.ndarray  # tokens made only of JSON punctuation: a walk that favours them ends
    markers: dict[str, int]  # marker -> its token id, when the tokenizer has it as one token


@functools.cache
def load_tokenizer(path: Path, with_markers: bool) -> Tokenizer:
    import llguidance.hf
    import transformers

    hf = transformers.AutoTokenizer.from_pretrained(str(path))
    markers = {}
    if with_markers:
        # As in real vocabularies: Qwen's markers are added tokens, Llama's and Mistral's special.
        hf.add_tokens(["<tool_call>", "</tool_call>"])
        hf.add_special_tokens({"additional_special_tokens": ["<|python_tag|>", "[TOOL_CALLS]"]})
        markers = {marker: hf.convert_tokens_to_ids(marker) for marker in MARKERS}
    ll = llguidance.hf.from_tokenizer(hf)
    punctuation = set(b'"{}[],: ')
    closing = np.array([bool(b := ll.decode_bytes([t])) and set(b) <= punctuation for t in range(ll.vocab_size)])
    return Tokenizer(ll, closing, markers)


def smollm2_dir(demo_models: Path) -> Path:
    """SmolLM2's mlx-lm folder as the server converts it from its GGUF (once, into the
    server's own cache: the suite's SmolLM2 loads find it there too)."""
    from deployments.gguf import converted_model_dir
    from policies.config import AppConfig

    config = AppConfig(models=[{"id": "smollm2", "path": "."}])
    (gguf,) = (demo_models / "smollm2-135m-instruct").glob("*.gguf")
    return converted_model_dir(gguf, config.gguf_cache_dir, config.gguf_dequantize)


@pytest.fixture(scope="module", params=["tiny-qwen2", "tiny-qwen2+markers", "smollm2"])
def tokenizer(request, demo_models) -> Tokenizer:
    if request.param == "smollm2":
        return load_tokenizer(smollm2_dir(demo_models), with_markers=False)
    return load_tokenizer(demo_models / "tiny-qwen2", with_markers=request.param.endswith("+markers"))


def beyond_float_range(text: str) -> bool:
    return any(math.isinf(float(number)) for number in re.findall(r"-?[0-9.]+[eE][-+]?[0-9]+", text))


def walk(tokenizer: Tokenizer, grammar: str, rng: random.Random, max_tokens: int = 800) -> list[int] | None:
    """Random tokens among those the grammar allows, until it is done; None if it never was."""
    matcher = LLMatcher(tokenizer.ll, grammar, log_level=0)
    assert not matcher.is_error(), matcher.get_error()
    mask = allocate_token_bitmask(1, tokenizer.ll.vocab_size)
    eos = np.array(tokenizer.ll.eos_tokens)
    tokens: list[int] = []
    while len(tokens) < max_tokens:
        if matcher.is_stopped():
            assert not matcher.is_error(), matcher.get_error()
            return tokens
        fill_next_token_bitmask(matcher, mask)
        allowed = np.flatnonzero(np.unpackbits(mask[0].view(np.uint8), bitorder="little")[: tokenizer.ll.vocab_size])
        choices = allowed[~np.isin(allowed, eos)]
        if matcher.is_accepting() and (not len(choices) or rng.random() < 0.5):
            return tokens
        assert len(choices), "the grammar allows nothing but is not done"
        closing = choices[tokenizer.closing[choices]]
        pool = closing if len(closing) and rng.random() < 0.6 else choices
        token = int(pool[rng.randrange(len(pool))])
        assert matcher.consume_token(token), matcher.get_error()
        tokens.append(token)
    return None


@pytest.mark.parametrize("parallel", [False, True], ids=["one", "parallel"])
@pytest.mark.parametrize("name", [None, "create_event", "lookup", "ping"])
@pytest.mark.parametrize("fmt", sorted(FORMATS))
def test_random_walks_under_the_grammar_are_valid_calls(tokenizer, fmt, name, parallel):
    tool_format = FORMATS[fmt]
    grammar = tool_format.grammar(TOOLS, name, parallel, tokenizer.ll)
    rng = random.Random(f"{fmt}-{name}-{parallel}")
    finished = 0
    for _ in range(4):
        tokens = walk(tokenizer, grammar, rng)
        if tokens is None:
            continue
        finished += 1
        text = tokenizer.ll.decode_str(tokens)
        if beyond_float_range(text):
            continue  # see test_numbers_beyond_float_range_are_no_call
        parser = OutputParser(tool_format, None)
        events = parser.feed(text) + parser.finish()
        assert events and all(isinstance(event, ToolCall) for event in events), text
        # Streamed token by token, as the server will, the calls are the same.
        utf8 = codecs.getincrementaldecoder("utf-8")()
        parser = OutputParser(tool_format, None)
        streamed = [e for t in tokens for e in parser.feed(utf8.decode(tokenizer.ll.decode_bytes([t])))]
        assert streamed + parser.feed(utf8.decode(b"", final=True)) + parser.finish() == events
        assert parallel or len(events) == 1
        for event in events:
            assert event.name in SCHEMAS and event.name == (name or event.name)
            jsonschema.validate(json.loads(event.arguments), SCHEMAS[event.name])
        # A marker that is one token of the vocabulary is written as that token, not spelled.
        for marker, token in tokenizer.markers.items():
            assert text.count(marker) == tokens.count(token)
    assert finished >= 2


# What each model writes for one call, and for two, to tools of TOOLS.
WRITTEN = {
    "hermes": (
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}\n</tool_call>',
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}\n</tool_call>\n'
        '<tool_call>\n{"name": "lookup", "arguments": {"ids": [7, 42]}}\n</tool_call>',
    ),
    "llama3": (
        '{"name": "get_weather", "parameters": {"city": "Paris", "unit": "celsius"}}',
        '{"name": "get_weather", "parameters": {"city": "Paris", "unit": "celsius"}}; '
        '{"name": "lookup", "parameters": {"ids": [7, 42]}}',
    ),
    "mistral": (
        '[TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}]',
        '[TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}, '
        '{"name": "lookup", "arguments": {"ids": [7, 42]}}]',
    ),
}


@pytest.mark.parametrize("fmt", sorted(WRITTEN))
def test_grammar_accepts_what_the_model_writes_and_nothing_else(demo_models, fmt):
    tokenizer = load_tokenizer(demo_models / "tiny-qwen2", with_markers=True)
    call, calls = WRITTEN[fmt]

    def accepts(text: str, name: str | None = None, parallel: bool = False) -> bool:
        matcher = LLMatcher(tokenizer.ll, FORMATS[fmt].grammar(TOOLS, name, parallel, tokenizer.ll), log_level=0)
        tokens = tokenizer.ll.tokenize_bytes(text.encode(), parse_special=True)
        return matcher.consume_tokens(tokens) and matcher.is_accepting()

    assert accepts(call)
    assert accepts(call, name="get_weather")
    assert not accepts(call, name="lookup")
    assert not accepts(calls)
    assert accepts(calls, parallel=True)
    assert not accepts(call.replace("Paris", "Paris\\"))
    assert not accepts(call.replace("celsius", "kelvin"))
    assert not accepts(call.replace("get_weather", "get_wether"))
    assert not accepts(call.replace('"city": "Paris", ', ""))  # a required argument left out
    assert not accepts(call.replace(": ", ":"))  # the templates' layout, not another one


@pytest.mark.parametrize("fmt", ["hermes", "mistral"])
def test_markers_that_are_special_tokens_need_the_tokenizer(demo_models, fmt):
    """llguidance offers a special token for a string that spells it, then refuses it."""
    tokenizer = load_tokenizer(demo_models / "tiny-qwen2", with_markers=True)
    text = WRITTEN[fmt][0]
    tokens = tokenizer.ll.tokenize_bytes(text.encode(), parse_special=True)
    with_tokenizer = LLMatcher(tokenizer.ll, FORMATS[fmt].grammar(TOOLS, None, False, tokenizer.ll), log_level=0)
    assert with_tokenizer.consume_tokens(tokens) and with_tokenizer.is_accepting()
    as_text = LLMatcher(tokenizer.ll, FORMATS[fmt].grammar(TOOLS, None, False), log_level=0)
    assert not as_text.consume_tokens(tokens[:1])


def test_unknown_tool_name_and_no_tools_are_refused(demo_models):
    tokenizer = load_tokenizer(demo_models / "tiny-qwen2", with_markers=False)
    for fmt in FORMATS.values():
        with pytest.raises(ValueError, match="no tool named 'nope'"):
            fmt.grammar(TOOLS, "nope", False, tokenizer.ll)
        with pytest.raises(ValueError, match="no tools"):
            fmt.grammar([], None, False, tokenizer.ll)


@pytest.mark.parametrize("fmt", sorted(FORMATS))
def test_invalid_schema_is_a_clear_error(demo_models, fmt):
    tokenizer = load_tokenizer(demo_models / "tiny-qwen2", with_markers=False)
    tools = [{"type": "function", "function": {"name": "broken", "parameters": {"type": "objekt"}}}]
    grammar = FORMATS[fmt].grammar(tools, None, False, tokenizer.ll)
    assert "Invalid type: objekt" in LLMatcher.validate_grammar(grammar, tokenizer.ll)
    matcher = LLMatcher(tokenizer.ll, grammar, log_level=0)
    assert matcher.is_error() and "objekt" in matcher.get_error()


def test_unimplemented_schema_keywords_are_not_enforced_rather_than_refused(demo_models):
    tokenizer = load_tokenizer(demo_models / "tiny-qwen2", with_markers=False)
    parameters = {"type": "object", "properties": {"tags": {"type": "array", "uniqueItems": True}}, "propertyNames": {}}
    tools = [{"type": "function", "function": {"name": "tag", "parameters": parameters}}]
    assert LLMatcher.validate_grammar(FORMATS["hermes"].grammar(tools, None, False, tokenizer.ll), tokenizer.ll) == ""


def test_numbers_beyond_float_range_are_no_call():
    """JSON allows 1E999 and a random walk can write it, but it has no value a client could
    read back (Python would say Infinity, which is not JSON): the call is given back as text."""
    text = '{"name": "ping", "parameters": {"n": 1E999}}'
    parser = OutputParser(FORMATS["llama3"], None)
    assert parser.feed(text) + parser.finish() == [Content(text)]
    assert beyond_float_range(text) and not beyond_float_range('{"n": 1E308, "s": "x"}')


# ---------------------------------------------------------------------------------------
# The generic format: tools for templates that render none.


def test_generic_format_writes_the_tools_and_past_calls_into_the_chat():
    generic = FORMATS["generic"]
    chat = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": "", "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "lookup", "arguments": {"query": "Paris"}}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "Sunny"},
    ]
    prompted = generic.prompt(chat, TOOLS)
    assert [m["role"] for m in prompted] == ["system", "user", "assistant", "user"]
    assert prompted[0]["content"].startswith("Be brief.\n\n# Tools") and '"name": "lookup"' in prompted[0]["content"]
    assert prompted[2]["content"] == '<tool_call>\n{"name": "lookup", "arguments": {"query":"Paris"}}\n</tool_call>'
    assert prompted[3]["content"] == "<tool_response>\nSunny\n</tool_response>"
    # What the model is shown a past call as, it is parsed back from.
    parser = OutputParser(generic, None)
    (call,) = parser.feed(prompted[2]["content"]) + parser.finish()
    assert (call.name, json.loads(call.arguments)) == ("lookup", {"query": "Paris"})
    assert generic.prompt(chat[1:2], []) == chat[1:2]  # no tools offered: nothing added


def test_with_tools_offered_a_generic_answer_is_text_or_valid_calls(tokenizer):
    generic = FORMATS["generic"]
    optional = generic.grammar(TOOLS, None, True, tokenizer.ll, optional=True)
    rng = random.Random("generic-optional")
    # Free walks are text (a marker is one path among thousands): never a call, never markup.
    texts = [walk(tokenizer, optional, rng, max_tokens=60) for _ in range(6)]
    for tokens in filter(None, texts):
        parser = OutputParser(generic, None)
        events = parser.feed(tokenizer.ll.decode_str(tokens)) + parser.finish()
        assert not any(isinstance(e, ToolCall) for e in events)
    # Every answer the forcing grammar allows, the optional one allows too.
    forced = generic.grammar(TOOLS, None, True, tokenizer.ll)
    for _ in range(4):
        tokens = walk(tokenizer, forced, rng)
        if tokens is None:
            continue
        matcher = LLMatcher(tokenizer.ll, optional, log_level=0)
        assert matcher.consume_tokens(tokens) and matcher.is_accepting(), tokenizer.ll.decode_str(tokens)
    # A text may not open like a call and then go astray.
    matcher = LLMatcher(tokenizer.ll, optional, log_level=0)
    assert not matcher.consume_tokens(tokenizer.ll.tokenize_str("<tool_call> hello"))


@pytest.mark.parametrize("fmt", sorted(FORMATS))
def test_a_call_cut_at_max_tokens_is_dropped_not_given_back_as_markup(fmt):
    tool_format = FORMATS[fmt]
    parser = OutputParser(tool_format, None)
    head = "Checking. " if tool_format.start else ""
    events = parser.feed(head + tool_format.start + '{"name": "lookup", "argu') + parser.finish(truncated=True)
    text = "".join(e.text for e in events if isinstance(e, Content))
    assert tool_format.start not in text and '"argu' not in text and not any(isinstance(e, ToolCall) for e in events)
