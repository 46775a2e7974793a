"""A new model type plugs in through the registry alone: no change to ingress or controller.

The "echo" type exists only in this test: its deployment answers chats with the last user
message reversed.
"""

from __future__ import annotations

from typing import AsyncIterator

import httpx
from ray import serve

from tests.conftest import delete_app, run_app

from policies.generation import GenerationRequest
from policies.events import Content, Finish
from deployments.registry import MODEL_KINDS, ModelKind
from policies.capabilities import CHAT, Capabilities
from graph import build_application


@serve.deployment(ray_actor_options={"num_cpus": 0})
class EchoModel:
    def __init__(self, entry, config):
        self.loaded = None

    async def load(self):
        from deployments.model_server import LoadReport

        self.loaded = LoadReport(model="echo", seconds=0.0, weights_bytes=0, process_bytes=1, process_before_bytes=1)
        return self.loaded

    def state(self):
        from deployments.model_server import ReplicaState

        return ReplicaState("loaded" if self.loaded else "none", self.loaded, [])

    async def generate(self, job: GenerationRequest, lease_id: str) -> list:
        text = job.messages[-1]["content"][::-1]
        return [Content(text), Finish("stop", len(job.messages), len(text))]

    async def stream(self, job: GenerationRequest, lease_id: str) -> AsyncIterator:
        text, finish = await self.generate(job, lease_id)
        for char in text.text:
            yield [Content(char)]
        yield [finish]


KINDS = {**MODEL_KINDS, "echo": ModelKind(EchoModel, Capabilities(frozenset({CHAT})))}


def build_echo(args: dict):
    """The application with the echo type registered (its import path for the config)."""
    return build_application(args, KINDS)


def test_registering_a_new_type(serve_port, base_url):
    args = {"models": [{"id": "parrot", "path": "models/tiny-llama", "type": "echo", "family": "echo"}]}
    url = run_app(args, "mlx-fleet-echo", "/echo", import_path="tests.test_registry:build_echo")
    try:
        card = httpx.get(f"{url}/v1/models/parrot").json()
        assert (card["type"], card["family"]) == ("echo", "echo")
        body = {"model": "parrot", "messages": [{"role": "user", "content": "hello"}]}
        reply = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=60).json()
        assert reply["choices"][0]["message"]["content"] == "olleh"
        with httpx.stream("POST", f"{url}/v1/chat/completions", json={**body, "stream": True}, timeout=60) as r:
            lines = [line for line in r.iter_lines() if line]
        assert lines[-1] == "data: [DONE]" and len(lines) == 5 + 3  # role, 5 chars, finish, DONE
        # Endpoints the type did not register answer 400, not 500.
        completion = httpx.post(f"{url}/v1/completions", json={"model": "parrot", "prompt": "x"}, timeout=60)
        assert completion.status_code == 400
        assert "does not serve /v1/completions" in completion.json()["error"]["message"]
    finally:
        delete_app("mlx-fleet-echo")
