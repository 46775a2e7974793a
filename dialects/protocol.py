"""The protocol every dialect follows (dialects/__init__.py says what each part means): a
generation request that describes itself and becomes one `GenerationRequest`, and a reply
that turns the generation's events into the dialect's answer, whole or streamed."""

from __future__ import annotations

from typing import Any, Protocol

from policies.errors import ApiError
from policies.events import Event
from policies.generation import GenerationRequest


class DialectRequest(Protocol):
    """A chat, completion, Responses or Messages request."""

    stream: bool

    def needs(self) -> dict[str, str]: ...
    def wishes(self) -> dict[str, str]: ...
    def ignored(self) -> list[str]: ...
    def image_urls(self) -> list[tuple[str, str]]: ...
    @property
    def constraint_param(self) -> str: ...


class ChatRequest(DialectRequest, Protocol):
    """A request whose messages become the generation directly (Chat Completions, Messages,
    legacy Completions); a Responses request needs its stored history first."""

    def to_generation(self, vision: bool, images: list[Any]) -> GenerationRequest: ...


class Reply(Protocol):
    def full(self, events: list[Event]) -> dict[str, Any]: ...
    def opening(self) -> list[str]: ...
    def batch(self, events: list[Event]) -> list[str]: ...
    def failure(self, error: ApiError) -> list[str]: ...
    def closing(self) -> list[str]: ...
