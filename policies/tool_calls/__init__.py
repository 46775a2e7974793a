"""How each model family writes tool calls, one small module per format, all the same shape.

Each module defines `FORMAT`: the markers around a call in the generated text, a parser for
the text between them, and the llguidance grammar that forces a call in that format (for
`tool_choice: "required"` or a named function).

A model gets its template's own format when the template renders tools (`format_for`);
a chat model whose template renders none (Gemma 1-3, SmolLM2, ...) gets the generic format,
whose module also writes the tools into the prompt (`ToolFormat.prompt`). FunctionGemma and
Gemma 4 use templates of their own (`<start_function_call>`, `<|tool_call>`) that are not
supported yet.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from llguidance import LLMatcher, LLTokenizer

from policies.events import ToolCall
from policies.input_grammar import escaped_input_grammar


class Grammar(Protocol):
    def __call__(
        self, tools: list[dict[str, Any]], name: str | None, parallel: bool, tokenizer: LLTokenizer | None = None,
        optional: bool = False,
    ) -> str: ...


Prompt = Callable[[list[dict[str, Any]], list[dict[str, Any]]], list[dict[str, Any]]]


@dataclass(frozen=True)
class ToolFormat:
    name: str
    start: str  # opens a call in the generated text
    end: str  # closes one; "" when the call runs to the end of the answer
    parse: Callable[[str], list[ToolCall]]  # the text between start and end -> its calls
    grammar: Grammar  # (tools, name, parallel, tokenizer, optional) -> the grammar forcing calls
    bare: bool = False  # may a whole answer be calls without the start marker (Llama 3)?
    # (messages, tools) -> messages with the tools written in, for templates that render
    # none (the generic format); None when the template renders them itself.
    prompt: Prompt | None = None


def arguments_text(arguments: dict[str, Any]) -> str:
    """The one form of a call's arguments, so streamed and whole answers are byte-identical."""
    return json.dumps(arguments, ensure_ascii=False, separators=(",", ":"), allow_nan=False)


def tool_calls(parsed: Any) -> list[ToolCall]:
    """Calls from parsed JSON: one `{"name", "arguments"}` object or a list of them.

    Arguments written as a JSON string (some templates render them so) are decoded too.
    """
    calls = parsed if isinstance(parsed, list) else [parsed]
    out = []
    for call in calls:
        name = call.get("name") if isinstance(call, dict) else None
        arguments = call.get("arguments", {}) if isinstance(call, dict) else None
        if isinstance(arguments, str):
            arguments = json.loads(arguments)
        if not isinstance(name, str) or not name or not isinstance(arguments, dict):
            raise ValueError(f"not a tool call: {call!r}")
        out.append(ToolCall(name=name, arguments=arguments_text(arguments)))
    if not out:
        raise ValueError("no tool call")
    return out


# Calls are forced in the layout the templates render past calls with (`tojson`): ", " and
# ": " separators, no other whitespace. That keeps the model in distribution and a
# random-weight one from padding whitespace forever. Tools' schemas often carry keywords
# llguidance does not implement (uniqueItems, propertyNames, ...): those are not enforced,
# rather than refusing the request; a schema that is wrong still fails to compile.
_JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": ", "lenient": True}


def calls_grammar(
    start: str, tools: list[dict[str, Any]], name: str | None, arguments_key: str, optional: bool = False
) -> str:
    """An llguidance grammar from the format's `start` rule, which writes each call as `call`.

    A call is `{"name": "<tool>", "<arguments_key>": <arguments>}`, to one of `tools` (OpenAI
    shape) or only to the one called `name`. Each tool's parameters are a JSON schema of
    their own, so that their `$ref`s still resolve against their own root; a custom tool's
    Lark grammar is a grammar of its own, for the same reason. `optional`: the
    answer may instead be text, which then does not open with a marker (`<` or `[`).
    """
    functions = [tool["function"] for tool in tools]
    if name is not None:
        functions = [f for f in functions if f["name"] == name]
        if not functions:
            raise ValueError(f"no tool named {name!r}")
    if not functions:
        raise ValueError("no tools to call")
    if optional:
        start = "start: calls | answer\nanswer: /[^<\\[\\s][\\s\\S]*/\n" + start.replace("start:", "calls:", 1)
    rules = [start, "call: " + " | ".join(f"call_{i}" for i in range(len(functions)))]
    for i, function in enumerate(functions):
        schema = dict(function.get("parameters") or {"type": "object"})
        schema.setdefault("type", "object")
        schema["x-guidance"] = _JSON_OPTIONS
        head = '{"name": ' + json.dumps(function["name"], ensure_ascii=False) + f', "{arguments_key}": '
        rules.append(f"call_{i}: {literal(head)} arguments_{i} {literal('}')}")
        escaped_input = escaped_input_grammar(schema)
        if escaped_input is None:
            rules.append(f"arguments_{i}: %json {json.dumps(schema)}")
        else:  # a custom tool's Lark grammar, for its one string
            opening, closing = literal('{"input": "'), literal('"}')
            rules.append(f"arguments_{i}: {opening} input_{i} {closing}")
            rules.append(f"input_{i}: %lark {{\n{escaped_input}}}")
    return LLMatcher.grammar_from_lark("\n".join(rules) + "\n")


def literal(text: str) -> str:
    """`text` as a Lark string."""
    return json.dumps(text, ensure_ascii=False)


def marker(text: str, tokenizer: LLTokenizer | None) -> str:
    """A marker as a Lark item: the token itself when the vocabulary has it as one special
    token (llguidance counts every added `<...>` token as special), the string otherwise.

    A string never matches a special token, yet llguidance forces canonically tokenized
    text and would offer that token, then reject it: the matcher would fail at the marker.
    So a grammar built without the tokenizer is for checking the tools' schemas only, unless
    the model's markers are plain text.
    """
    if tokenizer is not None:
        tokens = tokenizer.tokenize_bytes(text.encode(), parse_special=True)
        if len(tokens) == 1 and tokenizer.is_special_token(tokens[0]):
            return f"<[{tokens[0]}]>"
    return literal(text)


def format_for(chat_template: str | None) -> ToolFormat | None:
    """The tool-call format a chat template renders, as mlx-lm's `_infer_tool_parser` finds it;
    None for a template that renders no tools (such a model gets the generic format)."""
    if not chat_template:
        return None
    if "[TOOL_CALLS]" in chat_template:
        return FORMATS["mistral"]
    # Qwen3-Coder's and GLM's calls are XML inside <tool_call>, not Hermes JSON.
    xml_calls = "<function=" in chat_template or "<arg_key>" in chat_template
    if "<tool_call>" in chat_template and not xml_calls:
        if "tool_call.name" in chat_template or "tools" in chat_template:
            return FORMATS["hermes"]
    if "<|python_tag|>" in chat_template:
        return FORMATS["llama3"]
    json_instructions = "Given the following functions" in chat_template or '"parameters"' in chat_template
    if json_instructions and "<|eot_id|>" in chat_template:
        return FORMATS["llama3"]
    return None


# Imported last: each format module imports ToolFormat and the helpers above.
from policies.tool_calls import generic, hermes, llama3, mistral  # noqa: E402

FORMATS = {module.FORMAT.name: module.FORMAT for module in (generic, hermes, llama3, mistral)}
