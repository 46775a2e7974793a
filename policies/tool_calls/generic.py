"""Generic: for chat models whose template renders no tools (SmolLM2, Gemma, older Mistral
and Llama), as llama.cpp's server and LM Studio give every chat model tools. The server
writes the tool list and the calling convention into the system prompt, and past calls and
their results into the turns as text (such templates drop them); each call is
`<tool_call>\n{"name": ..., "arguments": {...}}\n</tool_call>` in plain text, as Hermes
writes it, and with tools offered the answer is constrained to either text or such calls."""

from __future__ import annotations

import json
from typing import Any

from policies.tool_calls import ToolFormat, arguments_text, hermes

# Hermes' markers, parser and grammar; what is generic is writing the tools into the prompt.
START, END = hermes.START, hermes.END

INSTRUCTIONS = """# Tools

You may call one or more functions to help with the request. The functions, as JSON schemas:
<tools>
{tools}
</tools>

To call functions, answer with nothing but one block per call, each holding a JSON object with the function's name and its arguments:
<tool_call>
{{"name": "<function name>", "arguments": <the arguments as a JSON object>}}
</tool_call>
The results come back in <tool_response></tool_response> blocks. When no function is needed, answer in plain text."""


def prompt(messages: list[dict[str, Any]], tools: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The chat with the tools in its system prompt and past calls and results as text."""
    out: list[dict[str, Any]] = []
    for message in messages:
        if message.get("tool_calls"):
            calls = "\n".join(_block(call["function"]) for call in message["tool_calls"])
            text = message.get("content") or ""
            out.append({"role": "assistant", "content": f"{text}\n{calls}" if text else calls})
        elif message["role"] == "tool":
            out.append({"role": "user", "content": f"<tool_response>\n{message['content']}\n</tool_response>"})
        else:
            out.append(message)
    if tools:
        listing = "\n".join(json.dumps(tool["function"], ensure_ascii=False) for tool in tools)
        instructions = INSTRUCTIONS.format(tools=listing)
        if out and out[0]["role"] == "system":
            out[0] = {**out[0], "content": f"{out[0]['content']}\n\n{instructions}"}
        else:
            out.insert(0, {"role": "system", "content": instructions})
    return out


def _block(function: dict[str, Any]) -> str:
    arguments = function["arguments"]
    if isinstance(arguments, str):
        arguments = json.loads(arguments)
    name = json.dumps(function["name"], ensure_ascii=False)
    return f'{START}\n{{"name": {name}, "arguments": {arguments_text(arguments)}}}\n{END}'


FORMAT = ToolFormat(name="generic", start=START, end=END, parse=hermes.parse, grammar=hermes.grammar, prompt=prompt)
