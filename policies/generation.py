"""The one request every API dialect translates into, and model servers generate from."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from policies.constraints import Constraint


@dataclass
class Sampling:
    """Sampling settings as the client sent them; None means "the model's default"."""

    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    top_k: int | None = None


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

    @property
    def chat(self) -> bool:
        return self.messages is not None

