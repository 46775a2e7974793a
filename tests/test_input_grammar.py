"""Custom tools' input grammars (policies/input_grammar.py), read by llguidance on the JSON
string the model writes, escapes and all: what Codex's apply_patch grammar lets through and
what it stops, recursive rules, %ignore, and the lexeme boundaries escaping moves."""

from __future__ import annotations

import functools
import json

import pytest
from llguidance import LLMatcher

from policies.input_grammar import InputGrammar, escaped_input_grammar, input_grammar
from tests.conftest import ROOT

# Codex 0.171's apply_patch grammar, as its binary holds it.
CODEX = (ROOT / "tests" / "fixtures" / "codex_apply_patch.lark").read_text()
PATCH = ("*** Begin Patch\n*** Update File: src/app.py\n@@ def main():\n-    print(\"hi\")\n+    print(\"hello\\tworld\")\n"
         "*** Add File: notes.txt\n+first line\n*** Delete File: old.txt\n*** End Patch\n")
NOT_PATCHES = [
    "*** Begin Patch\n*** Update File: a.py\nx = 2\n*** End Patch\n",  # a change line without its + - or space
    "Here is the patch:\n*** Begin Patch\n*** Delete File: a\n*** End Patch\n",  # text before it
    "*** Begin Patch\n*** End Patch\n",  # no hunk
    "*** Begin Patch\n*** Add File: a\n+x\n",  # no end
]
EXPRESSIONS = 'start: expr\nexpr: "(" expr ")" | ATOM\nATOM: /[a-z"\\\\]+/i\n'


def lark(definition: str) -> dict:
    return {"type": "grammar", "syntax": "lark", "definition": definition}


def accepts(grammar: InputGrammar, text: str) -> bool:
    """Whether llguidance lets a model write `text` as the JSON string of a custom tool's input."""
    if grammar.pattern is not None:
        compiled = LLMatcher.grammar_from_json_schema({"type": "string", "pattern": grammar.pattern})
    else:
        escaped = escaped_input_grammar(grammar.parameters())
        compiled = LLMatcher.grammar_from_lark('start: "\\"" input "\\""\ninput: %lark {\n' + escaped + "}\n")
    matcher = LLMatcher(_tokenizer(), compiled)
    tokens = _tokenizer().tokenize_str(json.dumps(text, ensure_ascii=False))
    return matcher.validate_tokens(tokens) == len(tokens) and matcher.consume_tokens(tokens) and matcher.is_accepting()


@functools.cache
def _tokenizer():
    from llguidance import LLTokenizer

    return LLTokenizer((ROOT / "models" / "tiny-qwen2" / "tokenizer.json").read_text())


def test_codex_apply_patch_grammar_holds_for_the_escaped_input():
    grammar = input_grammar(lark(CODEX))
    assert grammar.lark == CODEX and grammar.unenforced is None
    assert accepts(grammar, PATCH)
    for text in NOT_PATCHES:
        assert not accepts(grammar, text), text


def test_lark_constructs_read_as_lark_reads_them():
    grammar = input_grammar(lark('start: op " " NUM ("," NUM)* [SUFFIX]\n'
                                 'op: "add"i\n    | "sub"\nNUM: DIGIT ~ 1..3\nSUFFIX: "a".."c" -> tail\n'
                                 '%import common.DIGIT  // one digit'))
    for text in ("ADD 1", "add 12,345", "sub 9b", "aDd 7,8,9c"):
        assert accepts(grammar, text), text
    for text in ("sUB 1", "add 1234", "add 1,", "add 1d", " add 1"):
        assert not accepts(grammar, text), text


def test_a_recursive_grammar_is_enforced_with_escapes_inside_its_terminals():
    grammar = input_grammar(lark(EXPRESSIONS))
    assert grammar.unenforced is None
    for text in ("x", "((x))", '(("Quoted\\"))', "(((aBc)))"):
        assert accepts(grammar, text), text
    for text in ("((x)", "(x))", "()", "(x y)", "(\t)"):
        assert not accepts(grammar, text), text


def test_ignored_text_may_stand_between_terminals_but_not_inside_them():
    grammar = input_grammar(lark('start: item+\nitem: WORD | "[" item+ "]"\n%import common.WORD\n%import common.WS\n%ignore WS'))
    for text in ("ab", " ab  cd\n", "[ ab [cd]\t] ef "):
        assert accepts(grammar, text), text
    for text in ("ab,", "[ab", ""):
        assert not accepts(grammar, text), text


def test_an_escaped_character_ends_where_json_ends_it():
    # `.*` then a newline: the tab inside the line and the newline after it both start with
    # a backslash once escaped, and neither may swallow the other.
    grammar = input_grammar(lark('start: line+\nline: /(.*)/ LF\n%import common.LF\n%ignore /#/'))
    assert accepts(grammar, 'a\tb "c"\n\\d\n\n')
    assert not accepts(grammar, "a\tb")


def test_regex_flags_apply():
    grammar = input_grammar(lark("start: /[a-z]+ x/ix"))
    assert accepts(grammar, "AbcX") and not accepts(grammar, "Abc X")


def test_a_regex_grammar_is_the_whole_input():
    grammar = input_grammar({"type": "grammar", "syntax": "regex", "definition": "(add|sub) [0-9]{1,3}"})
    assert grammar.parameters()["properties"]["input"]["pattern"] == grammar.pattern
    assert accepts(grammar, "add 12") and not accepts(grammar, "xadd 12")


@pytest.mark.parametrize("definition, why", [
    ('start: %json {"type": "integer"}', "cannot read '%json"),
    ("start: /a$/", "uses an anchor"),
])
def test_a_grammar_with_no_escaped_form_is_checked_then_left_unenforced(definition, why):
    grammar = input_grammar(lark(definition))
    assert grammar.lark is None and why in grammar.unenforced
    assert grammar.parameters()["properties"]["input"] == {"type": "string"}


@pytest.mark.parametrize("format, says", [
    (lark("start: ((("), "Lark grammar does not compile"),
    ({"type": "grammar", "syntax": "regex", "definition": "(a"}, "regular expression does not compile"),
    ({"type": "grammar", "syntax": "ebnf", "definition": "x"}, "not one of lark, regex"),
    ({"type": "grammar", "syntax": "lark"}, "needs its definition"),
    ({"type": "json"}, "not one of text, grammar"),
])
def test_a_grammar_that_does_not_compile_says_why(format, says):
    with pytest.raises(ValueError, match=says):
        input_grammar(format)


def test_free_text_has_no_grammar():
    assert input_grammar(None) == input_grammar({"type": "text"}) == InputGrammar()
    assert escaped_input_grammar(InputGrammar().parameters()) is None
