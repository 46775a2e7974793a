"""A draft model through the server (issue 26): `draft:` names another catalog model whose
weights run in the model's own replica (no process of their own), charged to it; the
model's greedy answers, plain and streamed, are those of the same model without
speculation; /admin/models counts the draft's proposals.

An application of its own under /drafts: the bench model drafted by a second catalog
entry of the same files (a draft that agrees with the model: every proposal is taken),
and the bench model with speculation off.
"""

from __future__ import annotations

import httpx
import pytest

from policies.config import deployment_name
from tests.conftest import run_app, wait_for
from tests.test_ledger_truth import replica_processes

APP = "mlx-fleet-drafts"
DRAFTED, TWIN, PLAIN = "bench-drafted", "bench-twin", "bench-plain"
PROMPT = "one two three four five six seven eight nine ten " * 4


def drafts_args() -> dict:
    path = "models/bench-llama-20m"
    return {
        "load_wait_timeout": "120s",
        "default_max_tokens": 64,
        "models": [
            {"id": DRAFTED, "path": path, "draft": TWIN},
            {"id": TWIN, "path": path},
            {"id": PLAIN, "path": path, "speculative": False},
        ],
    }


@pytest.fixture(scope="module")
def drafts(demo_models, serve_port):
    url = run_app(drafts_args(), name=APP, route_prefix="/drafts")
    with httpx.Client(base_url=url, timeout=120) as client:
        wait_for(lambda: client.get("/health").status_code == 200, "drafts app answers")
        yield client


def view(client: httpx.Client) -> dict[str, dict]:
    return {m["id"]: m for m in client.get("/admin/models").json()["models"]}


def completion(client: httpx.Client, model: str, stream: bool = False) -> str:
    body = {"model": model, "prompt": PROMPT, "max_tokens": 48, "temperature": 0, "stream": stream}
    if not stream:
        return client.post("/v1/completions", json=body).raise_for_status().json()["choices"][0]["text"]
    text = []
    with client.stream("POST", "/v1/completions", json=body) as response:
        for line in response.iter_lines():
            if line.startswith("data: {"):
                import json

                text += [choice["text"] for choice in json.loads(line[6:])["choices"]]
    return "".join(text)


def test_a_drafted_model_answers_as_without_speculation_and_its_draft_is_charged_to_it(drafts):
    expected = completion(drafts, PLAIN)
    assert completion(drafts, DRAFTED) == expected
    assert completion(drafts, DRAFTED, stream=True) == expected
    models = view(drafts)
    # The draft's weights are in the drafted model's replica: charged there, no process of its own.
    assert models[DRAFTED]["status"] == "loaded" and models[TWIN]["status"] == "unloaded"
    weights = models[PLAIN]["weights_bytes"]
    assert models[DRAFTED]["weights_bytes"] >= 1.8 * weights
    assert models[DRAFTED]["estimated_bytes"] >= models[PLAIN]["estimated_bytes"] + 0.9 * weights
    running = replica_processes(APP)
    assert deployment_name(TWIN) not in running and len(running[deployment_name(DRAFTED)]) == 1
    # A draft that is the model itself proposes what the model chooses: all of it is taken.
    wait_for(lambda: (view(drafts)[DRAFTED]["speculation"] or {}).get("passes", 0) > 0, "counts in /admin/models", 30)
    counts = view(drafts)[DRAFTED]["speculation"]
    assert counts["accepted_tokens"] == counts["proposed_tokens"] > 0 and counts["acceptance_rate"] == 1
    assert view(drafts)[PLAIN]["speculation"] is None
