"""A multi-node Ray cluster on this one machine, serving mlx-fleet; driven over stdin.

    python bench/multinode_driver.py CONFIG.json

CONFIG.json: {"args": <the application's args>, "nodes": ["a", "b"], "num_cpus": 2,
"system_config": <Ray's, default SYSTEM_CONFIG>}. The
head node carries no fleet label (the controller and the ingress run there); every name in
"nodes" becomes a Ray node labelled `mlx-fleet/node=<name>`. Run from the repository root
(relative model paths), in a process group of its own: `bench/multinode.py` starts it for
`tests/test_multinode.py` and `bench/nodes.py`.

Protocol, one line each, on stdout (anything else there is noise to skip):
    NODES {"a": "<node id hex>", ...}   the labelled nodes, after start and after each change
    READY <base url>                    the application answers
    REMOVED <name> / ADDED <name>       after `remove <name>` / `add <name>` on stdin
    ERROR <message>                     a command failed; the driver goes on
    ALIVE {"<node id hex>": true, ...}  after `alive`: every node GCS knows, and whether alive
    BYE                                 after `quit`: Serve, Ray and every node are gone
Commands on stdin: `remove <name>` (SIGKILL that node's raylet and workers, as a Mac that
drops off the network), `add <name>` (a new node with that label), `alive`, `quit`. End of
stdin, SIGTERM and SIGINT also quit.

The cluster's temp dir is private (RAY_TMPDIR), so that `ray.init()` elsewhere on the
machine never finds this cluster through /tmp/ray/ray_current_cluster, and its session
files go with it.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path

NODE_LABEL = "mlx-fleet/node"
ROOT = Path(__file__).resolve().parent.parent

# Before Ray is imported: its servers on loopback only, and a temp dir of our own.
os.environ.pop("RAY_ADDRESS", None)
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
WORK_DIR = Path(tempfile.mkdtemp(prefix="mlxmn-", dir="/tmp"))  # short: Ray's socket paths
os.environ["RAY_TMPDIR"] = str(WORK_DIR)
# The nodes' workers (model replicas) import this checkout's modules, as this process does.
os.environ["PYTHONPATH"] = os.pathsep.join(
    [str(ROOT), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
)
sys.path.insert(0, str(ROOT))

# GCS declares a node dead after `threshold` missed health checks `period` apart: ~3 s here
# rather than Ray's default 30 s, so that a removed node is noticed while a test waits.
SYSTEM_CONFIG = {
    "health_check_initial_delay_ms": 1000,
    "health_check_period_ms": 1000,
    "health_check_timeout_ms": 1000,
    "health_check_failure_threshold": 3,
}

_print_lock = threading.Lock()


def say(line: str) -> None:
    with _print_lock:
        sys.stdout.write(line + "\n")
        sys.stdout.flush()


def log(message: str) -> None:
    print(f"multinode driver: {message}", file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Fleet:
    def __init__(self, config: dict):
        self.config = config
        self.num_cpus = int(config.get("num_cpus", 2))
        self.cluster = None
        self.nodes: dict = {}  # name -> ray._private.node.Node
        self.stopped = False
        self.lock = threading.Lock()

    def start(self) -> str:
        started = time.monotonic()
        import ray
        from ray import serve
        from ray.cluster_utils import Cluster

        self.cluster = Cluster(
            initialize_head=True,
            head_node_args={
                "num_cpus": self.num_cpus,
                "include_dashboard": False,
                # Even without the dashboard Ray runs a minimal one, on 8265 unless told.
                "dashboard_port": free_port(),
                "node_ip_address": "127.0.0.1",
                "_system_config": self.config.get("system_config", SYSTEM_CONFIG),
            },
        )
        for name in self.config.get("nodes", []):
            self.add(name)
        log(f"cluster of {1 + len(self.nodes)} nodes up in {time.monotonic() - started:.1f} s")
        ray.init(
            address=self.cluster.address,
            log_to_driver=False,
            runtime_env={"env_vars": {"HF_HUB_OFFLINE": "1"}},
        )
        port = free_port()
        # One machine: proxies on every node would all bind this port.
        serve.start(http_options={"host": "127.0.0.1", "port": port, "location": "HeadOnly"})

        from graph import application_config, deploy, direct_ingress_port

        os.chdir(ROOT)
        args = {"prompt_cache_dir": str(WORK_DIR / "prompt-cache"), **self.config["args"]}
        log(f"Serve started at {time.monotonic() - started:.1f} s")
        deploy([application_config(args, "mlx-fleet")])
        log(f"application running at {time.monotonic() - started:.1f} s")
        self.report_nodes()
        return f"http://127.0.0.1:{direct_ingress_port('mlx-fleet')}"

    def add(self, name: str) -> None:
        if name in self.nodes:
            raise ValueError(f"node {name} is already in the cluster")
        self.nodes[name] = self.cluster.add_node(
            num_cpus=self.num_cpus, node_ip_address="127.0.0.1", labels={NODE_LABEL: name}
        )

    def remove(self, name: str) -> None:
        node = self.nodes.pop(name)
        self.cluster.remove_node(node, allow_graceful=False)

    def report_nodes(self) -> None:
        say("NODES " + json.dumps({name: node.node_id for name, node in self.nodes.items()}))

    def stop(self) -> None:
        """Serve, the driver's connection, every node; each step runs even if one before fails."""
        with self.lock:
            if self.stopped:
                return
            self.stopped = True
        import ray

        steps = []
        if ray.is_initialized():
            from ray import serve

            steps += [serve.shutdown, ray.shutdown]
        if self.cluster is not None:
            steps.append(self.cluster.shutdown)
        for step in steps:
            try:
                step()
            except Exception as error:  # noqa: BLE001 - keep tearing down
                log(f"{step.__qualname__} failed: {error!r}")
        shutil.rmtree(WORK_DIR, ignore_errors=True)


def main() -> int:
    config = json.loads(Path(sys.argv[1]).read_text())
    fleet = Fleet(config)

    def on_signal(signum, frame):
        fleet.stop()
        os._exit(0)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        url = fleet.start()
        say(f"READY {url}")
        for line in sys.stdin:
            command, _, name = line.strip().partition(" ")
            try:
                if command == "quit":
                    break
                if command == "remove":
                    fleet.remove(name)
                    fleet.report_nodes()
                    say(f"REMOVED {name}")
                elif command == "add":
                    fleet.add(name)
                    fleet.report_nodes()
                    say(f"ADDED {name}")
                elif command == "alive":
                    import ray

                    say("ALIVE " + json.dumps({n["NodeID"]: n["Alive"] for n in ray.nodes()}))
                elif command:
                    say(f"ERROR unknown command {line.strip()!r}")
            except Exception as error:  # noqa: BLE001 - report, keep serving
                say(f"ERROR {command} {name}: {error!r}")
    finally:
        fleet.stop()
    say("BYE")
    return 0


if __name__ == "__main__":
    started = time.monotonic()
    code = main()
    log(f"ran {time.monotonic() - started:.1f} s")
    sys.exit(code)
