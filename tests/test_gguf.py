"""GGUF conversion (deployments/gguf.py), without Ray: tiny models written as GGUF the way
llama.cpp writes them come back as the same model, for every supported architecture."""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from gguf import GGMLQuantizationType, GGUFWriter
from mlx.utils import tree_flatten

from deployments.gguf import GGUFError, converted_model_dir
from graph import ConfigError, build_catalog, load_config
from policies.detection import detect, read_gguf_metadata
from tests.gguf_files import write_gguf

TEXT = "The quick brown fox jumps over the lazy dog. 1234 <|im_start|>"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")
FABRICATED = {
    "qwen3": {"head_dim": 16, "tie_word_embeddings": True, "rope_theta": 1_000_000.0},
    "gemma3_text": {  # six layers: one period of five local layers and a global one
        "num_hidden_layers": 6, "head_dim": 16, "num_key_value_heads": 1, "query_pre_attn_scalar": 16,
        "sliding_window": 512, "rope_theta": 1_000_000.0,
    },
}


def fabricate(out: Path, model_type: str, tokenizer_from: Path) -> Path:
    """A random tiny model of an architecture the demo catalog lacks, with tiny-llama's tokenizer."""
    import importlib

    out.mkdir(parents=True)
    for name in TOKENIZER_FILES:
        shutil.copy(tokenizer_from / name, out / name)
    vocab = json.loads((tokenizer_from / "config.json").read_text())["vocab_size"]
    config = {
        "model_type": model_type, "hidden_size": 64, "num_hidden_layers": 2, "intermediate_size": 128,
        "num_attention_heads": 4, "num_key_value_heads": 2, "rms_norm_eps": 1e-6, "vocab_size": vocab,
        "max_position_embeddings": 2048, **FABRICATED[model_type],
    }
    architecture = importlib.import_module(f"mlx_lm.models.{model_type}")
    mx.random.seed(3)
    model = architecture.Model(architecture.ModelArgs.from_dict(config))
    mx.save_safetensors(str(out / "model.safetensors"), dict(tree_flatten(model.parameters())))
    (out / "config.json").write_text(json.dumps(config))
    return out


@pytest.fixture(scope="module")
def sources(demo_models, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("gguf-sources")
    return {
        "llama": demo_models / "tiny-llama",
        "qwen2": demo_models / "tiny-qwen2",
        "qwen3": fabricate(root / "qwen3", "qwen3", demo_models / "tiny-llama"),
        "gemma3": fabricate(root / "gemma3", "gemma3_text", demo_models / "tiny-llama"),
    }


def logits(model_dir: Path, ids: list[int]) -> np.ndarray:
    from mlx_lm import load

    model, _ = load(str(model_dir))
    return np.array(model(mx.array([ids]))[0].astype(mx.float32))


def tokenizer(model_dir: Path):
    from mlx_lm import load

    return load(str(model_dir))[1]


@pytest.mark.parametrize("architecture", ["llama", "qwen2", "qwen3", "gemma3"])
def test_a_gguf_converts_back_to_the_same_model(sources, tmp_path, architecture):
    source = sources[architecture]
    gguf = write_gguf(source, tmp_path / f"tiny-{architecture}.gguf", architecture)
    converted = converted_model_dir(gguf, tmp_path / "cache", dequantize=False)

    original, back = tokenizer(source), tokenizer(converted)
    ids = original.encode(TEXT)
    assert back.encode(TEXT) == ids
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi!"}]
    assert back.apply_chat_template(chat, tokenize=False, add_generation_prompt=True) == \
        original.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    assert back.eos_token == original.eos_token
    # Same numbers out of the same tokens: permutations and norm offsets are undone.
    np.testing.assert_allclose(logits(converted, ids), logits(source, ids), atol=1e-4, rtol=1e-4)


def test_q8_0_and_q4_0_stay_quantized_and_float32_expands_them(sources, tmp_path):
    source = sources["llama"]
    ids = tokenizer(source).encode(TEXT)
    reference = logits(source, ids)
    for linear_type, bits, tolerance in ((GGMLQuantizationType.Q8_0, 8, 0.05), (GGMLQuantizationType.Q4_0, 4, 0.5)):
        gguf = write_gguf(source, tmp_path / f"tiny-{linear_type.name}.gguf", "llama", linear_type)
        native = converted_model_dir(gguf, tmp_path / "cache", dequantize=False)
        expanded = converted_model_dir(gguf, tmp_path / "cache", dequantize=True)
        assert json.loads((native / "config.json").read_text())["quantization"] == {"group_size": 32, "bits": bits}
        assert "quantization" not in json.loads((expanded / "config.json").read_text())
        weights = mx.load(str(native / "model.safetensors"))
        assert weights["model.layers.0.self_attn.q_proj.weight"].dtype == mx.uint32
        assert all(v.dtype == mx.float32 for v in mx.load(str(expanded / "model.safetensors")).values())
        quantized = logits(native, ids)
        np.testing.assert_allclose(logits(expanded, ids), quantized, atol=5e-3)  # the same numbers
        assert np.abs(quantized - reference).max() < tolerance  # within the quantization's error


def test_types_mlx_cannot_read_are_dequantized(sources, tmp_path):
    source = sources["qwen2"]
    gguf = write_gguf(source, tmp_path / "tiny-q5_0.gguf", "qwen2", GGMLQuantizationType.Q5_0)
    with pytest.raises(RuntimeError):
        mx.load(str(gguf))  # MLX's own reader refuses Q5_0
    converted = converted_model_dir(gguf, tmp_path / "cache", dequantize=False)
    from gguf import GGUFReader
    from gguf.quants import dequantize

    (down,) = [t for t in GGUFReader(str(gguf)).tensors if t.name == "blk.1.ffn_down.weight"]
    expected = dequantize(down.data, down.tensor_type).reshape(64, 128)
    got = mx.load(str(converted / "model.safetensors"))["model.layers.1.mlp.down_proj.weight"]
    np.testing.assert_allclose(np.array(got.astype(mx.float32)), expected, atol=1e-3)
    ids = tokenizer(source).encode(TEXT)
    assert np.abs(logits(converted, ids) - logits(source, ids)).max() < 0.5  # Q5_0's error


def test_conversion_is_cached_by_file_version_and_earlier_versions_removed(sources, tmp_path):
    gguf = write_gguf(sources["llama"], tmp_path / "tiny.gguf", "llama")
    started = time.perf_counter()
    first = converted_model_dir(gguf, tmp_path / "cache", dequantize=False)
    converting = time.perf_counter() - started
    written = (first / "model.safetensors").stat().st_mtime_ns
    assert converted_model_dir(gguf, tmp_path / "cache", dequantize=False) == first
    assert (first / "model.safetensors").stat().st_mtime_ns == written  # not converted again
    os.utime(gguf, ns=(time.time_ns(), time.time_ns() + 10**9))  # a new version of the file
    second = converted_model_dir(gguf, tmp_path / "cache", dequantize=False)
    assert second != first and (second / "config.json").exists()
    # The earlier version's copy is gone; a file of the same name elsewhere keeps its own.
    (tmp_path / "other").mkdir()
    elsewhere = write_gguf(sources["llama"], tmp_path / "other" / "tiny.gguf", "llama")
    third = converted_model_dir(elsewhere, tmp_path / "cache", dequantize=False)
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == sorted([second.name, third.name])
    assert converting > 0


def test_unsupported_architectures_are_refused_at_start(tmp_path):
    gguf = tmp_path / "phi.gguf"
    writer = GGUFWriter(str(gguf), "phi3")
    writer.add_block_count(1)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    config = load_config({"models": [{"id": "phi", "path": str(gguf)}]})
    with pytest.raises(ConfigError, match="architecture 'phi3'"):
        build_catalog(config)
    with pytest.raises(GGUFError, match="phi3"):
        converted_model_dir(gguf, tmp_path / "cache", dequantize=False)


def test_detection_reads_the_gguf_architecture(sources, tmp_path):
    folder = tmp_path / "Qwen-thing"
    folder.mkdir()
    write_gguf(sources["qwen2"], folder / "model.gguf", "qwen2")
    for path in (folder, folder / "model.gguf"):
        found = detect(str(path))
        assert (found.type, found.family, found.architecture) == ("text-generation", "qwen", "qwen2")
        assert "general.architecture 'qwen2'" in found.reason
    (folder / "other.gguf").write_bytes((folder / "model.gguf").read_bytes())
    config = load_config({"models": [{"id": "q", "path": str(folder)}]})
    with pytest.raises(ConfigError, match="several GGUF files"):
        build_catalog(config)


def test_the_header_reader_agrees_with_gguf_and_refuses_truncated_files(sources, tmp_path):
    from gguf import GGUFReader

    gguf = tmp_path / "model.gguf"
    write_gguf(sources["llama"], gguf, "llama")
    reference = {n: f.contents() for n, f in GGUFReader(str(gguf)).fields.items() if not n.startswith("GGUF.")}
    assert read_gguf_metadata(gguf, arrays=True) == reference
    # Without arrays, the tokenizer's lists are skipped and everything else still read.
    assert read_gguf_metadata(gguf) == {k: v for k, v in reference.items() if not isinstance(v, list)}
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(gguf.read_bytes()[:200])
    with pytest.raises(ValueError, match="ends early"):
        read_gguf_metadata(truncated)
