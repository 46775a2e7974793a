"""LoRA adapters served as models of their own on their base's replica (issue 25): each
answers as mlx-lm answers with the adapter loaded, alone and mixed with the base and the
other adapter, is charged its own bytes, is evicted before its base, and has a prompt cache
of its own; /v1/models, /admin/models and `mlx-fleet ps` show it under its base.

An application of its own under /adapters: tiny-llama with two adapters (one sized by
override, one measured), beside two models that take the room they need.
"""

from __future__ import annotations

import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from policies.config import CONTROLLER_NAME, INGRESS_NAME, deployment_name
from tests.conftest import ROOT, run_app, wait_for
from tests.test_ledger_truth import replica_processes

APP = "mlx-fleet-adapters"
BASE, LORA_A, LORA_B = "tiny-llama", "tiny-llama-lora-a", "tiny-llama-lora-b"
PROMPT = "the quick brown fox"
TOKENS = 16


def adapters_args() -> dict:
    return {
        "memory_limit": "2.2GB",
        "load_wait_timeout": "60s",
        "default_max_tokens": 64,
        "models": [
            {"id": BASE, "path": "models/tiny-llama", "memory": "1GB"},
            {"id": LORA_A, "base": BASE, "path": "models/tiny-llama-lora-a", "memory": "0.3GB"},
            {"id": LORA_B, "base": BASE, "path": "models/tiny-llama-lora-b"},
            {"id": "qwen", "path": "models/tiny-qwen2", "memory": "1GB"},
            {"id": "gemma", "path": "models/tiny-gemma", "memory": "1.5GB"},
        ],
    }


@pytest.fixture(scope="module")
def adapters(demo_models, serve_port):
    url = run_app(adapters_args(), name=APP, route_prefix="/adapters")
    with httpx.Client(base_url=url, timeout=120) as client:
        wait_for(lambda: client.get("/health").status_code == 200, "adapters app answers")
        yield client


@pytest.fixture(scope="module")
def reference(demo_models):
    """Greedy text in-process, `reference(model id, prompt)`: mlx-lm's own load of the base,
    with the adapter when the id is one."""
    from mlx_lm import generate, load

    loaded = {
        model_id: load(str(demo_models / BASE), adapter_path=str(demo_models / model_id) if model_id != BASE else None)
        for model_id in (BASE, LORA_A, LORA_B)
    }

    def answer(model_id: str, prompt: str = PROMPT) -> str:
        model, tokenizer = loaded[model_id]
        return generate(model, tokenizer, prompt, max_tokens=TOKENS)

    assert len({answer(m) for m in loaded}) == 3  # each adapter changes the answer
    return answer


def complete(client: httpx.Client, model_id: str, prompt: str = PROMPT) -> dict:
    response = client.post(
        "/v1/completions", json={"model": model_id, "prompt": prompt, "max_tokens": TOKENS, "temperature": 0}
    )
    assert response.status_code == 200, response.text
    return response.json()


def admin(client: httpx.Client) -> dict[str, dict]:
    return {m["id"]: m for m in client.get("/admin/models").json()["models"]}


def unload_all(client: httpx.Client) -> None:
    for model_id, model in admin(client).items():
        if model["status"] != "unloaded":
            assert client.post(f"/admin/models/{model_id}/unload").status_code == 200


def test_adapters_are_models_of_their_own_under_their_base(adapters):
    cards = {m["id"]: m for m in adapters.get("/v1/models").json()["data"]}
    assert cards[LORA_A]["parent"] == BASE and cards[LORA_B]["parent"] == BASE
    assert cards[BASE].get("parent") is None
    assert cards[LORA_A]["context_length"] == cards[BASE]["context_length"]
    assert cards[LORA_A]["capabilities"] == cards[BASE]["capabilities"]


def test_each_adapter_answers_as_mlx_lm_loads_it_alone_and_mixed(adapters, reference):
    unload_all(adapters)
    for model_id in (LORA_A, BASE, LORA_B):
        assert complete(adapters, model_id)["choices"][0]["text"] == reference(model_id)
    view = admin(adapters)
    assert {view[m]["status"] for m in (BASE, LORA_A, LORA_B)} == {"loaded"}
    # One process for the three: the adapters run in the base's replica.
    assert view[LORA_A]["node"] == view[BASE]["node"]
    assert {d: len(pids) for d, pids in replica_processes(APP).items() if d not in (INGRESS_NAME, CONTROLLER_NAME)} == {
        deployment_name(BASE): 1
    }

    mixed = [BASE, LORA_A, LORA_B] * 4
    with ThreadPoolExecutor(len(mixed)) as pool:
        answers = list(pool.map(lambda m: complete(adapters, m), mixed))
    for model_id, answer in zip(mixed, answers):
        assert answer["choices"][0]["text"] == reference(model_id), model_id


def test_an_adapter_is_charged_its_bytes_and_evicted_before_its_base(adapters):
    unload_all(adapters)
    for model_id in (BASE, LORA_A, LORA_B):
        complete(adapters, model_id)
    view = admin(adapters)
    before = {m: view[m]["evictions"] for m in (BASE, LORA_A)}  # admin unloads count too

    def evictions(view: dict) -> tuple[int, int]:
        return view[LORA_A]["evictions"] - before[LORA_A], view[BASE]["evictions"] - before[BASE]

    assert view[LORA_A]["memory_bytes"] == 300_000_000  # its override
    weights = (ROOT / "models" / LORA_B / "adapters.safetensors").stat().st_size
    assert 0.5 * weights <= view[LORA_B]["memory_bytes"] <= 1.5 * weights  # its matrices, measured
    # qwen needs 1 GB, 0.9 GB are free: an adapter goes (the least recently used), not the base.
    complete(adapters, "qwen")
    view = admin(adapters)
    assert (view[LORA_A]["status"], view[LORA_B]["status"], view[BASE]["status"]) == ("unloaded", "loaded", "loaded")
    assert evictions(view) == (1, 0)
    # The adapter loads again into its resident base, which stays while it waits to.
    complete(adapters, LORA_A)
    view = admin(adapters)
    assert (view[LORA_A]["status"], view[BASE]["status"], view["qwen"]["status"]) == ("loaded", "loaded", "unloaded")
    # gemma needs 1.5 GB: the adapter goes first, then its base.
    complete(adapters, "gemma")
    view = admin(adapters)
    assert (view[BASE]["status"], view[LORA_A]["status"]) == ("unloaded", "unloaded")
    assert evictions(view) == (2, 1)
    totals = adapters.get("/admin/models").json()
    assert view["gemma"]["status"] == "loaded" and totals["used_bytes"] <= totals["memory_limit_bytes"]


def test_each_adapter_has_its_own_prompt_cache(adapters, reference):
    unload_all(adapters)
    fresh = "a prompt no earlier test sent, to be cached"
    first = complete(adapters, LORA_A, fresh)
    base = complete(adapters, BASE, fresh)  # lora-a's cache of this prompt must not serve it
    again = complete(adapters, LORA_A, fresh)
    assert base["choices"][0]["text"] == reference(BASE, fresh)
    # The base may share a token or so with its own earlier prompts; lora-a's second request
    # reads all but the last token of its first from lora-a's cache.
    cached = {name: answer["usage"]["prompt_tokens_details"]["cached_tokens"] for name, answer in (("base", base), ("again", again))}
    assert cached["base"] < cached["again"] == again["usage"]["prompt_tokens"] - 1, cached
    assert first["choices"][0]["text"] == again["choices"][0]["text"] == reference(LORA_A, fresh)


def test_ps_shows_adapters_under_their_base(adapters):
    unload_all(adapters)
    complete(adapters, LORA_B)
    env = {**os.environ, "MLX_FLEET_URL": str(adapters.base_url)}
    lines = subprocess.run(
        [sys.executable, "-m", "fleet_cli", "ps"], capture_output=True, text=True, cwd=ROOT, env=env, timeout=120
    ).stdout.splitlines()
    names = [line.split("  ")[0].strip() for line in lines if line.startswith((BASE, "└"))]
    assert names == [BASE, f"└ {LORA_B}"]
