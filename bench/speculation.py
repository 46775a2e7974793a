"""Speculative decoding (prompt lookup): decode tokens/s with and without it, side by side.

    python -m bench.speculation [--repeats N]

One app serves each model twice, from the same files: as configured by default
(`speculative: prompt_lookup`) and with `speculative: false`. Per repeat, interleaved, one
request at a time (the CPU is the limit), greedy, streamed:

* edit: a 200-line text to copy with three small changes (what agents do to files);
* chat: a free question, nothing to copy;
* edit x4: four edit requests at once (different changes), total tokens over wall time.

The decode rate runs from the first content chunk to the last, over the completion tokens
the usage chunk reports (time to first token excluded: the prompt's reading is the same
work either way, and the prompt cache serves repeats). Both sides must give the same text
(greedy speculation changes nothing but speed); each ratio is speculative over plain.
Also recorded: the acceptance rate per model from /admin/models.

mlx-lm's own server speculates only with a draft model (`--draft-model`): no smaller model
with SmolLM2's or the bench model's tokenizer is in the offline catalog, so it is not run.
"""

from __future__ import annotations

import argparse
import time
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor

import httpx

from bench.common import serve_app, summarize, write_result
from bench.throughput import stream_chat, wait_until_loaded

MODELS = {"smollm2": "models/smollm2-135m-instruct", "bench": "models/bench-llama-20m"}
MAX_TOKENS = 256
LINES = 200  # about 3,900 prompt tokens
CHANGES = [
    ("item 17", "item seventeen"),
    ("item 42", "item forty-two"),
    ("item 99", "item ninety-nine"),
    ("item 120", "item one hundred twenty"),
]


def app_args() -> dict:
    models = []
    for name, path in MODELS.items():
        models.append({"id": name, "path": path, "pinned": True})
        models.append({"id": f"{name}-plain", "path": path, "pinned": True, "speculative": False})
    return {"models": models, "memory_limit": "90%"}


def edit_messages(change: int = 0) -> list[dict[str, str]]:
    text = "\n".join(f"- item {i}: the shelf holds {i * 3} boxes of size {i % 7 + 1}" for i in range(1, LINES + 1))
    old, new = CHANGES[change]
    # The text first: the requests share it as a prefix, which the prompt cache reads once.
    ask = f"{text}\n\nRewrite the list above exactly, changing only `{old}` to `{new}`."
    return [{"role": "user", "content": ask}]


CHAT = [{"role": "user", "content": "Tell me about the history of the bicycle."}]


def speculation_of(client: httpx.Client, model_id: str) -> dict:
    models = client.get("/admin/models").raise_for_status().json()["models"]
    return next(m for m in models if m["id"] == model_id)["speculation"] or {}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=2)
    repeats = parser.parse_args().repeats
    started = time.perf_counter()
    samples: dict[str, list[float]] = defaultdict(list)
    with (
        serve_app(app_args(), name="bench-speculation") as base_url,
        httpx.Client(base_url=base_url, timeout=900) as client,
        ThreadPoolExecutor(max_workers=4) as pool,
    ):
        for name in MODELS:
            for model_id in (name, f"{name}-plain"):
                wait_until_loaded(client, model_id)
                print(f"{model_id}: reading the text into the prompt cache", flush=True)
                stream_chat(client, model_id, 8, edit_messages())
        for repeat in range(repeats):
            for name in MODELS:
                texts: dict[str, dict[str, str]] = defaultdict(dict)
                for model_id in (f"{name}-plain", name):
                    side = "plain" if model_id.endswith("-plain") else "speculative"
                    for task, messages in (("edit", edit_messages()), ("chat", CHAT)):
                        result = stream_chat(client, model_id, MAX_TOKENS, messages)
                        samples[f"{name}_{task}_{side}_tok_s"].append(result.decode_tok_s)
                        texts[task][side] = result.text
                        print(f"repeat {repeat + 1} {model_id} {task}: {result.decode_tok_s:.1f} tok/s "
                              f"({result.completion_tokens} tokens)")
                    wall = time.perf_counter()
                    runs = list(pool.map(lambda c: stream_chat(client, model_id, MAX_TOKENS, edit_messages(c)), range(4)))
                    rate = sum(r.completion_tokens for r in runs) / (time.perf_counter() - wall)
                    samples[f"{name}_edit_x4_{side}_tok_s"].append(rate)
                    print(f"repeat {repeat + 1} {model_id} edit x4: {rate:.1f} tok/s")
                for task, sides in texts.items():
                    if sides["plain"] != sides["speculative"]:
                        raise RuntimeError(f"{name} {task}: the speculative text differs from the plain one")
        figures: dict = {}
        for key, values in samples.items():
            figures[key] = summarize(values)
        for name in MODELS:
            for task in ("edit", "chat", "edit_x4"):
                ratios = [
                    s / p
                    for s, p in zip(samples[f"{name}_{task}_speculative_tok_s"], samples[f"{name}_{task}_plain_tok_s"])
                ]
                figures[f"{name}_{task}_speculative_over_plain"] = summarize(ratios)
            counts = speculation_of(client, name)
            figures[f"{name}_acceptance_rate"] = counts.get("acceptance_rate") or 0.0
            figures[f"{name}_accepted_tokens"] = counts.get("accepted_tokens", 0)
            figures[f"{name}_proposed_tokens"] = counts.get("proposed_tokens", 0)
    figures["wall_s"] = time.perf_counter() - started
    write_result("speculation", figures)


if __name__ == "__main__":
    main()
