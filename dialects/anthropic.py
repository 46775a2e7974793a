"""Anthropic's Messages API (`POST /v1/messages`, `/v1/messages/count_tokens`): what Claude
Code-style clients speak. Messages of content blocks (text, image, tool_use, tool_result,
thinking) become one chat for the model's own template; the answer's events become content
blocks, whole or as Anthropic's event stream."""

from __future__ import annotations

import json
import uuid
from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, model_validator

from dialects.errors import anthropic_error_body
from dialects.sse import sse
from policies.errors import ApiError
from dialects.openai import MAX_TOKENS_CAP, SEED_LIMIT
from policies.constraints import Constraint
from policies.events import Content, Event, Finish, Reasoning, ToolCall
from policies.generation import GenerationRequest, Sampling

MAX_STOP_SEQUENCES = 16
STOP_REASONS = {"stop": "end_turn", "length": "max_tokens", "tool_calls": "tool_use"}


class _Model(BaseModel):
    # Clients send fields we do not act on (cache_control, citations, ...): accept them.
    model_config = ConfigDict(extra="ignore")


class TextBlock(_Model):
    type: Literal["text"]
    text: str


class Base64Source(_Model):
    type: Literal["base64"]
    media_type: str
    data: str


class UrlSource(_Model):
    type: Literal["url"]
    url: str


class ImageBlock(_Model):
    type: Literal["image"]
    source: Annotated[Union[Base64Source, UrlSource], Field(discriminator="type")]

    @property
    def url(self) -> str:
        if isinstance(self.source, UrlSource):
            return self.source.url
        return f"data:{self.source.media_type};base64,{self.source.data}"


class ToolUseBlock(_Model):
    type: Literal["tool_use"]
    id: str
    name: str
    input: dict[str, Any]


class TextSource(_Model):
    type: Literal["text"]
    media_type: str = "text/plain"
    data: str


class DocumentBlock(_Model):
    """A document the client attached: plain-text sources are read as text; others (PDF,
    images as documents) are named in their place, as no model here reads them."""

    type: Literal["document"]
    source: Annotated[Union[TextSource, Base64Source, UrlSource], Field(discriminator="type")]
    title: str | None = None

    @property
    def text(self) -> str:
        if isinstance(self.source, TextSource):
            return self.source.data
        kind = self.source.media_type if isinstance(self.source, Base64Source) else self.source.url
        return f"[document {self.title or ''} ({kind}) not shown: this server reads text documents only]"


class ToolResultBlock(_Model):
    type: Literal["tool_result"]
    tool_use_id: str
    content: str | list[Annotated[Union[TextBlock, ImageBlock, DocumentBlock], Field(discriminator="type")]] = ""
    is_error: bool = False

    @property
    def text(self) -> str:
        """The result as text: a tool message carries text only, so an image a tool returned
        is named in its place."""
        if isinstance(self.content, str):
            return self.content
        return "".join(
            "[image]" if isinstance(block, ImageBlock) else block.text for block in self.content
        )

    @property
    def images(self) -> int:
        return 0 if isinstance(self.content, str) else sum(isinstance(b, ImageBlock) for b in self.content)


class ThinkingBlock(_Model):
    type: Literal["thinking"]
    thinking: str
    signature: str | None = None


class RedactedThinkingBlock(_Model):
    type: Literal["redacted_thinking"]
    data: str


Block = Annotated[
    Union[TextBlock, ImageBlock, DocumentBlock, ToolUseBlock, ToolResultBlock, ThinkingBlock, RedactedThinkingBlock],
    Field(discriminator="type"),
]


class Message(_Model):
    # Claude Code sends system messages inside the conversation (its agent and skill lists).
    role: Literal["user", "assistant", "system"]
    content: str | list[Block]

    @property
    def blocks(self) -> list[Any]:
        return [TextBlock(type="text", text=self.content)] if isinstance(self.content, str) else self.content


class Tool(_Model):
    """A client tool (with `input_schema`), or one of Anthropic's server tools (`type`
    such as `web_search_20250305`, no schema), which no model here can run."""

    type: str | None = None
    name: str = Field(pattern=r"^[A-Za-z0-9_-]{1,128}$")
    description: str | None = None
    input_schema: dict[str, Any] | None = None

    @property
    def client_side(self) -> bool:
        return self.input_schema is not None and self.type in (None, "custom")


class ToolChoice(_Model):
    type: Literal["auto", "any", "tool", "none"]
    name: str | None = None
    disable_parallel_tool_use: bool = False


class Thinking(_Model):
    type: Literal["enabled", "disabled", "adaptive"]
    budget_tokens: int | None = None


class JsonOutputFormat(_Model):
    type: Literal["json_schema"]
    schema_: dict[str, Any] = Field(alias="schema")


class OutputConfig(_Model):
    format: JsonOutputFormat | None = None
    effort: str | None = None  # accepted; the model's template decides how it thinks


class MessagesRequest(_Model):
    model: str
    max_tokens: int = Field(ge=1, le=MAX_TOKENS_CAP)
    messages: list[Message] = Field(min_length=1)
    system: str | list[TextBlock] | None = None
    stop_sequences: list[str] | None = Field(default=None, max_length=MAX_STOP_SEQUENCES)
    temperature: float | None = Field(default=None, ge=0, le=1)
    top_p: float | None = Field(default=None, gt=0, le=1)
    top_k: int | None = Field(default=None, ge=1)
    seed: int | None = Field(default=None, ge=0, lt=SEED_LIMIT)  # not Anthropic's; handy for tests
    tools: list[Tool] | None = None
    tool_choice: ToolChoice | None = None
    thinking: Thinking | None = None
    output_config: OutputConfig | None = None
    metadata: dict[str, Any] | None = None
    stream: bool = False

    @model_validator(mode="after")
    def _consistent(self) -> "MessagesRequest":
        names = [tool.name for tool in self.client_tools]
        choice = self.tool_choice
        if choice is not None and choice.type == "tool":
            if not choice.name:
                raise ApiError(400, "tool_choice of type tool needs the tool's name", param="tool_choice.name")
            if choice.name not in names:
                raise ApiError(400, f"tool_choice names tool {choice.name!r}, which is not in tools", param="tool_choice")
        if choice is not None and choice.type in ("any", "tool") and not names:
            raise ApiError(400, f"tool_choice {choice.type!r} needs tools", param="tool_choice")
        if any(not s for s in self.stop_sequences or []):
            raise ApiError(400, "stop sequences must not be empty", param="stop_sequences")
        return self

    # -- translation ---------------------------------------------------------------------------

    @property
    def client_tools(self) -> list[Tool]:
        return [tool for tool in self.tools or [] if tool.client_side]

    @property
    def tools_offered(self) -> list[dict[str, Any]]:
        if self.tool_choice and self.tool_choice.type == "none":
            return []
        return [
            {"type": "function", "function": {"name": t.name, "description": t.description or "", "parameters": t.input_schema}}
            for t in self.client_tools
        ]

    def ignored(self) -> list[str]:
        """What this request asks for that the answer leaves out, said in a warning header."""
        notes = [f"server tool {t.name!r} ({t.type}) ignored: no model here runs server tools"
                 for t in self.tools or [] if not t.client_side]
        if any(isinstance(b, ToolResultBlock) and b.images for m in self.messages for b in m.blocks):
            notes.append("images inside tool_result are shown to the model as the text [image]")
        if self.schema is not None and self._forced_call:
            notes.append("output_config.format ignored: the answer is a required tool call, whose input follows its schema")
        return notes

    @property
    def schema(self) -> dict[str, Any] | None:
        output_format = self.output_config.format if self.output_config else None
        return output_format.schema_ if output_format else None

    @property
    def _forced_call(self) -> bool:
        return bool(self.tools_offered) and self.tool_choice is not None and self.tool_choice.type in ("any", "tool")

    @property
    def constraint(self) -> Constraint | None:
        """A required tool call (tool_choice any or tool), else output_config's JSON schema."""
        choice = self.tool_choice
        if self._forced_call:
            return Constraint(
                tools=self.tools_offered,
                tool=choice.name if choice.type == "tool" else None,
                parallel=not choice.disable_parallel_tool_use,
            )
        return Constraint(schema=self.schema) if self.schema is not None else None

    def needs(self) -> dict[str, str]:
        wanted = {
            "tools": bool(self.tools_offered),
            "structured_output": self.schema is not None and not self._forced_call,
        }
        fields = {"tools": "tools", "structured_output": "output_config.format"}
        return {feature: fields[feature] for feature, asked in wanted.items() if asked}

    def wishes(self) -> dict[str, str]:
        """Features used where the model has them, left out (with a warning) where not:
        `thinking` asks a model to think if it can, as Claude Code sends it by default."""
        return {"reasoning": "thinking"} if self.thinking and self.thinking.type != "disabled" else {}

    @property
    def constraint_param(self) -> str:
        constraint = self.constraint
        return "tools" if constraint is None or constraint.schema is None else "output_config.format.schema"

    def image_urls(self) -> list[tuple[str, str]]:
        return [
            (block.url, f"messages.{i}.content.{j}.source")
            for i, message in enumerate(self.messages)
            for j, block in enumerate(message.blocks)
            if isinstance(block, ImageBlock)
        ]

    def to_generation(self, vision: bool, images: list[Any]) -> GenerationRequest:
        kwargs: dict[str, Any] = {}
        if self.thinking is not None:
            kwargs["enable_thinking"] = self.thinking.type != "disabled"
        return GenerationRequest(
            sampling=Sampling(
                max_tokens=self.max_tokens,
                temperature=self.temperature,
                top_p=self.top_p,
                top_k=self.top_k,
                seed=self.seed,
                stop=list(self.stop_sequences or []),
            ),
            messages=self.chat(vision),
            images=images,
            tools=self.tools_offered,
            template_kwargs=kwargs,
            constraint=self.constraint,
        )

    def chat(self, vision: bool) -> list[dict[str, Any]]:
        """The conversation as chat templates read it: the system text first; tool_use blocks
        become the assistant's tool calls, tool_result blocks tool messages."""
        chat: list[dict[str, Any]] = []
        system = self.system if isinstance(self.system, str) else "".join(b.text for b in self.system or [])
        # Templates take one system prompt, first: system messages inside the conversation
        # join it in their order.
        folded = [system] + [_text(m) for m in self.messages if m.role == "system"]
        system = "\n\n".join(text for text in folded if text)
        if system:
            chat.append({"role": "system", "content": system})
        for message in self.messages:
            if message.role == "system":
                continue
            parts: list[dict[str, str]] = []
            calls = []
            for block in message.blocks:
                if isinstance(block, (TextBlock, DocumentBlock)):
                    parts.append({"type": "text", "text": block.text})
                elif isinstance(block, ImageBlock):
                    parts.append({"type": "image"})
                elif isinstance(block, ToolUseBlock):
                    calls.append({"id": block.id, "type": "function", "function": {"name": block.name, "arguments": block.input}})
                elif isinstance(block, ToolResultBlock):
                    chat.append({"role": "tool", "tool_call_id": block.tool_use_id, "content": block.text})
            if parts or calls:
                text = "".join(p.get("text", "") for p in parts)
                entry: dict[str, Any] = {"role": message.role, "content": parts if vision else text}
                if calls:
                    entry["tool_calls"] = calls
                chat.append(entry)
        return chat


def _text(message: Message) -> str:
    return "".join(block.text for block in message.blocks if isinstance(block, (TextBlock, DocumentBlock)))


class CountTokensRequest(MessagesRequest):
    max_tokens: int = Field(default=1, ge=1, le=MAX_TOKENS_CAP)  # not part of counting


# -- replies ---------------------------------------------------------------------------------


def event_sse(event: dict[str, Any]) -> str:
    """Anthropic's clients read the event name from the `event:` line."""
    return sse(event, event["type"])


class Reply:
    """A Messages API answer from a generation's events, whole or as Anthropic's stream:
    message_start, then for each content block content_block_start, its deltas and
    content_block_stop, then message_delta (stop reason, usage) and message_stop."""

    def __init__(self, model: str):
        self.model = model
        self.id = f"msg_{uuid.uuid4().hex[:24]}"
        self.index = -1  # the open content block's index
        self.open: str | None = None  # its type: "text" or "thinking"

    def full(self, events: list[Event]) -> dict[str, Any]:
        finish = events[-1]
        assert isinstance(finish, Finish)
        content: list[dict[str, Any]] = []
        for event in events:
            kind = "text" if isinstance(event, Content) else "thinking" if isinstance(event, Reasoning) else None
            if kind and content and content[-1]["type"] == kind:
                content[-1][kind] += event.text
            elif kind == "text":
                content.append({"type": "text", "text": event.text})
            elif kind == "thinking":
                content.append({"type": "thinking", "thinking": event.text, "signature": ""})
            elif isinstance(event, ToolCall):
                content.append(self._tool_use(event))
        return {**self._message(content, finish), "usage": self._usage(finish)}

    def opening(self) -> list[str]:
        start = {**self._message([], None), "usage": {"input_tokens": 0, "output_tokens": 0}}
        return [event_sse({"type": "message_start", "message": start}), event_sse({"type": "ping"})]

    def batch(self, events: list[Event]) -> list[str]:
        out = []
        for event in events:
            if isinstance(event, (Content, Reasoning)):
                kind = "text" if isinstance(event, Content) else "thinking"
                if self.open != kind:
                    out += self._close()
                    self.index, self.open = self.index + 1, kind
                    block = {"type": "text", "text": ""} if kind == "text" else {"type": "thinking", "thinking": "", "signature": ""}
                    out.append(event_sse({"type": "content_block_start", "index": self.index, "content_block": block}))
                delta = {"type": "text_delta", "text": event.text} if kind == "text" else {"type": "thinking_delta", "thinking": event.text}
                out.append(event_sse({"type": "content_block_delta", "index": self.index, "delta": delta}))
            elif isinstance(event, ToolCall):
                out += self._close()
                self.index += 1
                block = self._tool_use(event)
                arguments = json.dumps(block.pop("input"), ensure_ascii=False)
                out.append(event_sse({"type": "content_block_start", "index": self.index, "content_block": {**block, "input": {}}}))
                out.append(event_sse({"type": "content_block_delta", "index": self.index,
                                "delta": {"type": "input_json_delta", "partial_json": arguments}}))
                out.append(event_sse({"type": "content_block_stop", "index": self.index}))
            elif isinstance(event, Finish):
                out += self._close()
                delta = {"stop_reason": self._stop_reason(event), "stop_sequence": event.stop_sequence}
                out.append(event_sse({"type": "message_delta", "delta": delta, "usage": self._usage(event)}))
        return out

    def failure(self, error: ApiError) -> list[str]:
        return [sse(anthropic_error_body(error), "error")]

    def closing(self) -> list[str]:
        return [event_sse({"type": "message_stop"})]

    def _close(self) -> list[str]:
        if self.open is None:
            return []
        closing = []
        if self.open == "thinking":  # clients keep thinking blocks whole only when signed
            closing.append(event_sse({"type": "content_block_delta", "index": self.index,
                                "delta": {"type": "signature_delta", "signature": ""}}))
        self.open = None
        return [*closing, event_sse({"type": "content_block_stop", "index": self.index})]

    def _message(self, content: list[dict[str, Any]], finish: Finish | None) -> dict[str, Any]:
        return {
            "id": self.id,
            "type": "message",
            "role": "assistant",
            "model": self.model,
            "content": content,
            "stop_reason": self._stop_reason(finish) if finish else None,
            "stop_sequence": finish.stop_sequence if finish else None,
        }

    @staticmethod
    def _stop_reason(finish: Finish) -> str:
        return "stop_sequence" if finish.stop_sequence else STOP_REASONS[finish.finish_reason]

    @staticmethod
    def _usage(finish: Finish) -> dict[str, int]:
        # Anthropic counts cache reads apart: the prompt is input_tokens + cache_read_input_tokens.
        return {
            "input_tokens": finish.prompt_tokens - finish.cached_tokens,
            "output_tokens": finish.completion_tokens,
            "cache_read_input_tokens": finish.cached_tokens,
        }

    @staticmethod
    def _tool_use(call: ToolCall) -> dict[str, Any]:
        return {"type": "tool_use", "id": f"toolu_{uuid.uuid4().hex[:24]}", "name": call.name,
                "input": json.loads(call.arguments)}
