"""Text generation with mlx-lm: chat templates, sampling, stop sequences, streaming."""

from __future__ import annotations

from dataclasses import dataclass
from typing import AsyncIterator, Callable, Iterable, Iterator

from ray import serve

from deployments.model_server import ModelServer
from deployments.openai_types import ApiError, Finish, Sampling, TextJob
from policies.config import AppConfig, ModelEntry
from policies.families import FamilyAdapter, adapter_for, render_chat
from policies.stop_strings import StopMatcher

Event = str | Finish  # pieces of text, then one Finish


@dataclass
class Step:
    """One step of a generator, as the model libraries report it."""

    text: str
    tokens: int  # generated tokens this step adds to the completion
    finish_reason: str | None
    prompt_tokens: int


def completion_events(steps: Iterable[Step], stop: list[str]) -> Iterator[Event]:
    """Text pieces cut at the first stop sequence, then one Finish with the token counts."""
    stops = StopMatcher(stop)
    tokens = 0
    for step in steps:
        tokens += step.tokens
        text = stops.feed(step.text)
        if text:
            yield text
        if stops.stopped:
            yield Finish("stop", step.prompt_tokens, tokens)
            return
        if step.finish_reason:
            tail = stops.flush()
            if tail:
                yield tail
            yield Finish(step.finish_reason, step.prompt_tokens, tokens)
            return


def make_sampler(sampling: Sampling, adapter: FamilyAdapter) -> Callable:
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


@serve.deployment(ray_actor_options={"num_cpus": 0})
class TextModel(ModelServer):
    def __init__(self, entry: ModelEntry, config: AppConfig):
        super().__init__(entry, config)
        self.default_max_tokens = config.default_max_tokens
        self.adapter = adapter_for(entry.family)
        self.model = None
        self.tokenizer = None
        self.context_length: int | None = None

    async def generate(self, job: TextJob) -> tuple[str, Finish]:
        pieces: list[str] = []
        async for event in self.stream(job):
            if isinstance(event, Finish):
                return "".join(pieces), event
            pieces.append(event)
        raise RuntimeError("generation ended without a finish event")

    async def stream(self, job: TextJob) -> AsyncIterator[Event]:
        self.require_loaded()
        async for event in self.iterate_mlx(lambda: self._events(job)):
            yield event

    # -- MLX thread -----------------------------------------------------------------------

    def _load(self) -> None:
        from mlx_lm import load

        self.model, self.tokenizer, model_config = load(self.entry.path, return_config=True)
        self.context_length = model_config.get("max_position_embeddings")
        # Templates end a turn with a token the tokenizer may not list as EOS (<|eot_id|>,
        # <end_of_turn>): without it generation runs past the answer until max_tokens.
        vocab = self.tokenizer.get_vocab()
        for token in self.adapter.stop_tokens:
            if token in vocab:
                self.tokenizer.add_eos_token(token)

    def _release_weights(self) -> None:
        self.model = self.tokenizer = None

    def _events(self, job: TextJob) -> Iterator[Event]:
        import mlx.core as mx
        from mlx_lm import stream_generate

        prompt = self._prompt_tokens(job)
        max_tokens = self._max_tokens(job.sampling.max_tokens, len(prompt))
        sampler = make_sampler(job.sampling, self.adapter)
        responses = stream_generate(
            self.model, self.tokenizer, mx.array(prompt), max_tokens=max_tokens, sampler=sampler
        )
        # mlx-lm's responses carry one token each; an end-of-sequence token is not part of
        # the completion, so the response that reports it counts no token.
        steps = (
            Step(r.text, 0 if r.finish_reason == "stop" else 1, r.finish_reason, len(prompt))
            for r in responses
        )
        return completion_events(steps, job.sampling.stop)

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
