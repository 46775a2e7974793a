"""The one request every API dialect translates into, and model servers generate from."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

from policies.constraints import Constraint
from policies.errors import ContextOverflow


@dataclass
class Sampling:
    """Sampling settings as the client sent them; None means "the model's default"."""

    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    top_k: int | None = None
    max_tokens_param: str = "max_tokens"  # what the client's dialect calls max_tokens, for errors


@dataclass(frozen=True)
class AdapterRef:
    """A LoRA adapter a request runs with: its model id and its directory."""

    id: str
    path: str


@dataclass
class GenerationRequest:
    """What a dialect asks a text or vision server to generate: chat messages or a raw
    prompt. For vision models a message's content may list parts, where each
    `{"type": "image"}` part stands for the next of `images` (PIL images, in order)."""

    sampling: Sampling
    messages: list[dict[str, Any]] | None = None
    prompt: str | None = None
    images: list[Any] = field(default_factory=list)
    tools: list[dict[str, Any]] = field(default_factory=list)  # rendered by the chat template
    template_kwargs: dict[str, Any] = field(default_factory=dict)
    constraint: Constraint | None = None  # what the answer must be (a JSON value, tool calls)
    logprobs: int | None = None  # None: none; n: each token's and its n likeliest alternatives'
    adapter: AdapterRef | None = None  # a LoRA adapter of the model to answer with

    @property
    def chat(self) -> bool:
        return self.messages is not None



def with_adapter(job: GenerationRequest, entry: Any) -> GenerationRequest:
    """The request as the model's replica runs it: a LoRA adapter's (`entry.base` set) runs
    on its base's replica with the adapter."""
    return replace(job, adapter=AdapterRef(entry.id, entry.path)) if entry.base else job


def token_budget(
    model_id: str, requested: int | None, prompt_tokens: int, context_length: int | None, default: int | None,
    param: str = "max_tokens",
) -> int:
    """How many tokens a generation may produce: what the client asked for; when it asked
    for nothing, the rest of the model's context (as OpenAI and Anthropic do), capped by the
    operator's `default` if one is set. A model whose context is unknown gets `default` or
    UNKNOWN_CONTEXT_BUDGET."""
    room = None if context_length is None else context_length - prompt_tokens
    if room is not None and room < 1:
        raise ContextOverflow(model_id, prompt_tokens, None, context_length)
    if requested is None:
        cap = default or (UNKNOWN_CONTEXT_BUDGET if room is None else room)
        return cap if room is None else min(cap, room)
    if room is not None and requested > room:
        raise ContextOverflow(model_id, prompt_tokens, requested, context_length, param)
    return requested


# A model whose config names no context length, and no operator's default: some cap is needed.
UNKNOWN_CONTEXT_BUDGET = 4096
