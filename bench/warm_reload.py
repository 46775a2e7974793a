"""Warm reload: a chat's second turn after its model was evicted and loaded again.

    python -m bench.warm_reload [--repeats N]

Per repeat, three new ~2k-token chats on the bench model (their opening words differ, so
none starts from another's cache), one after another:

* kept: turn 1, then turn 2 (turn 1, its answer and a short question) with the model
  loaded all along: turn 2 starts from turn 1's prefix in the in-memory prompt cache;
* reloaded: turn 1, then the model unloaded (its replica saves its prompt cache to disk)
  and loaded again through the admin API (the new replica reads it back), then turn 2.
  Unload and load are timed on their own: turn 2's time to first token is the request's;
* uncached: turn 2 of a chat whose turn 1 was never sent: the whole prompt read.

Targets: reloaded / kept <= 1.5, reloaded / uncached <= 0.2.
"""

from __future__ import annotations

import argparse
import time
from collections import defaultdict

import httpx

from bench.common import Summary, serve_app, summarize, write_result
from bench.throughput import Stream, stream_chat, wait_until_loaded

MODEL_ID = "bench"
# bench-llama-20m: a context of 8192 tokens, and big enough for prefill to cost seconds.
APP_ARGS = {"models": [{"id": MODEL_ID, "path": "models/bench-llama-20m", "pinned": True}]}
STORY = "The river ran past the old mill, the bridge and the sleeping town. " * 60  # ~1950 tokens


def turn(client: httpx.Client, messages: list[dict[str, str]]) -> Stream:
    """One streamed chat turn: time to first text, the answer, and the prompt's usage."""
    return stream_chat(client, MODEL_ID, 16, messages)


def opening(chat: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": f"Chat {chat}. {STORY} What happened?"}]


def second(turn1: list[dict[str, str]], answer: str) -> list[dict[str, str]]:
    return [*turn1, {"role": "assistant", "content": answer}, {"role": "user", "content": "And then?"}]


def timed_post(client: httpx.Client, path: str) -> float:
    started = time.perf_counter()
    client.post(path).raise_for_status()
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    repeats = parser.parse_args().repeats

    samples: dict[str, list[float]] = defaultdict(list)
    with serve_app(APP_ARGS) as base_url, httpx.Client(base_url=base_url, timeout=600) as client:
        wait_until_loaded(client, MODEL_ID)
        turn(client, [{"role": "user", "content": "Warm up."}])  # untimed: first-call costs
        for repeat in range(1, repeats + 1):
            kept_turn1 = opening(f"{repeat}a")
            kept = turn(client, second(kept_turn1, turn(client, kept_turn1).text))

            reloaded_turn1 = opening(f"{repeat}b")
            answer = turn(client, reloaded_turn1).text
            unload_s = timed_post(client, f"/admin/models/{MODEL_ID}/unload")
            load_s = timed_post(client, f"/admin/models/{MODEL_ID}/load")
            reloaded = turn(client, second(reloaded_turn1, answer))

            uncached = turn(client, second(opening(f"{repeat}c"), answer))
            print(
                f"repeat {repeat}/{repeats}: turn 2 TTFT kept {kept.ttft_s:.3f} s, reloaded {reloaded.ttft_s:.3f} s, "
                f"uncached {uncached.ttft_s:.3f} s; unload {unload_s:.2f} s, load {load_s:.2f} s; "
                f"cached/prompt tokens kept {kept.cached_tokens}/{kept.prompt_tokens}, "
                f"reloaded {reloaded.cached_tokens}/{reloaded.prompt_tokens}, "
                f"uncached {uncached.cached_tokens}/{uncached.prompt_tokens}",
                flush=True,
            )
            samples["turn2_ttft_kept_s"].append(kept.ttft_s)
            samples["turn2_ttft_reloaded_s"].append(reloaded.ttft_s)
            samples["turn2_ttft_uncached_s"].append(uncached.ttft_s)
            samples["unload_s"].append(unload_s)
            samples["load_s"].append(load_s)
            samples["turn2_prompt_tokens"].append(reloaded.prompt_tokens)
            samples["turn2_cached_tokens_kept"].append(kept.cached_tokens)
            samples["turn2_cached_tokens_reloaded"].append(reloaded.cached_tokens)
            samples["turn2_cached_tokens_uncached"].append(uncached.cached_tokens)
    figures: dict[str, Summary | float] = {name: summarize(values) for name, values in samples.items()}
    reloaded_median = figures["turn2_ttft_reloaded_s"]["median"]
    figures["reloaded_vs_kept"] = reloaded_median / figures["turn2_ttft_kept_s"]["median"]
    figures["reloaded_vs_uncached"] = reloaded_median / figures["turn2_ttft_uncached_s"]["median"]
    write_result("warm_reload", figures)


if __name__ == "__main__":
    main()
