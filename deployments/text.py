"""Text generation with mlx-lm: chat templates, sampling, stop sequences, streaming, and
continuous batching of concurrent requests."""

from __future__ import annotations

import asyncio
from functools import partial
from typing import AsyncIterator, Callable, Iterable, Iterator

from ray import serve

from deployments.batching import BatchEngine, Sequence, Step
from deployments.model_server import ModelServer
from deployments.openai_types import ApiError, Finish, Sampling, TextJob
from policies.config import AppConfig, ModelEntry
from deployments.gguf import converted_model_dir
from policies.detection import gguf_file
from policies.families import FamilyAdapter, adapter_for, render_chat, stop_tokens
from policies.stop_strings import StopMatcher

Event = str | Finish  # pieces of text, then one Finish


class CompletionTracker:
    """Turns generator steps into text pieces cut at the first stop sequence, then one
    Finish with the token counts."""

    def __init__(self, stop: list[str]):
        self.stops = StopMatcher(stop)
        self.tokens = 0
        self.finished = False

    def feed(self, step: Step) -> list[Event]:
        self.tokens += step.tokens
        events: list[Event] = []
        text = self.stops.feed(step.text)
        if text:
            events.append(text)
        if self.stops.stopped:
            events.append(Finish("stop", step.prompt_tokens, self.tokens))
        elif step.finish_reason:
            tail = self.stops.flush()
            if tail:
                events.append(tail)
            events.append(Finish(step.finish_reason, step.prompt_tokens, self.tokens))  # type: ignore[arg-type]
        self.finished = isinstance(events[-1], Finish) if events else False
        return events


def completion_events(steps: Iterable[Step], stop: list[str]) -> Iterator[Event]:
    tracker = CompletionTracker(stop)
    for step in steps:
        yield from tracker.feed(step)
        if tracker.finished:
            return


def make_sampler(adapter: FamilyAdapter, sampling: Sampling) -> Callable:
    """mlx-lm's sampler for a request; the family's defaults fill what the client left out.

    Seeds the MLX random state too, so the same seed reproduces the same text.
    """
    import mlx.core as mx
    from mlx_lm.sample_utils import make_sampler as mlx_lm_sampler

    if sampling.seed is not None:
        mx.random.seed(sampling.seed)
    return mlx_lm_sampler(
        temp=adapter.temperature if sampling.temperature is None else sampling.temperature,
        top_p=adapter.top_p if sampling.top_p is None else sampling.top_p,
    )


class GenerativeServer(ModelServer):
    """What text and vision servers share: family settings, and `generate` as the whole of
    `stream`, so that plain and streamed answers are the same by construction."""

    def __init__(self, entry: ModelEntry, config: AppConfig):
        super().__init__(entry, config)
        self.default_max_tokens = config.default_max_tokens
        self.adapter = adapter_for(entry.family)

    async def generate(self, job: TextJob, lease_id: str) -> tuple[str, Finish]:
        pieces: list[str] = []
        async for event in self.stream(job, lease_id):
            if isinstance(event, Finish):
                return "".join(pieces), event
            pieces.append(event)
        raise RuntimeError("generation ended without a finish event")

    async def stream(self, job: TextJob, lease_id: str) -> AsyncIterator[Event]:
        async with self.serving(lease_id):
            async for event in self.events(job):
                yield event

    def events(self, job: TextJob) -> AsyncIterator[Event]:
        raise NotImplementedError


@serve.deployment(ray_actor_options={"num_cpus": 0})
class TextModel(GenerativeServer):
    def __init__(self, entry: ModelEntry, config: AppConfig):
        super().__init__(entry, config)
        self.model = None
        self.tokenizer = None
        self.engine: BatchEngine | None = None
        self.context_length: int | None = None
        self.prompt_cache_bytes = self.reserved_bytes = config.prompt_cache_bytes
        self.gguf_cache_dir = config.gguf_cache_dir
        self.gguf_dequantize = config.gguf_dequantize

    async def events(self, job: TextJob) -> AsyncIterator[Event]:
        # Templates and tokenizers are plain Python over the whole prompt: not on the loop.
        prompt = await asyncio.to_thread(self._prompt_tokens, job)
        loop = asyncio.get_running_loop()
        steps: asyncio.Queue = asyncio.Queue()
        sequence = Sequence(
            prompt=prompt,
            max_tokens=self._max_tokens(job.sampling.max_tokens, len(prompt)),
            sampling=job.sampling,
            emit=lambda item: loop.call_soon_threadsafe(steps.put_nowait, item),
        )
        self.engine.submit(sequence)
        tracker = CompletionTracker(job.sampling.stop)
        try:
            while not tracker.finished:
                # Take every step that is already waiting: when tokens come faster than
                # chunks travel, one chunk carries several tokens.
                batch = [await steps.get()]
                while not steps.empty():
                    batch.append(steps.get_nowait())
                text: list[str] = []
                for item in batch:
                    if isinstance(item, BaseException):
                        raise item
                    for event in tracker.feed(item):
                        if isinstance(event, Finish):
                            if text:
                                yield "".join(text)
                            yield event
                            return
                        text.append(event)
                if text:
                    yield "".join(text)
        finally:
            sequence.cancelled = True  # the engine drops it from the batch, if still there

    # -- MLX thread -----------------------------------------------------------------------

    def _load(self) -> None:
        from mlx_lm import load

        path = self.entry.path
        gguf = gguf_file(path)
        if gguf is not None:
            path = str(converted_model_dir(gguf, self.gguf_cache_dir, self.gguf_dequantize))
        self.model, self.tokenizer, model_config = load(path, return_config=True)
        self.context_length = model_config.get("max_position_embeddings")
        # Templates end a turn with a token the tokenizer may not list as EOS (<|eot_id|>,
        # <end_of_turn>): without it generation runs past the answer until max_tokens.
        vocab = self.tokenizer.get_vocab()
        for token in stop_tokens(self.adapter, self.tokenizer.chat_template):
            if token in vocab:
                self.tokenizer.add_eos_token(token)
        self.engine = BatchEngine(
            self.model,
            self.tokenizer,
            self._mlx,
            partial(make_sampler, self.adapter),
            prompt_cache_bytes=self.prompt_cache_bytes,
        )

    # -- prompt ---------------------------------------------------------------------------

    def _prompt_tokens(self, job: TextJob) -> list[int]:
        tokenizer = self.tokenizer
        if job.prompt is not None:
            return tokenizer.encode(job.prompt)
        if not tokenizer.has_chat_template:
            raise ApiError(400, f"Model {self.entry.id} has no chat template; use /v1/completions")
        try:
            rendered = render_chat(self.adapter, tokenizer, job.messages)
        except Exception as error:  # the template's own raise_exception(), e.g. role order
            raise ApiError(
                400, f"Model {self.entry.id} cannot format these messages: {error}", param="messages"
            ) from None
        # The template writes BOS itself; encoding must not add a second one.
        return tokenizer.encode(rendered, add_special_tokens=False)

    def _max_tokens(self, requested: int | None, prompt_tokens: int) -> int:
        room = None if self.context_length is None else self.context_length - prompt_tokens
        if room is not None and room < 1:
            raise ApiError(
                400,
                f"The prompt has {prompt_tokens} tokens; model {self.entry.id} has a "
                f"context of {self.context_length} tokens. Shorten the prompt.",
                param="messages",
                code="context_length_exceeded",
            )
        if requested is None:
            return self.default_max_tokens if room is None else min(self.default_max_tokens, room)
        if room is not None and requested > room:
            raise ApiError(
                400,
                f"max_tokens={requested} plus the prompt's {prompt_tokens} tokens exceeds "
                f"model {self.entry.id}'s context of {self.context_length} tokens.",
                param="max_tokens",
                code="context_length_exceeded",
            )
        return requested
