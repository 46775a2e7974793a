"""A custom tool's input grammar, as one regular expression the model's input must match.

A custom tool (Responses API, Codex's `apply_patch`) takes free text, and may give its
grammar: Lark, or a regex. The model writes the input as a JSON string inside its call
(`{"input": "..."}`), so the grammar has to hold for the string's decoded value, escapes and
all. llguidance does that for a JSON schema's `pattern`, not for a Lark grammar; so a Lark
grammar that is not recursive (Codex's is not) is flattened into one regular expression:
each rule and terminal written in place of its name. A grammar that cannot be flattened
(recursive rules, `%ignore`, llguidance's own extensions) is checked, then left unenforced,
and the request's warning says why.
"""

from __future__ import annotations

import ast
import functools
import re
from dataclasses import dataclass
from typing import Any

from llguidance import LLMatcher

# The longest pattern flattening may write: rules used in many places are copied each time.
PATTERN_MAX = 100_000

# Lark's `common` terminals that grammars import, as regular expressions.
COMMON = {
    "LF": r"\n", "CR": r"\r", "NEWLINE": r"(?:\r?\n)+", "WS": r"[ \t\f\r\n]+", "WS_INLINE": r"[ \t]+",
    "DIGIT": "[0-9]", "HEXDIGIT": "[a-fA-F0-9]", "INT": "[0-9]+", "SIGNED_INT": "[+-]?[0-9]+",
    "DECIMAL": r"(?:[0-9]+\.[0-9]*|\.[0-9]+)", "LETTER": "[A-Za-z]", "UCASE_LETTER": "[A-Z]",
    "LCASE_LETTER": "[a-z]", "WORD": "[A-Za-z]+", "CNAME": "[_A-Za-z][_A-Za-z0-9]*",
    "ESCAPED_STRING": r'"(?:[^"\\]|\\.)*"',
    "NUMBER": r"(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?",
    "SIGNED_NUMBER": r"[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?",
}


class Unflattenable(Exception):
    """A well-formed grammar with no single regular expression for it."""


@dataclass(frozen=True)
class InputGrammar:
    """What a custom tool's input must be: `pattern` (a regex it matches whole), or any
    text; `unenforced` says why a grammar the client gave is not enforced."""

    pattern: str | None = None
    unenforced: str | None = None

    def parameters(self) -> dict[str, Any]:
        """The call's arguments as the model writes them: its input as one string, and
        nothing else (a grammar would otherwise let the model add keys forever)."""
        text: dict[str, Any] = {"type": "string"}
        if self.pattern is not None:
            text["pattern"] = self.pattern
        return {"type": "object", "properties": {"input": text}, "required": ["input"], "additionalProperties": False}


def input_grammar(format: dict[str, Any] | None) -> InputGrammar:
    """A custom tool's `format` (`{"type": "text"}` or `{"type": "grammar", "syntax":
    "lark" | "regex", "definition": ...}`) as what its input must be.

    Raises ValueError, saying what is wrong, for a grammar llguidance cannot compile.
    """
    if not format or format.get("type") in (None, "text"):
        return InputGrammar()
    if format.get("type") != "grammar":
        raise ValueError(f"format type {format.get('type')!r} is not one of text, grammar")
    spec = format.get("grammar") if isinstance(format.get("grammar"), dict) else format
    syntax, definition = spec.get("syntax"), spec.get("definition")
    if not isinstance(definition, str) or not definition.strip():
        raise ValueError("a grammar format needs its definition")
    return _compiled(syntax, definition)


# A client sends the same tools with every request (Codex: its apply_patch grammar).
@functools.lru_cache(maxsize=64)
def _compiled(syntax: str, definition: str) -> InputGrammar:
    if syntax == "regex":
        return InputGrammar(_checked(anchored(definition)))
    if syntax != "lark":
        raise ValueError(f"grammar syntax {syntax!r} is not one of lark, regex")
    is_error, messages = LLMatcher.validate_grammar_with_warnings(LLMatcher.grammar_from_lark(definition))
    if is_error:
        raise ValueError(f"the Lark grammar does not compile: {_one_line(messages[0])}")
    try:
        return InputGrammar(_checked(anchored(flatten(definition))))
    except Unflattenable as why:
        return InputGrammar(unenforced=str(why))


def anchored(regex: str) -> str:
    # A schema's pattern is found anywhere in the string (JSON Schema's rule): the grammar is
    # the whole input.
    return f"^(?:{regex})$"


def _checked(pattern: str) -> str:
    grammar = LLMatcher.grammar_from_json_schema({"type": "string", "pattern": pattern})
    is_error, messages = LLMatcher.validate_grammar_with_warnings(grammar)
    if is_error:
        raise ValueError(f"the grammar's regular expression does not compile: {_one_line(messages[0])}")
    return pattern


def _one_line(message: str) -> str:
    return " ".join(message.split())


# -- Lark, flattened --------------------------------------------------------------------------

_TOKEN = re.compile(r"""
    (?P<space>[ \t]+) | (?P<comment>//[^\n]*)
  | (?P<string>"(?:[^"\\\n]|\\.)*"i?)
  | (?P<regexp>/(?!/)(?:[^/\\\n]|\\.)+/[imslux]*)
  | (?P<name>[A-Za-z_][A-Za-z_0-9]*)
  | (?P<arrow>->) | (?P<range>\.\.) | (?P<number>[0-9]+)
  | (?P<op>[+*?]) | (?P<punct>[()\[\]|~])
""", re.VERBOSE)

_DEFINITION = re.compile(r"^[?!]?(?P<name>[A-Za-z_][A-Za-z_0-9]*)(?:\.-?[0-9]+)?\s*:(?P<body>.*)$", re.DOTALL)


def flatten(definition: str) -> str:
    """The language of a Lark grammar's `start` rule, as one regular expression."""
    rules: dict[str, list[tuple[str, str]]] = {}
    for line in _statements(definition):
        if line.startswith("%import"):
            rules.update(_imports(re.sub(r"\s*//.*$", "", line)))
        elif line.startswith("%"):
            raise Unflattenable(f"{line.split()[0]} is not supported in a flattened grammar")
        else:
            match = _DEFINITION.match(line)
            if match is None:
                raise Unflattenable(f"cannot read {line[:60]!r}")
            rules[match["name"]] = _tokens(match["body"])
    if "start" not in rules:
        raise Unflattenable("the grammar has no start rule")
    return _Flattener(rules).rule("start", ())


def _statements(definition: str) -> list[str]:
    """One line per rule or directive: continuation lines (`| ...`) joined to theirs."""
    out: list[str] = []
    for raw in definition.splitlines():
        line = raw.strip()
        if not line or line.startswith("//"):
            continue
        if line.startswith("|") and out:
            out[-1] += " " + line
        else:
            out.append(line)
    return out


def _imports(line: str) -> dict[str, list[tuple[str, str]]]:
    match = re.fullmatch(r"%import\s+common\s*(?:\.(\w+)(?:\s*->\s*(\w+))?|\(([\w\s,]+)\))", line)
    if match is None:
        raise Unflattenable(f"only Lark's common terminals can be imported, not {line[8:].strip()!r}")
    names = [(match[1], match[2] or match[1])] if match[1] else [(n.strip(), n.strip()) for n in match[3].split(",")]
    out = {}
    for name, alias in names:
        if name not in COMMON:
            raise Unflattenable(f"common.{name} is not known here")
        out[alias] = [("regex", COMMON[name])]
    return out


def _tokens(body: str) -> list[tuple[str, str]]:
    out, at = [], 0
    while at < len(body):
        match = _TOKEN.match(body, at)
        if match is None:
            raise Unflattenable(f"cannot read {body[at:at + 30]!r}")
        at = match.end()
        kind = match.lastgroup
        if kind not in ("space", "comment"):  # punctuation is its own kind: `(`, `|`, `~`, ...
            out.append((match[0] if kind == "punct" else kind, match[0]))
    return out


class _Flattener:
    """Writes each rule in place of its name; a rule that reaches itself cannot be."""

    def __init__(self, rules: dict[str, list[tuple[str, str]]]):
        self.rules = rules
        self.done: dict[str, str] = {}

    def rule(self, name: str, using: tuple[str, ...]) -> str:
        if name in self.done:
            return self.done[name]
        if name in using:
            raise Unflattenable(f"rule {name!r} is recursive")
        if name not in self.rules:
            raise Unflattenable(f"rule {name!r} is not defined")
        tokens = self.rules[name]
        if tokens and tokens[0][0] == "regex":  # an imported terminal, already a regex
            self.done[name] = tokens[0][1]
            return self.done[name]
        regex, rest = self.alternatives(tokens, using + (name,))
        if rest:
            raise Unflattenable(f"rule {name!r}: unexpected {rest[0][1]!r}")
        if len(regex) > PATTERN_MAX:
            raise Unflattenable(f"the grammar flattens to over {PATTERN_MAX} characters")
        self.done[name] = regex
        return regex

    def alternatives(self, tokens: list, using: tuple[str, ...]) -> tuple[str, list]:
        options = []
        while True:
            sequence, tokens = self.sequence(tokens, using)
            options.append(sequence)
            if not tokens or tokens[0][0] != "|":
                break
            tokens = tokens[1:]
        return (options[0] if len(options) == 1 else "(?:" + "|".join(options) + ")"), tokens

    def sequence(self, tokens: list, using: tuple[str, ...]) -> tuple[str, list]:
        parts = []
        while tokens and tokens[0][0] not in ("|", ")", "]"):
            if tokens[0][0] == "arrow":  # `-> alias` names a tree node: no text
                tokens = tokens[2:]
                continue
            atom, tokens = self.atom(tokens, using)
            if tokens and tokens[0][0] == "op":
                atom, tokens = f"(?:{atom}){tokens[0][1]}", tokens[1:]
            elif tokens and tokens[0][0] == "~":
                atom, tokens = self.repeat(atom, tokens[1:])
            parts.append(atom)
        return "".join(parts), tokens

    def atom(self, tokens: list, using: tuple[str, ...]) -> tuple[str, list]:
        (kind, text), tokens = tokens[0], tokens[1:]
        if kind in ("(", "["):
            inner, tokens = self.alternatives(tokens, using)
            close = ")" if kind == "(" else "]"
            if not tokens or tokens[0][0] != close:
                raise Unflattenable(f"{kind} without {close}")
            # A sequence concatenates as it is, an alternation comes grouped.
            return (inner if kind == "(" else f"(?:{inner})?"), tokens[1:]
        if kind == "string":
            if tokens and tokens[0][0] == "range" and len(tokens) > 1 and tokens[1][0] == "string":
                low, high = _string(text), _string(tokens[1][1])
                return f"[{_escape(low)}-{_escape(high)}]", tokens[2:]
            return _literal(text), tokens
        if kind == "regexp":
            return _regexp(text), tokens
        if kind == "name":
            return self.rule(text, using), tokens
        raise Unflattenable(f"unexpected {text!r}")

    @staticmethod
    def repeat(atom: str, tokens: list) -> tuple[str, list]:
        if not tokens or tokens[0][0] != "number":
            raise Unflattenable("~ needs a count")
        low, tokens = tokens[0][1], tokens[1:]
        if tokens and tokens[0][0] == "range" and len(tokens) > 1 and tokens[1][0] == "number":
            return f"(?:{atom}){{{low},{tokens[1][1]}}}", tokens[2:]
        return f"(?:{atom}){{{low}}}", tokens


def _string(token: str) -> str:
    body = token[:-1] if token.endswith("i") else token
    return ast.literal_eval(body)


def _literal(token: str) -> str:
    text = _string(token)
    if token.endswith("i"):
        return "".join(f"[{_escape(c.lower())}{_escape(c.upper())}]" if c.lower() != c.upper() else _escape(c)
                       for c in text)
    return "".join(_escape(c) for c in text)


def _escape(char: str) -> str:
    if char in "\\.^$|?*+()[]{}/-":
        return "\\" + char
    return {"\n": r"\n", "\r": r"\r", "\t": r"\t"}.get(char, char if char.isprintable() else f"\\u{{{ord(char):x}}}")


def _regexp(token: str) -> str:
    body, flags = token[1:token.rindex("/")], token[token.rindex("/") + 1:]
    body = body.replace("\\/", "/")
    if flags:
        raise Unflattenable(f"regex flags {flags!r} are not supported in a flattened grammar")
    return f"(?:{body})"

