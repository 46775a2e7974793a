"""What text and vision servers share: events from generator steps (stop sequences, the
answer split into text, reasoning and tool calls), mlx-lm's sampler for a request, and the
base server whose `generate` is the whole of its `stream`."""

from __future__ import annotations

from typing import AsyncIterator, Callable, Iterable, Iterator

from deployments.batching import Step
from deployments.model_server import ModelServer
from policies.config import AppConfig, ModelEntry
from policies.events import Content, Event, Finish, Logprobs, ToolCall, merged
from policies.families import FamilyAdapter, adapter_for
from policies.generation import GenerationRequest, Sampling
from policies.output_parser import OutputParser
from policies.stop_strings import StopMatcher


class CompletionTracker:
    """Turns generator steps into events: text cut at the first stop sequence (for chats
    split into answer, reasoning and tool calls), log-probabilities when asked for, then
    one Finish with the token counts."""

    def __init__(self, stop: list[str], parser: OutputParser | None = None, token_limit: int | None = None):
        self.stops = StopMatcher(stop)
        self.parser = parser
        self.token_limit = token_limit
        self.tokens = 0
        self.reasoning_tokens = 0
        self.tool_calls = 0
        self.finished = False

    def feed(self, step: Step) -> list[Event]:
        self.tokens += step.tokens
        events: list[Event] = [Logprobs([step.logprob])] if step.logprob else []
        events += self._split(self.stops.feed(step.text))
        if self.parser is not None and self.parser.mode == "reasoning":
            self.reasoning_tokens += step.tokens
        if self.stops.stopped:
            events += self._finish("stop", step, self.stops.matched)
        elif step.finish_reason:
            events += self._split(self.stops.flush())
            events += self._finish(step.finish_reason, step)
        return events

    def _split(self, text: str) -> list[Event]:
        if not text:
            return []
        events = self.parser.feed(text) if self.parser else [Content(text)]
        self.tool_calls += sum(isinstance(e, ToolCall) for e in events)
        return events

    def _finish(self, reason: str, step: Step, stop_sequence: str | None = None) -> list[Event]:
        events: list[Event] = self.parser.finish(truncated=reason == "length") if self.parser else []
        self.tool_calls += sum(isinstance(e, ToolCall) for e in events)
        if reason == "stop" and self.tool_calls:
            reason = "tool_calls"
        self.finished = True
        finish = Finish(
            reason, step.prompt_tokens, self.tokens, stop_sequence, step.cached_tokens,  # type: ignore[arg-type]
            reasoning_tokens=self.reasoning_tokens, token_limit=self.token_limit,
        )
        return [*events, finish]


def completion_events(steps: Iterable[Step], stop: list[str], token_limit: int | None = None) -> Iterator[Event]:
    tracker = CompletionTracker(stop, token_limit=token_limit)
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
        top_k=sampling.top_k or 0,
    )


class GenerativeServer(ModelServer):
    """What text and vision servers share: family settings, and `generate` as the whole of
    `stream`, so that plain and streamed answers are the same by construction."""

    def __init__(self, entry: ModelEntry, config: AppConfig):
        super().__init__(entry, config)
        self.default_max_tokens = config.default_max_tokens
        self.adapter = adapter_for(entry.family)

    async def generate(self, job: GenerationRequest, lease_id: str) -> list[Event]:
        events: list[Event] = []
        async for batch in self.stream(job, lease_id):
            events += batch
        if not events or not isinstance(events[-1], Finish):
            raise RuntimeError("generation ended without a finish event")
        return merged(events)

    async def stream(self, job: GenerationRequest, lease_id: str) -> AsyncIterator[list[Event]]:
        """Events in batches: one batch per chunk the client gets (text merged within)."""
        async with self.serving(lease_id):
            async for batch in self.events(job):
                yield batch

    def events(self, job: GenerationRequest) -> AsyncIterator[list[Event]]:
        raise NotImplementedError
