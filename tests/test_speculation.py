"""Speculative decoding (prompt lookup) inside the continuous batch, on real tiny models and
without Ray: greedy output with speculation equals greedy output without it, token for
token, alone, batched with rows that propose different amounts, from a prompt cache hit,
under a grammar, with LoRA adapters mixed in a batch; and `usage` counts what was emitted.

The engines under test propose whenever a row has a guess (`EveryPass`: a pass is taken to
cost nothing), so that every path is exercised whatever this machine's costs; the decision
itself is tested in test_policies_speculation.
"""

from __future__ import annotations

import queue
from concurrent.futures import ThreadPoolExecutor

import pytest

from deployments.batching import BatchEngine, Sequence, Step
from deployments.generative import make_sampler
from policies.families import adapter_for
from policies.generation import Sampling
from policies.speculation import PassCost

TIMEOUT_S = 120
# Prompts that repeat themselves (the model copies) and one that does not.
COPY = "one two three four five six seven eight nine ten " * 6
CODE = "\n".join(f"def f{i}(value):\n    return value * {i}\n" for i in range(8))
FREE = "Once upon a time"


class EveryPass(PassCost):
    """A pass costs what a plain step does: every guess is checked by the model."""

    def relative(self, rows: int, proposed_per_row: int) -> float:
        return 1.0


def make_engine(model, tokenizer, speculate: bool, **options) -> BatchEngine:
    executor = ThreadPoolExecutor(max_workers=1)
    adapter = adapter_for("llama")
    return BatchEngine(
        model,
        tokenizer,
        executor,
        lambda sampling: make_sampler(adapter, sampling),
        speculate=speculate,
        pass_cost=EveryPass() if speculate else None,
        **options,
    )


@pytest.fixture(scope="module", params=["tiny-llama", "bench-llama-20m"])
def loaded(request, demo_models):
    from mlx_lm import load

    return load(str(demo_models / request.param))


class Run:
    def __init__(self, engine: BatchEngine, prompt: list[int], max_tokens: int = 48, processors=(), **sampling):
        self.items: queue.Queue = queue.Queue()
        sampling.setdefault("temperature", 0.0)
        self.sequence = Sequence(
            prompt=prompt,
            max_tokens=max_tokens,
            sampling=Sampling(**sampling),
            emit=self.items.put,
            processors=list(processors),
        )
        engine.submit(self.sequence)

    def steps(self) -> list[Step]:
        steps = []
        while not steps or not steps[-1].finish_reason:
            item = self.items.get(timeout=TIMEOUT_S)
            if isinstance(item, BaseException):
                raise item
            steps.append(item)
        return steps


def text_and_count(steps: list[Step]) -> tuple[str, int, str]:
    return "".join(s.text for s in steps), sum(s.tokens for s in steps), steps[-1].finish_reason


def test_alone_and_batched_the_text_is_the_one_without_speculation(loaded):
    model, tokenizer = loaded
    plain, speculating = make_engine(model, tokenizer, False), make_engine(model, tokenizer, True)
    prompts = [tokenizer.encode(p) for p in (COPY, CODE, FREE, COPY[:40])]
    expected = [text_and_count(Run(plain, p).steps()) for p in prompts]
    for prompt, want in zip(prompts, expected):  # alone
        assert text_and_count(Run(speculating, prompt).steps()) == want
    assert speculating.speculation.accepted > 0, "nothing was accepted: the copy prompts did not speculate"
    before = speculating.speculation.passes
    runs = [Run(speculating, p) for p in prompts]  # one batch; rows propose and accept differently
    assert [text_and_count(r.steps()) for r in runs] == expected
    assert speculating.speculation.passes > before
    # usage counts generated tokens: the finish reason and the count are the plain run's.
    assert all(count <= 48 for _, count, _ in expected)


def test_max_tokens_is_kept_exactly_when_a_proposal_would_run_past_it(loaded):
    model, tokenizer = loaded
    plain, speculating = make_engine(model, tokenizer, False), make_engine(model, tokenizer, True)
    prompt = tokenizer.encode(COPY)
    for max_tokens in (1, 2, 5, 13):
        want = text_and_count(Run(plain, prompt, max_tokens).steps())
        got = text_and_count(Run(speculating, prompt, max_tokens).steps())
        assert got == want and got[1] <= max_tokens


def test_a_prompt_cache_hit_speculates_to_the_same_text(loaded):
    model, tokenizer = loaded
    plain = make_engine(model, tokenizer, False)
    speculating = make_engine(model, tokenizer, True, prompt_cache_bytes=64 << 20)
    first, follow_up = tokenizer.encode(COPY), tokenizer.encode(COPY + " eleven twelve")
    for prompt in (first, follow_up):
        want = text_and_count(Run(plain, prompt).steps())
        steps = Run(speculating, prompt).steps()
        assert text_and_count(steps) == want
    assert steps[-1].cached_tokens > 0, "the follow-up did not start from the cached prefix"


def test_under_a_grammar_proposals_are_cut_to_what_it_allows_and_the_text_is_the_same(loaded):
    from deployments.constraints import GrammarTokenizer
    from policies.constraints import Constraint

    model, tokenizer = loaded
    grammar = GrammarTokenizer(tokenizer)
    schema = {
        "type": "object",
        "properties": {"words": {"type": "array", "items": {"enum": ["one", "two", "three"]}}},
        "required": ["words"],
    }
    constraint = Constraint(schema=schema)
    plain, speculating = make_engine(model, tokenizer, False), make_engine(model, tokenizer, True)
    prompt = tokenizer.encode(COPY)
    want = text_and_count(Run(plain, prompt, 64, [grammar.mask(constraint, None)]).steps())
    mask = grammar.mask(constraint, None)
    got = text_and_count(Run(speculating, prompt, 64, [mask]).steps())
    assert got == want and mask.error is None
    assert speculating.speculation.proposed > 0, "no proposal was made under the grammar"


def test_sampled_rows_speculate_and_seeded_ones_reproduce(loaded):
    import mlx.core as mx

    model, tokenizer = loaded
    speculating = make_engine(model, tokenizer, True)
    prompt = tokenizer.encode(COPY)
    seeded = [text_and_count(Run(speculating, prompt, temperature=0.8, seed=7).steps()) for _ in range(2)]
    assert seeded[0] == seeded[1]
    passes = speculating.speculation.passes
    mx.random.seed(3)  # the unseeded row draws from MLX's global state: one fixed draw here
    sampled = Run(speculating, prompt, 32, temperature=0.7, top_k=3).steps()
    assert 1 <= sum(s.tokens for s in sampled) <= 32
    assert speculating.speculation.passes > passes  # a sampled row was verified by its own draws


@pytest.fixture(scope="module")
def bench_and_draft(demo_models):
    """The bench model, and tiny-llama as its draft (the same vocabulary)."""
    from mlx_lm import load

    return load(str(demo_models / "bench-llama-20m")), load(str(demo_models / "tiny-llama"))[0]


@pytest.mark.parametrize("draft_is_the_model", [True, False])
def test_a_draft_model_proposes_and_the_text_is_the_one_without_it(bench_and_draft, draft_is_the_model):
    """A draft equal to the target proposes what the target chooses (greedy: every proposal
    is accepted); a different one proposes what it would say, and the target keeps its own
    text either way, alone and in a batch whose rows join and finish at different times."""
    (model, tokenizer), other = bench_and_draft
    draft = model if draft_is_the_model else other
    plain = make_engine(model, tokenizer, False)
    drafted = make_engine(model, tokenizer, False, draft=draft)
    prompts = [tokenizer.encode(p) for p in (COPY, CODE, FREE, COPY[:40])]
    lengths = [48, 30, 17, 5]
    expected = [text_and_count(Run(plain, p, n).steps()) for p, n in zip(prompts, lengths)]
    assert text_and_count(Run(drafted, prompts[0], lengths[0]).steps()) == expected[0]
    runs = [Run(drafted, p, n) for p, n in zip(prompts, lengths)]
    assert [text_and_count(r.steps()) for r in runs] == expected
    counts = drafted.speculation
    assert counts.passes > 0 and counts.proposed > 0
    if draft_is_the_model:
        assert counts.accepted == counts.proposed
