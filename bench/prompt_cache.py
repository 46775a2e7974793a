"""Prompt cache: time to first token of a chat's second turn against its first.

    python -m bench.prompt_cache [--repeats N]

Per repeat, a new long chat (its opening words differ, so nothing is cached from earlier
repeats) on the pinned bench model:

* turn 1: a ~500-token user message, streamed; time to first token (the whole prompt read);
* turn 2: turn 1, its answer and a short question; with the prompt cache the server reads
  only what follows the cached prefix;
* in-process reference: `mlx_lm.stream_generate` on turn 2's prompt with no cache, in this
  process, interleaved: what reading the whole second prompt costs.

Target: turn 2's time to first token <= 0.5 x turn 1's.
"""

from __future__ import annotations

import argparse
import time
from collections import defaultdict
from typing import Any

import httpx
from mlx_lm import load, stream_generate

from bench.common import ROOT, Summary, serve_app, summarize, write_result
from bench.throughput import stream_chat, wait_until_loaded

MODEL_ID = "bench"
MODEL_PATH = "models/bench-llama-20m"
APP_ARGS = {"models": [{"id": MODEL_ID, "path": MODEL_PATH, "pinned": True}]}
STORY = "The river ran past the old mill, the bridge and the sleeping town. " * 30


def turn_ttft(client: httpx.Client, messages: list[dict[str, str]]) -> tuple[float, str]:
    """Seconds to the first generated text of a streamed chat, and the whole answer."""
    turn = stream_chat(client, MODEL_ID, 16, messages)
    return turn.ttft_s, turn.text


def in_process_ttft(model: Any, tokenizer: Any, messages: list[dict[str, str]]) -> float:
    started = time.perf_counter()
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    for response in stream_generate(model, tokenizer, prompt, max_tokens=16):
        if response.text:
            return time.perf_counter() - started
    raise RuntimeError("no text generated")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    repeats = parser.parse_args().repeats

    model, tokenizer = load(str(ROOT / MODEL_PATH))
    samples: dict[str, list[float]] = defaultdict(list)
    with serve_app(APP_ARGS) as base_url, httpx.Client(base_url=base_url, timeout=300) as client:
        wait_until_loaded(client, MODEL_ID)
        for repeat in range(repeats + 1):  # the first round warms up and is not counted
            turn1 = [{"role": "user", "content": f"Chat {repeat}. {STORY} What happened?"}]
            first_ttft, answer = turn_ttft(client, turn1)
            turn2 = turn1 + [
                {"role": "assistant", "content": answer},
                {"role": "user", "content": "And then?"},
            ]
            second_ttft, _ = turn_ttft(client, turn2)
            reference = in_process_ttft(model, tokenizer, turn2)
            if repeat == 0:
                continue
            print(f"repeat {repeat}/{repeats}: turn 1 {first_ttft:.3f} s, turn 2 {second_ttft:.3f} s, "
                  f"in-process turn 2 without cache {reference:.3f} s")
            samples["server_turn1_ttft_s"].append(first_ttft)
            samples["server_turn2_ttft_s"].append(second_ttft)
            samples["in_process_turn2_uncached_ttft_s"].append(reference)
    figures: dict[str, Summary | float] = {name: summarize(v) for name, v in samples.items()}
    figures["turn2_vs_turn1"] = figures["server_turn2_ttft_s"]["median"] / figures["server_turn1_ttft_s"]["median"]
    figures["turn2_vs_in_process_uncached"] = (
        figures["server_turn2_ttft_s"]["median"] / figures["in_process_turn2_uncached_ttft_s"]["median"]
    )
    write_result("prompt_cache", figures)


if __name__ == "__main__":
    main()
