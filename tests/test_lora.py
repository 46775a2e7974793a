"""LoRA adapters on one loaded base (deployments/lora.py), in-process MLX without Ray: each
adapter's greedy output equals mlx-lm's own `load(base, adapter_path=...)`, token for token,
with several adapters loaded beside each other; adapters that do not fit are refused."""

from __future__ import annotations

import json
import shutil

import pytest

from policies.adapters import read_adapter_config
from tests.test_speculation import EveryPass

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


def rank_8_adapter(demo_models, folder):
    """tiny-llama's third adapter, of another rank than the demo ones (built as they are)."""
    import importlib.util
    import sys

    spec = importlib.util.spec_from_file_location("make_demo_models", demo_models.parent / "scripts" / "make_demo_models.py")
    demo = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = demo
    spec.loader.exec_module(demo)
    (folder / "tiny-llama").symlink_to(demo_models / "tiny-llama")
    (folder / "rank-8").mkdir()
    demo.lora_builder("tiny-llama", seed=3, rank=8)(folder / "rank-8", "rank-8")
    return folder / "rank-8"


@pytest.mark.parametrize("ranks,speculate", [("equal", False), ("different", False), ("different", True)])
def test_one_batch_mixes_adapters_and_each_row_answers_as_alone(demo_models, tmp_path, ranks, speculate):
    """The engine's batch runs base and adapter rows together (one generator, one forward
    pass per step): each answers exactly as it does alone, and as mlx-lm with the adapter.
    Adapters of one rank share one gathered product; of different ranks, one each. With
    speculation, a verify pass runs each row's proposal with the row's adapter."""
    import queue
    from concurrent.futures import ThreadPoolExecutor

    from mlx_lm import load

    from deployments.batching import BatchEngine, Sequence
    from deployments.generative import make_sampler
    from deployments.lora import Adapters
    from policies.families import adapter_for
    from policies.generation import Sampling

    class Watched(Adapters):
        """Notes each forward pass whose rows ran different adapters."""

        mixed_passes = 0

        def __setattr__(self, name, value):
            if name == "rows" and value is not None:
                Watched.mixed_passes += 1
            super().__setattr__(name, value)

    model, tokenizer = load(str(demo_models / "tiny-llama"))
    adapters = Watched(model)
    paths = {name: demo_models / name for name in ("tiny-llama-lora-a", "tiny-llama-lora-b")}
    if ranks == "different":
        paths["tiny-llama-lora-b"] = rank_8_adapter(demo_models, tmp_path)
    for name, path in paths.items():
        adapters.load(name, str(path))
    executor = ThreadPoolExecutor(max_workers=1)
    engine = BatchEngine(
        model, tokenizer, executor, lambda s: make_sampler(adapter_for("llama"), s), adapters=adapters,
        speculate=speculate, pass_cost=EveryPass() if speculate else None,
    )

    def run(batch: list[str | None]) -> list[list[int]]:
        outputs = [queue.Queue() for _ in batch]
        executor.submit(lambda: None).result()  # the engine idle: all are queued before it starts
        sequences = [
            Sequence(tokenizer.encode(PROMPT), TOKENS, Sampling(temperature=0.0), out.put, adapter=adapter)
            for adapter, out in zip(batch, outputs)
        ]
        for sequence in sequences:
            engine._incoming.append(sequence)
        with engine._lock:
            engine._start()
        texts = []
        for out in outputs:
            items = [out.get(timeout=60)]
            while not items[-1].finish_reason:
                items.append(out.get(timeout=60))
            texts.append("".join(step.text for step in items))
        return texts

    try:
        alone = {adapter: run([adapter])[0] for adapter in (None, "tiny-llama-lora-a", "tiny-llama-lora-b")}
        mixed = [None, "tiny-llama-lora-a", "tiny-llama-lora-b", "tiny-llama-lora-a", None]
        assert Watched.mixed_passes == 0
        assert run(mixed) == [alone[adapter] for adapter in mixed]
        if speculate:  # fewer passes than tokens, each one mixed
            assert engine.speculation.accepted > 0 and Watched.mixed_passes >= TOKENS // 9
        else:
            assert Watched.mixed_passes >= TOKENS  # one batch: every decode step mixed them
        assert len(set(alone.values())) == 3
        reference, _ = load(str(demo_models / "tiny-llama"), adapter_path=str(paths["tiny-llama-lora-b"]))
        from mlx_lm import generate
        assert alone["tiny-llama-lora-b"] == generate(reference, tokenizer, PROMPT, max_tokens=TOKENS)
    finally:
        executor.shutdown()
