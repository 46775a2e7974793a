"""Latency: a one-token chat through the server, against the same work in-process.

    python -m bench.latency [--repeats N] [--url URL --model NAME --peer-name PEER]

With `--url`, the server modes run against another OpenAI-compatible server already
listening there (a peer, serving the same tiny-llama files as NAME), next to the same
in-process reference: the peer's rows, measured the same way in the same run.

Per repeat, 100 rounds one after another on one keep-alive connection; each round runs,
interleaved so that all see the same machine load:

* server, end to end: a non-streaming chat with `max_tokens: 1`, from sending to the answer.
* server, time to first token: the same chat streaming, to its first content chunk.
* the same through Serve's proxy (our own server only): its port answers the same routes,
  one hop longer than the ingress replica's own port (direct ingress, ops/fleet.env).
* in-process: render the chat template, tokenize and `mlx_lm.generate` one token in this
  process; what the replica computes for the request, without HTTP, JSON and Ray.

Each repeat yields a p50 and a p99 per mode; the table shows those over the repeats.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections import defaultdict
from contextlib import ExitStack, nullcontext
from typing import Any, Callable, Sequence

import httpx
from mlx_lm import generate, load
from mlx_lm.sample_utils import make_sampler

from bench.common import ROOT, Summary, proxy_url, serve_app, summarize, write_result
from bench.throughput import MESSAGES, chat_body, stream_chat, wait_until_loaded

MODEL_ID = "tiny"
MODEL_PATH = "models/tiny-llama"
APP_ARGS = {
    "models": [{"id": MODEL_ID, "path": MODEL_PATH, "pinned": True}],
    # Every request sends the same prompt: with the prompt cache the server would read it
    # only once, and answer with less work than the in-process reference does.
    "prompt_cache_size": None,
}
ROUNDS = 100
WARM_UP_ROUNDS = 10


def e2e_seconds(client: httpx.Client, model_id: str) -> float:
    started = time.perf_counter()
    response = client.post("/v1/chat/completions", json=chat_body(model_id, 1, stream=False))
    seconds = time.perf_counter() - started
    # One token asked for, so "length" with some text is one token generated. Usage is not
    # checked: peers count differently (vllm-mlx 0.6 re-encodes the text: 1 token counts 3).
    choice = response.raise_for_status().json()["choices"][0]
    if choice["finish_reason"] != "length" or not choice["message"]["content"]:
        raise RuntimeError(f"expected one generated token, got {choice}")
    return seconds


def ttft_seconds(client: httpx.Client, model_id: str) -> float:
    # The rest of a one-token stream (finish and usage chunks) is read too, so the replica
    # is idle again before the next request.
    return stream_chat(client, model_id, max_tokens=1).ttft_s


def in_process_seconds(model: Any, tokenizer: Any) -> float:
    """Template, tokenization and one greedy token, as the replica does them for a request."""
    started = time.perf_counter()
    rendered = tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=False)
    # The template writes BOS itself; encoding must not add a second one.
    prompt = tokenizer.encode(rendered, add_special_tokens=False)
    text = generate(model, tokenizer, prompt, max_tokens=1, sampler=make_sampler(temp=0.0))
    seconds = time.perf_counter() - started
    if not text:
        raise RuntimeError("in-process generation produced no text")
    return seconds


def p99(samples: Sequence[float]) -> float:
    return statistics.quantiles(samples, n=100, method="inclusive")[98]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--url", help="measure this running OpenAI-compatible server instead of ours")
    parser.add_argument("--model", default=MODEL_ID, help="the model name to send with --url")
    parser.add_argument("--peer-name", default="peer", help="names the result: latency_<name>.json")
    args = parser.parse_args()
    repeats, model_id = args.repeats, args.model if args.url else MODEL_ID
    run_started = time.perf_counter()

    model, tokenizer = load(str(ROOT / MODEL_PATH))
    # Figure name -> one sample (milliseconds) per repeat, in the order the table lists them.
    samples: dict[str, list[float]] = defaultdict(list)
    server = nullcontext(args.url.rstrip("/").removesuffix("/v1")) if args.url else serve_app(APP_ARGS)
    with server as base_url, httpx.Client(base_url=base_url, timeout=60) as client, ExitStack() as stack:
        if not args.url:
            wait_until_loaded(client, MODEL_ID)
            # The same stream through Serve's proxy: what direct ingress saves.
            proxied = stack.enter_context(httpx.Client(base_url=proxy_url(), timeout=60))
        modes: dict[str, Callable[[], float]] = {
            "server_e2e": lambda: e2e_seconds(client, model_id),
            "server_ttft": lambda: ttft_seconds(client, model_id),
            **({} if args.url else {"server_ttft_via_proxy": lambda: ttft_seconds(proxied, model_id)}),
            "in_process": lambda: in_process_seconds(model, tokenizer),
        }
        # Untimed: the connection, first-call costs and MLX's first graph of each mode.
        for _ in range(WARM_UP_ROUNDS):
            for run in modes.values():
                run()
        for repeat in range(1, repeats + 1):
            times_ms: dict[str, list[float]] = {name: [] for name in modes}
            for _ in range(ROUNDS):
                for name, run in modes.items():
                    times_ms[name].append(run() * 1000)
            for name, times in times_ms.items():
                samples[f"{name}_p50_ms"].append(statistics.median(times))
                samples[f"{name}_p99_ms"].append(p99(times))
            listed = ", ".join(f"{name} {values[-1]:.2f}" for name, values in samples.items())
            print(f"repeat {repeat}/{repeats} ({ROUNDS} rounds): {listed}", flush=True)

    figures: dict[str, Summary | float] = {name: summarize(v) for name, v in samples.items()}
    # Medians over the repeats: one slow repeat (the machine is shared) should not move it.
    median = {name: statistics.median(values) for name, values in samples.items()}
    figures["overhead_p50_ms"] = median["server_e2e_p50_ms"] - median["in_process_p50_ms"]
    print()
    write_result("latency" if not args.url else f"latency_{args.peer_name}", figures)
    print(f"total run time {time.perf_counter() - run_started:.1f} s")


if __name__ == "__main__":
    main()
