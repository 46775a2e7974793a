"""Decode throughput: generated tokens per second through the server, against mlx-lm in-process.

    python -m bench.throughput [--repeats N]

Per repeat, interleaved so that all see the same machine load, with the same rendered chat
prompt and 256 greedy tokens; never two at once, as each takes the CPU to itself:

* server, one stream: a streaming chat request; its decode rate from the first content chunk
  to the last chunk (time to first token excluded, reported apart) over the completion tokens
  the final usage chunk reports.
* in-process, one stream: `mlx_lm.stream_generate` in this process, timed the same way.
* server, 4 and 8 concurrent streams: total completion tokens over the wall time from sending
  the first request to the end of the last stream.
* in-process, batch of 4 and 8: `mlx_lm.generate.batch_generate` on as many copies of the
  prompt, total tokens over its wall time.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import httpx
import mlx.core as mx
from mlx_lm import load, stream_generate
from mlx_lm.generate import batch_generate
from mlx_lm.sample_utils import make_sampler

from bench.common import ROOT, Summary, serve_app, summarize, write_result

MODEL_ID = "bench"
MODEL_PATH = "models/bench-llama-20m"
APP_ARGS = {
    "models": [{"id": MODEL_ID, "path": MODEL_PATH, "pinned": True}],
    # Every request sends the same prompt: with the prompt cache the server would read it
    # only once, and its time to first token would be for less work than in-process.
    "prompt_cache_size": None,
}
MESSAGES = [{"role": "user", "content": "Write a long story about a river."}]
MAX_TOKENS = 256
CONCURRENCY = (4, 8)
LOAD_TIMEOUT_S = 300


@dataclass
class Stream:
    """One timed generation, through the server or in-process."""

    ttft_s: float  # from sending (or calling) to the first piece of generated text
    decode_s: float  # from that first piece to the end of the stream
    completion_tokens: int
    text: str
    prompt_tokens: int = 0  # through the server: as its usage chunk reports them
    cached_tokens: int = 0  # of those, read from the server's prompt cache

    @property
    def decode_tok_s(self) -> float:
        # The first token's time is the TTFT; the decode interval holds the other tokens.
        # (The server may coalesce tokens into one chunk: should the first chunk carry two,
        # the rate is off by one token in 256.)
        return (self.completion_tokens - 1) / self.decode_s


def chat_body(
    model_id: str, max_tokens: int, stream: bool, messages: list[dict[str, str]] = MESSAGES
) -> dict[str, Any]:
    body: dict[str, Any] = {
        "model": model_id,
        "messages": messages,
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": stream,
    }
    if stream:
        # Chunks are not tokens (a token may carry no text, or be held back and sent with the
        # next one): only the usage chunk at the end tells how many tokens were generated.
        body["stream_options"] = {"include_usage": True}
    return body


def stream_chat(
    client: httpx.Client, model_id: str, max_tokens: int, messages: list[dict[str, str]] = MESSAGES
) -> Stream:
    """A streaming chat request read to its end, timed chunk by chunk."""
    sent = time.perf_counter()
    first: float | None = None
    last = sent
    pieces: list[str] = []
    usage: dict[str, int] | None = None
    body = chat_body(model_id, max_tokens, stream=True, messages=messages)
    with client.stream("POST", "/v1/chat/completions", json=body) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            last = time.perf_counter()
            chunk = json.loads(line.removeprefix("data: "))
            if "error" in chunk:
                raise RuntimeError(f"stream failed: {chunk['error']}")
            if chunk.get("usage"):
                usage = chunk["usage"]
            # The opening chunk carries only the role, with empty content.
            text = chunk["choices"][0]["delta"].get("content") if chunk["choices"] else None
            if text:
                pieces.append(text)
                first = first or last
    if first is None or usage is None:
        raise RuntimeError("the stream ended without content or without a usage chunk")
    cached = (usage.get("prompt_tokens_details") or {}).get("cached_tokens", 0)
    return Stream(
        first - sent, last - first, usage["completion_tokens"], "".join(pieces), usage["prompt_tokens"], cached
    )


def stream_in_process(model: Any, tokenizer: Any, prompt: list[int]) -> Stream:
    """What the server's replica runs for the same request, timed the same way."""
    started = time.perf_counter()
    first: float | None = None
    pieces: list[str] = []
    tokens = 0
    responses = stream_generate(
        model, tokenizer, mx.array(prompt), max_tokens=MAX_TOKENS, sampler=make_sampler(temp=0.0)
    )
    for response in responses:
        # As in the server, the response reporting end of sequence adds no token.
        if response.finish_reason != "stop":
            tokens += 1
        if response.text:
            pieces.append(response.text)
            first = first or time.perf_counter()
    ended = time.perf_counter()
    if first is None:
        raise RuntimeError("in-process generation produced no text")
    return Stream(first - started, ended - first, tokens, "".join(pieces))


def concurrent_tok_s(client: httpx.Client, pool: ThreadPoolExecutor, streams: int) -> float:
    """Aggregate tokens/s of `streams` simultaneous streaming requests."""
    started = time.perf_counter()
    results = list(pool.map(lambda _: stream_chat(client, MODEL_ID, MAX_TOKENS), range(streams)))
    return sum(r.completion_tokens for r in results) / (time.perf_counter() - started)


def batch_tok_s(model: Any, tokenizer: Any, prompt: list[int], size: int) -> float:
    """Aggregate tokens/s of mlx-lm's batched generation over `size` copies of the prompt."""
    started = time.perf_counter()
    # Greedy is batch_generate's default sampler.
    done = batch_generate(
        model, tokenizer, prompts=[prompt] * size, max_tokens=MAX_TOKENS, return_token_ids=True
    )
    return sum(len(ids) for ids in done.token_ids) / (time.perf_counter() - started)


def model_status(client: httpx.Client, model_id: str) -> str:
    models = client.get("/admin/models").raise_for_status().json()["models"]
    return next(m["status"] for m in models if m["id"] == model_id)


def wait_until_loaded(client: httpx.Client, model_id: str) -> None:
    """A pinned model loads in the background after the app starts; wait for its weights."""
    deadline = time.monotonic() + LOAD_TIMEOUT_S
    while (status := model_status(client, model_id)) != "loaded":
        if time.monotonic() > deadline:
            raise TimeoutError(f"model {model_id} not loaded after {LOAD_TIMEOUT_S} s: {status}")
        time.sleep(0.5)


def check_same_work(server: Stream, in_process: Stream) -> None:
    """Greedy decoding of the same prompt must give the same tokens on both sides."""
    if server.text != in_process.text or server.completion_tokens != in_process.completion_tokens:
        raise RuntimeError(
            f"server and in-process generations differ: {server.completion_tokens} tokens "
            f"{server.text[:60]!r}... against {in_process.completion_tokens} tokens "
            f"{in_process.text[:60]!r}..."
        )
    print(f"server and in-process both generate the same {server.completion_tokens} tokens")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    repeats = parser.parse_args().repeats
    run_started = time.perf_counter()

    model, tokenizer = load(str(ROOT / MODEL_PATH))
    # The chat template writes BOS itself, as the server renders it.
    prompt = tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True)

    # Figure name -> one sample per repeat, in the order the table lists them.
    samples: dict[str, list[float]] = defaultdict(list)
    with (
        serve_app(APP_ARGS) as base_url,
        httpx.Client(base_url=base_url, timeout=600) as client,
        ThreadPoolExecutor(max_workers=max(CONCURRENCY)) as pool,
    ):
        wait_until_loaded(client, MODEL_ID)
        # Untimed warm-up (connection, first-call costs of both sides), checked for equal work.
        check_same_work(
            stream_chat(client, MODEL_ID, MAX_TOKENS), stream_in_process(model, tokenizer, prompt)
        )
        for repeat in range(1, repeats + 1):
            server = stream_chat(client, MODEL_ID, MAX_TOKENS)
            in_process = stream_in_process(model, tokenizer, prompt)
            samples["server_1_stream_tok_s"].append(server.decode_tok_s)
            samples["in_process_1_stream_tok_s"].append(in_process.decode_tok_s)
            samples["server_1_stream_ttft_s"].append(server.ttft_s)
            samples["in_process_1_stream_ttft_s"].append(in_process.ttft_s)
            for k in CONCURRENCY:
                samples[f"server_{k}_streams_tok_s"].append(concurrent_tok_s(client, pool, k))
                samples[f"in_process_batch_{k}_tok_s"].append(
                    batch_tok_s(model, tokenizer, prompt, k)
                )
            listed = ", ".join(f"{name} {values[-1]:.2f}" for name, values in samples.items())
            print(f"repeat {repeat}/{repeats}: {listed}", flush=True)

    figures: dict[str, Summary | float] = {name: summarize(v) for name, v in samples.items()}
    # Medians: one slow repeat (the machine is shared) should not move the ratios.
    median = {name: statistics.median(values) for name, values in samples.items()}
    single = median["server_1_stream_tok_s"]
    figures["single_stream_ratio"] = single / median["in_process_1_stream_tok_s"]
    for k in CONCURRENCY:
        server_k = median[f"server_{k}_streams_tok_s"]
        figures[f"server_{k}_streams_vs_1"] = server_k / single
        figures[f"batch{k}_ratio"] = server_k / median[f"in_process_batch_{k}_tok_s"]
    print()
    write_result("throughput", figures)
    print(f"total run time {time.perf_counter() - run_started:.1f} s")


if __name__ == "__main__":
    main()
