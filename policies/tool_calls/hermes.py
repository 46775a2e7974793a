"""Hermes / Qwen: each call is `<tool_call>\n{"name": ..., "arguments": {...}}\n</tool_call>`,
one block per call; parallel calls are consecutive blocks."""

from __future__ import annotations

from typing import Any

from llguidance import LLTokenizer
from policies.events import ToolCall
from policies.tool_calls import ToolFormat, calls_grammar, literal, marker, tool_calls

# mlx-lm's markers (tests check they agree); its parser is imported where calls are parsed,
# in the model server: importing mlx-lm costs the ingress 0.7 s and its transformers.
START, END = "<tool_call>", "</tool_call>"


def parse(text: str) -> list[ToolCall]:
    from mlx_lm.tool_parsers import json_tools

    return tool_calls(json_tools.parse_tool_call(text))


def grammar(
    tools: list[dict[str, Any]], name: str | None, parallel: bool, tokenizer: LLTokenizer | None = None,
    optional: bool = False,
) -> str:
    block = f"{marker(START, tokenizer)} {literal(chr(10))} call {literal(chr(10))} {marker(END, tokenizer)}"
    more = f" ({literal(chr(10))} block)*" if parallel else ""
    return calls_grammar(f"start: block{more}\nblock: {block}", tools, name, "arguments", optional)


FORMAT = ToolFormat(name="hermes", start=START, end=END, parse=parse, grammar=grammar)
