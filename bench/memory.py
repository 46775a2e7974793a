"""Memory: resident memory of the whole stack when idle, and what each loaded model adds.

    python -m bench.memory

The stack is every process of the Ray cluster this benchmark starts (GCS, raylet, dashboard
agent, workers, Serve's controller, proxy and replicas): all descendants of this process.
The driver (this process) is reported apart, as a client of the stack rather than part of it.

* idle: the app with two demo models, neither pinned, after the controller has settled (no
  model replica left).
* per model, one after the other: load it through `POST /admin/models/<id>/load`, report
  the growth of the stack's total RSS and what `/admin/models` says the model costs
  (`process_bytes`, `weights_bytes`, `memory_bytes`), then unload it again.

One measurement per figure (n=1): memory does not vary the way timings do. RSS counts
shared pages (libraries) once per process, so the sum overstates the memory really used.
MB are 10**6 bytes, as in the server's logs.
"""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import psutil

from bench.common import Summary, serve_app, summarize, write_result

MODELS = {"tiny-llama": "models/tiny-llama", "bench-llama-20m": "models/bench-llama-20m"}
APP_ARGS = {"models": [{"id": model_id, "path": path} for model_id, path in MODELS.items()]}
MB = 1e6
# RSS moves a little for a while after a change (workers finish importing, the pool of idle
# Ray workers refills): a sample counts once it matches the previous one.
SETTLE_INTERVAL_S = 1.0
SETTLE_TOLERANCE_BYTES = 2 * MB
SETTLE_TIMEOUT_S = 30.0

Snapshot = dict[int, tuple[str, int]]  # pid -> (label, RSS bytes)


def label(process: psutil.Process) -> str:
    """A readable name: Ray's process title (ray::...), the Python script, or the binary."""
    command = process.cmdline()
    if not command:
        return process.name()
    if command[0].startswith("ray::"):
        return command[0].split()[0]
    script = next((Path(arg).name for arg in command[1:] if arg.endswith(".py")), None)
    return script or Path(command[0]).name


def stack_snapshot() -> Snapshot:
    """RSS of every descendant of this process, that is, of the cluster it started."""
    snapshot: Snapshot = {}
    for process in psutil.Process().children(recursive=True):
        try:
            snapshot[process.pid] = (label(process), process.memory_info().rss)
        except psutil.NoSuchProcess:  # ended between the listing and the reading
            continue
    return snapshot


def total(snapshot: Snapshot) -> int:
    return sum(rss for _, rss in snapshot.values())


def settled_snapshot() -> Snapshot:
    """A snapshot taken once the set of processes and their total RSS have stopped moving."""
    deadline = time.monotonic() + SETTLE_TIMEOUT_S
    previous = stack_snapshot()
    while True:
        time.sleep(SETTLE_INTERVAL_S)
        current = stack_snapshot()
        same_processes = current.keys() == previous.keys()
        if same_processes and abs(total(current) - total(previous)) < SETTLE_TOLERANCE_BYTES:
            return current
        if time.monotonic() > deadline:
            print(f"memory still moving after {SETTLE_TIMEOUT_S:.0f} s; taking the last sample")
            return current
        previous = current


def print_processes(title: str, snapshot: Snapshot) -> None:
    print(f"{title}: {len(snapshot)} processes, {total(snapshot) / MB:.1f} MB RSS")
    for pid, (name, rss) in sorted(snapshot.items(), key=lambda item: -item[1][1]):
        print(f"  {rss / MB:8.1f} MB  {pid:>7}  {name}")


def admin_model(client: httpx.Client, model_id: str) -> dict:
    models = client.get("/admin/models").raise_for_status().json()["models"]
    return next(m for m in models if m["id"] == model_id)


def megabytes(value: int | None) -> Summary:
    if value is None:
        raise RuntimeError("/admin/models reports no figure for a loaded model")
    return summarize([value / MB])


def main() -> None:
    run_started = time.perf_counter()
    figures: dict[str, Summary | float] = {}
    with serve_app(APP_ARGS) as base_url, httpx.Client(base_url=base_url, timeout=300) as client:
        idle = settled_snapshot()
        print_processes("idle stack", idle)
        figures["stack_idle_rss_mb"] = summarize([total(idle) / MB])
        figures["driver_rss_mb"] = summarize([psutil.Process().memory_info().rss / MB])
        for model_id in MODELS:
            before = settled_snapshot()
            client.post(f"/admin/models/{model_id}/load").raise_for_status()
            loaded = settled_snapshot()
            print_processes(f"\nwith {model_id} loaded", loaded)
            state = admin_model(client, model_id)
            figures[f"{model_id}_rss_growth_mb"] = summarize([(total(loaded) - total(before)) / MB])
            figures[f"{model_id}_admin_process_mb"] = megabytes(state["process_bytes"])
            figures[f"{model_id}_admin_weights_mb"] = megabytes(state["weights_bytes"])
            figures[f"{model_id}_admin_memory_mb"] = megabytes(state["memory_bytes"])
            # Unloaded again, so the next model's growth starts from the idle stack.
            client.post(f"/admin/models/{model_id}/unload").raise_for_status()
        # Whether unloading gives the memory back: the replica processes should be gone.
        figures["stack_after_unloads_rss_mb"] = summarize([total(settled_snapshot()) / MB])
    print()
    write_result("memory", figures)
    print(f"total run time {time.perf_counter() - run_started:.1f} s")


if __name__ == "__main__":
    main()
