"""The continuous-batching engine on a real tiny model, without Ray: a sequence that fails
fails alone, its batch-mates finish exactly as they would have alone, and the engine keeps
serving."""

from __future__ import annotations

import queue
from concurrent.futures import ThreadPoolExecutor

import pytest

from deployments.batching import BatchEngine, Sequence, Step
from policies.generation import Sampling
from deployments.generative import make_sampler
from policies.families import adapter_for

PROMPTS = ["Once upon a time", "The capital of France", "def main():", "Hello there, friend"]
MAX_TOKENS = 24
TIMEOUT_S = 60


@pytest.fixture(scope="module")
def engine(demo_models):
    from mlx_lm import load

    model, tokenizer = load(str(demo_models / "tiny-llama"))
    executor = ThreadPoolExecutor(max_workers=1)
    adapter = adapter_for("llama")

    def sampler_for(sampling: Sampling):
        if sampling.top_p == 0.123:  # this test's way of asking for a sampler that breaks
            raise ValueError("sampler construction failed")
        return make_sampler(adapter, sampling)

    yield BatchEngine(model, tokenizer, executor, sampler_for), tokenizer
    executor.shutdown()


class Run:
    """One submitted sequence and what the engine emitted for it."""

    def __init__(self, engine: BatchEngine, tokenizer, prompt: str, **sampling):
        self.items: queue.Queue = queue.Queue()
        sampling.setdefault("temperature", 0.0)
        self.sequence = Sequence(
            prompt=tokenizer.encode(prompt),
            max_tokens=MAX_TOKENS,
            sampling=Sampling(**sampling),
            emit=self.items.put,
        )
        engine.submit(self.sequence)

    def first(self) -> Step:
        item = self.items.get(timeout=TIMEOUT_S)
        self._buffer = [item]
        return item

    def result(self) -> str | BaseException:
        items = getattr(self, "_buffer", [])
        while not (items and (isinstance(items[-1], BaseException) or items[-1].finish_reason)):
            items.append(self.items.get(timeout=TIMEOUT_S))
        if isinstance(items[-1], BaseException):
            return items[-1]
        return "".join(step.text for step in items)


def solo(engine, tokenizer, prompt: str) -> str:
    return Run(engine, tokenizer, prompt).result()


def test_a_seed_mlx_cannot_take_fails_alone_inside_a_running_batch(engine):
    engine, tokenizer = engine
    alone = {prompt: solo(engine, tokenizer, prompt) for prompt in PROMPTS}
    assert all(isinstance(text, str) and text for text in alone.values())

    runs = [Run(engine, tokenizer, prompt) for prompt in PROMPTS]
    runs[0].first()  # the batch is decoding
    bad = Run(engine, tokenizer, "seeded", seed=-1)  # what the edge refuses, straight in

    error = bad.result()
    assert isinstance(error, BaseException)
    assert [run.result() for run in runs] == [alone[prompt] for prompt in PROMPTS]
    assert solo(engine, tokenizer, PROMPTS[1]) == alone[PROMPTS[1]]  # still serving


def test_a_sampler_that_cannot_be_built_fails_only_its_sequence(engine):
    engine, tokenizer = engine
    alone = {prompt: solo(engine, tokenizer, prompt) for prompt in PROMPTS}
    runs = [Run(engine, tokenizer, prompt) for prompt in PROMPTS[:2]]
    broken = Run(engine, tokenizer, "broken", top_p=0.123)
    runs += [Run(engine, tokenizer, prompt) for prompt in PROMPTS[2:]]

    error = broken.result()
    assert isinstance(error, ValueError) and "sampler construction failed" in str(error)
    assert [run.result() for run in runs] == [alone[prompt] for prompt in PROMPTS]


def test_a_cancelled_sequence_leaves_the_batch_and_the_rest_finish(engine):
    engine, tokenizer = engine
    alone = solo(engine, tokenizer, PROMPTS[2])
    leaving = Run(engine, tokenizer, PROMPTS[0])
    staying = Run(engine, tokenizer, PROMPTS[2])
    leaving.first()
    leaving.sequence.cancelled = True  # what the replica does when its client goes away
    assert staying.result() == alone


def test_the_same_seed_gives_the_same_text(engine):
    engine, tokenizer = engine
    first = Run(engine, tokenizer, PROMPTS[0], temperature=1.0, seed=7).result()
    again = Run(engine, tokenizer, PROMPTS[0], temperature=1.0, seed=7).result()
    assert isinstance(first, str) and first == again

