"""Llama 3.1+ JSON calls: `{"name": ..., "parameters": {...}}`, after `<|python_tag|>` or as
the whole answer (what the template's "Given the following functions" instructions ask
for); several calls are separated by ";". mlx-lm has no parser for it."""

from __future__ import annotations

import json
from typing import Any

from llguidance import LLTokenizer

from policies.events import ToolCall
from policies.tool_calls import ToolFormat, calls_grammar, literal, tool_calls

START = "<|python_tag|>"


def parse(text: str) -> list[ToolCall]:
    decoder = json.JSONDecoder()
    calls = []
    rest = text.strip()
    while rest:
        call, length = decoder.raw_decode(rest)
        if not isinstance(call, dict):
            raise ValueError(f"not a tool call: {call!r}")
        # The template asks for "parameters"; models trained on other formats say "arguments".
        calls.append({"name": call.get("name"), "arguments": call.get("parameters", call.get("arguments", {}))})
        rest = rest[length:].strip()
        if rest and not rest.startswith(";"):
            raise ValueError(f"text after a tool call: {rest[:40]!r}")
        rest = rest[1:].strip()
    return tool_calls(calls)


def grammar(
    tools: list[dict[str, Any]], name: str | None, parallel: bool, tokenizer: LLTokenizer | None = None,
    optional: bool = False,
) -> str:
    # The bare form the template's instructions ask for: no marker, the tokenizer is not needed.
    more = f" ({literal('; ')} call)*" if parallel else ""
    return calls_grammar(f"start: call{more}", tools, name, "parameters", optional)


FORMAT = ToolFormat(name="llama3", start=START, end="", parse=parse, grammar=grammar, bare=True)
