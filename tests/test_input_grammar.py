"""Custom tools' input grammars as one regular expression (policies/input_grammar.py): what
Codex's apply_patch grammar lets through and what it stops, read by Python's `re` and by
llguidance on the JSON string the model writes, escapes and all."""

from __future__ import annotations

import functools
import json
import re

import pytest
from llguidance import LLMatcher

from policies.input_grammar import InputGrammar, input_grammar
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


def lark(definition: str) -> dict:
    return {"type": "grammar", "syntax": "lark", "definition": definition}


def accepts_json_string(pattern: str, text: str) -> bool:
    """Whether llguidance lets a model write `text` as the JSON string of a schema with `pattern`."""
    matcher = LLMatcher(_tokenizer(), LLMatcher.grammar_from_json_schema({"type": "string", "pattern": pattern}))
    tokens = _tokenizer().tokenize_str(json.dumps(text))
    return matcher.validate_tokens(tokens) == len(tokens) and matcher.consume_tokens(tokens) and matcher.is_accepting()


@functools.cache
def _tokenizer():
    from llguidance import LLTokenizer

    return LLTokenizer((ROOT / "models" / "tiny-qwen2" / "tokenizer.json").read_text())


def test_codex_apply_patch_grammar_flattens_and_holds_for_the_escaped_input():
    grammar = input_grammar(lark(CODEX))
    assert grammar.pattern and grammar.unenforced is None
    assert re.fullmatch(grammar.pattern, PATCH)
    assert accepts_json_string(grammar.pattern, PATCH)
    for text in NOT_PATCHES:
        assert not re.fullmatch(grammar.pattern, text), text
        assert not accepts_json_string(grammar.pattern, text), text


def test_lark_constructs_read_as_lark_reads_them():
    grammar = input_grammar(lark('start: op " " NUM ("," NUM)* [SUFFIX]\n'
                                 'op: "add"i\n    | "sub"\nNUM: DIGIT ~ 1..3\nSUFFIX: "a".."c" -> tail\n'
                                 '%import common.DIGIT  // one digit'))
    for text in ("ADD 1", "add 12,345", "sub 9b", "aDd 7,8,9c"):
        assert re.fullmatch(grammar.pattern, text), text
    for text in ("sUB 1", "add 1234", "add 1,", "add 1d", " add 1"):
        assert not re.fullmatch(grammar.pattern, text), text


def test_a_regex_grammar_is_the_whole_input():
    grammar = input_grammar({"type": "grammar", "syntax": "regex", "definition": "(add|sub) [0-9]{1,3}"})
    assert grammar.parameters()["properties"]["input"]["pattern"] == grammar.pattern
    assert accepts_json_string(grammar.pattern, "add 12") and not accepts_json_string(grammar.pattern, "xadd 12")


@pytest.mark.parametrize("definition, why", [
    ('start: expr\nexpr: "(" expr ")" | "x"', "rule 'expr' is recursive"),
    ('start: WORD+\n%import common.WORD\n%ignore " "', "%ignore"),
    ("start: /[a-z]+/i", "regex flags"),
])
def test_a_grammar_no_regex_can_hold_is_checked_then_left_unenforced(definition, why):
    grammar = input_grammar(lark(definition))
    assert grammar.pattern is None and why in grammar.unenforced
    assert "pattern" not in grammar.parameters()["properties"]["input"]


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


def test_free_text_has_no_pattern():
    assert input_grammar(None) == input_grammar({"type": "text"}) == InputGrammar()
