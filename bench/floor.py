"""The floor a fleet's costs are measured against: Ray and Serve themselves.

    python -m bench.floor --port P    # bare Ray + Serve, nothing deployed, until SIGTERM

and `build_trivial` (import path `bench.floor:build_trivial`): an application of the
fleet's shape with nothing of the fleet in it, one trivial deployment per model declared as
the fleet declares its models (no replica, the same autoscaling policy), plus an ingress and
a controller that do nothing. `bench/footprint.py` starts both the way it starts the fleet
and reports every figure as fleet minus floor, from the same sitting.
"""

from __future__ import annotations

import argparse
import os
import signal
import threading
from typing import Any

from ray import serve
from starlette.requests import Request

from deployments.replica_policy import zero_replicas


@serve.deployment(ray_actor_options={"num_cpus": 0})
class TrivialModel:
    async def __call__(self) -> str:
        return "ok"


@serve.deployment(ray_actor_options={"num_cpus": 0})
class TrivialController:
    def __init__(self, models: dict[str, Any]):
        self.models = models


@serve.deployment(ray_actor_options={"num_cpus": 0})
class TrivialIngress:
    def __init__(self, controller: Any, models: dict[str, Any]):
        self.models = models

    async def __call__(self, request: Request) -> dict[str, list[str]]:
        return {"data": sorted(self.models)}


def build_trivial(args: dict[str, Any]):
    """`deployments` trivial models at zero replicas, a controller and an ingress."""
    models = {
        f"m{i}": TrivialModel.options(name=f"m{i}", autoscaling_config=zero_replicas()).bind()
        for i in range(int(args.get("deployments", 9)))
    }
    return TrivialIngress.bind(TrivialController.bind(models), models)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, required=True)
    port = parser.parse_args().port
    import ray

    os.environ.pop("RAY_ADDRESS", None)
    ray.init(address="local", include_dashboard=True, log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    print("ready", flush=True)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    stop.wait()
    serve.shutdown()
    ray.shutdown()


if __name__ == "__main__":
    main()
