"""Footprint: what the server costs when nobody asks anything, the way users start it.

    python -m bench.footprint [--idle-seconds 30] [--config serve_config.yaml]

`serve run` on the default config (on a free port, with the environment `make serve` sets),
then, each figure over every process the command started (its descendants):

* start: seconds from launching `serve run` to `/v1/models` answering, and to
  `/health/ready`; the number of processes once started;
* idle, nothing loaded (after start-up has settled): CPU as a share of one core over
  `--idle-seconds`, and PSS (proportional set size: shared pages split between the
  processes that share them, so the sum is the memory really used) and RSS;
* the same with three text models and the embeddings model loaded (through the admin API),
  and what each loaded model added in PSS next to its weights' size.

Results go to bench/results/footprint.json with the busiest processes by idle CPU.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import psutil
import yaml

from bench.common import ROOT, Summary, direct_ingress_env, free_port, write_result
from graph import application_config, fleet_env
from bench.memory import label

LOADED = ["smollm2-135m-instruct", "tiny-llama", "bench-llama-20m", "all-MiniLM-L6-v2"]
MB = 1e6


def stack(root: psutil.Process) -> list[psutil.Process]:
    return [root, *root.children(recursive=True)]


def cpu_seconds(processes: list[psutil.Process]) -> dict[int, float]:
    times = {}
    for process in processes:
        try:
            t = process.cpu_times()
            times[process.pid] = t.user + t.system
        except psutil.NoSuchProcess:
            continue
    return times


def idle_cpu(root: psutil.Process, seconds: float) -> tuple[float, list[tuple[float, str]]]:
    """Share of one core the stack used over `seconds`, and the busiest processes."""
    processes = stack(root)
    names = {}
    for p in processes:
        try:
            names[p.pid] = label(p)
        except psutil.NoSuchProcess:
            continue
    before = cpu_seconds(processes)
    time.sleep(seconds)
    after = cpu_seconds(processes)
    used = {pid: after[pid] - before[pid] for pid in after if pid in before}
    busiest = sorted(((100 * s / seconds, f"{names.get(pid, '?')} [{pid}]") for pid, s in used.items()), reverse=True)
    return 100 * sum(used.values()) / seconds, busiest[:12]


def memory(root: psutil.Process) -> tuple[float, float, int]:
    """(PSS MB, RSS MB, processes) of the stack."""
    pss = rss = 0
    count = 0
    for process in stack(root):
        try:
            info = process.memory_full_info()
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        pss += info.pss
        rss += info.rss
        count += 1
    return pss / MB, rss / MB, count


def wait_for(url: str, timeout: float = 180, ok=lambda status: status == 200) -> float:
    started = time.perf_counter()
    while time.perf_counter() - started < timeout:
        try:
            if ok(httpx.get(url, timeout=2).status_code):
                return time.perf_counter() - started
        except httpx.HTTPError:
            pass
        time.sleep(0.05)
    raise TimeoutError(f"{url} did not answer in {timeout:.0f} s")


def settle(base: str, seconds: float = 15) -> None:
    """Start-up is over once no model is loading (and Ray's own start-up work has died down)."""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        models = httpx.get(f"{base}/admin/models", timeout=10).json()["models"]
        if all(m["status"] in ("loaded", "unloaded") for m in models):
            break
        time.sleep(0.5)
    time.sleep(seconds)


def launch(command: list[str], env: dict[str, str]) -> subprocess.Popen:
    return subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def stop(process: subprocess.Popen) -> None:
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(60)
    except subprocess.TimeoutExpired:
        process.kill()


def idle_figures(figures: dict, phase: str, root: psutil.Process, seconds: float) -> None:
    cpu, busiest = idle_cpu(root, seconds)
    pss, rss, count = memory(root)
    figures[f"{phase}_cpu_percent_of_a_core"] = cpu
    figures[f"{phase}_pss_mb"] = pss
    figures[f"{phase}_rss_mb"] = rss
    figures[f"{phase}_processes"] = float(count)
    print(f"{phase}: {cpu:.1f} % of a core, PSS {pss:.0f} MB, RSS {rss:.0f} MB, {count} processes; busiest:")
    for share, name in busiest:
        print(f"  {share:5.1f} %  {name}")


def serve_config(config: dict, env: dict[str, str]) -> tuple[str, int, dict[str, str]]:
    """`config` on free ports, written where `serve run` can read it, with the environment
    to run it in and the port the API is at: the ingress replica's own (direct ingress, as
    ops/fleet.env has it) or, without direct ingress, Serve's proxy."""
    proxy_port = free_port()
    config = {**config, "http_options": {**config.get("http_options", {}), "port": proxy_port}}
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", dir=ROOT, delete=False) as file:
        yaml.safe_dump(config, file)
    if env.get("RAY_SERVE_ENABLE_DIRECT_INGRESS") != "1":
        return file.name, proxy_port, env
    api_port = free_port()
    return file.name, api_port, {**env, **direct_ingress_env(api_port)}


def measure_floor(figures: dict, env: dict[str, str], seconds: float, deployments: int) -> None:
    """Bare Ray + Serve, then a trivial application of the fleet's shape, each started and
    measured as the fleet is."""
    serve_bin = str(Path(sys.executable).parent / "serve")
    port = free_port()
    started = time.perf_counter()
    process = launch([sys.executable, "-m", "bench.floor", "--port", str(port)], env)
    try:
        wait_for(f"http://127.0.0.1:{port}/", ok=lambda status: True)
        figures["floor_start_s"] = time.perf_counter() - started
        time.sleep(15)
        idle_figures(figures, "floor", psutil.Process(process.pid), seconds)
    finally:
        stop(process)
    app = application_config({"deployments": deployments}, "trivial", import_path="bench.floor:build_trivial")
    trivial = {"proxy_location": "HeadOnly", "http_options": {"host": "127.0.0.1"}, "applications": [app]}
    path, port, trivial_env = serve_config(trivial, env)
    started = time.perf_counter()
    process = launch([serve_bin, "run", path], trivial_env)
    try:
        wait_for(f"http://127.0.0.1:{port}/")
        figures["trivial_app_start_s"] = time.perf_counter() - started
        time.sleep(15)
        idle_figures(figures, "trivial_app", psutil.Process(process.pid), seconds)
    finally:
        stop(process)
        os.unlink(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--idle-seconds", type=float, default=30)
    parser.add_argument("--config", default="serve_config.yaml")
    parser.add_argument("--env", action="append", default=[], metavar="NAME=VALUE",
                        help="extra environment for `serve run` (to try Ray settings)")
    parser.add_argument("--no-load", action="store_true", help="measure the idle stack only")
    parser.add_argument("--no-floor", action="store_true", help="skip Ray + Serve's own floor")
    parser.add_argument("--ray-defaults", action="store_true", help="without ops/fleet.env's settings")
    args = parser.parse_args()
    config = yaml.safe_load((ROOT / args.config).read_text())
    tuned = {} if args.ray_defaults else fleet_env()
    env = {**os.environ, **tuned, "HF_HUB_OFFLINE": "1", **dict(item.split("=", 1) for item in args.env)}
    env.pop("RAY_ADDRESS", None)
    figures: dict[str, Summary | float] = {}
    if not args.no_floor:
        measure_floor(figures, env, args.idle_seconds, len(config["applications"][0]["args"]["models"]))
    path, port, env = serve_config(config, env)
    base = f"http://127.0.0.1:{port}"
    serve_bin = Path(sys.executable).parent / "serve"
    started = time.perf_counter()
    process = launch([str(serve_bin), "run", path], env)
    root = psutil.Process(process.pid)
    try:
        wait_for(f"{base}/v1/models")
        figures["start_to_models_s"] = time.perf_counter() - started
        wait_for(f"{base}/health/ready")
        figures["start_to_ready_s"] = time.perf_counter() - started
        settle(base)
        for phase, loads in (("idle", []), ("loaded", LOADED))[: 1 if args.no_load else 2]:
            for model_id in loads:
                before, _, _ = memory(root)
                httpx.post(f"{base}/admin/models/{model_id}/load", json={"pin": False}, timeout=300).raise_for_status()
                settle(base, seconds=5)
                after, _, _ = memory(root)
                view = next(m for m in httpx.get(f"{base}/admin/models").json()["models"] if m["id"] == model_id)
                figures[f"{model_id}_pss_added_mb"] = after - before
                figures[f"{model_id}_weights_mb"] = (view["weights_bytes"] or 0) / MB
            idle_figures(figures, phase, root, args.idle_seconds)
    finally:
        stop(process)
        os.unlink(path)
    if not args.no_floor:
        for figure in ("cpu_percent_of_a_core", "pss_mb"):
            figures[f"idle_{figure}_over_floor"] = figures[f"idle_{figure}"] - figures[f"floor_{figure}"]
            figures[f"idle_{figure}_over_trivial_app"] = figures[f"idle_{figure}"] - figures[f"trivial_app_{figure}"]
        figures["start_over_trivial_app"] = figures["start_to_models_s"] / figures["trivial_app_start_s"]
    print()
    write_result("footprint", figures)


if __name__ == "__main__":
    main()
