"""GGUF files as model sources: turned into an mlx-lm model folder once, then cached.

A GGUF (llama.cpp's format, what Ollama and LM Studio keep on disk) holds weights, the
model's settings and its tokenizer as metadata. `converted_model_dir` writes what
`mlx_lm.load` reads: `config.json`, `model.safetensors` and the tokenizer files with the
chat template. Conversion undoes what llama.cpp's converter did to Hugging Face weights:

- llama: q/k projection rows were permuted for llama.cpp's interleaved rotary layout;
- gemma3: norm weights were stored plus one (llama.cpp's norm multiplies by w, Gemma's by 1 + w).

Q4_0, Q4_1 and Q8_0 tensors stay quantized (MLX reads them as its own 4/8-bit, group 32);
files with other types (K-quants, ...) are dequantized with the `gguf` package.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

from policies.detection import read_gguf_metadata
from policies.logs import module_logger

logger = module_logger(__name__)

SUPPORTED = ("llama", "qwen2", "qwen3", "gemma3")
MLX_QUANT_GROUP = 32  # what MLX's GGUF reader makes of Q4_0, Q4_1 and Q8_0 blocks
WEIGHTS = "model.safetensors"

# GGUF tensor names -> Hugging Face module names, per block and for the whole model.
_BLOCK_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "attn_norm": "input_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "ffn_norm": "post_attention_layernorm",
}
# Gemma 3 has a norm on each side of attention and of the MLP.
_GEMMA3_BLOCK_NAMES = {
    **_BLOCK_NAMES,
    "post_attention_norm": "post_attention_layernorm",
    "ffn_norm": "pre_feedforward_layernorm",
    "post_ffw_norm": "post_feedforward_layernorm",
}
_MODEL_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
_MODEL_TYPES = {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "gemma3": "gemma3_text"}


class GGUFError(ValueError):
    """The file is not a GGUF this server can turn into a model; the message says why."""


def converted_model_dir(path: str | Path, cache_dir: str | Path, dequantize: bool) -> Path:
    """An mlx-lm model folder for a GGUF file, converted on first use and then reused.

    The cache entry is keyed by the file's path, size and modification time (and the
    weights' form), and is written to a temporary folder first, so a crash mid-conversion
    never leaves a half entry. A new entry replaces the ones of earlier versions of the
    same file (a download again, an edit): they would only fill the disk.
    """
    source = Path(path).resolve()
    stat = source.stat()
    form = "float32" if dequantize else "native"
    place = hashlib.sha1(str(source).encode()).hexdigest()[:8]
    target = Path(cache_dir).expanduser() / f"{source.stem}-{place}-{stat.st_size}-{stat.st_mtime_ns}-{form}"
    if (target / "config.json").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(f"{target.name}.partial-{os.getpid()}")
    shutil.rmtree(partial, ignore_errors=True)
    started = time.perf_counter()
    logger.info("converting %s (%.0f MB, %s weights) into %s", source, stat.st_size / 1e6, form, target)
    try:
        convert(source, partial, dequantize)
        os.replace(partial, target)
    except OSError:
        if not (target / "config.json").exists():  # not another process's finished copy
            raise
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    logger.info("converted %s in %.1f s", source.name, time.perf_counter() - started)
    for stale in target.parent.glob(f"{source.stem}-{place}-*-{form}"):
        if stale != target and ".partial-" not in stale.name:
            logger.info("removing %s: converted from an earlier version of %s", stale, source)
            shutil.rmtree(stale, ignore_errors=True)
    return target


def convert(source: Path, out: Path, dequantize: bool = False) -> None:
    """Write an mlx-lm model folder for the GGUF file `source` into `out`."""
    import mlx.core as mx

    metadata = read_gguf_metadata(source, arrays=True)
    architecture = metadata.get("general.architecture")
    if architecture not in SUPPORTED:
        raise GGUFError(
            f"{source.name}: architecture {architecture!r} is not supported for GGUF "
            f"(supported: {', '.join(SUPPORTED)})"
        )
    tensors = _read_tensors(source)
    config = model_config(metadata, tensors)
    weights = _hf_weights(architecture, tensors, config)
    if dequantize:
        weights = _dequantized(weights)
    elif any(name.endswith(".scales") for name in weights):
        config["quantization"] = {"group_size": MLX_QUANT_GROUP, "bits": _most_common_bits(weights)}
    out.mkdir(parents=True)
    mx.save_safetensors(str(out / WEIGHTS), weights, metadata={"format": "mlx"})
    (out / "config.json").write_text(json.dumps(config, indent=2))
    _save_tokenizer(metadata, out)


def model_config(metadata: dict[str, Any], tensors: dict[str, Any]) -> dict[str, Any]:
    """The Hugging Face style config.json of the model a GGUF describes."""
    architecture = metadata["general.architecture"]

    def get(key: str, default: Any = None) -> Any:
        return metadata.get(f"{architecture}.{key}", default)

    heads = int(get("attention.head_count"))
    hidden = int(get("embedding_length"))
    config: dict[str, Any] = {
        "model_type": _MODEL_TYPES[architecture],
        "hidden_size": hidden,
        "num_hidden_layers": int(get("block_count")),
        "intermediate_size": int(get("feed_forward_length")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(get("attention.head_count_kv", heads)),
        "head_dim": int(get("attention.key_length", hidden // heads)),
        "rms_norm_eps": float(get("attention.layer_norm_rms_epsilon", 1e-6)),
        "rope_theta": float(get("rope.freq_base", 10_000.0)),
        "max_position_embeddings": int(get("context_length", 2048)),
        "vocab_size": int(get("vocab_size", len(metadata.get("tokenizer.ggml.tokens", ())))),
        "tie_word_embeddings": not any(name.startswith("output.") for name in tensors),
    }
    if architecture == "gemma3":
        config.update(
            sliding_window=int(get("attention.sliding_window", 512)),
            query_pre_attn_scalar=config["head_dim"],
            rope_local_base_freq=10_000.0,  # llama.cpp's fixed value for Gemma 3's local layers
        )
    return config


def _read_tensors(source: Path) -> dict[str, Any]:
    """The file's tensors as MLX arrays: quantized as MLX's own where MLX reads the type,
    else dequantized to float16."""
    import mlx.core as mx

    try:
        return mx.load(str(source))
    except (ValueError, RuntimeError) as error:
        logger.info("MLX cannot read every tensor type of %s (%s): dequantizing with gguf", source.name, error)
    import numpy as np
    from gguf import GGUFReader
    from gguf.quants import dequantize

    tensors = {}
    for tensor in GGUFReader(str(source)).tensors:
        values = dequantize(tensor.data, tensor.tensor_type)
        shape = tuple(reversed([int(d) for d in tensor.shape]))  # GGUF lists dimensions innermost first
        tensors[tensor.name] = mx.array(np.asarray(values, dtype=np.float32).reshape(shape)).astype(mx.float16)
    return tensors


def _hf_weights(architecture: str, tensors: dict[str, Any], config: dict[str, Any]) -> dict[str, Any]:
    block_names = _GEMMA3_BLOCK_NAMES if architecture == "gemma3" else _BLOCK_NAMES
    weights = {}
    for name, value in tensors.items():
        stem, _, suffix = name.rpartition(".")  # suffix: weight, bias, scales or biases
        parts = stem.split(".")
        if parts[0] == "blk":
            hf = f"model.layers.{parts[1]}.{block_names[parts[2]]}"
        elif stem in _MODEL_NAMES:
            hf = _MODEL_NAMES[stem]
        else:
            raise GGUFError(f"tensor {name} has no place in a {architecture} model")
        weights[f"{hf}.{suffix}"] = _undo_llama_cpp(architecture, hf, suffix, value, config)
    return weights


def _undo_llama_cpp(architecture: str, name: str, suffix: str, value: Any, config: dict[str, Any]) -> Any:
    if architecture == "llama" and name.endswith(("q_proj", "k_proj")) and suffix != "bias":
        heads = config["num_attention_heads" if name.endswith("q_proj") else "num_key_value_heads"]
        return _unpermute_rows(value, heads)
    if architecture == "gemma3" and name.endswith("norm") and suffix == "weight":
        return value - 1
    return value


def _unpermute_rows(value: Any, heads: int) -> Any:
    """Undo llama.cpp's `permute`: within each head, rows (0, 1, 2, 3, ...) were interleaved
    as (pairs of halves); quantized weights, scales and biases share the row order."""
    rows = value.shape[0]
    return (
        value.reshape(heads, rows // heads // 2, 2, *value.shape[1:])
        .swapaxes(1, 2)
        .reshape(value.shape)
    )


def _dequantized(weights: dict[str, Any]) -> dict[str, Any]:
    """Every tensor as float32, quantized ones expanded from their scales and biases."""
    import mlx.core as mx

    plain = {}
    for name, value in weights.items():
        if name.endswith((".scales", ".biases")):
            continue
        stem = name[: -len(".weight")] if name.endswith(".weight") else None
        if stem is not None and f"{stem}.scales" in weights:
            scales, biases = weights[f"{stem}.scales"], weights[f"{stem}.biases"]
            bits = value.shape[-1] // scales.shape[-1]
            value = mx.dequantize(value, scales, biases, group_size=MLX_QUANT_GROUP, bits=bits)
        plain[name] = value.astype(mx.float32)
    return plain


def _most_common_bits(weights: dict[str, Any]) -> int:
    """Bits of most quantized tensors; mlx-lm reads each tensor's own from its shapes."""
    from collections import Counter

    bits = Counter(
        weights[f"{name[: -len('.scales')]}.weight"].shape[-1] // value.shape[-1]
        for name, value in weights.items()
        if name.endswith(".scales")
    )
    return bits.most_common(1)[0][0]


def _save_tokenizer(metadata: dict[str, Any], out: Path) -> None:
    """tokenizer.json and tokenizer_config.json (with the chat template) from the metadata."""
    from tokenizers import pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    from transformers.integrations.gguf.gguf_tokenizer_mapping import convert_gguf_tokenizer

    tokens = list(metadata["tokenizer.ggml.tokens"])
    description = {
        "tokenizer_type": metadata.get("tokenizer.ggml.model"),
        "pre_tokenizer_type": metadata.get("tokenizer.ggml.pre"),
        "tokens": tokens,
        "token_type": [int(t) for t in metadata.get("tokenizer.ggml.token_type", ())],
    }
    for key in ("merges", "scores"):
        if f"tokenizer.ggml.{key}" in metadata:
            description[key] = list(metadata[f"tokenizer.ggml.{key}"])
    backend, _ = convert_gguf_tokenizer(metadata["general.architecture"], description)
    if description["pre_tokenizer_type"] == "smollm":
        # SmolLM splits digits one by one before the byte-level regex (its tokenizer.json does).
        backend.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
        )

    def token(key: str) -> str | None:
        index = metadata.get(f"tokenizer.ggml.{key}_token_id")
        return None if index is None else tokens[int(index)]

    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=token("bos"),
        eos_token=token("eos"),
        unk_token=token("unknown"),
        pad_token=token("padding"),
        add_bos_token=bool(metadata.get("tokenizer.ggml.add_bos_token", False)),
        add_eos_token=bool(metadata.get("tokenizer.ggml.add_eos_token", False)),
    )
    template = metadata.get("tokenizer.chat_template")
    if template:
        tokenizer.chat_template = template
    tokenizer.save_pretrained(str(out))

