"""Several nodes, one fleet: what losing and regaining a node costs.

    python -m bench.nodes [--repeats N]

A Ray cluster of a head and two labelled nodes, a and b, on this machine
(`bench/multinode_driver.py`). Each round loads a model on b, kills b's raylet and workers
(SIGKILL, as a Mac that drops off the network) and measures, from the kill:
- `detect_s`: until `/admin/models` shows b gone (its probe silent; Ray's own health checks
  run at their defaults here, so it is the fleet that notices);
- `served_elsewhere_s`: until a client that retries every 0.2 s gets an answer from the model,
  now loaded on a; `refused_meanwhile` counts the 503s it got before, and
  `answered_by_the_killed_node` the answers b's replica still gave before it died;
then adds b back and measures `rejoin_s` (until b is alive in the view) and `load_on_rejoined_s`
(a load there of a model that runs only on b). Side by side in the same run, `load_s` is the cold load of the same model on a
node that stayed (a's replica process started, weights loaded, first token), the floor of
`served_elsewhere_s`. The probe actors' memory and CPU are read from /proc.
"""

from __future__ import annotations

import argparse
import tempfile
import threading
import time
from pathlib import Path

import httpx
import psutil

from bench.common import format_table, summarize, write_result
from bench.multinode import Driver

ARGS = {
    # a fits one model: "moved" goes to b while "stays" is on a, and back to a (in its place)
    # when b is gone.
    "nodes": [{"name": "a", "memory_limit": "1.5GB"}, {"name": "b", "memory_limit": "3GB"}],
    "models": [
        {"id": "moved", "path": "models/tiny-llama", "memory": "1GB"},
        {"id": "stays", "path": "models/tiny-qwen2", "memory": "1GB", "node": "a"},
        {"id": "on-b", "path": "models/tiny-gemma", "memory": "1GB", "node": "b"},
    ],
}
CHAT = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1, "temperature": 0}


def chat(http: httpx.Client, model: str) -> httpx.Response:
    return http.post("/v1/chat/completions", json={"model": model, **CHAT})


def until(condition, timeout: float = 120, every: float = 0.05) -> float:
    """Seconds until `condition()` holds."""
    started = time.monotonic()
    while not condition():
        if time.monotonic() - started > timeout:
            raise TimeoutError("condition not reached")
        time.sleep(every)
    return time.monotonic() - started


def view(http: httpx.Client) -> dict:
    return http.get("/admin/models").json()


def node(http: httpx.Client, name: str) -> dict:
    return next(n for n in view(http)["nodes"] if n["name"] == name)


def model(http: httpx.Client, model_id: str) -> dict:
    return next(m for m in view(http)["models"] if m["id"] == model_id)


def unload(http: httpx.Client, model_id: str) -> None:
    http.post(f"/admin/models/{model_id}/unload").raise_for_status()


def probes() -> list[psutil.Process]:
    return [p for p in psutil.process_iter(["cmdline"]) if "NodeProbe" in " ".join(p.info["cmdline"] or [])]


def probe_cost(seconds: float = 10.0) -> dict[str, float]:
    found = probes()
    for process in found:
        process.cpu_percent()
    time.sleep(seconds)
    return {
        "probe_processes": len(found),
        "probe_pss_mb": sum(p.memory_full_info().pss for p in found) / len(found) / 1e6,
        "probe_cpu_percent": sum(p.cpu_percent() for p in found) / len(found),
    }


def one_round(driver: Driver, http: httpx.Client) -> dict[str, float]:
    unload(http, "moved")
    # Cold load on a node that stays: the floor of a re-placement.
    unload(http, "stays")
    started = time.monotonic()
    chat(http, "stays").raise_for_status()
    load_s = time.monotonic() - started
    # On a it would evict "stays"; b has room: it goes there.
    chat(http, "moved").raise_for_status()
    assert model(http, "moved")["node"] == "b"

    gone_at: list[float] = []

    def watch() -> None:
        until(lambda: not node(http, "b")["alive"])
        gone_at.append(time.monotonic())

    driver.remove("b")
    killed = time.monotonic()
    threading.Thread(target=watch).start()
    refused = answered_by_b = 0
    while True:
        # b's workers outlive its raylet for a moment: the first answers may still come from b.
        if chat(http, "moved").status_code != 200:
            refused += 1
        elif model(http, "moved")["node"] == "a":
            break
        else:
            answered_by_b += 1
        time.sleep(0.2)
    served_elsewhere_s = time.monotonic() - killed
    until(lambda: bool(gone_at))

    driver.add("b")
    added = time.monotonic()
    until(lambda: node(http, "b")["alive"])
    rejoin_s = time.monotonic() - added
    unload(http, "on-b")
    started = time.monotonic()
    chat(http, "on-b").raise_for_status()
    load_on_rejoined_s = time.monotonic() - started
    return {
        "load_s": load_s,
        "served_elsewhere_s": served_elsewhere_s,
        "detect_s": gone_at[0] - killed,
        "refused_meanwhile": refused,
        "answered_by_the_killed_node": answered_by_b,
        "rejoin_s": rejoin_s,
        "load_on_rejoined_s": load_on_rejoined_s,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    options = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="mlx-fleet-bench-nodes-"))
    started = time.monotonic()
    # Ray's own node health checks at their defaults: the fleet's probes notice first.
    driver = Driver({"nodes": ["a", "b"], "num_cpus": 2, "args": ARGS, "system_config": {}}, workdir)
    try:
        url = driver.start(timeout=300)
        start_s = time.monotonic() - started
        with httpx.Client(base_url=url, timeout=120) as http:
            until(lambda: all(m["status"] == "unloaded" for m in view(http)["models"]), timeout=60)
            rounds = [one_round(driver, http) for _ in range(options.repeats)]
            cost = probe_cost()
    finally:
        driver.quit()
    figures = {key: summarize([r[key] for r in rounds]) for key in rounds[0]}
    figures["served_elsewhere_over_cold_load"] = summarize(
        [r["served_elsewhere_s"] / r["load_s"] for r in rounds]
    )
    figures.update({"start_s": start_s, **cost})
    print(format_table(figures))
    print(f"written to {write_result('nodes', figures)}")


if __name__ == "__main__":
    main()
