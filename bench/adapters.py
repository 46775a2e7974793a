"""LoRA adapters against full copies, in one sitting on one server: 8 adapters of the bench
model against 8 copies of it — the memory each holds, how long each takes to load, and the
throughput of traffic spread over the adapters against traffic to one.

    python -m bench.adapters [--repeats N]

The adapters are fabricated (random rank-8 matrices on every linear layer, mlx-lm's format)
into a temporary folder; the copies are the bench model under 8 ids. Everything is charged
as measured (no `memory:` overrides).
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

from bench.common import ROOT, Summary, serve_app, summarize, write_result

BASE = "bench-llama-20m"
N = 8
MAX_TOKENS = 32
STREAMS = 8


def fabricate(directory: Path) -> list[Path]:
    spec = importlib.util.spec_from_file_location("make_demo_models", ROOT / "scripts" / "make_demo_models.py")
    demo = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = demo  # its dataclasses look their module up
    spec.loader.exec_module(demo)
    paths = []
    for i in range(N):
        out = directory / f"lora-{i}"
        out.mkdir()
        # make_demo_models builds from its output folder's parent: the base lives in models/.
        (directory / BASE).exists() or (directory / BASE).symlink_to(ROOT / "models" / BASE)
        demo.lora_builder(BASE, seed=100 + i, rank=8)(out, out.name)
        paths.append(out)
    return paths


def admin(client: httpx.Client) -> dict:
    return client.get("/admin/models").raise_for_status().json()


def preload_seconds(client: httpx.Client, model_id: str) -> float:
    started = time.perf_counter()
    client.post(f"/admin/models/{model_id}/load", json={"pin": False}).raise_for_status()
    return time.perf_counter() - started


def unload(client: httpx.Client, ids: list[str]) -> None:
    for model_id in ids:
        client.post(f"/admin/models/{model_id}/unload").raise_for_status()


def tokens_per_second(client: httpx.Client, pool: ThreadPoolExecutor, models: list[str]) -> float:
    """Aggregate completion tokens/s of one request to each of `models`, all at once."""

    def one(model_id: str) -> int:
        body = {"model": model_id, "prompt": "Once upon a time", "max_tokens": MAX_TOKENS, "temperature": 0}
        return client.post("/v1/completions", json=body).raise_for_status().json()["usage"]["completion_tokens"]

    started = time.perf_counter()
    tokens = sum(pool.map(one, models))
    return tokens / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    repeats = parser.parse_args().repeats
    folder = tempfile.TemporaryDirectory(prefix="mlx-fleet-bench-adapters-")
    adapters = fabricate(Path(folder.name))
    lora_ids = [f"lora-{i}" for i in range(N)]
    copy_ids = [f"copy-{i}" for i in range(N)]
    args = {
        "memory_limit": "80%",
        "models": [
            {"id": BASE, "path": f"models/{BASE}"},
            *({"id": i, "base": BASE, "path": str(p)} for i, p in zip(lora_ids, adapters)),
            *({"id": i, "path": f"models/{BASE}"} for i in copy_ids),
        ],
    }
    samples: dict[str, list[float]] = {}

    def sample(name: str, value: float) -> None:
        samples.setdefault(name, []).append(value)

    with serve_app(args, name="bench-adapters") as url, httpx.Client(base_url=url, timeout=600) as client, \
            ThreadPoolExecutor(STREAMS) as pool:
        for repeat in range(1, repeats + 1):
            sample("base_load_s", preload_seconds(client, BASE))
            for model_id in lora_ids:
                sample("adapter_load_s", preload_seconds(client, model_id))
            view = {m["id"]: m for m in admin(client)["models"]}
            sample("base_bytes", view[BASE]["memory_bytes"])
            sample("adapter_bytes", statistics.median(view[i]["memory_bytes"] for i in lora_ids))
            sample("base_and_8_adapters_bytes", view[BASE]["memory_bytes"] + sum(view[i]["memory_bytes"] for i in lora_ids))
            tokens_per_second(client, pool, [lora_ids[0]] * STREAMS)  # warm-up, untimed
            sample("one_adapter_8_streams_tok_s", tokens_per_second(client, pool, [lora_ids[0]] * STREAMS))
            sample("8_adapters_8_streams_tok_s", tokens_per_second(client, pool, lora_ids))
            sample("base_8_streams_tok_s", tokens_per_second(client, pool, [BASE] * STREAMS))
            unload(client, [*lora_ids, BASE])
            for model_id in copy_ids:
                sample("copy_load_s", preload_seconds(client, model_id))
            view = {m["id"]: m for m in admin(client)["models"]}
            sample("8_copies_bytes", sum(view[i]["memory_bytes"] for i in copy_ids))
            sample("8_copies_8_streams_tok_s", tokens_per_second(client, pool, copy_ids))
            unload(client, copy_ids)
            print(f"repeat {repeat}/{repeats}: " + ", ".join(f"{k} {v[-1]:.3g}" for k, v in samples.items()), flush=True)
    folder.cleanup()

    figures: dict[str, Summary | float] = {name: summarize(values) for name, values in samples.items()}
    median = {name: statistics.median(values) for name, values in samples.items()}
    figures["copy_bytes_per_adapter_bytes"] = median["8_copies_bytes"] / N / median["adapter_bytes"]
    figures["8_adapters_vs_8_copies_memory"] = median["base_and_8_adapters_bytes"] / median["8_copies_bytes"]
    figures["copy_load_per_adapter_load"] = median["copy_load_s"] / median["adapter_load_s"]
    figures["mixed_vs_one_adapter_throughput"] = median["8_adapters_8_streams_tok_s"] / median["one_adapter_8_streams_tok_s"]
    figures["mixed_adapters_vs_8_copies_throughput"] = median["8_adapters_8_streams_tok_s"] / median["8_copies_8_streams_tok_s"]
    write_result("adapters", figures)


if __name__ == "__main__":
    main()
