"""What runs is what the ledger says runs: the replica processes Serve really runs (found by
their process titles, `ray::ServeReplica:<app>:<deployment>`) against `/admin/models`.

A model replica runs exactly when the ledger charges its model: no weightless replica left
over from start-up, none left behind by an eviction, none started unseen.
"""

from __future__ import annotations

import re
import time

import psutil

from tests.conftest import APP_NAME, wait_for
from deployments.warm_workers import SETUP_HOOK_ENV
from policies.config import CONTROLLER_NAME, INGRESS_NAME, deployment_name

FLEET = {INGRESS_NAME, CONTROLLER_NAME}


def raylet_pid() -> int:
    """This test session's raylet: the parent of its workers (other clusters may run here)."""
    import ray
    from ray._private import ray_constants

    (raylet,) = ray._private.worker._global_node.all_processes[ray_constants.PROCESS_TYPE_RAYLET]
    return raylet.process.pid


def replica_processes(app: str = APP_NAME) -> dict[str, list[int]]:
    """{deployment: pids of its replica processes} for the application, from the OS."""
    prefix = f"ray::ServeReplica:{app}:"
    found: dict[str, list[int]] = {}
    for process in psutil.Process(raylet_pid()).children(recursive=True):
        try:
            cmdline = process.cmdline()
        except psutil.Error:
            continue
        if cmdline and cmdline[0].startswith(prefix):
            # While it runs a task Ray titles it ray::<actor>.<method> (deployment names never
            # end in an identifier after a dot: dots in them come from ids like Qwen2.5-0.5B).
            title = cmdline[0][len(prefix):].split()[0]
            found.setdefault(re.sub(r"\.[A-Za-z_]\w*$", "", title), []).append(process.pid)
    return found


def charged(http) -> dict[str, dict]:
    """{deployment: model view} of the models the ledger charges (loaded or loading), but
    for LoRA adapters: they are charged inside their base's process."""
    models = http.get("/admin/models").json()["models"]
    return {deployment_name(m["id"]): m for m in models if m["memory_bytes"] is not None and not m["base"]}


def settled(http) -> bool:
    return all(m["status"] in ("loaded", "unloaded") for m in http.get("/admin/models").json()["models"])


def assert_processes_match_ledger(http, timeout: float = 30) -> None:
    last: list = []

    def match() -> bool:
        running, models = replica_processes(), charged(http)
        last[:] = [running, sorted(models)]
        return settled(http) and set(running) == FLEET | set(models) and all(
            len(pids) == 1 for pids in running.values()
        )

    try:
        wait_for(match, "replica processes == ingress + controller + charged models", timeout)
    except AssertionError:
        raise AssertionError(f"processes {last[0]} != ledger {last[1]} (+ ingress, controller)") from None


def test_serve_runs_exactly_the_models_the_ledger_charges(http):
    # Right after start and long after it alike: nothing weightless is kept running.
    assert_processes_match_ledger(http)
    time.sleep(6)  # past any start-up grace
    assert_processes_match_ledger(http, timeout=5)
    for model in charged(http).values():
        assert model["status"] == "loaded" and model["process_bytes"] > 0


def test_a_load_and_an_unload_start_and_stop_one_process(http):
    model = "tiny-llama"
    reply = http.post("/v1/completions", json={"model": model, "prompt": "hi", "max_tokens": 2})
    assert reply.status_code == 200, reply.text
    assert_processes_match_ledger(http)
    assert deployment_name(model) in replica_processes()
    view = charged(http)[deployment_name(model)]
    pid = replica_processes()[deployment_name(model)][0]
    # The ledger charges the process that runs (RSS measured at load, within what it is now).
    rss = psutil.Process(pid).memory_info().rss
    assert 0.5 * rss <= view["process_bytes"] <= 1.5 * rss
    assert http.post(f"/admin/models/{model}/unload").status_code == 200
    assert_processes_match_ledger(http)
    assert deployment_name(model) not in replica_processes()


def stays_unloaded(http, model: str, seconds: float = 5.0) -> None:
    """The model's replica is gone and no process of it comes back (Serve's request metrics
    from the last request must not undo the eviction)."""
    assert_processes_match_ledger(http)
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        assert deployment_name(model) not in replica_processes(), f"{model}'s replica came back"
        time.sleep(0.1)
    assert http.get(f"/v1/models/{model}").json()["status"] == "unloaded"


def test_an_eviction_right_after_a_request_is_never_undone(http):
    model = "tiny-qwen2"
    for _ in range(3):
        reply = http.post("/v1/completions", json={"model": model, "prompt": "hi", "max_tokens": 2})
        assert reply.status_code == 200, reply.text
        assert http.post(f"/admin/models/{model}/unload").status_code == 200
        stays_unloaded(http, model, seconds=3)


def test_an_eviction_after_a_client_died_mid_request_is_never_undone(http, base_url):
    import signal
    import subprocess
    import sys

    model = "tiny-gemma"
    client = (
        "import httpx, sys\n"
        "body = {'model': sys.argv[2], 'stream': True, 'max_tokens': 2000, "
        "'messages': [{'role': 'user', 'content': 'hi'}]}\n"
        "with httpx.stream('POST', sys.argv[1] + '/v1/chat/completions', json=body, timeout=120) as r:\n"
        "    for line in r.iter_lines():\n"
        "        if line.startswith('data:'):\n"
        "            print('streaming', flush=True)\n"
    )
    for _ in range(2):
        process = subprocess.Popen([sys.executable, "-c", client, base_url, model], stdout=subprocess.PIPE, text=True)
        assert process.stdout.readline().strip() == "streaming"
        process.send_signal(signal.SIGKILL)  # the client dies mid-stream
        process.wait()
        assert http.post(f"/admin/models/{model}/unload").status_code == 200
        stays_unloaded(http, model)


def maps_mlx(pid: int) -> bool:
    return any("libmlx" in m.path for m in psutil.Process(pid).memory_maps())


def ready_warm_workers(http) -> list[dict]:
    return [w for w in http.get("/admin/models").json()["warm_workers"] if w["ready"]]


def test_only_model_replicas_import_mlx_and_they_keep_the_open_file_limit(http):
    # The ingress, the controller (and Serve's own actors) stay as small as Ray makes them;
    # a model replica imports mlx-lm, which would set the open-file limit to (2048, 4096)
    # when imported: deployments/mlx_runtime keeps the limit.
    import resource

    running = replica_processes()
    for name in FLEET:
        assert not maps_mlx(running[name][0]), f"{name} imported MLX"
    reply = http.post("/v1/completions", json={"model": "tiny-llama", "prompt": "hi", "max_tokens": 2})
    assert reply.status_code == 200, reply.text
    (replica,) = replica_processes()[deployment_name("tiny-llama")]
    assert maps_mlx(replica)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    assert psutil.Process(replica).rlimit(psutil.RLIMIT_NOFILE) == (soft, hard)
    assert soft > 2048 or soft == resource.RLIM_INFINITY  # else this machine's limit proves nothing
    assert http.post("/admin/models/tiny-llama/unload").status_code == 200


def test_a_cold_load_starts_in_the_warm_worker_and_another_takes_its_place(http):
    model = "tiny-mistral"
    assert http.post(f"/admin/models/{model}/unload").status_code == 200  # a cold load follows
    # Each application of this session's cluster keeps one; they share them (one runtime env).
    wait_for(lambda: ready_warm_workers(http), "a warm worker ready")
    waiting = {w["pid"] for w in http.get("/admin/models").json()["warm_workers"]}
    warm = ready_warm_workers(http)[0]
    # An idle process of this cluster, MLX and mlx-lm imported, shown with what it holds.
    process = psutil.Process(warm["pid"])
    assert process.parent().pid == raylet_pid() and maps_mlx(warm["pid"])
    assert 0.5 * process.memory_info().rss <= warm["rss_bytes"] <= 1.5 * process.memory_info().rss
    reply = http.post("/v1/completions", json={"model": model, "prompt": "hi", "max_tokens": 2})
    assert reply.status_code == 200, reply.text
    (replica,) = replica_processes()[deployment_name(model)]
    assert replica in waiting, f"replica {replica} not among the warm workers {waiting}: {raylet_children()}"
    wait_for(
        lambda: {w["pid"] for w in ready_warm_workers(http)} - {replica},
        "another warm worker ready",
        timeout=90,  # the controller checks every 10 s, past a starting one's grace
    )
    assert http.post(f"/admin/models/{model}/unload").status_code == 200
    assert_processes_match_ledger(http)
    assert not psutil.pid_exists(replica)  # the replica's process ends with it


def raylet_children() -> list[tuple[int, str, str | None]]:
    found = []
    for process in psutil.Process(raylet_pid()).children():
        try:
            found.append((process.pid, process.cmdline()[0][:60], process.environ().get(SETUP_HOOK_ENV)))
        except (psutil.Error, IndexError):
            continue
    return found
