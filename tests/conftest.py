"""One Ray cluster and one mlx-fleet application for the whole test session.

Integration tests start the app from the same `args` as serve_config.yaml, on free ports,
and shut everything down at the end (never `ray stop`: it would kill other clusters).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import pytest
import yaml

# In-process references run MLX under the same BLAS as the model replicas (same floats, same
# greedy tokens): chosen before any test module imports MLX.
import deployments.mlx_runtime  # noqa: F401

ROOT = Path(__file__).resolve().parent.parent
APP_NAME = "mlx-fleet"
# Prompt caches the test apps save when their models unload: one folder per app, out of the
# user's cache and gone after the session, so that no run starts warm from an earlier one.
PROMPT_CACHE_DIR = Path(tempfile.gettempdir()) / f"mlx-fleet-test-prompt-cache-{os.getpid()}"

# The single-host setting of `make serve`: Ray's own servers listen on loopback only. Read
# by Ray when it is imported, so set before any test module imports it.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
# The Ray settings `make serve` starts the fleet with: tested as shipped. Read by Ray's
# processes when `ray.init` starts them, after this.
from graph import fleet_env  # noqa: E402

for _name, _value in fleet_env().items():
    os.environ.setdefault(_name, _value)
# The session runs several applications, each ingress replica serving HTTP on a port of its
# own (direct ingress): Serve's default range, in place of the fleet's one port (8000, which
# a server of the user's may hold).
os.environ["RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT"] = "30000"
os.environ["RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT"] = "31000"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for(condition, what: str, timeout: float = 60) -> None:
    """Poll `condition` until it holds; a server that is restarting may fail a poll."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if condition():
                return
        except (httpx.HTTPError, KeyError, ValueError):
            pass
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for: {what}")


def default_app_args() -> dict:
    """serve_config.yaml's args, with answers capped at 512 tokens where a request names no
    max_tokens: the random-weight models rarely end an answer, and their contexts run to
    32k tokens. The uncapped default (the rest of the context) is tested in test_kv_admission."""
    config = yaml.safe_load((ROOT / "serve_config.yaml").read_text())
    return {**config["applications"][0]["args"], "default_max_tokens": 512}


@pytest.fixture(scope="session")
def demo_models() -> Path:
    """The offline demo catalog, fabricated once (idempotent, a few seconds)."""
    subprocess.run([sys.executable, str(ROOT / "scripts" / "make_demo_models.py")], check=True, cwd=ROOT)
    return ROOT / "models"


@pytest.fixture(scope="session")
def ray_cluster():
    import ray

    os.environ.pop("RAY_ADDRESS", None)
    ray.init(
        address="local",
        num_cpus=2,
        include_dashboard=False,
        runtime_env={"env_vars": {"HF_HUB_OFFLINE": "1"}},
        log_to_driver=False,
    )
    yield
    from ray import serve

    serve.shutdown()
    ray.shutdown()
    shutil.rmtree(PROMPT_CACHE_DIR, ignore_errors=True)


@pytest.fixture(scope="session")
def serve_port(ray_cluster) -> int:
    from ray import serve

    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    return port


# The applications this session deployed, by name: a Serve config is declarative, so each
# deploy names them all (an unchanged one is left running as it is).
DEPLOYED: dict[str, dict] = {}


def run_app(args: dict, name: str = APP_NAME, route_prefix: str = "/", import_path: str = "graph:build_app") -> str:
    """Deploy the application from `args`, as `serve run` would, and return its base URL: its
    ingress replica's own HTTP port (direct ingress, as `make serve` serves it)."""
    from graph import application_config, deploy

    os.chdir(ROOT)  # relative model paths in args are relative to the repo, as with `serve run`
    args = {"prompt_cache_dir": str(PROMPT_CACHE_DIR / name), **args}
    DEPLOYED[name] = application_config(args, name, route_prefix, import_path)
    deploy(list(DEPLOYED.values()))
    return app_url(name, route_prefix)


def app_url(name: str, route_prefix: str) -> str:
    """The application's base URL now: its ingress replica's port, which a restarted replica
    may not get back here (many applications share the session's port range)."""
    from graph import direct_ingress_port

    return f"http://127.0.0.1:{direct_ingress_port(name)}{route_prefix.rstrip('/')}"


def delete_app(name: str) -> None:
    from graph import deploy

    if DEPLOYED.pop(name, None) is not None:
        deploy(list(DEPLOYED.values()))


@pytest.fixture(scope="session")
def base_url(demo_models, serve_port) -> str:
    return run_app(default_app_args())


@pytest.fixture(scope="session")
def http(base_url):
    with httpx.Client(base_url=base_url, timeout=120) as client:
        yield client


@pytest.fixture(scope="session")
def client(base_url):
    from openai import OpenAI

    return OpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=0, timeout=120)
