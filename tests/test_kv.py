"""KV sizes: the pure arithmetic, and the measurement against what mlx-lm really allocates,
on real tiny models without Ray."""

from __future__ import annotations

import queue
from concurrent.futures import ThreadPoolExecutor

import pytest

from deployments.batching import BatchEngine, Sequence
from deployments.generative import make_sampler
from deployments.text import measure_kv_shape
from policies.families import adapter_for
from policies.generation import Sampling
from policies.kv import KV_STEP_TOKENS, KvShape


def test_kv_bytes_grow_in_steps_and_windows_cap_their_layers():
    shape = KvShape(((100, None), (10, 512)))
    assert shape.bytes_per_token == 110
    assert shape.bytes_for(0) == 0
    assert shape.bytes_for(1) == 110 * KV_STEP_TOKENS
    assert shape.bytes_for(KV_STEP_TOKENS + 1) == 110 * 2 * KV_STEP_TOKENS
    assert shape.bytes_for(4000) == 100 * 4096 + 10 * 512


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-qwen3"])
def test_the_measured_shape_predicts_what_mlx_lm_allocates(demo_models, name):
    import mlx.core as mx
    from mlx_lm import load
    from mlx_lm.models.cache import make_prompt_cache

    model, _ = load(str(demo_models / name))
    shape = measure_kv_shape(model)
    for tokens in (1, 300, 700):
        cache = make_prompt_cache(model)
        mx.eval(model(mx.array([list(range(1, tokens + 1))]), cache=cache))
        allocated = sum(layer.keys.nbytes + layer.values.nbytes for layer in cache)
        assert shape.bytes_for(tokens) == allocated


def test_a_finished_sequence_leaves_no_more_in_the_prompt_cache_than_it_reserved(demo_models):
    from mlx_lm import load

    model, tokenizer = load(str(demo_models / "tiny-llama"))
    shape = measure_kv_shape(model)
    with ThreadPoolExecutor(max_workers=1) as executor:
        engine = BatchEngine(
            model, tokenizer, executor, lambda s: make_sampler(adapter_for("llama"), s), prompt_cache_bytes=10**9
        )
        prompt, max_tokens = tokenizer.encode("Once upon a time " * 40), 50
        steps: queue.Queue = queue.Queue()
        engine.submit(Sequence(prompt, max_tokens, Sampling(temperature=0.0), steps.put))
        while not steps.get(timeout=60).finish_reason:
            pass
        cached = engine.prompt_cache_bytes()
        assert 0 < cached <= shape.bytes_for(len(prompt) + max_tokens)
        engine.shrink_prompt_cache(0)
        assert engine.prompt_cache_bytes() == 0
