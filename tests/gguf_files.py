"""GGUF files written the way llama.cpp's converter writes them, from mlx-lm model folders.

Tests build tiny models, write them as GGUF here (q/k rows permuted for llama, Gemma norms
stored plus one, llama.cpp's metadata keys and tokenizer arrays), and check that the server's
converter gives back the same model.
"""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx
import numpy as np
from gguf import GGMLQuantizationType, GGUFWriter, TokenType
from gguf.quants import quantize

HF_TO_GGUF_BLOCK = {
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "self_attn.q_norm": "attn_q_norm",
    "self_attn.k_norm": "attn_k_norm",
    "input_layernorm": "attn_norm",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
    "post_attention_layernorm": "ffn_norm",
}
GEMMA3_BLOCK = {
    **HF_TO_GGUF_BLOCK,
    "post_attention_layernorm": "post_attention_norm",
    "pre_feedforward_layernorm": "ffn_norm",
    "post_feedforward_layernorm": "post_ffw_norm",
}
HF_TO_GGUF_MODEL = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output"}


def llama_cpp_permute(weights: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's `permute` (convert_hf_to_gguf.py) for q/k projection rows."""
    return (
        weights.reshape(heads, 2, weights.shape[0] // heads // 2, *weights.shape[1:])
        .swapaxes(1, 2)
        .reshape(weights.shape)
    )


def write_gguf(
    model_dir: Path,
    out: Path,
    architecture: str,
    linear_type: GGMLQuantizationType = GGMLQuantizationType.F32,
) -> Path:
    config = json.loads((model_dir / "config.json").read_text())
    weights = {k: np.array(v.astype(mx.float32)) for k, v in mx.load(str(model_dir / "model.safetensors")).items()}
    writer = GGUFWriter(str(out), architecture)
    heads = config["num_attention_heads"]
    kv_heads = config.get("num_key_value_heads", heads)
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_context_length(config.get("max_position_embeddings", 2048))
    writer.add_embedding_length(config["hidden_size"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_key_length(config.get("head_dim") or config["hidden_size"] // heads)
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    writer.add_rope_freq_base(config.get("rope_theta", 10_000.0))
    writer.add_vocab_size(config["vocab_size"])
    if architecture == "gemma3":
        writer.add_sliding_window(config["sliding_window"])
    _add_tokenizer(writer, model_dir)

    block_names = GEMMA3_BLOCK if architecture == "gemma3" else HF_TO_GGUF_BLOCK
    for name, value in weights.items():
        module, _, suffix = name.rpartition(".")
        if module.startswith("model.layers."):
            _, _, index, rest = module.split(".", 3)
            gguf_name = f"blk.{index}.{block_names[rest]}.{suffix}"
        else:
            gguf_name = f"{HF_TO_GGUF_MODEL[module]}.{suffix}"
        if architecture == "llama" and module.endswith(("q_proj", "k_proj")):
            value = llama_cpp_permute(value, heads if module.endswith("q_proj") else kv_heads)
        if architecture == "gemma3" and module.endswith("norm"):
            value = value + 1
        if value.ndim == 2 and linear_type != GGMLQuantizationType.F32:
            writer.add_tensor(gguf_name, quantize(value, linear_type), raw_dtype=linear_type)
        else:
            writer.add_tensor(gguf_name, value)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out


def _add_tokenizer(writer: GGUFWriter, model_dir: Path) -> None:
    """A byte-level BPE tokenizer as llama.cpp stores one ("gpt2")."""
    tokenizer = json.loads((model_dir / "tokenizer.json").read_text())
    settings = json.loads((model_dir / "tokenizer_config.json").read_text())
    vocab = dict(tokenizer["model"]["vocab"])
    special = {added["content"]: added["id"] for added in tokenizer.get("added_tokens", [])}
    vocab.update(special)
    tokens = [token for token, _ in sorted(vocab.items(), key=lambda item: item[1])]
    merges = [m if isinstance(m, str) else " ".join(m) for m in tokenizer["model"]["merges"]]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_merges(merges)
    writer.add_token_types([TokenType.CONTROL if t in special else TokenType.NORMAL for t in tokens])
    for role in ("bos", "eos"):
        token = settings.get(f"{role}_token")
        if isinstance(token, dict):
            token = token["content"]
        if token in vocab:
            getattr(writer, f"add_{role}_token_id")(vocab[token])
    # As llama.cpp's SpecialVocab: BOS is added when the post-processor's template starts with it.
    processors = tokenizer.get("post_processor") or {}
    template = next(
        (p for p in processors.get("processors", [processors]) if p.get("type") == "TemplateProcessing"), None
    )
    first = (template or {}).get("single", [{}])[0].get("SpecialToken", {}).get("id")
    writer.add_add_bos_token(first is not None and first == settings.get("bos_token"))
    template = model_dir / "chat_template.jinja"
    writer.add_chat_template(template.read_text() if template.exists() else settings["chat_template"])
