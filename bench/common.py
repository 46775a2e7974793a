"""Shared helpers for the benchmarks: a local cluster running the app, statistics, results.

A benchmark builds an args dict (the same shape as serve_config.yaml's `args`), measures
inside `serve_app(args)`, and hands its figures to `write_result`, which keeps them in
bench/results/<name>.json next to the machine they were measured on.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import platform
import socket
import statistics
import tempfile
import time
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator, Sequence

import httpx
import psutil

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
PACKAGES = ("ray", "mlx", "mlx-lm", "mlx-vlm", "mlx-embeddings")

Summary = dict[str, float | int]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def serve_app(args: dict[str, Any], name: str = "bench", settle_timeout: float = 120) -> Iterator[str]:
    """A fresh local Ray cluster running the app from `args`; yields its base URL.

    Yields only once every unpinned model is unloaded and its replica gone, so measurements
    do not overlap the controller's scale-to-zero right after start. Everything started here
    is shut down on exit (never `ray stop`: other clusters may run on this machine). Prompt
    caches saved at unloads go to a folder of this run unless `args` name one: no run starts
    warm from an earlier one.
    """
    import ray
    from ray import serve

    from graph import application_config, deploy, direct_ingress_port, fleet_env

    os.chdir(ROOT)  # relative model paths in args are relative to the repo, as with `serve run`
    os.environ.pop("RAY_ADDRESS", None)  # "local" must mean a new cluster of our own
    if os.environ.get("BENCH_RAY_DEFAULTS") != "1":  # the Ray settings `make serve` uses
        os.environ.update({k: v for k, v in fleet_env().items() if k not in os.environ})
        os.environ.update(direct_ingress_env(free_port()))
    prompt_caches = tempfile.TemporaryDirectory(prefix="mlx-fleet-bench-prompt-cache-")
    args = {"prompt_cache_dir": prompt_caches.name, **args}
    ray.init(
        address="local",
        num_cpus=2,
        include_dashboard=False,
        runtime_env={"env_vars": {"HF_HUB_OFFLINE": "1"}},
        log_to_driver=False,
    )
    try:
        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        deploy([application_config(args, name)])
        direct = os.environ.get("RAY_SERVE_ENABLE_DIRECT_INGRESS") == "1"
        base_url = f"http://127.0.0.1:{direct_ingress_port(name) if direct else port}"
        _wait_until_settled(base_url, name, settle_timeout)
        yield base_url
    finally:
        serve.shutdown()
        ray.shutdown()
        prompt_caches.cleanup()


def direct_ingress_env(port: int) -> dict[str, str]:
    """Serve's direct ingress on `port` alone, in place of ops/fleet.env's 8000, which a
    server of the user's may hold."""
    return {"RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT": str(port), "RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT": str(port + 1)}


def proxy_url() -> str:
    """The running Serve instance's proxy: the same routes as the ingress replica's own port,
    one hop longer."""
    import ray
    from ray.serve.context import _get_global_client

    options = ray.get(_get_global_client()._controller.get_http_config.remote())
    return f"http://{options.host}:{options.port}"


def _wait_until_settled(base_url: str, app_name: str, timeout: float) -> None:
    """Wait until unpinned models are unloaded and their deployments have no replica."""
    from ray import serve

    from policies.config import deployment_name

    deadline = time.monotonic() + timeout
    with httpx.Client(base_url=base_url, timeout=30) as client:
        while True:
            models = client.get("/admin/models").raise_for_status().json()["models"]
            unpinned = [m for m in models if not m["pinned"] and not m["base"]]  # adapters: no deployment
            deployments = serve.status().applications[app_name].deployments
            replicas = sum(
                sum(deployments[deployment_name(m["id"])].replica_states.values()) for m in unpinned
            )
            if replicas == 0 and all(m["status"] == "unloaded" for m in unpinned):
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"models not settled after {timeout:.0f} s: {models}")
            time.sleep(0.2)


def summarize(samples: Sequence[float]) -> Summary:
    if not samples:
        raise ValueError("no samples to summarize")
    return {
        "min": min(samples),
        "median": statistics.median(samples),
        "max": max(samples),
        "n": len(samples),
    }


def machine_info() -> dict[str, Any]:
    versions: dict[str, str | None] = {}
    for package in PACKAGES:
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = None
    return {
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
        "memory_total_bytes": psutil.virtual_memory().total,
        "python": platform.python_version(),
        "packages": versions,
    }


def write_result(name: str, figures: dict[str, Summary | float]) -> Path:
    """Write bench/results/<name>.json and print the figures as a table; returns the path."""
    result = {
        "name": name,
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": machine_info(),
        "figures": figures,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    # Written whole, then renamed: an interrupted run never leaves half a result behind.
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    tmp.replace(path)
    print(format_table(figures))
    print(f"\nwritten to {path.relative_to(ROOT)}")
    return path


def format_table(figures: dict[str, Summary | float]) -> str:
    width = max(len(key) for key in figures)
    lines = [f"{'figure':<{width}}  {'min':>9}  {'median':>9}  {'max':>9}  {'n':>3}"]
    for key, value in figures.items():
        if isinstance(value, dict):
            lines.append(
                f"{key:<{width}}  {value['min']:>9.3f}  {value['median']:>9.3f}  "
                f"{value['max']:>9.3f}  {value['n']:>3}"
            )
        else:  # a single derived number, such as a ratio of medians
            lines.append(f"{key:<{width}}  {'':>9}  {value:>9.3f}")
    return "\n".join(lines)
