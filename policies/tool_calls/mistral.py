"""Mistral: `[TOOL_CALLS] [{"name": ..., "arguments": {...}}, ...]` (v0.3), or
`[TOOL_CALLS]name[ARGS]{...}` (later tokenizers); no closing marker, the calls run to the end
of the answer. Forced calls take the v0.3 form, the one with the JSON list."""

from __future__ import annotations

from typing import Any

from llguidance import LLTokenizer
from policies.events import ToolCall
from policies.tool_calls import ToolFormat, calls_grammar, literal, marker, tool_calls

# mlx-lm's marker (tests check it agrees); its parser is imported where calls are parsed.
START = "[TOOL_CALLS]"


def parse(text: str) -> list[ToolCall]:
    from mlx_lm.tool_parsers import mistral

    return tool_calls(mistral.parse_tool_call(text))


def grammar(
    tools: list[dict[str, Any]], name: str | None, parallel: bool, tokenizer: LLTokenizer | None = None,
    optional: bool = False,
) -> str:
    more = f' ({literal(", ")} call)*' if parallel else ""
    start = f'start: {marker(START, tokenizer)} {literal(" [")} call{more} {literal("]")}'
    return calls_grammar(start, tools, name, "arguments", optional)


FORMAT = ToolFormat(name="mistral", start=START, end="", parse=parse, grammar=grammar)
