"""What a generation produces, whatever API dialect asked for it: pieces of answer text,
pieces of reasoning, whole tool calls, the log-probabilities of generated tokens, then one
`Finish`. Model servers emit these; each dialect turns them into its own wire format."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True)
class Content:
    """A piece of the answer's text."""

    text: str


@dataclass(frozen=True)
class Reasoning:
    """A piece of the model's thinking (between its think markers), kept out of the answer."""

    text: str


@dataclass(frozen=True)
class ToolCall:
    """One call the model asked for: a function name and its arguments as a JSON object text."""

    name: str
    arguments: str


@dataclass(frozen=True)
class TopLogprob:
    token: str
    logprob: float
    bytes: list[int]


@dataclass(frozen=True)
class TokenLogprob:
    """One generated token with its log-probability and the most likely alternatives."""

    token: str
    logprob: float
    bytes: list[int]
    top: list[TopLogprob]


@dataclass(frozen=True)
class Logprobs:
    """Log-probabilities of the tokens generated since the previous such event."""

    tokens: list[TokenLogprob]


@dataclass(frozen=True)
class Finish:
    """The last event of a generation."""

    finish_reason: Literal["stop", "length", "tool_calls"]
    prompt_tokens: int
    completion_tokens: int
    stop_sequence: str | None = None  # the client's stop sequence that ended the text, if one did
    cached_tokens: int = 0  # of the prompt tokens, those read from the prompt cache
    reasoning_tokens: int = 0  # of the completion tokens, those spent thinking
    token_limit: int | None = None  # the cap on completion tokens that applied


Event = Content | Reasoning | ToolCall | Logprobs | Finish


def merged(events: list[Event]) -> list[Event]:
    """The same events with neighbouring text pieces joined (answer with answer, thinking
    with thinking) and all log-probabilities in one event first, so that a chunk or a whole
    answer carries few events. Log-probabilities follow tokens, not the text split."""
    tokens = [token for event in events if isinstance(event, Logprobs) for token in event.tokens]
    out: list[Event] = [Logprobs(tokens)] if tokens else []
    for event in events:
        last = out[-1] if out else None
        if isinstance(event, Logprobs):
            continue
        if isinstance(event, (Content, Reasoning)) and type(last) is type(event):
            out[-1] = type(event)(last.text + event.text)  # type: ignore[union-attr]
        else:
            out.append(event)
    return out
