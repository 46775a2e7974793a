"""OpenAI's Responses API (`/v1/responses`): what Codex-style clients speak. Input items
(messages, function calls and their outputs) and an optional stored conversation become one
chat for the model's own template; the answer's events become output items (reasoning,
message, function_call), whole or as the Responses event stream."""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass
from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, field_validator, model_validator

from dialects.sse import sse
from policies.errors import ApiError
from dialects.openai import MAX_TOKENS_CAP, JsonObjectFormat, TextFormat
from policies.constraints import Constraint
from policies.events import Content, Event, Finish, Reasoning, ToolCall
from policies.generation import GenerationRequest, Sampling
from policies.input_grammar import InputGrammar, input_grammar


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


def qualified(name: str, namespace: str | None) -> str:
    """A function's name as the model sees it: `namespace.name` inside a namespace."""
    return f"{namespace}.{name}" if namespace else name


class FunctionCallItem(_Model):
    type: Literal["function_call"]
    call_id: str
    name: str
    arguments: str
    namespace: str | None = None

    def chat_call(self) -> dict[str, Any]:
        """The call as chat templates read it."""
        function = {"name": qualified(self.name, self.namespace), "arguments": _arguments(self.arguments)}
        return {"id": self.call_id, "type": "function", "function": function}


class CustomToolCallItem(_Model):
    type: Literal["custom_tool_call"]
    call_id: str
    name: str
    input: str

    def chat_call(self) -> dict[str, Any]:
        """The call as chat templates read it: the free text as its one argument, `input`."""
        return {"id": self.call_id, "type": "function", "function": {"name": self.name, "arguments": {"input": self.input}}}


class FunctionCallOutputItem(_Model):
    type: Literal["function_call_output", "custom_tool_call_output"]
    call_id: str
    output: str | list[InputPart]

    @property
    def text(self) -> str:
        """A tool message carries text: an image among the output's parts is named in its place."""
        if isinstance(self.output, str):
            return self.output
        return "".join(part.text if isinstance(part, InputText) else "[image]" for part in self.output)


class ReasoningItem(_Model):
    """Reasoning a client passes back from an earlier answer: not shown to the model again,
    as templates drop the thinking of past turns."""

    type: Literal["reasoning"]


class OtherItem(_Model):
    """An item of a kind no model here acts on (a hosted tool's call, a compaction, an item
    reference): left out of the conversation, with a warning."""

    type: str


ITEM_KINDS = {
    "message": "message",
    "function_call": "function_call",
    "custom_tool_call": "custom_tool_call",
    "function_call_output": "call_output",
    "custom_tool_call_output": "call_output",
    "reasoning": "reasoning",
}


def _item_kind(value: Any) -> str:
    kind = value.get("type", "message") if isinstance(value, dict) else getattr(value, "type", "message")
    return ITEM_KINDS.get(kind, "other")


InputItem = Annotated[
    Union[
        Annotated[MessageItem, Tag("message")],
        Annotated[FunctionCallItem, Tag("function_call")],
        Annotated[CustomToolCallItem, Tag("custom_tool_call")],
        Annotated[FunctionCallOutputItem, Tag("call_output")],
        Annotated[ReasoningItem, Tag("reasoning")],
        Annotated[OtherItem, Tag("other")],
    ],
    Discriminator(_item_kind),
]


ToolName = Annotated[str, Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")]


class FunctionTool(_Model):
    type: Literal["function"]
    name: ToolName
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class NamespaceTool(_Model):
    """Functions grouped under a name (Codex sends its tools so): the model sees each as
    `namespace.name`, and its calls come back named as the client declared them."""

    type: Literal["namespace"]
    name: ToolName
    description: str | None = None
    tools: list[FunctionTool]


class CustomTool(_Model):
    """A tool whose input is free text (Codex's apply_patch): the model writes the text as a
    call's one string argument, `input`, which its grammar, when given, constrains."""

    type: Literal["custom"]
    name: ToolName
    description: str | None = None
    format: dict[str, Any] | None = None

    @field_validator("format")
    @classmethod
    def _compiles(cls, format: dict[str, Any] | None) -> dict[str, Any] | None:
        input_grammar(format)  # a ValueError says what is wrong with it
        return format

    @property
    def input(self) -> InputGrammar:
        return input_grammar(self.format)


class HostedTool(_Model):
    """A tool OpenAI's servers run (web_search, file_search, local_shell, ...): none here."""

    type: str


def _tool_kind(value: Any) -> str:
    kind = value.get("type") if isinstance(value, dict) else getattr(value, "type", None)
    return kind if kind in ("function", "namespace", "custom") else "hosted"


AnyTool = Annotated[
    Union[
        Annotated[FunctionTool, Tag("function")],
        Annotated[NamespaceTool, Tag("namespace")],
        Annotated[CustomTool, Tag("custom")],
        Annotated[HostedTool, Tag("hosted")],
    ],
    Discriminator(_tool_kind),
]

@dataclass(frozen=True)
class Offered:
    """A tool as the model sees it, and as the client named it."""

    kind: Literal["function", "custom"]
    name: str
    namespace: str | None
    description: str
    parameters: dict[str, Any]

    @property
    def model_name(self) -> str:
        return qualified(self.name, self.namespace)


class NamedTool(_Model):
    """A forced call to one function or custom tool."""

    type: Literal["function", "custom"]
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
    effort: str | None = None  # a hint to the template; names vary (xhigh, ...)


class ResponsesRequest(_Model):
    model: str
    input: str | list[InputItem]
    instructions: str | None = None
    tools: list[AnyTool] | None = None
    tool_choice: Literal["auto", "none", "required"] | NamedTool | None = None
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
        names = [tool.model_name for tool in self.offered]
        if isinstance(self.tool_choice, NamedTool) and self.tool_choice.name not in names:
            raise ApiError(400, f"tool_choice names tool {self.tool_choice.name!r}, which is not in tools",
                           param="tool_choice")
        if self.tool_choice == "required" and not names:
            raise ApiError(400, "tool_choice required needs tools", param="tool_choice")
        if len(set(names)) != len(names):
            raise ApiError(400, "tools names one function twice", param="tools")
        return self

    # -- translation ---------------------------------------------------------------------------

    @property
    def offered(self) -> list[Offered]:
        """The client's functions and custom tools, namespaces flattened; hosted tools left out."""
        out = []
        for tool in self.tools or []:
            members = tool.tools if isinstance(tool, NamespaceTool) else [tool]
            namespace = tool.name if isinstance(tool, NamespaceTool) else None
            for member in members:
                if isinstance(member, FunctionTool):
                    out.append(Offered("function", member.name, namespace, member.description or "",
                                       member.parameters or {"type": "object", "properties": {}}))
                elif isinstance(member, CustomTool):
                    out.append(Offered("custom", member.name, None, member.description or "", member.input.parameters()))
        return out

    def tool_named(self, model_name: str) -> Offered | None:
        return next((tool for tool in self.offered if tool.model_name == model_name), None)

    @property
    def tools_offered(self) -> list[dict[str, Any]]:
        if self.tool_choice == "none":
            return []
        return [
            {"type": "function",
             "function": {"name": tool.model_name, "description": tool.description, "parameters": tool.parameters}}
            for tool in self.offered
        ]

    def ignored(self) -> list[str]:
        """What this request asks for that the answer leaves out, said in a warning header."""
        notes = [f"hosted tool {tool.type!r} ignored: no model here runs OpenAI's hosted tools"
                 for tool in self.tools or [] if isinstance(tool, HostedTool)]
        notes += [f"custom tool {tool.name!r}: its input grammar is not enforced ({tool.input.unenforced})"
                  for tool in self.tools or [] if isinstance(tool, CustomTool) and tool.input.unenforced]
        kinds = sorted({item.type for item in self.items if isinstance(item, OtherItem)})
        if kinds:
            notes.append(f"input items of type {', '.join(kinds)} left out: no model here acts on them")
        if self.schema is not None and self._forced_call:
            notes.append("text.format ignored: the answer is a required tool call, whose arguments follow its schema")
        return notes

    @property
    def schema(self) -> dict[str, Any] | None:
        text_format = self.text.format if self.text else None
        if isinstance(text_format, JsonSchemaText):
            return text_format.schema_
        return {"type": "object"} if isinstance(text_format, JsonObjectFormat) else None

    @property
    def _forced_call(self) -> bool:
        return bool(self.tools_offered) and (self.tool_choice == "required" or isinstance(self.tool_choice, NamedTool))

    @property
    def constraint(self) -> Constraint | None:
        """A required tool call, else text.format's JSON schema."""
        if self._forced_call:
            named = self.tool_choice.name if isinstance(self.tool_choice, NamedTool) else None
            return Constraint(tools=self.tools_offered, tool=named, parallel=self.parallel_tool_calls)
        return Constraint(schema=self.schema) if self.schema is not None else None

    @property
    def constraint_param(self) -> str:
        constraint = self.constraint
        return "tools" if constraint is None or constraint.schema is None else "text.format.schema"

    def needs(self) -> dict[str, str]:
        wanted = {
            "tools": bool(self.tools_offered),
            "structured_output": self.schema is not None and not self._forced_call,
        }
        fields = {"tools": "tools", "structured_output": "text.format"}
        return {feature: fields[feature] for feature, asked in wanted.items() if asked}

    def wishes(self) -> dict[str, str]:
        # Codex always sends an effort: a model that cannot think answers without thinking.
        effort = self.reasoning.effort if self.reasoning else None
        return {"reasoning": "reasoning.effort"} if effort not in (None, "none") else {}

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

    def chat(self, conversation: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """The chat for the template: the instructions (never carried over from an earlier
        response), then the conversation."""
        return ([{"role": "system", "content": self.instructions}] if self.instructions else []) + conversation

    def conversation(self, earlier: list[dict[str, Any]], vision: bool) -> list[dict[str, Any]]:
        """The stored conversation this request continues, then its own items, as chat messages."""
        chat = list(earlier)
        for item in self.items:
            if isinstance(item, MessageItem):
                parts = [{"type": "text", "text": p.text} if isinstance(p, InputText) else {"type": "image"}
                         for p in item.parts]
                text = "".join(p.get("text", "") for p in parts)
                role = "system" if item.role == "developer" else item.role
                chat.append({"role": role, "content": parts if vision else text})
            elif isinstance(item, (FunctionCallItem, CustomToolCallItem)):
                call = item.chat_call()
                last = chat[-1] if chat else None
                if last and last["role"] == "assistant" and "tool_calls" in last:
                    last["tool_calls"].append(call)
                else:
                    chat.append({"role": "assistant", "content": "", "tool_calls": [call]})
            elif isinstance(item, FunctionCallOutputItem):
                chat.append({"role": "tool", "tool_call_id": item.call_id, "content": item.text})
        return chat

    def to_generation(self, chat: list[dict[str, Any]], images: list[Any]) -> GenerationRequest:
        kwargs: dict[str, Any] = {}
        if self.reasoning and self.reasoning.effort:
            kwargs = {"reasoning_effort": self.reasoning.effort, "enable_thinking": self.reasoning.effort != "none"}
        return GenerationRequest(
            sampling=Sampling(max_tokens=self.max_output_tokens, temperature=self.temperature, top_p=self.top_p,
                              max_tokens_param="max_output_tokens"),
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
            field, kind = ("input", "custom_tool_call_input") if item["type"] == "custom_tool_call" else (
                "arguments", "function_call_arguments")
            out.append(self._sse("response.output_item.added", output_index=index,
                                 item={**item, field: "", "status": "in_progress"}))
            out.append(self._sse(f"response.{kind}.delta", item_id=item["id"], output_index=index, delta=item[field]))
            done = {"name": item["name"]} if field == "arguments" else {}
            out.append(self._sse(f"response.{kind}.done", item_id=item["id"], output_index=index,
                                 **{field: item[field]}, **done))
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

    def _call(self, call: ToolCall) -> dict[str, Any]:
        """The call as the client declared its tool: a custom tool's free text input, a
        namespaced function's name and namespace apart."""
        call_id = f"call_{uuid.uuid4().hex[:24]}"
        tool = self.request.tool_named(call.name)
        if tool is not None and tool.kind == "custom":
            text = json.loads(call.arguments).get("input", "")
            return {"type": "custom_tool_call", "id": f"ctc_{uuid.uuid4().hex[:24]}", "call_id": call_id,
                    "name": tool.name, "input": text if isinstance(text, str) else json.dumps(text),
                    "status": "completed"}
        item = {"type": "function_call", "id": f"fc_{uuid.uuid4().hex[:24]}", "call_id": call_id,
                "name": tool.name if tool else call.name, "arguments": call.arguments, "status": "completed"}
        if tool is not None and tool.namespace:
            item["namespace"] = tool.namespace
        return item

    def turns(self) -> list[dict[str, Any]]:
        """The answer as sent, as the assistant turn a later request's template renders:
        its text, and its calls under the ids the client was given."""
        text = "".join(part["text"] for item in self.items if item["type"] == "message" for part in item["content"])
        kinds = {"function_call": FunctionCallItem, "custom_tool_call": CustomToolCallItem}
        calls = [kinds[item["type"]].model_validate(item).chat_call() for item in self.items if item["type"] in kinds]
        turn: dict[str, Any] = {"role": "assistant", "content": text}
        if calls:
            turn["tool_calls"] = calls
        return [turn]

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
            # The cap that applied, also when the request left it to the model's context.
            "max_output_tokens": finish.token_limit if finish and finish.token_limit else request.max_output_tokens,
            "tool_choice": (request.tool_choice.model_dump() if isinstance(request.tool_choice, NamedTool)
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
                "output_tokens_details": {"reasoning_tokens": finish.reasoning_tokens},
                "total_tokens": finish.prompt_tokens + finish.completion_tokens,
            },
        }

    def _sse(self, kind: str, **fields: Any) -> str:
        event = {"type": kind, "sequence_number": self.sequence, **fields}
        self.sequence += 1
        return sse(event, kind)
