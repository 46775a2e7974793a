"""OpenAI's Responses API (`/v1/responses`): what Codex-style clients speak. Input items
(messages, function calls and their outputs) and an optional stored conversation become one
chat for the model's own template; the answer's events become output items (reasoning,
message, function_call), whole or as the Responses event stream."""

from __future__ import annotations

import json
import time
import uuid
from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, model_validator

from dialects.errors import ApiError
from dialects.openai import MAX_TOKENS_CAP, JsonObjectFormat, TextFormat
from policies.constraints import Constraint
from policies.events import Content, Event, Finish, Reasoning, ToolCall
from policies.generation import GenerationRequest, Sampling


class _Model(BaseModel):
    model_config = ConfigDict(extra="ignore")


class InputText(_Model):
    type: Literal["input_text", "output_text"]
    text: str


class InputImage(_Model):
    type: Literal["input_image"]
    image_url: str
    detail: str | None = None


InputPart = Annotated[Union[InputText, InputImage], Field(discriminator="type")]


class MessageItem(_Model):
    type: Literal["message"] = "message"
    role: Literal["user", "assistant", "system", "developer"]
    content: str | list[InputPart]

    @property
    def parts(self) -> list[InputText | InputImage]:
        return [InputText(type="input_text", text=self.content)] if isinstance(self.content, str) else self.content


class FunctionCallItem(_Model):
    type: Literal["function_call"]
    call_id: str
    name: str
    arguments: str


class FunctionCallOutputItem(_Model):
    type: Literal["function_call_output"]
    call_id: str
    output: str


class ReasoningItem(_Model):
    """Reasoning a client passes back from an earlier answer: not shown to the model again,
    as templates drop the thinking of past turns."""

    type: Literal["reasoning"]


def _item_kind(value: Any) -> str:
    kind = value.get("type", "message") if isinstance(value, dict) else getattr(value, "type", "message")
    return kind


InputItem = Annotated[
    Union[
        Annotated[MessageItem, Tag("message")],
        Annotated[FunctionCallItem, Tag("function_call")],
        Annotated[FunctionCallOutputItem, Tag("function_call_output")],
        Annotated[ReasoningItem, Tag("reasoning")],
    ],
    Discriminator(_item_kind),
]


class FunctionTool(_Model):
    type: Literal["function"]
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class NamedFunction(_Model):
    type: Literal["function"]
    name: str


class JsonSchemaText(_Model):
    type: Literal["json_schema"]
    name: str = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")
    schema_: dict[str, Any] = Field(alias="schema")
    description: str | None = None
    strict: bool | None = None


class TextConfig(_Model):
    format: Annotated[Union[TextFormat, JsonObjectFormat, JsonSchemaText], Field(discriminator="type")] | None = None


class ReasoningConfig(_Model):
    effort: Literal["none", "minimal", "low", "medium", "high"] | None = None


class ResponsesRequest(_Model):
    model: str
    input: str | list[InputItem]
    instructions: str | None = None
    tools: list[FunctionTool] | None = None
    tool_choice: Literal["auto", "none", "required"] | NamedFunction | None = None
    parallel_tool_calls: bool = True
    text: TextConfig | None = None
    max_output_tokens: int | None = Field(default=None, ge=1, le=MAX_TOKENS_CAP)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    reasoning: ReasoningConfig | None = None
    stream: bool = False
    store: bool = True
    previous_response_id: str | None = None
    metadata: dict[str, str] | None = None

    @model_validator(mode="after")
    def _consistent(self) -> "ResponsesRequest":
        names = [tool.name for tool in self.tools or []]
        if isinstance(self.tool_choice, NamedFunction) and self.tool_choice.name not in names:
            raise ApiError(400, f"tool_choice names function {self.tool_choice.name!r}, which is not in tools",
                           param="tool_choice")
        if self.tool_choice == "required" and not names:
            raise ApiError(400, "tool_choice required needs tools", param="tool_choice")
        if self.constraint is not None and self.constraint.tools and self.schema is not None:
            raise ApiError(400, "text.format and a required tool call cannot both constrain one answer",
                           param="text.format")
        return self

    # -- translation ---------------------------------------------------------------------------

    @property
    def tools_offered(self) -> list[dict[str, Any]]:
        if not self.tools or self.tool_choice == "none":
            return []
        return [
            {"type": "function", "function": tool.model_dump(exclude={"type", "strict"}, exclude_none=True)}
            for tool in self.tools
        ]

    @property
    def schema(self) -> dict[str, Any] | None:
        text_format = self.text.format if self.text else None
        if isinstance(text_format, JsonSchemaText):
            return text_format.schema_
        return {"type": "object"} if isinstance(text_format, JsonObjectFormat) else None

    @property
    def constraint(self) -> Constraint | None:
        if self.tools_offered and (self.tool_choice == "required" or isinstance(self.tool_choice, NamedFunction)):
            named = self.tool_choice.name if isinstance(self.tool_choice, NamedFunction) else None
            return Constraint(tools=self.tools_offered, tool=named, parallel=self.parallel_tool_calls)
        return Constraint(schema=self.schema) if self.schema is not None else None

    @property
    def constraint_param(self) -> str:
        constraint = self.constraint
        return "tools" if constraint is None or constraint.schema is None else "text.format.schema"

    def needs(self) -> dict[str, str]:
        wanted = {
            "tools": bool(self.tools_offered),
            "structured_output": self.schema is not None,
            "reasoning": bool(self.reasoning and self.reasoning.effort),
        }
        fields = {"tools": "tools", "structured_output": "text.format", "reasoning": "reasoning.effort"}
        return {feature: fields[feature] for feature, asked in wanted.items() if asked}

    @property
    def items(self) -> list[Any]:
        return [MessageItem(role="user", content=self.input)] if isinstance(self.input, str) else self.input

    def image_urls(self) -> list[tuple[str, str]]:
        return [
            (part.image_url, f"input.{i}.content.{j}.image_url")
            for i, item in enumerate(self.items)
            if isinstance(item, MessageItem)
            for j, part in enumerate(item.parts)
            if isinstance(part, InputImage)
        ]

    def chat(self, earlier: list[dict[str, Any]], vision: bool) -> list[dict[str, Any]]:
        """The conversation for the template: the instructions (never carried over from an
        earlier response), the stored conversation, then this request's items."""
        chat = [{"role": "system", "content": self.instructions}] if self.instructions else []
        chat += earlier
        for item in self.items:
            if isinstance(item, MessageItem):
                parts = [{"type": "text", "text": p.text} if isinstance(p, InputText) else {"type": "image"}
                         for p in item.parts]
                text = "".join(p.get("text", "") for p in parts)
                role = "system" if item.role == "developer" else item.role
                chat.append({"role": role, "content": parts if vision else text})
            elif isinstance(item, FunctionCallItem):
                call = {"id": item.call_id, "type": "function",
                        "function": {"name": item.name, "arguments": _arguments(item.arguments)}}
                last = chat[-1] if chat else None
                if last and last["role"] == "assistant" and "tool_calls" in last:
                    last["tool_calls"].append(call)
                else:
                    chat.append({"role": "assistant", "content": "", "tool_calls": [call]})
            elif isinstance(item, FunctionCallOutputItem):
                chat.append({"role": "tool", "tool_call_id": item.call_id, "content": item.output})
        return chat

    def to_generation(self, chat: list[dict[str, Any]], images: list[Any]) -> GenerationRequest:
        kwargs: dict[str, Any] = {}
        if self.reasoning and self.reasoning.effort:
            kwargs = {"reasoning_effort": self.reasoning.effort, "enable_thinking": self.reasoning.effort != "none"}
        return GenerationRequest(
            sampling=Sampling(max_tokens=self.max_output_tokens, temperature=self.temperature, top_p=self.top_p),
            messages=chat,
            images=images,
            tools=self.tools_offered,
            template_kwargs=kwargs,
            constraint=self.constraint,
        )


def _arguments(text: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except ValueError:
        raise ApiError(400, "a function_call item's arguments must be a JSON object", param="input") from None
    if not isinstance(value, dict):
        raise ApiError(400, "a function_call item's arguments must be a JSON object", param="input")
    return value


def turns(events: list[Event]) -> list[dict[str, Any]]:
    """An answer as the assistant turn(s) a later request's template renders."""
    text = "".join(e.text for e in events if isinstance(e, Content))
    calls = [
        {"id": f"call_{i}", "type": "function", "function": {"name": e.name, "arguments": json.loads(e.arguments)}}
        for i, e in enumerate(e for e in events if isinstance(e, ToolCall))
    ]
    turn: dict[str, Any] = {"role": "assistant", "content": text}
    if calls:
        turn["tool_calls"] = calls
    return [turn]


# -- replies ---------------------------------------------------------------------------------


class Reply:
    """A Response object from a generation's events, whole or as the Responses event stream
    (response.created, output items with their parts and deltas, response.completed)."""

    def __init__(self, model: str, request: ResponsesRequest):
        self.model = model
        self.request = request
        self.id = f"resp_{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.sequence = 0
        self.items: list[dict[str, Any]] = []  # output items so far, finished or not
        self.open: dict[str, Any] | None = None  # the message or reasoning item being written
        self.finished: dict[str, Any] | None = None  # the final Response object

    # -- whole --------------------------------------------------------------------------------

    def full(self, events: list[Event]) -> dict[str, Any]:
        for event in events:
            self._add(event)
        self._close()
        finish = events[-1]
        assert isinstance(finish, Finish)
        self.finished = self.response(finish)
        return self.finished

    # -- streamed -----------------------------------------------------------------------------

    def opening(self) -> list[str]:
        start = self.response(None)
        return [self._sse("response.created", response=start), self._sse("response.in_progress", response=start)]

    def batch(self, events: list[Event]) -> list[str]:
        out: list[str] = []
        for event in events:
            if isinstance(event, Finish):
                out += self._closing_events()
                self.finished = self.response(event)
                kind = "response.completed" if self.finished["status"] == "completed" else "response.incomplete"
                out.append(self._sse(kind, response=self.finished))
            else:
                out += self._streamed(event)
        return out

    def failure(self, error: ApiError) -> list[str]:
        return [self._sse("error", code=error.code or error.type, message=error.message, param=error.param)]

    def closing(self) -> list[str]:
        return []

    # -- items --------------------------------------------------------------------------------

    def _streamed(self, event: Event) -> list[str]:
        """Events for one piece of the answer: a new item's opening when it starts one."""
        out: list[str] = []
        index = len(self.items) - 1
        if isinstance(event, (Content, Reasoning)):
            kind = "message" if isinstance(event, Content) else "reasoning"
            if self.open is None or self.open["type"] != kind:
                out += self._closing_events()
                self._open(kind)
                index = len(self.items) - 1
                out.append(self._sse("response.output_item.added", output_index=index, item=self._snapshot(self.open)))
                part = self._part(kind, "")
                if kind == "message":
                    out.append(self._sse("response.content_part.added", item_id=self.open["id"], output_index=index,
                                         content_index=0, part=part))
            self._append(event.text)
            delta_kind = "response.output_text.delta" if kind == "message" else "response.reasoning_text.delta"
            extra = {"logprobs": []} if kind == "message" else {}
            out.append(self._sse(delta_kind, item_id=self.open["id"], output_index=index, content_index=0,
                                 delta=event.text, **extra))
        elif isinstance(event, ToolCall):
            out += self._closing_events()
            item = self._call(event)
            self.items.append(item)
            index = len(self.items) - 1
            out.append(self._sse("response.output_item.added", output_index=index,
                                 item={**item, "arguments": "", "status": "in_progress"}))
            out.append(self._sse("response.function_call_arguments.delta", item_id=item["id"], output_index=index,
                                 delta=item["arguments"]))
            out.append(self._sse("response.function_call_arguments.done", item_id=item["id"], output_index=index,
                                 name=item["name"], arguments=item["arguments"]))
            out.append(self._sse("response.output_item.done", output_index=index, item=item))
        return out

    def _add(self, event: Event) -> None:
        if isinstance(event, (Content, Reasoning)):
            kind = "message" if isinstance(event, Content) else "reasoning"
            if self.open is None or self.open["type"] != kind:
                self._close()
                self._open(kind)
            self._append(event.text)
        elif isinstance(event, ToolCall):
            self._close()
            self.items.append(self._call(event))

    def _open(self, kind: str) -> None:
        prefix = "msg" if kind == "message" else "rs"
        self.open = {"type": kind, "id": f"{prefix}_{uuid.uuid4().hex[:24]}", "text": ""}
        self.items.append(self.open)

    def _append(self, text: str) -> None:
        assert self.open is not None
        self.open["text"] += text

    def _close(self) -> None:
        if self.open is not None:
            self.items[self.items.index(self.open)] = self._finished_item(self.open)
            self.open = None

    def _closing_events(self) -> list[str]:
        if self.open is None:
            return []
        item, index = self.open, self.items.index(self.open)
        out = []
        if item["type"] == "message":
            out.append(self._sse("response.output_text.done", item_id=item["id"], output_index=index, content_index=0,
                                 text=item["text"], logprobs=[]))
            out.append(self._sse("response.content_part.done", item_id=item["id"], output_index=index, content_index=0,
                                 part=self._part("message", item["text"])))
        else:
            out.append(self._sse("response.reasoning_text.done", item_id=item["id"], output_index=index,
                                 content_index=0, text=item["text"]))
        self._close()
        out.append(self._sse("response.output_item.done", output_index=index, item=self.items[index]))
        return out

    def _finished_item(self, item: dict[str, Any]) -> dict[str, Any]:
        if item["type"] == "message":
            return {"type": "message", "id": item["id"], "status": "completed", "role": "assistant",
                    "content": [self._part("message", item["text"])]}
        return {"type": "reasoning", "id": item["id"], "summary": [], "content": [self._part("reasoning", item["text"])]}

    def _snapshot(self, item: dict[str, Any]) -> dict[str, Any]:
        """An item as announced when it starts: no content yet."""
        if item["type"] == "message":
            return {"type": "message", "id": item["id"], "status": "in_progress", "role": "assistant", "content": []}
        return {"type": "reasoning", "id": item["id"], "summary": []}

    @staticmethod
    def _part(kind: str, text: str) -> dict[str, Any]:
        if kind == "message":
            return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}
        return {"type": "reasoning_text", "text": text}

    @staticmethod
    def _call(call: ToolCall) -> dict[str, Any]:
        return {"type": "function_call", "id": f"fc_{uuid.uuid4().hex[:24]}", "call_id": f"call_{uuid.uuid4().hex[:24]}",
                "name": call.name, "arguments": call.arguments, "status": "completed"}

    # -- the Response object ----------------------------------------------------------------------

    def response(self, finish: Finish | None) -> dict[str, Any]:
        request = self.request
        status = "in_progress" if finish is None else "incomplete" if finish.finish_reason == "length" else "completed"
        text_format = request.text.format.model_dump(by_alias=True) if request.text and request.text.format else {"type": "text"}
        return {
            "id": self.id,
            "object": "response",
            "created_at": self.created,
            "status": status,
            "error": None,
            "incomplete_details": {"reason": "max_output_tokens"} if status == "incomplete" else None,
            "instructions": request.instructions,
            "model": self.model,
            "output": [item for item in self.items if item is not self.open] if finish else [],
            "parallel_tool_calls": request.parallel_tool_calls,
            "previous_response_id": request.previous_response_id,
            "temperature": request.temperature,
            "top_p": request.top_p,
            "max_output_tokens": request.max_output_tokens,
            "tool_choice": (request.tool_choice.model_dump() if isinstance(request.tool_choice, NamedFunction)
                            else request.tool_choice or "auto"),
            "tools": [tool.model_dump(exclude_none=True) for tool in request.tools or []],
            "text": {"format": text_format},
            "reasoning": {"effort": request.reasoning.effort if request.reasoning else None, "summary": None},
            "store": request.store,
            "metadata": request.metadata or {},
            "usage": None if finish is None else {
                "input_tokens": finish.prompt_tokens,
                "input_tokens_details": {"cached_tokens": finish.cached_tokens},
                "output_tokens": finish.completion_tokens,
                "output_tokens_details": {"reasoning_tokens": 0},
                "total_tokens": finish.prompt_tokens + finish.completion_tokens,
            },
        }

    def _sse(self, kind: str, **fields: Any) -> str:
        event = {"type": kind, "sequence_number": self.sequence, **fields}
        self.sequence += 1
        return f"event: {kind}\ndata: {json.dumps(event, separators=(',', ':'))}\n\n"
