"""Soak: mixed traffic over every demo model under a memory budget that forces evictions.

    python -m bench.soak [--minutes 10] [--concurrency 6] [--warmup-seconds 30] [--seed 0]

All seven demo models are served with an explicit `memory` each (1 GB per generative model,
0.5 GB for the embeddings model) and a `memory_limit` of 2.5 GB, so at most three fit at
once and the controller evicts the least recently used model all the time. `--concurrency`
asyncio tasks share one keep-alive httpx client and send, one request after another:

* chat (plain, and streamed with `stream_options.include_usage`), /v1/completions: 8 to 32
  tokens, a quarter greedy (temperature 0), a quarter with a seed; the model picked with a
  skew, two hot models and three cold ones;
* embeddings of 1 to 16 sentences; vision chats with a small in-memory PNG as a data: URL;
* about 2 % deliberately bad requests (negative seed, unknown model, malformed JSON, a model
  asked for what it does not serve, an image for a text model), which must get a 4xx:
  counted as "expected_4xx", apart from the other 4xx.

Phases: a warm-up of the same traffic (it starts with one request per model, so every model
has been loaded once), traffic stops, 10 s settle, then the start snapshot; then the soak
for `--minutes`, traffic stops, 10 s settle, the end snapshot. A snapshot is the RSS of every
process of the stack (all descendants of this process, labelled as in bench.memory) and
`GET /admin/models`.

Reported, for the soak phase only (warm-up outcomes are printed and kept in the details):

* requests by outcome: 200, expected 4xx, unexpected 4xx, 5xx, client timeouts (120 s per
  request, whole stream included) and connection errors; a 200 stream counts as failed if it
  does not end with `data: [DONE]`, carries an error event or lacks the usage chunk, a 200
  body as failed if it is not the expected shape; requests/s over the soak's wall time.
* latency per kind (chat plain, chat stream to its last byte, completions, embeddings,
  vision) over the successful requests: min/median/max/n, p50 (the median) and p99 (nearest
  rank). Waits for cold loads are included: that is what a client of a fleet that evicts sees.
* loads and evictions: the sums over the models of `/admin/models`' counters, end minus start.
* RSS, start against end. Processes other than model replicas (GCS, raylet, agents, Serve
  controller, proxy, ingress, fleet-controller) are matched by pid: their total must stay
  within 5 %. Model replicas come and go with evictions: they are matched by label (the
  deployment), and the sum of those present at both times is compared the same way.
  Processes present at only one of the two times (replicas of other models, Ray's idle
  workers) are listed apart. The same long-lived processes are also sampled every 5 s while
  traffic runs: their growth from the soak's midpoint to its end tells a trend from warm-up.
* after traffic: leases left on any model (must be 0) and used_bytes <= memory_limit_bytes.
  During traffic `/admin/models` is sampled every 5 s: the highest used_bytes seen (it may
  pass the limit while evicted models are still unloading for one that waits to load), and
  whether the loaded and loading models, those that may have a replica at the same time,
  ever add up to more than the limit.

The figures go to bench/results/soak.json as usual; the per-process table, the counts per
kind and outcome, the error messages and the 5 s samples go to its "details". MB are 10**6
bytes, as in the server's logs.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import math
import random
import statistics
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Any

import httpx
import psutil

from bench.common import Summary, serve_app, summarize, write_result
from bench.memory import MB, Snapshot, settled_snapshot, stack_snapshot, total
from policies.config import deployment_name

APP_NAME = "bench"  # serve_app's default; replica processes are ray::ServeReplica:<app>:<deployment>
TEXT_MODELS = {  # id -> weight: two hot, three cold
    "tiny-llama": 40,
    "bench-llama-20m": 30,
    "tiny-qwen2": 10,
    "tiny-mistral": 10,
    "tiny-gemma": 10,
}
VISION_MODEL = "tiny-qwen2-vl"
EMBEDDINGS_MODEL = "all-MiniLM-L6-v2"
ALL_MODELS = [*TEXT_MODELS, VISION_MODEL, EMBEDDINGS_MODEL]
MODEL_DEPLOYMENTS = {deployment_name(m): m for m in ALL_MODELS}
APP_ARGS: dict[str, Any] = {
    "memory_limit": "2.5GB",
    "load_wait_timeout": "60s",
    "models": [
        {
            "id": model_id,
            "path": f"models/{model_id}",
            "memory": "0.5GB" if model_id == EMBEDDINGS_MODEL else "1GB",
        }
        for model_id in ALL_MODELS
    ],
}
# Request kind -> weight (percent).
MIX = {
    "chat_plain": 35,
    "chat_stream": 30,
    "completions": 10,
    "embeddings": 13,
    "vision": 10,
    "bad": 2,
}
LATENCY_KINDS = ("chat_plain", "chat_stream", "completions", "embeddings", "vision")
REQUEST_TIMEOUT_S = 120.0
SETTLE_S = 10.0
MONITOR_INTERVAL_S = 5.0
FLAT_TOLERANCE_PCT = 5.0
COMMITTED = ("loaded", "loading")  # statuses whose model may have a replica running

# Outcomes. A request is "ok" or exactly one of the failures; bad requests are "expected_4xx"
# when refused with a 4xx and "bad_not_rejected" otherwise.
OK = "ok_200"
EXPECTED_4XX = "expected_4xx"
OUTCOMES = (
    OK,
    EXPECTED_4XX,
    "unexpected_4xx",
    "server_5xx",
    "stream_failed",
    "bad_body_200",
    "bad_not_rejected",
    "client_timeout",
    "connection_error",
    "other_status",
)
FAILURES = tuple(o for o in OUTCOMES if o not in (OK, EXPECTED_4XX))

PROMPTS = (
    "Say hello.",
    "Write a short poem about a river.",
    "What is the capital of France?",
    "List three colors.",
    "Tell me a story about a lighthouse keeper.",
    "Explain what a cache is in one sentence.",
    "Count from one to ten.",
    "Describe a quiet morning in a small town.",
)
SENTENCES = (
    "The old bridge crosses the river near the market.",
    "A teacher reads a letter in the library.",
    "Winter storms close the mountain road.",
    "The harbor is quiet in the evening.",
    "Every summer the festival fills the city with music.",
    "She carefully paints the wooden boat green.",
    "A train passes behind the forest before dawn.",
    "The kitchen window opens onto a small garden.",
)


def png_data_url(size: int = 64) -> str:
    """A small PNG (a red square on a blue ground) as a data: URL, made in memory."""
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (size, size), (30, 60, 200))
    ImageDraw.Draw(image).rectangle((size // 4, size // 4, 3 * size // 4, 3 * size // 4), fill=(220, 30, 30))
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return f"data:image/png;base64,{base64.b64encode(buffer.getvalue()).decode()}"


IMAGE_URL = png_data_url()


# -- requests ---------------------------------------------------------------------------------


@dataclass
class Request:
    kind: str  # a MIX key
    model: str
    path: str
    body: dict[str, Any] | None = None
    raw: bytes | None = None  # sent as is instead of `body` (malformed JSON)
    variant: str = ""  # which bad request
    inputs: int = 0  # embeddings: how many vectors the answer must hold

    @property
    def stream(self) -> bool:
        return bool(self.body and self.body.get("stream"))


@dataclass
class Outcome:
    request: Request
    outcome: str
    status: int | None
    seconds: float
    message: str | None = None  # why it failed: the error body, event or exception


def sampling(rng: random.Random) -> dict[str, Any]:
    """Small max_tokens; a quarter greedy, a quarter seeded, the rest the server's default."""
    options: dict[str, Any] = {"max_tokens": rng.randint(8, 32)}
    draw = rng.random()
    if draw < 0.25:
        options["temperature"] = 0
    elif draw < 0.5:
        options["seed"] = rng.randrange(2**32)
        options["temperature"] = 0.7
    return options


def chat_request(rng: random.Random, model: str, stream: bool) -> Request:
    body = {"model": model, "messages": [{"role": "user", "content": rng.choice(PROMPTS)}]}
    body |= sampling(rng)
    if stream:
        body |= {"stream": True, "stream_options": {"include_usage": True}}
    return Request("chat_stream" if stream else "chat_plain", model, "/v1/chat/completions", body)


def completion_request(rng: random.Random, model: str) -> Request:
    body = {"model": model, "prompt": rng.choice(PROMPTS)} | sampling(rng)
    return Request("completions", model, "/v1/completions", body)


def embeddings_request(rng: random.Random) -> Request:
    texts = rng.choices(SENTENCES, k=rng.randint(1, 16))
    body = {"model": EMBEDDINGS_MODEL, "input": texts}
    return Request("embeddings", EMBEDDINGS_MODEL, "/v1/embeddings", body, inputs=len(texts))


def vision_request(rng: random.Random) -> Request:
    parts = [
        {"type": "text", "text": rng.choice(("What is in the picture?", "Describe the colors."))},
        {"type": "image_url", "image_url": {"url": IMAGE_URL}},
    ]
    body = {"model": VISION_MODEL, "messages": [{"role": "user", "content": parts}]}
    body |= sampling(rng) | {"max_tokens": rng.randint(8, 16)}
    return Request("vision", VISION_MODEL, "/v1/chat/completions", body)


def bad_request(rng: random.Random) -> Request:
    """A request the server must refuse with a 4xx, before it costs a model anything."""
    model = rng.choice(list(TEXT_MODELS))
    messages = [{"role": "user", "content": "Say hello."}]
    variant = rng.choice(("negative_seed", "unknown_model", "malformed_json", "wrong_endpoint", "image_to_text_model"))
    chat = "/v1/chat/completions"
    if variant == "negative_seed":
        body = {"model": model, "messages": messages, "max_tokens": 8, "seed": -1}
        return Request("bad", model, chat, body, variant=variant)
    if variant == "unknown_model":
        body = {"model": "no-such-model", "messages": messages, "max_tokens": 8}
        return Request("bad", "no-such-model", chat, body, variant=variant)
    if variant == "malformed_json":
        raw = b'{"model": "' + model.encode() + b'", "messages": [{"role": "user", "content": '
        return Request("bad", model, chat, raw=raw, variant=variant)
    if variant == "wrong_endpoint":
        body = {"model": model, "input": ["a text model asked for embeddings"]}
        return Request("bad", model, "/v1/embeddings", body, variant=variant)
    parts = [{"type": "text", "text": "What is this?"}, {"type": "image_url", "image_url": {"url": IMAGE_URL}}]
    body = {"model": model, "messages": [{"role": "user", "content": parts}], "max_tokens": 8}
    return Request("bad", model, chat, body, variant=variant)


def pick(rng: random.Random, kind: str | None = None, model: str | None = None) -> Request:
    kind = kind or rng.choices(list(MIX), weights=list(MIX.values()))[0]
    if kind in ("chat_plain", "chat_stream", "completions"):
        model = model or rng.choices(list(TEXT_MODELS), weights=list(TEXT_MODELS.values()))[0]
        if kind == "completions":
            return completion_request(rng, model)
        return chat_request(rng, model, stream=kind == "chat_stream")
    if kind == "embeddings":
        return embeddings_request(rng)
    if kind == "vision":
        return vision_request(rng)
    return bad_request(rng)


def first_requests(rng: random.Random) -> list[Request]:
    """One request per model, so that the warm-up loads every model at least once."""
    requests = [pick(rng, "chat_plain", model) for model in TEXT_MODELS]
    return requests + [pick(rng, "vision"), pick(rng, "embeddings")]


# -- sending ----------------------------------------------------------------------------------


def error_message(text: str) -> str:
    """The error envelope's message if the body is one, else the body itself (shortened)."""
    try:
        data = json.loads(text)
        error = data.get("error") if isinstance(data, dict) else None
        if isinstance(error, dict) and error.get("message"):
            return f"{error.get('type')}: {error['message']}"
    except ValueError:
        pass
    return text[:400]


def check_body(request: Request, data: Any) -> str | None:
    """Why a 200 answer is not the expected shape, or None."""
    try:
        if request.kind == "embeddings":
            vectors = [item["embedding"] for item in data["data"]]
            if len(vectors) != request.inputs:
                return f"{len(vectors)} vectors for {request.inputs} inputs"
            if not vectors[0] or any(len(v) != len(vectors[0]) for v in vectors):
                return "vectors empty or of different lengths"
            return None
        choice = data["choices"][0]
        text = choice["text"] if request.kind == "completions" else choice["message"]["content"]
        if not isinstance(text, str) or not choice.get("finish_reason") or "usage" not in data:
            return f"no text, finish_reason or usage: {json.dumps(data)[:300]}"
        return None
    except (KeyError, IndexError, TypeError) as error:
        return f"unexpected body ({error!r}): {json.dumps(data)[:300]}"


async def read_stream(response: httpx.Response) -> str | None:
    """Read a streamed answer to its end; why it failed, or None."""
    done = False
    usage = False
    after_done = 0
    async for line in response.aiter_lines():
        if not line.startswith("data: "):
            continue
        if done:
            after_done += 1
            continue
        payload = line.removeprefix("data: ")
        if payload == "[DONE]":
            done = True
            continue
        try:
            chunk = json.loads(payload)
        except ValueError:
            return f"chunk is not JSON: {payload[:200]}"
        if "error" in chunk:
            return f"error event: {error_message(payload)}"
        usage = usage or bool(chunk.get("usage"))
    if not done:
        return "stream ended without data: [DONE]"
    if after_done:
        return f"{after_done} data lines after [DONE]"
    if not usage:
        return "no usage chunk although stream_options.include_usage was set"
    return None


async def send(client: httpx.AsyncClient, request: Request) -> Outcome:
    started = time.perf_counter()
    status: int | None = None

    def outcome(kind: str, message: str | None = None) -> Outcome:
        return Outcome(request, kind, status, time.perf_counter() - started, message)

    content = request.raw if request.raw is not None else json.dumps(request.body).encode()
    try:
        async with asyncio.timeout(REQUEST_TIMEOUT_S):
            async with client.stream(
                "POST", request.path, content=content, headers={"content-type": "application/json"}
            ) as response:
                status = response.status_code
                if status != 200 or not request.stream:
                    text = (await response.aread()).decode(errors="replace")
                if request.kind == "bad":
                    if 400 <= status < 500:
                        return outcome(EXPECTED_4XX)
                    return outcome("bad_not_rejected", f"{request.variant}: {text[:400]}")
                if 400 <= status < 500:
                    return outcome("unexpected_4xx", error_message(text))
                if status >= 500:
                    return outcome("server_5xx", error_message(text))
                if status != 200:
                    return outcome("other_status", text[:400])
                if request.stream:
                    problem = await read_stream(response)
                    return outcome("stream_failed", problem) if problem else outcome(OK)
                try:
                    problem = check_body(request, json.loads(text))
                except ValueError:
                    problem = f"body is not JSON: {text[:300]}"
                return outcome("bad_body_200", problem) if problem else outcome(OK)
    except (TimeoutError, httpx.TimeoutException) as error:
        return outcome("client_timeout", f"no complete answer within {REQUEST_TIMEOUT_S:.0f} s ({type(error).__name__})")
    except httpx.TransportError as error:
        # After the 200 head, a broken connection is a failed stream.
        kind = "stream_failed" if status == 200 else "connection_error"
        return outcome(kind, f"{type(error).__name__}: {error}")


# -- traffic ----------------------------------------------------------------------------------


@dataclass
class Traffic:
    """Everything one phase of traffic produced."""

    outcomes: list[Outcome] = field(default_factory=list)
    wall_s: float = 0.0
    samples: list[dict[str, Any]] = field(default_factory=list)  # every MONITOR_INTERVAL_S
    admin_errors: list[str] = field(default_factory=list)

    def counts(self) -> Counter:
        return Counter(o.outcome for o in self.outcomes)

    def latencies(self, kind: str) -> list[float]:
        return [o.seconds for o in self.outcomes if o.request.kind == kind and o.outcome == OK]

    def errors(self) -> list[dict[str, Any]]:
        """Distinct failures, most frequent first."""
        counted = Counter(
            (o.outcome, o.status, o.request.kind, o.request.model, o.message)
            for o in self.outcomes
            if o.outcome in FAILURES
        )
        return [
            {"outcome": k[0], "status": k[1], "kind": k[2], "model": k[3], "message": k[4], "count": n}
            for k, n in counted.most_common()
        ]


async def monitor(client: httpx.AsyncClient, traffic: Traffic, started: float, stop: asyncio.Event) -> None:
    """Sample the ledger and the stack's RSS while traffic runs."""
    while not stop.is_set():
        sample: dict[str, Any] = {"t_s": round(time.perf_counter() - started, 1)}
        try:
            view = (await client.get("/admin/models", timeout=30)).raise_for_status().json()
            models = view["models"]
            sample |= {
                "used_mb": view["used_bytes"] / MB,
                # used_bytes also counts models still unloading to make room for one that is
                # loading (the new replica starts once they are gone): the models that can have
                # a replica at the same time are the loaded and loading ones.
                "committed_mb": sum(m["memory_bytes"] or 0 for m in models if m["status"] in COMMITTED) / MB,
                "limit_mb": view["memory_limit_bytes"] / MB,
                "statuses": {m["id"]: m["status"] for m in models if m["status"] != "unloaded"},
                "in_flight": sum(m["in_flight"] for m in models),
                "waiting": sum(m.get("waiting") or 0 for m in models),
            }
        except (httpx.HTTPError, ValueError, KeyError) as error:
            traffic.admin_errors.append(f"{type(error).__name__}: {error}")
        snapshot = await asyncio.to_thread(stack_snapshot)
        sample |= {
            "stack_rss_mb": total(snapshot) / MB,
            "processes": len(snapshot),
            # Every process but the model replicas, which come and go with evictions.
            "long_lived_mb": {
                f"{canonical(name)}[{pid}]": rss / MB
                for pid, (name, rss) in snapshot.items()
                if replica_deployment(name, MODEL_DEPLOYMENTS) is None
            },
        }
        traffic.samples.append(sample)
        try:
            await asyncio.wait_for(stop.wait(), MONITOR_INTERVAL_S)
        except TimeoutError:
            pass


async def run_traffic(
    base_url: str, seconds: float, concurrency: int, rng: random.Random, first: list[Request], phase: str
) -> Traffic:
    """`concurrency` tasks send requests until `seconds` have passed; the last ones finish."""
    traffic = Traffic()
    queue = list(first)
    limits = httpx.Limits(max_connections=concurrency + 1, max_keepalive_connections=concurrency + 1)
    timeout = httpx.Timeout(REQUEST_TIMEOUT_S)
    started = time.perf_counter()
    deadline = started + seconds
    last_print = [started]

    async def worker() -> None:
        while time.perf_counter() < deadline or queue:
            request = queue.pop(0) if queue else pick(rng)
            traffic.outcomes.append(await send(client, request))
            now = time.perf_counter()
            if now - last_print[0] >= 15:
                last_print[0] = now
                counts = traffic.counts()
                listed = ", ".join(f"{k} {v}" for k, v in counts.items())
                print(f"{phase} {now - started:5.0f} s: {len(traffic.outcomes)} requests ({listed})", flush=True)

    async with httpx.AsyncClient(base_url=base_url, timeout=timeout, limits=limits) as client:
        stop = asyncio.Event()
        watcher = asyncio.create_task(monitor(client, traffic, started, stop))
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        traffic.wall_s = time.perf_counter() - started
        stop.set()
        await watcher
    return traffic


# -- snapshots --------------------------------------------------------------------------------


def admin_view(base_url: str) -> dict[str, Any]:
    with httpx.Client(base_url=base_url, timeout=30) as client:
        return client.get("/admin/models").raise_for_status().json()


def replica_deployment(name: str, deployments: dict[str, str]) -> str | None:
    """The model whose replica a process label is ("ray::ServeReplica:bench:tiny-llama", also
    with the ".method" Ray appends while a call runs), or None for any other process."""
    prefix = f"ray::ServeReplica:{APP_NAME}:"
    if not name.startswith(prefix):
        return None
    rest = name.removeprefix(prefix)
    # Longest first: a deployment name may contain dots, and be a prefix of another one.
    for deployment in sorted(deployments, key=len, reverse=True):
        if rest == deployment or rest.startswith(deployment + "."):
            return deployments[deployment]
    return None


def canonical(name: str) -> str:
    """A Ray process title without the ".method" of the call running when it was read."""
    return name.split(".")[0] if name.startswith("ray::") else name


def change_pct(start: float, end: float) -> float | None:
    return (end - start) / start * 100 if start else None


def second_half_growth(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """RSS of each long-lived process at the soak's midpoint against its end, while traffic
    runs: what the first half grows (imports, caches, allocator pools) is warm-up; what the
    second half still grows is the trend."""
    sampled = [s for s in samples if "long_lived_mb" in s]
    if len(sampled) < 4:
        return {"rows": [], "total": {"start_mb": 0.0, "end_mb": 0.0, "change_pct": None}}
    middle, last = sampled[len(sampled) // 2]["long_lived_mb"], sampled[-1]["long_lived_mb"]
    rows = [
        {"label": name, "start_mb": middle[name], "end_mb": last[name], "change_pct": change_pct(middle[name], last[name])}
        for name in sorted(middle)
        if name in last
    ]
    start, end = sum(r["start_mb"] for r in rows), sum(r["end_mb"] for r in rows)
    return {"rows": rows, "total": {"start_mb": start, "end_mb": end, "change_pct": change_pct(start, end)}}


def compare_rss(start: Snapshot, end: Snapshot) -> dict[str, Any]:
    """Start against end: other processes by pid, model replicas by model, the rest apart."""
    deployments = MODEL_DEPLOYMENTS

    def split(snapshot: Snapshot) -> tuple[dict[int, tuple[str, int]], dict[str, list[tuple[int, int]]]]:
        others: dict[int, tuple[str, int]] = {}
        replicas: dict[str, list[tuple[int, int]]] = defaultdict(list)
        for pid, (name, rss) in snapshot.items():
            model = replica_deployment(name, deployments)
            if model is None:
                others[pid] = (canonical(name), rss)
            else:
                replicas[model].append((pid, rss))
        return others, replicas

    start_others, start_replicas = split(start)
    end_others, end_replicas = split(end)
    long_lived = []
    only_start = []
    only_end = []
    for pid, (name, rss) in sorted(start_others.items(), key=lambda item: item[1][0]):
        if pid in end_others and end_others[pid][0] == name:
            end_rss = end_others[pid][1]
            long_lived.append(
                {"label": name, "pid": pid, "start_mb": rss / MB, "end_mb": end_rss / MB,
                 "change_pct": change_pct(rss, end_rss)}
            )
        else:
            only_start.append({"label": name, "pid": pid, "rss_mb": rss / MB})
    for pid, (name, rss) in sorted(end_others.items(), key=lambda item: item[1][0]):
        if not (pid in start_others and start_others[pid][0] == name):
            only_end.append({"label": name, "pid": pid, "rss_mb": rss / MB})
    replicas = []
    for model in ALL_MODELS:
        label_ = f"ray::ServeReplica:{APP_NAME}:{deployment_name(model)}"
        at_start, at_end = start_replicas.get(model, []), end_replicas.get(model, [])
        if at_start and at_end:
            s, e = sum(r for _, r in at_start), sum(r for _, r in at_end)
            replicas.append(
                {"label": label_, "start_pids": [p for p, _ in at_start], "end_pids": [p for p, _ in at_end],
                 "start_mb": s / MB, "end_mb": e / MB, "change_pct": change_pct(s, e)}
            )
        else:
            for pid, rss in at_start:
                only_start.append({"label": label_, "pid": pid, "rss_mb": rss / MB})
            for pid, rss in at_end:
                only_end.append({"label": label_, "pid": pid, "rss_mb": rss / MB})

    def totals(rows: list[dict[str, Any]]) -> dict[str, float]:
        s, e = sum(r["start_mb"] for r in rows), sum(r["end_mb"] for r in rows)
        return {"start_mb": s, "end_mb": e, "change_pct": change_pct(s, e)}

    return {
        "long_lived": long_lived,
        "long_lived_total": totals(long_lived),
        "replicas_at_both": replicas,
        "replicas_at_both_total": totals(replicas),
        "only_at_start": only_start,
        "only_at_end": only_end,
        "stack_start_mb": total(start) / MB,
        "stack_end_mb": total(end) / MB,
    }


def counters(view: dict[str, Any]) -> dict[str, dict[str, int]]:
    return {m["id"]: {"loads": m["loads"], "evictions": m["evictions"]} for m in view["models"]}


def settle_and_snapshot(base_url: str, what: str) -> tuple[Snapshot, dict[str, Any]]:
    print(f"traffic stopped; {SETTLE_S:.0f} s settle before the {what} snapshot", flush=True)
    time.sleep(SETTLE_S)
    snapshot = settled_snapshot()
    return snapshot, admin_view(base_url)


# -- report -----------------------------------------------------------------------------------


def percentile(samples: list[float], p: float) -> float:
    """Nearest-rank percentile (with fewer than 100 samples, p99 is the maximum)."""
    ordered = sorted(samples)
    return ordered[max(0, math.ceil(p / 100 * len(ordered)) - 1)]


def print_outcomes(title: str, traffic: Traffic) -> dict[str, dict[str, int]]:
    by_kind: dict[str, Counter] = defaultdict(Counter)
    for o in traffic.outcomes:
        by_kind[o.request.kind][o.outcome] += 1
    columns = [c for c in OUTCOMES if any(by_kind[k][c] for k in by_kind)] or [OK]
    print(f"\n{title}: {len(traffic.outcomes)} requests in {traffic.wall_s:.1f} s")
    print(f"  {'kind':<12}" + "".join(f"{c:>17}" for c in columns))
    for kind in [*MIX]:
        if kind in by_kind:
            print(f"  {kind:<12}" + "".join(f"{by_kind[kind][c]:>17}" for c in columns))
    return {kind: dict(counts) for kind, counts in by_kind.items()}


def print_errors(title: str, errors: list[dict[str, Any]]) -> None:
    if not errors:
        return
    print(f"\n{title}:")
    for e in errors:
        print(f"  {e['count']:>4} x {e['outcome']} (HTTP {e['status']}) {e['kind']} {e['model']}: {e['message']}")


def print_rss(rss: dict[str, Any]) -> None:
    def row(name: str, pid: Any, start: float, end: float, pct: float | None) -> str:
        change = "" if pct is None else f"{pct:+8.1f}%"
        return f"  {name:<48} {str(pid):>15} {start:9.1f} {end:9.1f} {change:>9}"

    header = f"  {'process':<48} {'pid':>15} {'start MB':>9} {'end MB':>9} {'change':>9}"
    print("\nRSS, long-lived processes (matched by pid)\n" + header)
    for r in sorted(rss["long_lived"], key=lambda r: -r["start_mb"]):
        print(row(r["label"], r["pid"], r["start_mb"], r["end_mb"], r["change_pct"]))
    t = rss["long_lived_total"]
    print(row("total", "", t["start_mb"], t["end_mb"], t["change_pct"]))
    print("\nRSS, model replicas present at both times (matched by model)\n" + header)
    for r in rss["replicas_at_both"]:
        pids = f"{','.join(map(str, r['start_pids']))}>{','.join(map(str, r['end_pids']))}"
        print(row(r["label"], pids, r["start_mb"], r["end_mb"], r["change_pct"]))
    t = rss["replicas_at_both_total"]
    print(row("total", "", t["start_mb"], t["end_mb"], t["change_pct"]))
    for key, title in (("only_at_start", "only at start"), ("only_at_end", "only at end")):
        print(f"\nprocesses {title}: " + (", ".join(
            f"{r['label']} [{r['pid']}] {r['rss_mb']:.1f} MB" for r in rss[key]) or "none"))
    print(f"\nwhole stack: {rss['stack_start_mb']:.1f} MB at start, {rss['stack_end_mb']:.1f} MB at end")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=10.0, help="soak duration (fractions allowed)")
    parser.add_argument("--concurrency", type=int, default=6, help="client tasks sending at once")
    parser.add_argument("--warmup-seconds", type=float, default=30.0)
    parser.add_argument("--seed", type=int, default=0, help="seed of the traffic's random choices")
    args = parser.parse_args()
    if args.minutes <= 0 or args.concurrency < 1:
        parser.error("--minutes must be positive and --concurrency at least 1")
    run_started = time.perf_counter()
    rng = random.Random(args.seed)

    with serve_app(APP_ARGS, name=APP_NAME) as base_url:
        print(f"warm-up: {args.warmup_seconds:.0f} s, {args.concurrency} clients", flush=True)
        warmup = asyncio.run(
            run_traffic(base_url, args.warmup_seconds, args.concurrency, rng, first_requests(rng), "warm-up")
        )
        start, view_start = settle_and_snapshot(base_url, "start")
        driver_start = psutil.Process().memory_info().rss
        never_loaded = [m["id"] for m in view_start["models"] if m["loads"] == 0]
        if never_loaded:
            print(f"warning: not loaded during the warm-up: {', '.join(never_loaded)}")
        print(f"soak: {args.minutes:g} min, {args.concurrency} clients", flush=True)
        soak = asyncio.run(run_traffic(base_url, args.minutes * 60, args.concurrency, rng, [], "soak"))
        end, view_end = settle_and_snapshot(base_url, "end")
        driver_end = psutil.Process().memory_info().rss

    # -- figures and details
    warmup_by_kind = print_outcomes("warm-up", warmup)
    soak_by_kind = print_outcomes("soak", soak)
    print_errors("warm-up failures", warmup.errors())
    print_errors("soak failures", soak.errors())
    counts = soak.counts()
    figures: dict[str, Summary | float] = {
        "soak_s": soak.wall_s,
        "requests": len(soak.outcomes),
        "requests_per_s": len(soak.outcomes) / soak.wall_s,
    }
    figures |= {outcome: counts[outcome] for outcome in OUTCOMES}
    figures["failed"] = sum(counts[f] for f in FAILURES)
    figures["warmup_failed"] = sum(warmup.counts()[f] for f in FAILURES)
    print(f"\n  {'latency (s)':<12} {'p50':>8} {'p99':>8} {'max':>8} {'n':>6}")
    for kind in LATENCY_KINDS:
        samples = soak.latencies(kind)
        if not samples:
            print(f"  {kind:<12} no successful request")
            continue
        figures[f"{kind}_latency_s"] = summarize(samples)
        # p50 is the median (of the two middle values when n is even), as in the summary.
        figures[f"{kind}_p50_s"] = statistics.median(samples)
        figures[f"{kind}_p99_s"] = percentile(samples, 99)
        print(f"  {kind:<12} {statistics.median(samples):8.3f} {percentile(samples, 99):8.3f} "
              f"{max(samples):8.3f} {len(samples):>6}")

    before, after = counters(view_start), counters(view_end)
    per_model = {
        m: {k: after[m][k] - before.get(m, {}).get(k, 0) for k in ("loads", "evictions")} for m in after
    }
    figures["loads"] = sum(c["loads"] for c in per_model.values())
    figures["evictions"] = sum(c["evictions"] for c in per_model.values())
    print("\nloads/evictions during the soak: " + ", ".join(
        f"{m} {c['loads']}/{c['evictions']}" for m, c in per_model.items()))

    rss = compare_rss(start, end)
    print_rss(rss)
    long_lived, replicas = rss["long_lived_total"], rss["replicas_at_both_total"]
    figures["rss_long_lived_start_mb"] = long_lived["start_mb"]
    figures["rss_long_lived_end_mb"] = long_lived["end_mb"]
    figures["rss_long_lived_change_pct"] = long_lived["change_pct"] or 0.0
    flat = abs(long_lived["change_pct"] or 0.0) <= FLAT_TOLERANCE_PCT
    figures["rss_long_lived_flat"] = float(flat)
    figures["rss_replicas_at_both_start_mb"] = replicas["start_mb"]
    figures["rss_replicas_at_both_end_mb"] = replicas["end_mb"]
    # No model loaded at both times: nothing to compare (not flat, not grown either).
    replicas_flat = replicas["change_pct"] is not None and abs(replicas["change_pct"]) <= FLAT_TOLERANCE_PCT
    if replicas["change_pct"] is not None:
        figures["rss_replicas_at_both_change_pct"] = replicas["change_pct"]
    figures["rss_replicas_at_both_flat"] = float(replicas_flat)
    figures["rss_stack_start_mb"] = rss["stack_start_mb"]
    figures["rss_stack_end_mb"] = rss["stack_end_mb"]
    figures["driver_rss_start_mb"] = driver_start / MB
    figures["driver_rss_end_mb"] = driver_end / MB

    trend = second_half_growth(soak.samples)
    print("\nRSS, long-lived processes over the second half of the soak (traffic running)")
    for row in trend["rows"]:
        print(f"  {row['label'][:58]:58} {row['start_mb']:9.1f} {row['end_mb']:9.1f} {row['change_pct']:+8.1f}%")
    trend_pct = trend["total"]["change_pct"] or 0.0
    print(f"  {'total':58} {trend['total']['start_mb']:9.1f} {trend['total']['end_mb']:9.1f} {trend_pct:+8.1f}%")
    figures["rss_long_lived_second_half_change_pct"] = trend_pct
    trend_flat = abs(trend_pct) <= FLAT_TOLERANCE_PCT
    figures["rss_long_lived_second_half_flat"] = float(trend_flat)

    leases_left = {m["id"]: len(m["leases"]) for m in view_end["models"] if m["leases"] or m["in_flight"]}
    figures["leases_left"] = sum(len(m["leases"]) for m in view_end["models"])
    figures["in_flight_left"] = sum(m["in_flight"] for m in view_end["models"])
    figures["used_mb_end"] = view_end["used_bytes"] / MB
    figures["memory_limit_mb"] = view_end["memory_limit_bytes"] / MB
    within = view_end["used_bytes"] <= view_end["memory_limit_bytes"]
    figures["used_within_limit"] = float(within)
    sampled = [s for s in soak.samples if "used_mb" in s]
    if sampled:
        figures["max_used_mb_seen"] = max(s["used_mb"] for s in sampled)
        figures["max_committed_mb_seen"] = max(s["committed_mb"] for s in sampled)
    figures["samples"] = len(sampled)
    figures["committed_over_limit_samples"] = sum(1 for s in sampled if s["committed_mb"] > s["limit_mb"])

    verdicts = {
        f"long-lived processes' RSS flat within {FLAT_TOLERANCE_PCT:g} %":
            (flat, f"{long_lived['change_pct']:+.1f} %"),
        f"long-lived processes' RSS flat over the soak's second half within {FLAT_TOLERANCE_PCT:g} %":
            (trend_flat, f"{trend_pct:+.1f} %"),
        f"replicas at both times flat within {FLAT_TOLERANCE_PCT:g} %":
            (replicas_flat, f"{replicas['change_pct'] or 0:+.1f} % over {len(rss['replicas_at_both'])} model(s)"),
        "no failed request": (
            figures["failed"] + figures["warmup_failed"] == 0,
            f"{figures['failed']} in the soak, {figures['warmup_failed']} in the warm-up"),
        "no lease left after traffic": (not leases_left, str(leases_left or "none")),
        "used_bytes <= memory_limit_bytes at the end": (
            within, f"{figures['used_mb_end']:.0f} of {figures['memory_limit_mb']:.0f} MB"),
        "loaded+loading models within memory_limit in every 5 s sample": (
            figures["committed_over_limit_samples"] == 0,
            f"{figures['committed_over_limit_samples']} of {len(sampled)} over; highest "
            f"{figures.get('max_committed_mb_seen', 0):.0f} MB (used_bytes, with models still "
            f"unloading: {figures.get('max_used_mb_seen', 0):.0f} MB)"),
        "evictions happened": (figures["evictions"] > 0, f"{figures['evictions']} evictions"),
    }
    print("\nverdicts")
    for name, (passed, detail) in verdicts.items():
        print(f"  {'PASS' if passed else 'FAIL'}  {name}: {detail}")

    print()
    path = write_result("soak", figures)
    details = {
        "settings": {
            "minutes": args.minutes, "concurrency": args.concurrency, "warmup_seconds": args.warmup_seconds,
            "seed": args.seed, "mix_pct": MIX, "text_model_weights": TEXT_MODELS,
            "request_timeout_s": REQUEST_TIMEOUT_S, "app_args": APP_ARGS,
        },
        "verdicts": {name: {"pass": passed, "detail": detail} for name, (passed, detail) in verdicts.items()},
        "soak_outcomes_by_kind": soak_by_kind,
        "warmup_outcomes_by_kind": warmup_by_kind,
        "soak_status_codes": dict(Counter(str(o.status) for o in soak.outcomes)),
        "bad_requests_by_variant": {
            variant: dict(Counter(str(o.status) for o in soak.outcomes + warmup.outcomes if o.request.variant == variant))
            for variant in sorted({o.request.variant for o in soak.outcomes + warmup.outcomes if o.request.kind == "bad"})
        },
        "soak_errors": soak.errors(),
        "warmup_errors": warmup.errors(),
        "loads_evictions_per_model": per_model,
        "rss": rss,
        "rss_second_half": trend,
        "leases_left_per_model": leases_left,
        "admin_end": view_end,
        "soak_samples": soak.samples,
        "admin_errors": soak.admin_errors + warmup.admin_errors,
    }
    # write_result keeps the figures flat (a table); the rest goes next to them, written whole.
    result = json.loads(path.read_text())
    result["details"] = details
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    tmp.replace(path)
    print(f"total run time {time.perf_counter() - run_started:.1f} s")


if __name__ == "__main__":
    main()
