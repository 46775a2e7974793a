"""Continuous batching for text generation: concurrent requests share decode steps.

One engine per loaded text model runs on the replica's MLX thread. Requests join the
running batch as they arrive (mlx-lm's `BatchGenerator`, the machinery `mlx_lm.server`
uses) and leave it when they finish or their client goes away. Requests with a `seed` run
alone: a seed sets MLX's global random state, which batch neighbours would share.

Each decode step may speculate (`deployments.speculation`): rows propose tokens from their
own history and one forward pass checks them, when the odds and the pass's measured cost
say it pays; the output is the same token for token.

Requests for a model's LoRA adapters share the batch with each other and with the base:
each row of a forward pass adds its own adapter (`deployments.lora`). Work on the model
itself (loading an adapter) runs between two decode steps.
"""

from __future__ import annotations

import threading
from collections import deque
from concurrent.futures import Executor, Future
from dataclasses import dataclass, field
from typing import Any, Callable, TypeVar

from policies.generation import Sampling
from policies.speculation import PassCost, SpeculationCounts
from policies.events import TokenLogprob, TopLogprob
from policies.logs import module_logger

logger = module_logger(__name__)

T = TypeVar("T")


@dataclass
class Step:
    """One step of a generator, as the model libraries report it."""

    text: str
    tokens: int  # generated tokens this step adds to the completion
    finish_reason: str | None
    prompt_tokens: int
    logprob: TokenLogprob | None = None  # of the token this step adds, when asked for
    cached_tokens: int = 0  # prompt tokens read from the prompt cache rather than computed


@dataclass
class Sequence:
    """One request inside the engine. `emit` must be safe to call from the MLX thread."""

    prompt: list[int]
    max_tokens: int
    sampling: Sampling
    emit: Callable[[Step | BaseException], None]
    # mlx-lm logits processors of this sequence alone (a grammar's mask)
    processors: list[Callable] = field(default_factory=list)
    logprobs: int | None = None  # None: not wanted; n: with the n likeliest alternatives
    adapter: str | None = None  # the LoRA adapter it runs with; None: the base alone
    cancelled: bool = False
    cached_tokens: int = 0
    detokenizer: Any = field(default=None, repr=False)

    def step(self, text: str, tokens: int, finish_reason: str | None, logprob: TokenLogprob | None = None) -> None:
        self.emit(Step(text, tokens, finish_reason, len(self.prompt), logprob, self.cached_tokens))

    def fail(self, error: BaseException) -> None:
        """End this sequence with an error for its client; nothing else is touched."""
        if not self.cancelled:
            logger.warning("a sequence failed alone: %r", error)
        self.cancelled = True
        self.emit(error)


class BatchEngine:
    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        executor: Executor,
        make_sampler: Callable[[Sampling], Callable],
        prompt_cache_bytes: int = 0,
        max_batch: int = 32,
        adapters: Any = None,
        speculate: bool = False,
        pass_cost: PassCost | None = None,
        draft: Any = None,
    ):
        from mlx_lm.models.cache import LRUPromptCache

        self.model = model
        self.tokenizer = tokenizer
        self.executor = executor
        self.make_sampler = make_sampler
        self.max_batch = max_batch
        self.adapters = adapters  # deployments.lora.Adapters: which one the model runs with
        # A draft model (same vocabulary) proposes in place of prompt lookup.
        self.draft = draft
        self.speculation = SpeculationCounts() if speculate or draft is not None else None
        # Kept across batches: what a pass costs on this machine.
        self._pass_cost = pass_cost or PassCost()
        # KV caches of finished requests, keyed by their tokens: the next turn of a chat
        # starts from its longest cached prefix instead of reading the whole prompt again.
        self.prompt_cache = (
            LRUPromptCache(max_size=64, max_bytes=prompt_cache_bytes) if prompt_cache_bytes else None
        )
        self._lock = threading.Lock()
        # The cache is read and filled on the MLX thread and shrunk from others (to make room
        # for a new sequence's KV while a batch runs).
        self._cache_lock = threading.Lock()
        self._incoming: deque[Sequence] = deque()
        self._chores: deque[tuple[Callable[[], Any], Future]] = deque()
        self._adapter_of: dict[int, str | None] = {}  # the running generator's uids -> adapters
        self._running = False

    def submit(self, sequence: Sequence) -> None:
        with self._lock:
            self._incoming.append(sequence)
            self._start()

    def between_steps(self, work: Callable[[], T]) -> Future:
        """Run `work` on the MLX thread between two decode steps (at once when idle): the
        model may change then, as no forward pass runs."""
        future: Future = Future()
        with self._lock:
            self._chores.append((work, future))
            self._start()
        return future

    def _start(self) -> None:
        """With the lock held: make sure the MLX thread serves the queues."""
        if not self._running:
            self._running = True
            self.executor.submit(self._run)

    def prompt_cache_bytes(self) -> int:
        return self.prompt_cache.nbytes if self.prompt_cache is not None else 0

    def using_prompt_cache(self, work: Callable[[Any], T]) -> T:
        """Run `work` on the prompt cache (saving or restoring it) while nothing else touches it."""
        with self._cache_lock:
            return work(self.prompt_cache)

    def shrink_prompt_cache(self, max_bytes: int) -> None:
        """Drop the least recently used cached prompts until at most `max_bytes` remain."""
        if self.prompt_cache is not None:
            with self._cache_lock:
                self.prompt_cache.trim_to(n_bytes=max_bytes)

    # -- MLX thread -----------------------------------------------------------------------

    def _run(self) -> None:
        """Serve until no request is left, then give the MLX thread back.

        A failure that belongs to one sequence (its sampler, its prompt, its text) fails
        that sequence only; a failed decode step fails the sequences that were in it and
        the engine starts a fresh batch for the others.
        """
        generator = None
        active: dict[int, Sequence] = {}
        batchable: deque[Sequence] = deque()
        seeded: deque[Sequence] = deque()
        try:
            while True:
                with self._lock:
                    for sequence in self._incoming:
                        (batchable if sequence.sampling.seed is None else seeded).append(sequence)
                    self._incoming.clear()
                    chores = list(self._chores)
                    self._chores.clear()
                    if not (active or batchable or seeded or chores):
                        self._running = False
                        return
                for work, future in chores:
                    try:
                        future.set_result(work())
                    except BaseException as error:
                        future.set_exception(error)
                # A seeded request waiting closes the batch to newcomers until it has run,
                # so that a steady stream of requests cannot starve it.
                while batchable and not seeded:
                    sequence = batchable.popleft()
                    if sequence.cancelled:
                        continue
                    if generator is None:
                        generator = self._new_generator()
                    try:
                        active[self._insert(generator, sequence)] = sequence
                    except Exception as error:
                        sequence.fail(error)
                gone = [uid for uid, sequence in active.items() if sequence.cancelled]
                if gone:
                    generator.remove(gone)
                    for uid in gone:
                        del active[uid]
                        self._adapter_of.pop(uid, None)
                if not active:
                    if seeded:
                        sequence = seeded.popleft()
                        if not sequence.cancelled:
                            self._use(sequence.adapter)
                            self._run_alone(sequence)
                    continue
                try:
                    _, responses = generator.next()
                except Exception as error:
                    logger.exception("a decode step failed; failing its %d sequences", len(active))
                    for sequence in active.values():
                        sequence.fail(error)
                    active.clear()
                    generator.close()
                    generator = None
                    continue
                for response in responses:
                    sequence = active[response.uid]
                    try:
                        self._deliver(sequence, response)
                    except Exception as error:
                        if not response.finish_reason:  # still in the batch: take it out
                            generator.remove([response.uid])
                        del active[response.uid]
                        sequence.fail(error)
                        continue
                    if response.finish_reason:
                        del active[response.uid]
                        self._adapter_of.pop(response.uid, None)
        except BaseException as error:  # the engine itself broke: fail everyone, hang no one
            logger.exception("text generation engine failed")
            with self._lock:
                waiting = [*active.values(), *batchable, *seeded, *self._incoming]
                chores = list(self._chores)
                self._incoming.clear()
                self._chores.clear()
                self._running = False
            for sequence in waiting:
                sequence.fail(error)
            for _, future in chores:
                future.set_exception(error)
        finally:
            if generator is not None:
                generator.close()

    def _use(self, adapter: str | None) -> None:
        """Run the next forward passes (of a sequence alone) with `adapter` (None: the base)."""
        if self.adapters is not None:
            self.adapters.active = adapter

    def _new_generator(self) -> Any:
        from mlx_lm.generate import BatchGenerator

        from deployments.lora import RowsByCaller

        self._adapter_of.clear()
        model = self.model if self.adapters is None else RowsByCaller(self.model, self.adapters, self._adapter_of)
        options = dict(stop_tokens=[[t] for t in self.tokenizer.eos_token_ids], completion_batch_size=self.max_batch)
        if self.speculation is None:
            return BatchGenerator(model, **options)
        from deployments.speculation import SpeculativeGenerator

        return SpeculativeGenerator(model, self.speculation, self._pass_cost, self.draft, **options)

    def _insert(self, generator: Any, sequence: Sequence) -> int:
        sampler = self.make_sampler(sequence.sampling)
        cache, rest = self._cached_prefix(sequence.prompt, sequence.adapter)
        (uid,) = generator.insert(
            [rest],
            [sequence.max_tokens],
            caches=[cache],
            all_tokens=[sequence.prompt[: len(sequence.prompt) - len(rest)]],
            samplers=[sampler],
            logits_processors=[sequence.processors],
        )
        self._adapter_of[uid] = sequence.adapter
        sequence.detokenizer = self.tokenizer.detokenizer
        sequence.cached_tokens = len(sequence.prompt) - len(rest)
        return uid

    def _deliver(self, sequence: Sequence, response: Any) -> None:
        detokenizer = sequence.detokenizer
        # The end-of-sequence token is not part of the completion: neither text nor count.
        if response.finish_reason != "stop":
            detokenizer.add_token(response.token)
        if response.finish_reason:
            detokenizer.finalize()
            if self.prompt_cache is not None:
                with self._cache_lock:
                    self.prompt_cache.insert_cache(sequence.adapter, list(response.all_tokens), response.prompt_cache)
        counted = 0 if response.finish_reason == "stop" else 1
        sequence.step(
            detokenizer.last_segment, counted, response.finish_reason, self._logprob(sequence, response, counted)
        )

    def _logprob(self, sequence: Sequence, response: Any, counted: int) -> TokenLogprob | None:
        if sequence.logprobs is None or not counted:
            return None
        return token_logprob(self.tokenizer, response.logprobs, response.token, sequence.logprobs)

    def _cached_prefix(self, prompt: list[int], adapter: str | None) -> tuple[list[Any] | None, list[int]]:
        """The KV cache of the longest cached prefix of `prompt` computed with `adapter` (an
        adapter's KV differs from the base's), and the tokens after it."""
        if self.prompt_cache is None:
            return None, prompt
        from mlx_lm.models.cache import can_trim_prompt_cache, trim_prompt_cache

        with self._cache_lock:
            cache, rest = self.prompt_cache.fetch_nearest_cache(adapter, prompt)
        if cache is not None and not rest:
            # The whole prompt is cached, but generation needs one token to read: re-read
            # the last one.
            if not can_trim_prompt_cache(cache):
                return None, prompt
            trim_prompt_cache(cache, 1)
            rest = prompt[-1:]
        return cache, rest

    def _run_alone(self, sequence: Sequence) -> None:
        import mlx.core as mx
        from mlx_lm import stream_generate

        responses = None
        try:
            sampler = self.make_sampler(sequence.sampling)
            responses = stream_generate(
                self.model,
                self.tokenizer,
                mx.array(sequence.prompt),
                sequence.max_tokens,
                sampler=sampler,
                logits_processors=sequence.processors,
            )
            for response in responses:
                if sequence.cancelled:
                    break
                # stream_generate reports the end-of-sequence token in its last response.
                counted = 0 if response.finish_reason == "stop" else 1
                sequence.step(response.text, counted, response.finish_reason, self._logprob(sequence, response, counted))
        except Exception as error:
            sequence.fail(error)
        finally:
            if responses is not None:
                responses.close()


def token_logprob(tokenizer: Any, logprobs: Any, token: int, top: int) -> TokenLogprob:
    """A generated token's log-probability and its `top` likeliest alternatives, from the
    normalized log-probabilities the token was sampled from (after any grammar mask)."""
    import mlx.core as mx

    def entry(token_id: int, value: float) -> TopLogprob:
        text = tokenizer.decode([token_id])
        return TopLogprob(text, value, list(text.encode()))

    chosen = entry(token, logprobs[token].item())
    alternatives: list[TopLogprob] = []
    if top:
        best = mx.argpartition(-logprobs, top - 1)[:top]
        values = logprobs[best].tolist()
        alternatives = [entry(i, v) for i, v in sorted(zip(best.tolist(), values), key=lambda p: -p[1])]
    return TokenLogprob(chosen.token, chosen.logprob, chosen.bytes, alternatives)
