"""The Mac path: models named by hub id, resolved from a local Hugging Face cache (a fake
one, laid out as huggingface_hub lays it out, holding demo models)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from graph import ConfigError, build_catalog, load_config

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def cache_model(cache: Path, repo: str, files_from: Path) -> Path:
    """`models--org--name/refs/main` and `snapshots/<commit>/` with the model's files."""
    entry = cache / f"models--{repo.replace('/', '--')}"
    snapshot = entry / "snapshots" / COMMIT
    shutil.copytree(files_from, snapshot)
    (entry / "refs").mkdir()
    (entry / "refs" / "main").write_text(COMMIT)
    return snapshot


@pytest.fixture
def hub_cache(demo_models, tmp_path) -> Path:
    cache_model(tmp_path, "mlx-community/SmolVLM-Tiny-Instruct", demo_models / "tiny-qwen2-vl")
    cache_model(tmp_path, "mistralai/Ministral-Tiny-Instruct", demo_models / "tiny-mistral")
    cache_model(tmp_path, "demo/all-MiniLM-L6-v2", demo_models / "all-MiniLM-L6-v2")
    return tmp_path


def catalog(hub_cache: Path, *models: dict, **settings):
    return build_catalog(load_config({"models": list(models), "hub_cache_dir": str(hub_cache), **settings}))


def test_hub_ids_resolve_to_their_snapshot_and_are_detected_there(hub_cache):
    vision, text, embeddings = catalog(
        hub_cache,
        {"id": "vlm", "path": "mlx-community/SmolVLM-Tiny-Instruct"},
        {"id": "ministral", "path": "mistralai/Ministral-Tiny-Instruct"},
        {"id": "minilm", "path": "demo/all-MiniLM-L6-v2"},
    )
    assert vision.path.endswith(f"models--mlx-community--SmolVLM-Tiny-Instruct/snapshots/{COMMIT}")
    assert (vision.type, text.type, embeddings.type) == ("vision", "text-generation", "embeddings")
    assert text.family == "mistral"
    assert (Path(text.path) / "config.json").exists()


def test_a_hub_id_missing_from_the_cache_stops_the_start_with_the_download_command(hub_cache):
    with pytest.raises(ConfigError) as error:
        catalog(hub_cache, {"id": "gone", "path": "mlx-community/Not-Downloaded-4bit"})
    message = str(error.value)
    assert "'gone'" in message and "hf download mlx-community/Not-Downloaded-4bit" in message
    assert "allow_download: true" in message


def test_with_downloads_allowed_a_missing_model_is_kept_by_id_without_a_size(hub_cache):
    from policies.memory import estimate_model_bytes

    (entry,) = catalog(hub_cache, {"id": "later", "path": "mlx-community/Not-Downloaded-4bit"}, allow_download=True)
    assert entry.path == "mlx-community/Not-Downloaded-4bit"
    assert estimate_model_bytes(entry.path, replica_overhead=200_000_000) is None  # not 0 bytes


@pytest.mark.parametrize(
    "name, kind, family",
    [
        ("HuggingFaceTB/SmolVLM-Instruct", "vision", None),
        ("HuggingFaceTB/SmolVLM2-2.2B-Instruct", "vision", None),
        ("mistralai/Ministral-8B-Instruct-2410", "text-generation", "mistral"),
        ("Ministral-3b-instruct", "text-generation", "mistral"),
        ("mistralai/Devstral-Small-2505", "text-generation", "mistral"),
        ("HuggingFaceTB/SmolLM2-1.7B-Instruct", "text-generation", "llama"),
        ("sentence-transformers/all-MiniLM-L6-v2", "embeddings", None),
    ],
)
def test_name_words_inside_brand_names(name, kind, family):
    from policies.detection import detect_from_name

    found = detect_from_name(name)
    assert found.type == kind
    if family:
        assert found.family == family
