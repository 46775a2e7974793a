"""Model type and family detection (policies/detection.py) on real public configs and names."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from policies.detection import EMBEDDINGS, TEXT, VISION, detect, detect_from_config, detect_from_name

FIXTURES = Path(__file__).parent / "fixtures"
TYPES = {"text": TEXT, "vision": VISION, "embeddings": EMBEDDINGS}
CONFIG_FIXTURES = sorted((FIXTURES / "configs").glob("*.json"))
NAME_FIXTURES = json.loads((FIXTURES / "model_names.json").read_text())


@pytest.mark.parametrize("path", CONFIG_FIXTURES, ids=lambda p: p.stem)
def test_public_configs(path):
    fixture = json.loads(path.read_text())
    found = detect_from_config(fixture["config"], files=set(), name=fixture["hub_name"].split("/")[-1])
    assert found.type == TYPES[fixture["expected_type"]], found.reason
    assert found.family in fixture["acceptable_families"], found
    assert found.architecture == fixture["expected_architecture"]
    assert found.reason


@pytest.mark.parametrize("entry", NAME_FIXTURES, ids=lambda e: e["name"])
def test_names_without_config(entry):
    found = detect_from_name(entry["name"])
    assert found.type == TYPES[entry["expected_type"]], found.reason
    assert found.family in entry["acceptable_families"], found


@pytest.mark.parametrize(
    "config, name, expected_type, expected_family",
    [
        # Gemma 3 1B is text-only; 4B and larger carry a vision tower.
        ({"architectures": ["Gemma3ForCausalLM"], "model_type": "gemma3_text"}, "gemma-3-1b-it", TEXT, "gemma"),
        ({"architectures": ["Gemma3ForConditionalGeneration"], "model_type": "gemma3",
          "vision_config": {"model_type": "siglip_vision_model"}, "text_config": {"model_type": "gemma3_text"}},
         "gemma-3-4b-it", VISION, "gemma"),
        # Phi-3.5-vision's architecture ends in ForCausalLM; its config still has a vision part.
        ({"architectures": ["Phi3VForCausalLM"], "model_type": "phi3_v", "img_processor": {"name": "clip_vision_model"}},
         "Phi-3.5-vision-instruct", VISION, "phi"),
        # Qwen3-Embedding is a Qwen3ForCausalLM by architecture.
        ({"architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3"}, "Qwen3-Embedding-0.6B", EMBEDDINGS, "qwen"),
        # DeepSeek-R1-Distill-Qwen is a Qwen2 model.
        ({"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2"}, "DeepSeek-R1-Distill-Qwen-7B", TEXT, "qwen"),
        # SmolLM is a Llama inside.
        ({"architectures": ["LlamaForCausalLM"], "model_type": "llama"}, "SmolLM2-135M-Instruct", TEXT, "llama"),
        # mlx quantized configs carry a quantization key; it changes nothing.
        ({"architectures": ["MistralForCausalLM"], "model_type": "mistral", "quantization": {"group_size": 64, "bits": 4}},
         "Mistral-7B-Instruct-v0.3-4bit", TEXT, "mistral"),
    ],
)
def test_tricky_configs(config, name, expected_type, expected_family):
    found = detect_from_config(config, files=set(), name=name)
    assert (found.type, found.family) == (expected_type, expected_family), found.reason


@pytest.mark.parametrize(
    "name, expected_type, expected_family",
    [
        ("deepseek-ai/DeepSeek-R1-Distill-Qwen-7B", TEXT, "qwen"),
        ("HuggingFaceTB/SmolLM2-1.7B-Instruct", TEXT, "llama"),
        ("mlx-community/Qwen3-Embedding-0.6B-4bit-DWQ", EMBEDDINGS, "qwen"),
        ("mlx-community/pixtral-12b-4bit", VISION, "pixtral"),
        ("mlx-community/Llama-3.2-11B-Vision-Instruct-4bit", VISION, "llama"),
        ("intfloat/multilingual-e5-large", EMBEDDINGS, "bert"),
        ("microsoft/phi-4", TEXT, "phi"),
    ],
)
def test_tricky_names(name, expected_type, expected_family):
    found = detect_from_name(name)
    assert (found.type, found.family) == (expected_type, expected_family), found.reason


def test_sentence_transformers_files_decide(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3"}))
    (tmp_path / "modules.json").write_text("[]")
    found = detect(str(tmp_path))
    assert (found.type, found.family) == (EMBEDDINGS, "qwen")
    assert "modules.json" in found.reason


def test_demo_models(demo_models):
    expected = {
        "tiny-llama": (TEXT, "llama"), "tiny-qwen2": (TEXT, "qwen"), "tiny-mistral": (TEXT, "mistral"),
        "tiny-gemma": (TEXT, "gemma"), "bench-llama-20m": (TEXT, "llama"),
        "tiny-qwen2-vl": (VISION, "qwen"), "all-MiniLM-L6-v2": (EMBEDDINGS, "bert"),
    }
    for name, kind in expected.items():
        found = detect(str(demo_models / name))
        assert (found.type, found.family) == kind, (name, found)


def test_command_line(demo_models, tmp_path):
    config_file = demo_models / "tiny-gemma" / "config.json"
    out = subprocess.run(
        [sys.executable, "-m", "fleet_cli", "detect", str(demo_models / "all-MiniLM-L6-v2"), str(config_file), "acme/house-model-v2"],
        capture_output=True, text=True, check=True, cwd=Path(__file__).parent.parent,
    ).stdout
    rows = [json.loads(line) for line in out.splitlines()]
    assert [set(row) for row in rows] == [{"input", "type", "family", "architecture", "reason"}] * 3
    assert [(r["type"], r["family"], r["architecture"]) for r in rows] == [
        (EMBEDDINGS, "bert", "bert"), (TEXT, "gemma", "gemma"), (TEXT, "llama", None)
    ]
    assert rows[2]["reason"].startswith("no config.json")


def test_the_served_context_is_the_models_own_capped_by_max_context():
    from policies.features import config_context_length, served_context

    assert config_context_length({"max_position_embeddings": 8192}) == 8192
    # A vision-language model keeps its text model's context in text_config.
    assert config_context_length({"text_config": {"max_position_embeddings": 32768}}) == 32768
    assert config_context_length({}) is None
    assert served_context(8192, 1024) == 1024
    assert served_context(8192, None) == 8192
    assert served_context(None, 1024) == 1024
    assert served_context(None, None) is None
