"""What a constrained answer must be, and the llguidance grammar that makes it so.

The ingress checks a constraint without the model (a schema that does not compile is a
400); the model server builds the grammar again with its tokenizer, which tool-call markers
need (they are special tokens, matched as tokens, not as text).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from llguidance import LLMatcher, LLTokenizer

from policies.tool_calls import ToolFormat

# The layout templates render JSON in: a random-weight model cannot pad whitespace forever.
JSON_LAYOUT = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


@dataclass(frozen=True)
class Constraint:
    """Either a JSON value of `schema`, or calls to `tools` (only to `tool` when named) in
    the model's own tool-call format; `optional` calls may be text instead."""

    schema: dict[str, Any] | None = None
    tools: list[dict[str, Any]] = field(default_factory=list)
    tool: str | None = None
    parallel: bool = True
    optional: bool = False

    def grammar(self, tool_format: ToolFormat | None, tokenizer: LLTokenizer | None = None) -> str:
        if self.schema is not None:
            return LLMatcher.grammar_from_json_schema(self.schema, defaults=JSON_LAYOUT)
        if tool_format is None:
            raise ValueError("a tool call is required but the model has no tool-call format")
        return tool_format.grammar(self.tools, self.tool, self.parallel, tokenizer, self.optional)

    def error(self, tool_format: ToolFormat | None) -> str | None:
        """Why this constraint cannot be compiled, or None."""
        try:
            grammar = self.grammar(tool_format)
        except ValueError as error:
            return str(error)
        is_error, messages = LLMatcher.validate_grammar_with_warnings(grammar)
        return messages[0] if is_error else None


def answer_constraint(
    asked: Constraint | None, tools: list[dict[str, Any]], tool_format: ToolFormat | None
) -> Constraint | None:
    """The constraint a generation runs under: the request's; or, for tools offered to a
    model that learnt no tool format (the generic one), "text, or valid calls", since such a
    model writes the convention only from its system prompt."""
    if asked is not None or not tools or tool_format is None or tool_format.prompt is None:
        return asked
    return Constraint(tools=tools, optional=True)
