"""Embeddings throughput: texts per second through the server, against mlx_embeddings in-process.

    python -m bench.embeddings [--repeats N]

Per repeat, interleaved so that all see the same machine load, the same 64 sentences:

* server, one request: all 64 texts in one /v1/embeddings request.
* in-process: tokenize, forward and conversion to lists of floats with mlx_embeddings in this
  process; what the server computes for that request, without HTTP, JSON and Ray.
* server, concurrent: 64 single-text requests at once; dynamic batching (`@serve.batch`)
  lets them share forward passes.
* server, sequential: the same 64 single-text requests one after another.
"""

from __future__ import annotations

import argparse
import random
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from typing import Any, Callable

import httpx
import mlx.core as mx
import mlx_embeddings
import numpy as np

from bench.common import ROOT, Summary, serve_app, summarize, write_result

MODEL_ID = "minilm"
MODEL_PATH = "models/all-MiniLM-L6-v2"
APP_ARGS = {"models": [{"id": MODEL_ID, "path": MODEL_PATH, "pinned": True}]}
# The model's max_seq_length (sentence_bert_config.json), which the server truncates to too.
MAX_LENGTH = 256
TEXTS = 64
# Server and in-process vectors are the same computation; they differ only by float32
# rounding, which depends on how much padding shares a forward pass.
TOLERANCE = 1e-4
LOAD_TIMEOUT_S = 300

ONE_REQUEST = "server_one_request_64_texts_per_s"
IN_PROCESS = "in_process_64_texts_per_s"
CONCURRENT = "server_64_concurrent_single_texts_per_s"
SEQUENTIAL = "server_64_sequential_single_texts_per_s"

WORDS = (
    "the a small old quiet river city market garden teacher student doctor farmer train "
    "bridge window morning evening winter summer bright cold heavy slowly carefully "
    "walks reads builds paints carries watches finds opens closes remembers near under "
    "across behind through before after with without because while every another "
    "yellow green stone wooden letter story song lamp road hill harbor boat mountain "
    "forest kitchen library festival storm silence journey question answer"
).split()

Vectors = list[list[float]]


def make_sentences(count: int, seed: int = 0) -> list[str]:
    """`count` distinct sentences of 10 to 20 words, the same on every run."""
    rng = random.Random(seed)
    sentences: list[str] = []
    while len(sentences) < count:
        sentence = " ".join(rng.choices(WORDS, k=rng.randint(10, 20))).capitalize() + "."
        if sentence not in sentences:
            sentences.append(sentence)
    return sentences


def embed_texts(client: httpx.Client, texts: list[str] | str) -> Vectors:
    """Vectors for `texts` (one text or a list) from one /v1/embeddings request."""
    response = client.post(
        "/v1/embeddings", json={"model": MODEL_ID, "input": texts, "encoding_format": "float"}
    )
    response.raise_for_status()
    return [item["embedding"] for item in response.json()["data"]]


def embed_text(client: httpx.Client, text: str) -> list[float]:
    return embed_texts(client, text)[0]


def embed_in_process(model: Any, tokenizer: Any, texts: list[str]) -> Vectors:
    inputs = tokenizer.batch_encode_plus(
        texts, return_tensors="mlx", padding=True, truncation=True, max_length=MAX_LENGTH
    )
    embeds = model(inputs["input_ids"], attention_mask=inputs["attention_mask"]).text_embeds
    mx.eval(embeds)
    # The server also turns its vectors into Python floats for the JSON answer.
    return embeds.tolist()


def model_status(client: httpx.Client) -> str:
    models = client.get("/admin/models").raise_for_status().json()["models"]
    return next(m["status"] for m in models if m["id"] == MODEL_ID)


def wait_until_loaded(client: httpx.Client) -> None:
    """A pinned model loads in the background after the app starts; wait for its weights."""
    deadline = time.monotonic() + LOAD_TIMEOUT_S
    while (status := model_status(client)) != "loaded":
        if time.monotonic() > deadline:
            raise TimeoutError(f"model {MODEL_ID} not loaded after {LOAD_TIMEOUT_S} s: {status}")
        time.sleep(0.5)


def max_difference(vectors: Vectors, reference: Vectors) -> float:
    return float(np.max(np.abs(np.array(vectors) - np.array(reference))))


def check_results(results: dict[str, Vectors]) -> None:
    """Every mode must give the one-request vectors, so the rates are for the same work."""
    reference = results[ONE_REQUEST]
    differences = {
        name: max_difference(vectors, reference)
        for name, vectors in results.items()
        if name != ONE_REQUEST
    }
    listed = ", ".join(f"{name} {difference:.1e}" for name, difference in differences.items())
    print(f"max |difference| from the one-request vectors: {listed}")
    wrong = {name: d for name, d in differences.items() if d > TOLERANCE}
    if wrong:
        raise RuntimeError(f"vectors differ from one request's by over {TOLERANCE}: {wrong}")


def texts_per_second(run: Callable[[], Vectors]) -> float:
    started = time.perf_counter()
    run()
    return TEXTS / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    repeats = parser.parse_args().repeats
    run_started = time.perf_counter()

    sentences = make_sentences(TEXTS)
    model, tokenizer = mlx_embeddings.load(str(ROOT / MODEL_PATH))
    rates: dict[str, list[float]] = {
        name: [] for name in (ONE_REQUEST, IN_PROCESS, CONCURRENT, SEQUENTIAL)
    }
    # Enough connections (kept alive between rounds) and threads for all requests at once.
    limits = httpx.Limits(max_connections=TEXTS, max_keepalive_connections=TEXTS)
    with (
        serve_app(APP_ARGS) as base_url,
        httpx.Client(base_url=base_url, timeout=600, limits=limits) as client,
        ThreadPoolExecutor(max_workers=TEXTS) as pool,
    ):
        wait_until_loaded(client)
        one_text = partial(embed_text, client)
        modes: dict[str, Callable[[], Vectors]] = {
            ONE_REQUEST: lambda: embed_texts(client, sentences),
            IN_PROCESS: lambda: embed_in_process(model, tokenizer, sentences),
            CONCURRENT: lambda: list(pool.map(one_text, sentences)),
            SEQUENTIAL: lambda: [one_text(sentence) for sentence in sentences],
        }
        # Untimed warm-up (connections, threads, first-call costs), checked once for correctness.
        check_results({name: run() for name, run in modes.items()})
        for repeat in range(1, repeats + 1):
            for name, run in modes.items():
                rates[name].append(texts_per_second(run))
            print(
                f"repeat {repeat}/{repeats}: texts/s one request {rates[ONE_REQUEST][-1]:.1f}, "
                f"in-process {rates[IN_PROCESS][-1]:.1f}, concurrent {rates[CONCURRENT][-1]:.1f}, "
                f"sequential {rates[SEQUENTIAL][-1]:.1f}",
                flush=True,
            )

    figures: dict[str, Summary | float] = {name: summarize(rate) for name, rate in rates.items()}
    # Medians: one slow repeat (the machine is shared) should not move the ratios.
    median = {name: statistics.median(samples) for name, samples in rates.items()}
    figures["one_request_vs_in_process"] = median[ONE_REQUEST] / median[IN_PROCESS]
    figures["concurrent_vs_sequential"] = median[CONCURRENT] / median[SEQUENTIAL]
    print()
    write_result("embeddings", figures)
    print(f"total run time {time.perf_counter() - run_started:.1f} s")


if __name__ == "__main__":
    main()
