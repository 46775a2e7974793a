"""Structured output: decode speed under a JSON-schema constraint against free text.

    python -m bench.structured [--repeats N]

The bench model through the server, one stream and 4 concurrent streams, interleaved per
repeat: the same chat with `response_format: json_schema` (an object with one long string,
so that generation runs its full 256 tokens inside the grammar) and without. Decode tok/s as
in bench.throughput (first content chunk to the last, over the completion tokens); the ratio
constrained / free is the grammar engine's per-token cost (llguidance computing the mask and
applying it to the logits).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx

from bench.common import Summary, serve_app, summarize, write_result
from bench.throughput import APP_ARGS, MAX_TOKENS, MESSAGES, MODEL_ID, wait_until_loaded

SCHEMA = {
    "type": "object",
    "properties": {"story": {"type": "string"}},
    "required": ["story"],
    "additionalProperties": False,
}
CONCURRENT = 4


def stream(client: httpx.Client, constrained: bool) -> tuple[float, int]:
    """(decode seconds from the first content chunk to the last, completion tokens)."""
    body: dict[str, Any] = {
        "model": MODEL_ID,
        "messages": MESSAGES,
        "max_tokens": MAX_TOKENS,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if constrained:
        body["response_format"] = {"type": "json_schema", "json_schema": {"name": "story", "schema": SCHEMA}}
    first = last = None
    tokens = 0
    with client.stream("POST", "/v1/chat/completions", json=body) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                raise RuntimeError(f"stream failed: {chunk['error']}")
            last = time.perf_counter()
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            elif chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                first = first or last
    if first is None or not tokens:
        raise RuntimeError("the stream ended without content or usage")
    return last - first, tokens


def one_stream_tok_s(client: httpx.Client, constrained: bool) -> float:
    seconds, tokens = stream(client, constrained)
    return (tokens - 1) / seconds


def concurrent_tok_s(client: httpx.Client, pool: ThreadPoolExecutor, constrained: bool) -> float:
    started = time.perf_counter()
    results = list(pool.map(lambda _: stream(client, constrained), range(CONCURRENT)))
    return sum(tokens for _, tokens in results) / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    repeats = parser.parse_args().repeats
    run_started = time.perf_counter()
    samples: dict[str, list[float]] = defaultdict(list)
    with (
        serve_app(APP_ARGS) as base_url,
        httpx.Client(base_url=base_url, timeout=600) as client,
        ThreadPoolExecutor(CONCURRENT) as pool,
    ):
        wait_until_loaded(client, MODEL_ID)
        stream(client, constrained=True)  # warm-up: the grammar tokenizer is built once
        stream(client, constrained=False)
        for repeat in range(1, repeats + 1):
            for constrained, name in ((False, "free"), (True, "json_schema")):
                samples[f"{name}_1_stream_tok_s"].append(one_stream_tok_s(client, constrained))
                samples[f"{name}_{CONCURRENT}_streams_tok_s"].append(concurrent_tok_s(client, pool, constrained))
            print(f"repeat {repeat}/{repeats}: " + ", ".join(f"{k} {v[-1]:.1f}" for k, v in samples.items()), flush=True)

    figures: dict[str, Summary | float] = {name: summarize(v) for name, v in samples.items()}
    median = {name: statistics.median(values) for name, values in samples.items()}
    figures["ratio_1_stream"] = median["json_schema_1_stream_tok_s"] / median["free_1_stream_tok_s"]
    figures[f"ratio_{CONCURRENT}_streams"] = (
        median[f"json_schema_{CONCURRENT}_streams_tok_s"] / median[f"free_{CONCURRENT}_streams_tok_s"]
    )
    print()
    write_result("structured", figures)
    print(f"total run time {time.perf_counter() - run_started:.1f} s")


if __name__ == "__main__":
    main()
