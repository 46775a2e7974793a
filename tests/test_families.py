"""Family adapters (policies/families) with the demo models' real tokenizers and templates."""

from __future__ import annotations

import pytest

from policies.families import adapter_for, prepare_messages, render_chat

CHAT = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hello there!"},
    {"role": "assistant", "content": "Hi."},
    {"role": "user", "content": "What is the capital of France?"},
]

RENDERED = {
    "tiny-llama": (
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nHello there!<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\nHi.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nWhat is the capital of France?<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    ),
    "tiny-qwen2": (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHello there!<|im_end|>\n"
        "<|im_start|>assistant\nHi.<|im_end|>\n<|im_start|>user\nWhat is the capital of France?<|im_end|>\n"
        "<|im_start|>assistant\n"
    ),
    # No system role: the system text opens the first user turn.
    "tiny-mistral": "<s>[INST] Be brief.\n\nHello there! [/INST]Hi.</s>[INST] What is the capital of France? [/INST]",
    "tiny-gemma": (
        "<bos><start_of_turn>user\nBe brief.\n\nHello there!<end_of_turn>\n<start_of_turn>model\nHi.<end_of_turn>\n"
        "<start_of_turn>user\nWhat is the capital of France?<end_of_turn>\n<start_of_turn>model\n"
    ),
}
FAMILY = {"tiny-llama": "llama", "tiny-qwen2": "qwen", "tiny-mistral": "mistral", "tiny-gemma": "gemma"}


@pytest.mark.parametrize("model", RENDERED)
def test_each_family_renders_its_own_template(demo_models, model):
    from mlx_lm.tokenizer_utils import load as load_tokenizer

    tokenizer = load_tokenizer(demo_models / model)
    assert render_chat(adapter_for(FAMILY[model]), tokenizer, CHAT) == RENDERED[model]


def test_unknown_families_use_the_default_adapter():
    assert adapter_for("phi") is adapter_for("llama")
    assert adapter_for("deepseek").name == "llama"


def test_system_merge_and_role_alternation():
    gemma = adapter_for("gemma")
    messages = [
        {"role": "system", "content": "S1"},
        {"role": "user", "content": "u1"},
        {"role": "user", "content": "u2"},
        {"role": "system", "content": "S2"},
    ]
    assert prepare_messages(gemma, messages) == [{"role": "user", "content": "S1\n\nS2\n\nu1\n\nu2"}]
    assert prepare_messages(gemma, [{"role": "system", "content": "only"}]) == [{"role": "user", "content": "only"}]
    assert prepare_messages(adapter_for("qwen"), messages) == messages  # ChatML takes anything
    assert messages[1] == {"role": "user", "content": "u1"}  # the caller's list is not changed
