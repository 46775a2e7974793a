"""A custom tool's input grammar, in a form llguidance enforces on the JSON string the model
writes.

A custom tool (Responses API, Codex's `apply_patch`) takes free text, and may give its
grammar: Lark, or a regex. The model writes the input as a JSON string inside its call
(`{"input": "..."}`), so the grammar has to hold for the string's decoded value, escapes and
all. A regex becomes the JSON schema's `pattern`, which llguidance matches against the
decoded string. A Lark grammar is rewritten into one of the string's escaped spelling, nested
into the call's grammar: every rule and terminal a rule, every character one lexeme. One
character at a time because llguidance's lexer is greedy: a lexeme whose escaped form may hold
a `\\t` would swallow the `\\` of a following `\\n`, then fail on the `n`. A grammar that
cannot be rewritten (llguidance's own extensions, lookarounds, templates) is checked, then
left unenforced, and the request's warning says why.
"""

from __future__ import annotations

import ast
import functools
import json
import re
import re._constants as sre
import re._parser as sre_parse
from dataclasses import dataclass
from typing import Any, Iterable, Union

from llguidance import LLMatcher

# Where a custom tool's parameters carry its Lark grammar for `escaped_input_grammar`.
LARK_KEY = "x-lark"

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


class Unenforceable(Exception):
    """A well-formed grammar whose escaped form cannot be written."""


@dataclass(frozen=True)
class InputGrammar:
    """What a custom tool's input must be: `pattern` (a regex it matches whole), `lark` (a
    grammar whose `start` it is), or any text; `unenforced` says why a grammar the client gave
    is not enforced."""

    pattern: str | None = None
    lark: str | None = None
    unenforced: str | None = None

    def parameters(self) -> dict[str, Any]:
        """The call's arguments as the model writes them: its input as one string, and
        nothing else (a grammar would otherwise let the model add keys forever)."""
        text: dict[str, Any] = {"type": "string"}
        if self.pattern is not None:
            text["pattern"] = self.pattern
        if self.lark is not None:
            text[LARK_KEY] = self.lark
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


def escaped_input_grammar(parameters: dict[str, Any]) -> str | None:
    """For a custom tool's `parameters` that carry a Lark grammar: an llguidance grammar of
    its input as the JSON string spells it, between the quotes; else None."""
    definition = ((parameters.get("properties") or {}).get("input") or {}).get(LARK_KEY)
    if not isinstance(definition, str):
        return None
    return _escaped(definition)


# A client sends the same tools with every request (Codex: its apply_patch grammar).
@functools.lru_cache(maxsize=64)
def _compiled(syntax: str, definition: str) -> InputGrammar:
    if syntax == "regex":
        return InputGrammar(pattern=_checked(anchored(definition)))
    if syntax != "lark":
        raise ValueError(f"grammar syntax {syntax!r} is not one of lark, regex")
    is_error, messages = LLMatcher.validate_grammar_with_warnings(LLMatcher.grammar_from_lark(definition))
    if is_error:
        raise ValueError(f"the Lark grammar does not compile: {_one_line(messages[0])}")
    try:
        _validated(_escaped(definition))
        return InputGrammar(lark=definition)
    except Unenforceable as why:
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


def _validated(lark: str) -> None:
    is_error, messages = LLMatcher.validate_grammar_with_warnings(LLMatcher.grammar_from_lark(lark))
    if is_error:  # our rewrite's fault, not the client's: the grammar goes unenforced
        raise Unenforceable(f"its escaped form does not compile: {_one_line(messages[0])}")


def _one_line(message: str) -> str:
    return " ".join(message.split())


# -- Lark, read -------------------------------------------------------------------------------

@dataclass(frozen=True)
class Alt:
    options: tuple["Node", ...]


@dataclass(frozen=True)
class Seq:
    items: tuple["Node", ...]


@dataclass(frozen=True)
class Repeat:
    item: "Node"
    low: int
    high: int | None  # None: no bound


@dataclass(frozen=True)
class Text:
    text: str
    folded: bool  # "..."i: either case


@dataclass(frozen=True)
class Span:
    low: str  # "a".."z"
    high: str


@dataclass(frozen=True)
class Regex:
    body: str  # Python's syntax, as Lark's
    flags: str


@dataclass(frozen=True)
class Ref:
    name: str


Node = Union[Alt, Seq, Repeat, Text, Span, Regex, Ref]

_COUNTS = {(0, None): "*", (1, None): "+", (0, 1): "?"}  # Repeat bounds with an operator of their own
_OPERATORS = {operator: bounds for bounds, operator in _COUNTS.items()}


@dataclass(frozen=True)
class Grammar:
    rules: dict[str, Node]  # terminals (upper case, imports) and rules
    ignored: tuple[Node, ...]  # %ignore: what may stand between any two terminals of the rules

    @staticmethod
    def is_terminal(name: str) -> bool:
        return name.lstrip("_")[:1].isupper()

    def used(self) -> set[str]:
        """The names the grammar's text is made of: reached from `start`, or from %ignore."""
        seen: set[str] = set()
        for node in (Ref("start"), *self.ignored):
            _names(node, self.rules, seen)
        return seen


_TOKEN = re.compile(r"""
    (?P<space>[ \t]+) | (?P<comment>//[^\n]*)
  | (?P<string>"(?:[^"\\\n]|\\.)*"i?)
  | (?P<regexp>/(?!/)(?:[^/\\\n]|\\.)+/[imslux]*)
  | (?P<name>[A-Za-z_][A-Za-z_0-9]*)
  | (?P<arrow>->) | (?P<range>\.\.) | (?P<number>[0-9]+)
  | (?P<op>[+*?]) | (?P<punct>[()\[\]|~])
""", re.VERBOSE)

_DEFINITION = re.compile(r"^[?!]?(?P<name>[A-Za-z_][A-Za-z_0-9]*)(?:\.-?[0-9]+)?\s*:(?P<body>.*)$", re.DOTALL)


def parse(definition: str) -> Grammar:
    """A Lark grammar's rules and terminals as trees."""
    rules: dict[str, Node] = {}
    ignored: list[Node] = []
    for line in _statements(definition):
        if line.startswith("%import"):
            rules.update(_imports(re.sub(r"\s*//.*$", "", line)))
        elif line.startswith("%ignore"):
            ignored.append(_Reader(_tokens(line[len("%ignore"):])).whole("%ignore"))
        elif line.startswith("%"):
            raise Unenforceable(f"{line.split()[0]} is not supported")
        else:
            match = _DEFINITION.match(line)
            if match is None:
                raise Unenforceable(f"cannot read {line[:60]!r}")
            rules[match["name"]] = _Reader(_tokens(match["body"])).whole(match["name"])
    if "start" not in rules:
        raise Unenforceable("the grammar has no start rule")
    grammar = Grammar(rules, tuple(ignored))
    missing = sorted(grammar.used() - rules.keys())
    if missing:
        raise Unenforceable(f"rule {missing[0]!r} is not defined")
    return grammar


def _names(node: Node, rules: dict[str, Node], seen: set[str]) -> None:
    """Adds to `seen` every name `node` reaches."""
    if isinstance(node, Ref):
        if node.name not in seen:
            seen.add(node.name)
            if node.name in rules:
                _names(rules[node.name], rules, seen)
    elif isinstance(node, (Alt, Seq)):
        for child in node.options if isinstance(node, Alt) else node.items:
            _names(child, rules, seen)
    elif isinstance(node, Repeat):
        _names(node.item, rules, seen)


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


def _imports(line: str) -> dict[str, Node]:
    match = re.fullmatch(r"%import\s+common\s*(?:\.(\w+)(?:\s*->\s*(\w+))?|\(([\w\s,]+)\))", line)
    if match is None:
        raise Unenforceable(f"only Lark's common terminals can be imported, not {line[8:].strip()!r}")
    names = [(match[1], match[2] or match[1])] if match[1] else [(n.strip(), n.strip()) for n in match[3].split(",")]
    out: dict[str, Node] = {}
    for name, alias in names:
        if name not in COMMON:
            raise Unenforceable(f"common.{name} is not known here")
        out[alias] = Regex(COMMON[name], "")
    return out


def _tokens(body: str) -> list[tuple[str, str]]:
    out, at = [], 0
    while at < len(body):
        match = _TOKEN.match(body, at)
        if match is None:
            raise Unenforceable(f"cannot read {body[at:at + 30]!r}")
        at = match.end()
        kind = match.lastgroup
        if kind not in ("space", "comment"):  # punctuation is its own kind: `(`, `|`, `~`, ...
            out.append((match[0] if kind == "punct" else kind, match[0]))
    return out


class _Reader:
    """Lark's expression syntax, read from the tokens of one definition."""

    def __init__(self, tokens: list[tuple[str, str]]):
        self.tokens = tokens

    def whole(self, name: str) -> Node:
        node = self.alternatives()
        if self.tokens:
            raise Unenforceable(f"{name}: unexpected {self.tokens[0][1]!r}")
        return node

    def peek(self) -> str | None:
        return self.tokens[0][0] if self.tokens else None

    def take(self) -> tuple[str, str]:
        token, self.tokens = self.tokens[0], self.tokens[1:]
        return token

    def alternatives(self) -> Node:
        options = [self.sequence()]
        while self.peek() == "|":
            self.take()
            options.append(self.sequence())
        return options[0] if len(options) == 1 else Alt(tuple(options))

    def sequence(self) -> Node:
        items = []
        while self.peek() not in (None, "|", ")", "]"):
            if self.peek() == "arrow":  # `-> alias` names a tree node: no text
                self.take(), self.take()
                continue
            item = self.atom()
            if self.peek() == "op":
                low, high = _OPERATORS[self.take()[1]]
                item = Repeat(item, low, high)
            elif self.peek() == "~":
                self.take()
                item = self.repeat(item)
            items.append(item)
        return items[0] if len(items) == 1 else Seq(tuple(items))

    def atom(self) -> Node:
        kind, text = self.take()
        if kind in ("(", "["):
            inner = self.alternatives()
            close = ")" if kind == "(" else "]"
            if self.peek() != close:
                raise Unenforceable(f"{kind} without {close}")
            self.take()
            return inner if kind == "(" else Repeat(inner, 0, 1)
        if kind == "string":
            if self.peek() == "range" and len(self.tokens) > 1 and self.tokens[1][0] == "string":
                self.take()
                return Span(_string(text), _string(self.take()[1]))
            return Text(_string(text), text.endswith("i"))
        if kind == "regexp":
            end = text.rindex("/")
            return Regex(text[1:end].replace("\\/", "/"), text[end + 1:])
        if kind == "name":
            return Ref(text)
        raise Unenforceable(f"unexpected {text!r}")

    def repeat(self, item: Node) -> Node:
        if self.peek() != "number":
            raise Unenforceable("~ needs a count")
        low = int(self.take()[1])
        if self.peek() == "range" and len(self.tokens) > 1 and self.tokens[1][0] == "number":
            self.take()
            return Repeat(item, low, int(self.take()[1]))
        return Repeat(item, low, low)


def _string(token: str) -> str:
    body = token[:-1] if token.endswith("i") else token
    return ast.literal_eval(body)


# -- Escaped: a Lark grammar of the JSON string's spelling ---------------------------------

# The characters a JSON string spells with a backslash, and how (json.dumps's spelling).
_SPELLED = {c: json.dumps(c)[1:-1] for c in ['"', "\\"] + [chr(n) for n in range(0x20)]}
_PLAIN = r'[^"\\\x00-\x1f]'  # the characters JSON writes as themselves
_EMPTY = '""'  # Lark's empty expression, for an empty sequence or alternative
_CATEGORIES = {sre.CATEGORY_DIGIT: r"\d", sre.CATEGORY_NOT_DIGIT: r"\D", sre.CATEGORY_SPACE: r"\s",
               sre.CATEGORY_NOT_SPACE: r"\S", sre.CATEGORY_WORD: r"\w", sre.CATEGORY_NOT_WORD: r"\W"}
_UNSUPPORTED = {"AT": "an anchor", "ASSERT": "a lookaround", "ASSERT_NOT": "a lookaround",
                "GROUPREF": "a backreference", "GROUPREF_EXISTS": "a conditional group",
                "ATOMIC_GROUP": "an atomic group", "POSSESSIVE_REPEAT": "a possessive repeat"}
_REGEX_FLAGS = {"i": re.IGNORECASE, "s": re.DOTALL, "m": re.MULTILINE, "x": re.VERBOSE, "u": 0, "l": 0}


@dataclass(frozen=True)
class CharClass:
    """One character out of code point ranges and `\\d`-like categories (or out of all others)."""

    ranges: tuple[tuple[int, int], ...] = ()
    categories: tuple[str, ...] = ()
    negated: bool = False
    folded: bool = False  # either case

    def source(self) -> str:
        """The class as Python's re and llguidance both read it."""
        inner = "".join(_class_char(lo) + ("" if lo == hi else "-" + _class_char(hi)) for lo, hi in self.ranges)
        return f"[{'^' if self.negated else ''}{inner}{''.join(self.categories)}]"

    def has_plain(self) -> bool:
        """Whether the class holds a character JSON writes as itself."""
        if self.negated or self.categories:
            return True
        # Any len(_SPELLED) + 1 code points in a row hold a plain one.
        return any(chr(n) not in _SPELLED for lo, hi in self.ranges for n in range(lo, min(hi, lo + len(_SPELLED)) + 1))


def _class_char(code: int) -> str:
    char = chr(code)
    if char.isascii() and char.isalnum():
        return char
    return f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}"


@functools.lru_cache(maxsize=64)
def _escaped(definition: str) -> str:
    return _Escaper(parse(definition)).grammar()


class _Escaper:
    """Rules for the escaped spelling of a grammar's text: every rule and terminal becomes a
    rule (`r_name`, `t_name`), every character one lexeme: a literal, or `c_N` for a class
    (its plain characters, and the escapes of the ones JSON spells with a backslash)."""

    def __init__(self, grammar: Grammar):
        self.source = grammar
        self.classes: dict[CharClass, str] = {}
        self.lines: list[str] = []

    def grammar(self) -> str:
        rules, ignored = self.source.rules, self.source.ignored
        if ignored:
            self.lines.append("ig_: (" + " | ".join(self.write(node, False) for node in ignored) + ")*")
        for name in sorted(self.source.used()):
            self.lines.append(f"{_rule_name(name)}: {self.write(rules[name], not Grammar.is_terminal(name)) or _EMPTY}")
        return "\n".join([f"start: r_start{' ig_' if ignored else ''}", *self.lines]) + "\n"

    def write(self, node: Node, in_rule: bool) -> str:
        """`node` as a Lark expression; `in_rule`: %ignore'd text may come before each of its
        terminals (in a terminal's own definition, not)."""
        ignore = "ig_ " if in_rule and self.source.ignored else ""
        if isinstance(node, Alt):
            return _either(self.write(option, in_rule) for option in node.options)
        if isinstance(node, Seq):
            return " ".join(filter(None, (self.write(item, in_rule) for item in node.items)))
        if isinstance(node, Repeat):
            return _repeat(self.write(node.item, in_rule), node.low, node.high)
        if isinstance(node, Ref):
            return (ignore if Grammar.is_terminal(node.name) else "") + _rule_name(node.name)
        if isinstance(node, Text):
            text = " ".join(self.char(ord(c), node.folded) for c in node.text)
        elif isinstance(node, Span):
            text = self.cls(CharClass(((ord(node.low), ord(node.high)),)))
        else:
            text = self.regex(node)
        return f"{ignore}({text})" if ignore else text

    def char(self, code: int, folded: bool) -> str:
        char = chr(code)
        if folded and char.lower() != char.upper():
            return self.cls(CharClass(((ord(char.lower()),) * 2, (ord(char.upper()),) * 2)))
        return json.dumps(_SPELLED.get(char, char), ensure_ascii=False)

    def cls(self, chars: CharClass) -> str:
        if chars not in self.classes:
            self.classes[chars] = name = f"c_{len(self.classes)}"
            matches = re.compile(chars.source(), re.IGNORECASE if chars.folded else 0).fullmatch
            options = [json.dumps(spelled) for char, spelled in _SPELLED.items() if matches(char)]
            if chars.has_plain():
                plain = f"[{chars.source()}&&{_PLAIN}]"
                options.insert(0, "/" + (f"(?i:{plain})" if chars.folded else plain) + "/")
            self.lines.append(f"{name}: {' | '.join(options)}")
        return self.classes[chars]

    def regex(self, node: Regex) -> str:
        flags = 0
        for flag in node.flags:
            flags |= _REGEX_FLAGS[flag]
        try:
            parsed = sre_parse.parse(node.body, flags)
        except re.error as why:
            raise Unenforceable(f"regex /{node.body}/ does not read: {why}") from None
        return self.sequence(parsed.data, parsed.state.flags) or _EMPTY

    def sequence(self, items: list, flags: int) -> str:
        return " ".join(filter(None, (self.item(op, value, flags) for op, value in items)))

    def item(self, op: Any, value: Any, flags: int) -> str:
        folded = bool(flags & re.IGNORECASE)
        if op is sre.LITERAL:
            return self.char(value, folded)
        if op is sre.NOT_LITERAL:
            return self.cls(CharClass(((value, value),), negated=True, folded=folded))
        if op is sre.ANY:
            dotall = bool(flags & re.DOTALL)
            return self.cls(CharClass(categories=(r"\s", r"\S")) if dotall else CharClass(((10, 10),), negated=True))
        if op is sre.IN:
            return self.cls(_char_class(value, folded))
        if op is sre.BRANCH:
            return _either(self.sequence(branch, flags) for branch in value[1])
        if op is sre.SUBPATTERN:
            _, add, remove, items = value
            return _group(self.sequence(items, (flags | add) & ~remove))
        if op in (sre.MAX_REPEAT, sre.MIN_REPEAT):
            low, high, items = value
            return _repeat(self.sequence(items, flags), low, None if high is sre.MAXREPEAT else high)
        what = _UNSUPPORTED.get(str(op), str(op).lower())
        raise Unenforceable(f"a regex in it uses {what}, which has no escaped form here")


def _rule_name(name: str) -> str:
    return ("t_" if Grammar.is_terminal(name) else "r_") + name.lower()


def _group(expression: str) -> str:
    return f"({expression or _EMPTY})"


def _either(options: Iterable[str]) -> str:
    return "(" + " | ".join(option or _EMPTY for option in options) + ")"


def _repeat(item: str, low: int, high: int | None) -> str:
    item = _group(item)
    if (low, high) in _COUNTS:
        return item + _COUNTS[(low, high)]
    if high is None:
        return f"{item} ~ {low} {item}*"
    return f"{item} ~ {low}" if low == high else f"{item} ~ {low}..{high}"


def _char_class(items: list, folded: bool) -> CharClass:
    ranges, categories, negated = [], [], False
    for op, value in items:
        if op is sre.NEGATE:
            negated = True
        elif op is sre.LITERAL:
            ranges.append((value, value))
        elif op is sre.RANGE:
            ranges.append(value)
        elif op is sre.CATEGORY:
            categories.append(_CATEGORIES[value])
        else:
            raise Unenforceable(f"regex class item {str(op).lower()} is not supported")
    return CharClass(tuple(ranges), tuple(categories), negated, folded)
