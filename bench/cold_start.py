"""Cold start: the first token from an unloaded model, against loading it in plain Python.

    python -m bench.cold_start [--repeats N]

Per repeat, interleaved so that both see the same machine load:

* server: a streaming chat request to the unloaded model through HTTP, timed to its first
  content chunk (replica start + import + load + first token); the same request again,
  now warm; then the admin unload of the loaded, idle model (eviction).
* in-process: a fresh interpreter that imports mlx_lm, loads the same directory and
  generates the first token of the same chat; its whole wall time (process start included)
  is the reference of `cold_start_ratio`.

The server waits, before each cold request, until its warm worker is ready (the state a
load finds unless loads follow each other within seconds); a second server with
`warm_workers: false` gives the same figure without one.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import httpx

from bench.common import ROOT, Summary, serve_app, summarize, write_result

MODEL_ID = "bench"
MODEL_PATH = "models/bench-llama-20m"
APP_ARGS = {
    "models": [
        {"id": MODEL_ID, "path": MODEL_PATH},
        {"id": "tiny", "path": "models/tiny-llama"},
    ],
}
CHAT = {
    "model": MODEL_ID,
    "messages": [{"role": "user", "content": "Say hello."}],
    "stream": True,
    # A few tokens rather than one: a first token with no text (end of sequence, part of a
    # character) would end a one-token stream without any content chunk.
    "max_tokens": 8,
    "temperature": 0,
}

# Runs in a fresh interpreter: what a script pays to get the model into memory by itself.
IN_PROCESS = """
import json, sys, time
started = time.perf_counter()
import mlx_lm
model, tokenizer = mlx_lm.load(sys.argv[1])
loaded = time.perf_counter() - started
prompt = tokenizer.apply_chat_template([{"role": "user", "content": "Say hello."}], add_generation_prompt=True)
next(mlx_lm.stream_generate(model, tokenizer, prompt, max_tokens=1))
print(json.dumps({"import_and_load_s": loaded, "since_launch_s": time.time() - float(sys.argv[2])}))
"""


def first_token_seconds(client: httpx.Client) -> float:
    """Seconds from sending the request to its first chunk with generated text.

    The rest of the stream is read too, so the model is idle again when this returns.
    """
    started = time.perf_counter()
    first: float | None = None
    with client.stream("POST", "/v1/chat/completions", json=CHAT) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if first is None and has_content(line):
                first = time.perf_counter() - started
    if first is None:
        raise RuntimeError("the stream ended without any content chunk")
    return first


def has_content(line: str) -> bool:
    """Whether a server-sent-events line is a chunk carrying generated text."""
    if not line.startswith("data: ") or line == "data: [DONE]":
        return False
    chunk = json.loads(line.removeprefix("data: "))
    if "error" in chunk:
        raise RuntimeError(f"stream failed: {chunk['error']}")
    # The opening chunk carries only the role, with empty content.
    return bool(chunk["choices"] and chunk["choices"][0]["delta"].get("content"))


def model_status(client: httpx.Client) -> str:
    models = client.get("/admin/models").raise_for_status().json()["models"]
    return next(m["status"] for m in models if m["id"] == MODEL_ID)


def unload_seconds(client: httpx.Client) -> float:
    """Time the admin unload; it answers once the model's replica is gone."""
    started = time.perf_counter()
    response = client.post(f"/admin/models/{MODEL_ID}/unload").raise_for_status()
    seconds = time.perf_counter() - started
    if response.json()["status"] != "unloaded" or model_status(client) != "unloaded":
        raise RuntimeError(f"model {MODEL_ID} still loaded after unload: {response.json()}")
    return seconds


def in_process_seconds() -> tuple[float, float]:
    """(import + load measured inside a fresh interpreter, seconds from launching it to its
    first token)."""
    done = subprocess.run(
        [sys.executable, "-c", IN_PROCESS, str(ROOT / MODEL_PATH), repr(time.time())],
        capture_output=True,
        text=True,
        check=True,
        cwd=ROOT,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    figures = json.loads(done.stdout.strip().splitlines()[-1])
    return figures["import_and_load_s"], figures["since_launch_s"]


def wait_for_warm_worker(client: httpx.Client, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not any(w["ready"] for w in client.get("/admin/models").raise_for_status().json()["warm_workers"]):
        if time.monotonic() > deadline:
            raise RuntimeError(f"no warm worker ready after {timeout:.0f} s")
        time.sleep(0.2)


def cold_without_warm_worker(repeats: int) -> list[float]:
    cold = []
    with serve_app({**APP_ARGS, "warm_workers": False}, name="cold") as base_url, httpx.Client(
        base_url=base_url, timeout=300
    ) as client:
        for _ in range(repeats):
            cold.append(first_token_seconds(client))
            unload_seconds(client)
            print(f"without a warm worker: cold {cold[-1]:.3f} s", flush=True)
    return cold


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    repeats = parser.parse_args().repeats
    run_started = time.perf_counter()

    cold: list[float] = []
    warm: list[float] = []
    eviction: list[float] = []
    in_process: list[float] = []
    process: list[float] = []
    with serve_app(APP_ARGS) as base_url, httpx.Client(base_url=base_url, timeout=300) as client:
        for repeat in range(1, repeats + 1):
            # Unloaded before every cold request: the start settles, then each repeat unloads.
            if model_status(client) != "unloaded":
                raise RuntimeError(f"model {MODEL_ID} is not unloaded before repeat {repeat}")
            wait_for_warm_worker(client)
            cold.append(first_token_seconds(client))
            warm.append(first_token_seconds(client))
            eviction.append(unload_seconds(client))
            wait_for_warm_worker(client)  # its imports would slow the fresh interpreter down
            load, wall = in_process_seconds()
            in_process.append(load)
            process.append(wall)
            print(
                f"repeat {repeat}/{repeats}: cold {cold[-1]:.3f} s, warm {warm[-1]:.3f} s, "
                f"eviction {eviction[-1]:.3f} s, in-process load {load:.3f} s (to first token, "
                f"process start included: {wall:.3f} s)",
                flush=True,
            )
    unwarmed = cold_without_warm_worker(max(2, repeats // 2))

    figures: dict[str, Summary | float] = {
        "server_cold_first_token_s": summarize(cold),
        "server_cold_first_token_without_warm_worker_s": summarize(unwarmed),
        "server_warm_first_token_s": summarize(warm),
        "in_process_import_and_load_s": summarize(in_process),
        "in_process_first_token_with_process_start_s": summarize(process),
        "eviction_s": summarize(eviction),
    }
    # Medians: one slow repeat (the machine is shared) should not move the ratio.
    figures["cold_start_ratio"] = statistics.median(cold) / statistics.median(process)
    figures["cold_start_ratio_without_warm_worker"] = statistics.median(unwarmed) / statistics.median(process)
    print()
    write_result("cold_start", figures)
    print(f"total run time {time.perf_counter() - run_started:.1f} s")


if __name__ == "__main__":
    main()
