"""Warm reloads: a text model's prompt cache goes to disk when its replica is scaled to zero
and comes back with the next load. A third application in the session's cluster, with its
own prompt cache folder and a small disk bound."""

from __future__ import annotations

import shutil
from pathlib import Path

import httpx
import pytest
from openai import OpenAI

from tests.conftest import delete_app, run_app

APP = "mlx-fleet-warm"
KEY = "warm"
# A tiny-llama entry of ~300 tokens takes ~170 KB: one model's five fit, two models' ten do not.
DISK_BOUND = 1_200_000
SEA = [{"role": "user", "content": "Tell me about the sea and the mountains. " * 15}]


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("prompt-cache")


@pytest.fixture(scope="module")
def warm_url(demo_models, serve_port, base_url, store):
    # After the default app (base_url), so all share the cluster; this one under /warm.
    args = {
        "admin_api_key": KEY,
        "prompt_cache_dir": str(store),
        "prompt_cache_disk": DISK_BOUND,
        "models": [{"id": "chat", "path": "models/tiny-llama"}, {"id": "other", "path": "models/tiny-llama"}],
    }
    yield run_app(args, name=APP, route_prefix="/warm")
    delete_app(APP)


@pytest.fixture(scope="module")
def admin(warm_url):
    with httpx.Client(base_url=warm_url, timeout=120, headers={"Authorization": f"Bearer {KEY}"}) as client:
        yield client


@pytest.fixture(scope="module")
def openai_client(warm_url) -> OpenAI:
    return OpenAI(base_url=f"{warm_url}/v1", api_key="unused", max_retries=0, timeout=120)


def reload(admin: httpx.Client, model: str, wipe: Path | None = None) -> None:
    """Unload the model (its replica saves its prompt cache), optionally wipe what was saved,
    and load it again (it restores what is there)."""
    assert admin.post(f"/admin/models/{model}/unload").status_code == 200
    if wipe is not None:
        shutil.rmtree(wipe, ignore_errors=True)
    assert admin.post(f"/admin/models/{model}/load", json={"pin": False}).json()["status"] == "loaded"


def saved(store: Path, model: str) -> dict[str, float]:
    """The model's saved entries: file name -> modification time (when last used)."""
    return {f.name: f.stat().st_mtime for f in store.glob(f"{model}-*/*.safetensors")}


def test_second_turn_after_unload_and_reload_starts_from_the_saved_prefix(admin, openai_client, store):
    def ask(messages):
        return openai_client.chat.completions.create(model="chat", messages=messages, max_tokens=8, temperature=0)

    assert admin.post("/admin/models/chat/load", json={"pin": False}).status_code == 200
    first = ask(SEA)
    turn2 = [*SEA, {"role": "assistant", "content": first.choices[0].message.content},
             {"role": "user", "content": "And then?"}]

    reload(admin, "chat")
    assert saved(store, "chat")
    # The restored cache is held, and charged, from the load on.
    view = next(m for m in admin.get("/admin/models").json()["models"] if m["id"] == "chat")
    assert 0 < view["prompt_cache_bytes"] <= view["held_bytes"]
    after_reload = ask(turn2)

    # The same two turns without an eviction in between, from an empty prompt cache.
    (model_dir,) = store.glob("chat-*")
    reload(admin, "chat", wipe=model_dir)
    again = ask(SEA)
    assert again.choices[0].message.content == first.choices[0].message.content
    assert again.usage.prompt_tokens_details.cached_tokens == 0
    kept = ask(turn2)

    cached = after_reload.usage.prompt_tokens_details.cached_tokens
    assert cached == kept.usage.prompt_tokens_details.cached_tokens
    assert first.usage.prompt_tokens <= cached < after_reload.usage.prompt_tokens
    assert after_reload.choices[0].message.content == kept.choices[0].message.content


def test_saved_caches_stay_within_the_disk_bound_least_recently_used_first(admin, openai_client, store):
    for model in ("chat", "other"):  # empty prompt caches, nothing saved
        reload(admin, model, wipe=store)
    for n in range(5):
        messages = [{"role": "user", "content": f"Conversation {n}. {SEA[0]['content']}"}]
        openai_client.chat.completions.create(model="chat", messages=messages, max_tokens=4, temperature=0)
    assert admin.post("/admin/models/chat/unload").status_code == 200
    chat_saved = saved(store, "chat")
    assert len(chat_saved) == 5 and sum(f.stat().st_size for f in store.rglob("*.safetensors")) <= DISK_BOUND

    for n in range(5):
        messages = [{"role": "user", "content": f"Talk {n}. {SEA[0]['content']}"}]
        openai_client.chat.completions.create(model="other", messages=messages, max_tokens=4, temperature=0)
    assert admin.post("/admin/models/other/unload").status_code == 200

    # Together over the bound: the newer model's entries stay, the other's oldest went.
    assert sum(f.stat().st_size for f in store.rglob("*.safetensors")) <= DISK_BOUND
    assert len(saved(store, "other")) == 5
    left = saved(store, "chat")
    assert 0 < len(left) < 5
    newest = sorted(chat_saved, key=chat_saved.get)[-len(left):]
    assert sorted(left) == sorted(newest)
