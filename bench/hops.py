"""Where a request's time goes: each hop of the serving path, measured by requests that
stop at successive depths.

    python -m bench.hops [--repeats N]

Per repeat, 200 sequential requests of each kind on one keep-alive connection, interleaved:

* `GET /health`: HTTP proxy -> ingress, nothing else;
* `GET /v1/models`: the same plus one call to the controller;
* a one-token chat to a pinned tiny model: proxy -> ingress -> controller acquire -> model
  replica (template, tokenize, one token) -> release (sent after answering);
* in-process: the model's own work for that chat, without any hop.

Differences of p50s attribute the time: controller hop = models - health; model hop and
its work = chat - models; serving overhead = chat - in-process.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections import defaultdict
from typing import Callable

import httpx
from mlx_lm import load

from bench.common import ROOT, Summary, serve_app, summarize, write_result
from bench.latency import APP_ARGS, MODEL_ID, MODEL_PATH, e2e_seconds, in_process_seconds
from bench.throughput import wait_until_loaded

ROUNDS = 200


def timed_get(client: httpx.Client, path: str) -> float:
    started = time.perf_counter()
    client.get(path).raise_for_status()
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    repeats = parser.parse_args().repeats

    model, tokenizer = load(str(ROOT / MODEL_PATH))
    samples: dict[str, list[float]] = defaultdict(list)
    with serve_app(APP_ARGS) as base_url, httpx.Client(base_url=base_url, timeout=60) as client:
        wait_until_loaded(client, MODEL_ID)
        kinds: dict[str, Callable[[], float]] = {
            "health": lambda: timed_get(client, "/health"),
            "models": lambda: timed_get(client, "/v1/models"),
            "chat": lambda: e2e_seconds(client),
            "in_process": lambda: in_process_seconds(model, tokenizer),
        }
        for kind in kinds.values():  # warm-up
            kind()
        for _ in range(repeats):
            rounds: dict[str, list[float]] = defaultdict(list)
            for _ in range(ROUNDS):
                for name, kind in kinds.items():
                    rounds[name].append(kind() * 1000)
            for name, values in rounds.items():
                samples[f"{name}_p50_ms"].append(statistics.median(values))
    figures: dict[str, Summary | float] = {name: summarize(v) for name, v in samples.items()}
    p50 = {name: figures[f"{name}_p50_ms"]["median"] for name in kinds}
    figures["proxy_and_ingress_ms"] = p50["health"]
    figures["controller_hop_ms"] = p50["models"] - p50["health"]
    figures["acquire_model_hop_and_work_ms"] = p50["chat"] - p50["models"]
    figures["serving_overhead_ms"] = p50["chat"] - p50["in_process"]
    write_result("hops", figures)


if __name__ == "__main__":
    main()
