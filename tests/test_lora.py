"""LoRA adapters on one loaded base (deployments/lora.py), in-process MLX without Ray: each
adapter's greedy output equals mlx-lm's own `load(base, adapter_path=...)`, token for token,
with several adapters loaded beside each other; adapters that do not fit are refused."""

from __future__ import annotations

import json
import shutil

import pytest

from policies.adapters import read_adapter_config

PROMPT = "the quick brown fox"
TOKENS = 24


def greedy(model, tokenizer) -> list[int]:
    from mlx_lm.generate import generate_step
    import mlx.core as mx

    prompt = mx.array(tokenizer.encode(PROMPT))
    return [int(token) for token, _ in zip((t for t, _ in generate_step(prompt, model)), range(TOKENS))]


@pytest.fixture(scope="module")
def base(demo_models):
    from mlx_lm import load

    return load(str(demo_models / "tiny-llama"))


def test_each_adapter_answers_as_mlx_lm_loads_it(base, demo_models):
    from mlx_lm import load

    from deployments.lora import Adapters

    model, tokenizer = base
    adapters = Adapters(model)
    for name in ("tiny-llama-lora-a", "tiny-llama-lora-b"):
        adapters.load(name, str(demo_models / name))
    plain = greedy(model, tokenizer)
    answers = {}
    for name in ("tiny-llama-lora-a", "tiny-llama-lora-b"):
        adapters.active = name
        answers[name] = greedy(model, tokenizer)
        reference, _ = load(str(demo_models / "tiny-llama"), adapter_path=str(demo_models / name))
        assert answers[name] == greedy(reference, tokenizer)
    adapters.active = None
    assert greedy(model, tokenizer) == plain  # the base is untouched
    assert len({tuple(plain), *map(tuple, answers.values())}) == 3  # each adapter changes the answer
    adapters.unload("tiny-llama-lora-a")
    adapters.active = "tiny-llama-lora-a"  # an unloaded adapter adds nothing
    assert greedy(model, tokenizer) == plain and set(adapters.loaded) == {"tiny-llama-lora-b"}


def test_adapters_that_do_not_fit_are_refused(demo_models, tmp_path):
    from mlx_lm import load

    from deployments.lora import AdapterError, Adapters

    model, _ = load(str(demo_models / "tiny-llama"))
    dora = tmp_path / "dora"
    shutil.copytree(demo_models / "tiny-llama-lora-a", dora)
    config = json.loads((dora / "adapter_config.json").read_text())
    (dora / "adapter_config.json").write_text(json.dumps({**config, "fine_tune_type": "dora"}))
    with pytest.raises(ValueError, match="only LoRA adapters"):
        read_adapter_config(dora)
    with pytest.raises(ValueError, match="has no adapter_config.json"):
        read_adapter_config(tmp_path)

    import mlx.core as mx

    wrong = tmp_path / "wrong"
    shutil.copytree(demo_models / "tiny-llama-lora-a", wrong)
    weights = mx.load(str(wrong / "adapters.safetensors"))
    name = next(k for k in weights if k.endswith("lora_a"))
    weights[name] = mx.zeros((weights[name].shape[0] + 1, weights[name].shape[1]))
    mx.save_safetensors(str(wrong / "adapters.safetensors"), weights)
    with pytest.raises(AdapterError, match="do not fit"):
        Adapters(model).load("wrong", str(wrong))
