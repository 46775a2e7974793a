"""Custom tools' input grammars: what llguidance's mask costs per token, in process.

    python -m bench.input_grammar [--repeats N]

A long apply_patch call (200 added lines, quotes and tabs in them) as the model writes it
(`{"name": ..., "arguments": {"input": "..."}}`, the JSON every tool format holds), walked token by token with the mask computed before each
(what the model server does), under three grammars of the call: Codex's apply_patch grammar
in its escaped form (policies/input_grammar.py), the same call with free text (`input` any
string: llguidance's own JSON string lexeme, the floor), and a recursive arithmetic grammar on
a deeply nested expression. Ratios are against the free-text floor, from one sitting.
"""

from __future__ import annotations

import argparse
import json
import time

from llguidance import LLMatcher, LLTokenizer

from bench.common import ROOT, summarize, write_result
from policies.input_grammar import input_grammar
from policies.tool_calls import calls_grammar

CODEX = (ROOT / "tests" / "fixtures" / "codex_apply_patch.lark").read_text()
PATCH = ("*** Begin Patch\n*** Add File: src/values.py\n"
         + "".join(f'+    value_{i} = compute("item {i}", {i})\t# note\n' for i in range(200)) + "*** End Patch\n")
ARITHMETIC = 'start: expr\nexpr: NUM | "(" expr OP expr ")"\nOP: " + " | " * "\nNUM: /[0-9]+/'
NESTED = "(" * 60 + "1" + "".join(f" + {i})" for i in range(60))


def custom_tool(definition: str | None) -> dict:
    format = {"type": "grammar", "syntax": "lark", "definition": definition} if definition else None
    return {"type": "function", "function": {"name": "tool", "parameters": input_grammar(format).parameters()}}


def mask_ms_per_token(tokenizer: LLTokenizer, definition: str | None, text: str) -> float:
    grammar = calls_grammar("start: call", [custom_tool(definition)], "tool", "arguments")
    call = '{"name": "tool", "arguments": {"input": ' + json.dumps(text, ensure_ascii=False) + "}}"
    tokens = tokenizer.tokenize_str(call)
    matcher = LLMatcher(tokenizer, grammar)
    started = time.perf_counter()
    for token in tokens:
        matcher.compute_bitmask()
        if not matcher.consume_token(token):
            raise RuntimeError(f"the grammar refused the call: {matcher.get_error()}")
    return 1000 * (time.perf_counter() - started) / len(tokens)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    tokenizer = LLTokenizer((ROOT / "models" / "tiny-qwen2" / "tokenizer.json").read_text())
    cases = {"free_text": (None, PATCH), "apply_patch": (CODEX, PATCH), "arithmetic": (ARITHMETIC, NESTED)}
    samples: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(args.repeats):  # interleaved, so that drift hits every case alike
        for name, (definition, text) in cases.items():
            samples[name].append(mask_ms_per_token(tokenizer, definition, text))
    figures = {f"{name}_mask_ms_per_token": summarize(values) for name, values in samples.items()}
    floor = figures["free_text_mask_ms_per_token"]["median"]
    for name in ("apply_patch", "arithmetic"):
        figures[f"{name}_over_free_text"] = figures[f"{name}_mask_ms_per_token"]["median"] / floor
    write_result("input_grammar", figures)


if __name__ == "__main__":
    main()
