"""OpenAI's dialect: Chat Completions, legacy Completions and Embeddings requests, and the
replies (plain and streamed) built from a generation's events."""

from __future__ import annotations

import base64
import json
import time
import uuid
from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, StrictInt, field_validator, model_validator

from dialects.sse import DONE, sse
from policies.errors import ApiError
from policies.constraints import Constraint
from policies.events import Content, Event, Finish, Logprobs, Reasoning, TokenLogprob, ToolCall
from policies.generation import GenerationRequest, Sampling


# Far above any context window we serve; anything larger is a client bug, not a wish.
MAX_TOKENS_CAP = 131_072
# MLX seeds its generator with an unsigned 64-bit integer.
SEED_LIMIT = 2**64
MAX_STOP_SEQUENCES = 4
MAX_STOP_CHARS = 1000
MAX_TOP_LOGPROBS = 20  # chat; legacy completions allow 5
MAX_COMPLETION_LOGPROBS = 5


class _Request(BaseModel):
    # Clients send many optional OpenAI fields (user, logit_bias, ...): ignore what we do
    # not implement rather than break them.
    model_config = ConfigDict(extra="ignore")


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ImageUrl(BaseModel):
    url: str
    detail: Literal["auto", "low", "high"] | None = None


class ImagePart(BaseModel):
    type: Literal["image_url"]
    image_url: ImageUrl


ContentPart = Annotated[Union[TextPart, ImagePart], Field(discriminator="type")]


class FunctionCall(BaseModel):
    name: str
    arguments: str  # a JSON object, as text

    @field_validator("arguments")
    @classmethod
    def _json_object(cls, arguments: str) -> str:
        try:
            value = json.loads(arguments)
        except ValueError:
            raise ValueError("arguments must be a JSON object encoded as a string") from None
        if not isinstance(value, dict):
            raise ValueError("arguments must be a JSON object encoded as a string")
        return arguments


class AssistantToolCall(BaseModel):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(BaseModel):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[AssistantToolCall] | None = None  # assistant turns that called tools
    tool_call_id: str | None = None  # tool turns: which call this is the result of

    @model_validator(mode="after")
    def _tool_fields(self) -> "ChatMessage":
        if self.role == "tool" and not self.tool_call_id:
            raise ValueError("a tool message needs the tool_call_id of the call it answers")
        if self.tool_calls and self.role != "assistant":
            raise ValueError("only assistant messages carry tool_calls")
        return self

    def for_template(self, vision: bool) -> dict[str, Any]:
        """The message as chat templates read it: "developer" is OpenAI's newer name for
        "system", and tool-call arguments are objects (templates render them with tojson)."""
        message: dict[str, Any] = {
            "role": "system" if self.role == "developer" else self.role,
            "content": self.parts() if vision else self.text(),
        }
        if self.tool_calls:
            message["tool_calls"] = [
                {
                    "id": call.id,
                    "type": "function",
                    "function": {"name": call.function.name, "arguments": json.loads(call.function.arguments)},
                }
                for call in self.tool_calls
            ]
        if self.tool_call_id:
            message["tool_call_id"] = self.tool_call_id
        if self.name:
            message["name"] = self.name
        return message

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content if isinstance(part, TextPart))

    def parts(self) -> list[dict[str, str]]:
        """The content as text parts and `{"type": "image"}` placeholders, in order."""
        if not isinstance(self.content, list):
            return [{"type": "text", "text": self.text()}]
        return [
            {"type": "text", "text": part.text} if isinstance(part, TextPart) else {"type": "image"}
            for part in self.content
        ]


class StreamOptions(BaseModel):
    include_usage: bool = False


class FunctionDefinition(BaseModel):
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    description: str | None = None
    parameters: dict[str, Any] | None = None  # a JSON schema of the arguments object
    strict: bool | None = None


class Tool(BaseModel):
    type: Literal["function"]
    function: FunctionDefinition


class FunctionName(BaseModel):
    name: str


class NamedToolChoice(BaseModel):
    type: Literal["function"]
    function: FunctionName


class TextFormat(BaseModel):
    type: Literal["text"]


class JsonObjectFormat(BaseModel):
    type: Literal["json_object"]


class JsonSchema(BaseModel):
    name: str = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")
    description: str | None = None
    schema_: dict[str, Any] = Field(default_factory=dict, alias="schema")
    strict: bool | None = None


class JsonSchemaFormat(BaseModel):
    type: Literal["json_schema"]
    json_schema: JsonSchema


ResponseFormat = Annotated[Union[TextFormat, JsonObjectFormat, JsonSchemaFormat], Field(discriminator="type")]


class _GenerationRequest(_Request):
    model: str
    max_tokens: int | None = Field(default=None, ge=1, le=MAX_TOKENS_CAP)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    seed: int | None = Field(
        default=None, ge=0, lt=SEED_LIMIT, description="0 <= seed < 2**64; leave it out for a random one."
    )
    stop: str | list[str] | None = None
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None

    @field_validator("n")
    @classmethod
    def _only_one_choice(cls, n: int) -> int:
        if n != 1:
            raise ValueError("only n=1 is supported")
        return n

    @field_validator("stop")
    @classmethod
    def _stop_sequences(cls, stop: str | list[str] | None) -> str | list[str] | None:
        sequences = [stop] if isinstance(stop, str) else stop or []
        if len(sequences) > MAX_STOP_SEQUENCES:
            raise ValueError(f"at most {MAX_STOP_SEQUENCES} stop sequences are allowed")
        if any(not s for s in sequences):
            raise ValueError("stop sequences must not be empty")
        if any(len(s) > MAX_STOP_CHARS for s in sequences):
            raise ValueError(f"a stop sequence may have at most {MAX_STOP_CHARS} characters")
        return stop

    def sampling(self, max_tokens: int | None = None) -> Sampling:
        return Sampling(
            max_tokens=max_tokens or self.max_tokens,
            temperature=self.temperature,
            top_p=self.top_p,
            seed=self.seed,
            stop=[self.stop] if isinstance(self.stop, str) else list(self.stop or []),
        )

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    def wishes(self) -> dict[str, str]:
        """Features used where the model has them and left out, with a warning, where not."""
        return {}

    def ignored(self) -> list[str]:
        """What the request asks for that the answer leaves out, said in a warning header."""
        return []


class ChatCompletionRequest(_GenerationRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1, le=MAX_TOKENS_CAP)
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool = True
    response_format: ResponseFormat | None = None
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)
    reasoning_effort: Literal["none", "minimal", "low", "medium", "high"] | None = None
    chat_template_kwargs: dict[str, Any] | None = None

    @model_validator(mode="after")
    def _consistent(self) -> "ChatCompletionRequest":
        if self.top_logprobs is not None and not self.logprobs:
            raise ApiError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
        names = [tool.function.name for tool in self.tools or []]
        if len(set(names)) != len(names):
            raise ApiError(400, "tool names must be unique", param="tools")
        if self.tool_choice is not None and self.tool_choice != "none" and not names:
            raise ApiError(400, "tool_choice needs tools", param="tool_choice")
        if isinstance(self.tool_choice, NamedToolChoice) and self.tool_choice.function.name not in names:
            raise ApiError(
                400,
                f"tool_choice names function {self.tool_choice.function.name!r}, which is not in tools "
                f"({', '.join(names)})",
                param="tool_choice",
            )
        return self

    def sampling(self) -> Sampling:  # type: ignore[override]
        # The newer name wins: OpenAI deprecated max_tokens for chat in its favour.
        sampling = super().sampling(self.max_completion_tokens)
        if self.max_completion_tokens:
            sampling.max_tokens_param = "max_completion_tokens"
        return sampling

    @property
    def tools_offered(self) -> list[dict[str, Any]]:
        """The tools as chat templates take them; none when the client said "none"."""
        if not self.tools or self.tool_choice == "none":
            return []
        return [tool.model_dump(exclude_none=True) for tool in self.tools]

    @property
    def forced_tool(self) -> str | None | bool:
        """False: calls are optional; None: some call is required; a name: that call."""
        if isinstance(self.tool_choice, NamedToolChoice):
            return self.tool_choice.function.name
        return None if self.tool_choice == "required" and self.tools else False

    @property
    def structured(self) -> bool:
        return isinstance(self.response_format, (JsonObjectFormat, JsonSchemaFormat))

    @property
    def response_schema(self) -> dict[str, Any] | None:
        """The JSON schema the answer must follow, if response_format asks for one."""
        if isinstance(self.response_format, JsonSchemaFormat):
            return self.response_format.json_schema.schema_
        if isinstance(self.response_format, JsonObjectFormat):
            return {"type": "object"}
        return None

    @property
    def constraint(self) -> Constraint | None:
        """What the answer must be: the forced tool call(s), or the response_format's JSON."""
        if self.tools_offered and self.forced_tool is not False:
            return Constraint(tools=self.tools_offered, tool=self.forced_tool or None, parallel=self.parallel_tool_calls)
        if self.response_schema is not None:
            return Constraint(schema=self.response_schema)
        return None

    @property
    def template_kwargs(self) -> dict[str, Any]:
        """Extra variables for the chat template: the client's, and the reasoning effort."""
        kwargs = dict(self.chat_template_kwargs or {})
        if self.reasoning_effort is not None:
            kwargs.setdefault("reasoning_effort", self.reasoning_effort)
            kwargs.setdefault("enable_thinking", self.reasoning_effort != "none")
        return kwargs

    @property
    def logprobs_wanted(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None

    def needs(self) -> dict[str, str]:
        """The model features this request asks for, each with the field that asks."""
        wanted = {
            "tools": bool(self.tools_offered),
            "structured_output": self.structured and not self._forced_call,
            "logprobs": self.logprobs,
        }
        fields = {"tools": "tools", "structured_output": "response_format", "logprobs": "logprobs"}
        return {feature: fields[feature] for feature, asked in wanted.items() if asked}

    @property
    def _forced_call(self) -> bool:
        return bool(self.tools_offered) and self.forced_tool is not False

    def ignored(self) -> list[str]:
        if self.structured and self._forced_call:
            return ["response_format ignored: the answer is a required tool call, whose arguments follow its schema"]
        return []

    def wishes(self) -> dict[str, str]:
        # A reasoning effort is a hint: a model that cannot think answers without thinking.
        return {"reasoning": "reasoning_effort"} if self.reasoning_effort not in (None, "none") else {}

    @property
    def constraint_param(self) -> str:
        constraint = self.constraint
        return "tools" if constraint is None or constraint.schema is None else "response_format.json_schema.schema"

    def image_urls(self) -> list[tuple[str, str]]:
        """Every image part's URL with its JSON path, in order."""
        return [
            (part.image_url.url, f"messages.{i}.content.{j}.image_url")
            for i, message in enumerate(self.messages)
            for j, part in enumerate(message.content if isinstance(message.content, list) else [])
            if isinstance(part, ImagePart)
        ]

    def to_generation(self, vision: bool, images: list[Any]) -> GenerationRequest:
        return GenerationRequest(
            sampling=self.sampling(),
            messages=[m.for_template(vision) for m in self.messages],
            images=images,
            tools=self.tools_offered,
            template_kwargs=self.template_kwargs,
            constraint=self.constraint,
            logprobs=self.logprobs_wanted,
        )


class CompletionRequest(_GenerationRequest):
    prompt: str | list[str]
    logprobs: int | None = Field(default=None, ge=0, le=MAX_COMPLETION_LOGPROBS)

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, prompt: str | list[str]) -> str | list[str]:
        if isinstance(prompt, list) and len(prompt) != 1:
            raise ValueError("exactly one prompt is supported per request")
        return prompt

    @property
    def prompt_text(self) -> str:
        return self.prompt if isinstance(self.prompt, str) else self.prompt[0]

    def needs(self) -> dict[str, str]:
        return {"logprobs": "logprobs"} if self.logprobs is not None else {}

    @property
    def constraint_param(self) -> str:
        return "prompt"

    def image_urls(self) -> list[tuple[str, str]]:
        return []

    def to_generation(self, vision: bool, images: list[Any]) -> GenerationRequest:
        return GenerationRequest(sampling=self.sampling(), prompt=self.prompt_text, logprobs=self.logprobs)


# OpenAI's own limit on inputs per embeddings request.
MAX_EMBEDDING_INPUTS = 2048


class EmbeddingRequest(_Request):
    model: str
    # Text, texts, one token array or several: arrays are in the model's own vocabulary.
    input: str | list[str] | list[StrictInt] | list[list[StrictInt]]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = None

    @field_validator("input")
    @classmethod
    def _non_empty(cls, value: Any) -> Any:
        inputs = cls._as_list(value)
        if not inputs:
            raise ValueError("input must contain at least one text")
        if len(inputs) > MAX_EMBEDDING_INPUTS:
            raise ValueError(f"at most {MAX_EMBEDDING_INPUTS} inputs per request, got {len(inputs)}")
        empty = [i for i, item in enumerate(inputs) if not item]
        if empty:
            raise ValueError(f"input {empty[0]} is empty; every input needs text or tokens")
        return value

    @field_validator("dimensions")
    @classmethod
    def _no_dimensions(cls, value: int | None) -> int | None:
        if value is not None:
            raise ValueError("dimensions is not supported yet: vectors keep the model's size")
        return value

    @staticmethod
    def _as_list(value: Any) -> list[str] | list[list[int]]:
        if isinstance(value, str) or (value and isinstance(value[0], int)):
            return [value]
        return value

    @property
    def texts(self) -> list[str] | list[list[int]]:
        """The inputs, each a text or a token array."""
        return self._as_list(self.input)


class PreloadRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    pin: bool = True


def usage(finish: Finish) -> dict[str, Any]:
    return {
        "prompt_tokens": finish.prompt_tokens,
        "completion_tokens": finish.completion_tokens,
        "total_tokens": finish.prompt_tokens + finish.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": finish.cached_tokens},
        "completion_tokens_details": {"reasoning_tokens": finish.reasoning_tokens},
    }


class Reply:
    """OpenAI response objects for one request, chat or legacy completion shaped, from the
    generation's events. A streamed reply's chunks add up to the plain reply."""

    def __init__(self, model: str, chat: bool, logprobs: bool = False, include_usage: bool = False):
        self.model = model
        self.chat = chat
        self.logprobs = logprobs
        self.include_usage = include_usage
        self.id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.calls = 0  # tool calls sent so far: the next one's index
        self.text_offset = 0  # legacy completions' logprobs point into the text

    def _object(self, kind: str, choices: list[dict], **extra: Any) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": kind,
            "created": self.created,
            "model": self.model,
            "choices": choices,
            **extra,
        }

    def full(self, events: list[Event]) -> dict[str, Any]:
        finish = events[-1]
        assert isinstance(finish, Finish)
        text = "".join(e.text for e in events if isinstance(e, Content))
        tokens = [t for e in events if isinstance(e, Logprobs) for t in e.tokens]
        choice: dict[str, Any] = {
            "index": 0,
            "finish_reason": finish.finish_reason,
            "logprobs": self._logprobs(tokens) if self.logprobs else None,
        }
        if self.chat:
            calls = [self._tool_call(e) for e in events if isinstance(e, ToolCall)]
            reasoning = "".join(e.text for e in events if isinstance(e, Reasoning))
            message: dict[str, Any] = {"role": "assistant", "content": text if text or not calls else None}
            if reasoning:
                message["reasoning_content"] = reasoning
            if calls:
                message["tool_calls"] = calls
            choice["message"] = message
        else:
            choice["text"] = text
        kind = "chat.completion" if self.chat else "text_completion"
        return self._object(kind, [choice], usage=usage(finish))

    def opening(self) -> list[str]:
        """A chat stream's first chunk: the role, empty content."""
        return [sse(self._chunk({"role": "assistant", "content": ""}, None, self.include_usage))] if self.chat else []

    def batch(self, events: list[Event]) -> list[str]:
        chunks = [sse(chunk) for chunk in self.chunks(events, self.include_usage)]
        finish = events[-1] if events and isinstance(events[-1], Finish) else None
        if finish is not None and self.include_usage:
            chunks.append(sse(self.usage_chunk(finish)))
        return chunks

    def failure(self, error: ApiError) -> list[str]:
        return [sse(error.body())]

    def closing(self) -> list[str]:
        return [DONE]

    def chunks(self, events: list[Event], with_usage: bool) -> list[dict[str, Any]]:
        """The chunks for one batch of events: text and reasoning with their log-probabilities
        in one, each tool call in two (its id and name, then its arguments), the finish in one."""
        chunks = []
        text = "".join(e.text for e in events if isinstance(e, Content))
        reasoning = "".join(e.text for e in events if isinstance(e, Reasoning))
        tokens = [t for e in events if isinstance(e, Logprobs) for t in e.tokens]
        if text or reasoning or tokens:
            if self.chat:
                delta: dict[str, Any] = {"content": text} if text else {}
                if reasoning:
                    delta["reasoning_content"] = reasoning
            else:
                delta = {"text": text}
            chunks.append(self._chunk(delta, None, with_usage, self._logprobs(tokens) if self.logprobs else None))
        for event in events:
            if isinstance(event, ToolCall):
                call = self._tool_call(event)
                index = call.pop("index")
                arguments = call["function"]["arguments"]
                opening = {**call, "function": {"name": call["function"]["name"], "arguments": ""}}
                chunks.append(self._chunk({"tool_calls": [{"index": index, **opening}]}, None, with_usage))
                chunks.append(
                    self._chunk({"tool_calls": [{"index": index, "function": {"arguments": arguments}}]}, None, with_usage)
                )
            elif isinstance(event, Finish):
                chunks.append(self._chunk({} if self.chat else {"text": ""}, event.finish_reason, with_usage))
        return chunks

    def usage_chunk(self, finish: Finish) -> dict[str, Any]:
        kind = "chat.completion.chunk" if self.chat else "text_completion"
        return self._object(kind, [], usage=usage(finish))

    def _chunk(
        self, delta: dict[str, Any], finish_reason: str | None, with_usage: bool, logprobs: Any = None
    ) -> dict[str, Any]:
        choice: dict[str, Any] = {"index": 0, "finish_reason": finish_reason, "logprobs": logprobs}
        if self.chat:
            choice["delta"] = delta
        else:
            choice["text"] = delta.get("text", "")
        kind = "chat.completion.chunk" if self.chat else "text_completion"
        return self._object(kind, [choice], **({"usage": None} if with_usage else {}))

    def _tool_call(self, call: ToolCall) -> dict[str, Any]:
        index, self.calls = self.calls, self.calls + 1
        return {
            "index": index,
            "id": f"call_{uuid.uuid4().hex[:24]}",
            "type": "function",
            "function": {"name": call.name, "arguments": call.arguments},
        }

    def _logprobs(self, tokens: list[TokenLogprob]) -> dict[str, Any]:
        if self.chat:
            return {
                "content": [
                    {
                        "token": t.token,
                        "logprob": t.logprob,
                        "bytes": t.bytes,
                        "top_logprobs": [{"token": a.token, "logprob": a.logprob, "bytes": a.bytes} for a in t.top],
                    }
                    for t in tokens
                ]
            }
        offsets = []
        for t in tokens:
            offsets.append(self.text_offset)
            self.text_offset += len(t.token)
        return {
            "tokens": [t.token for t in tokens],
            "token_logprobs": [t.logprob for t in tokens],
            "top_logprobs": [{a.token: a.logprob for a in t.top} for t in tokens],
            "text_offset": offsets,
        }


def encode_vector(vector: Any, encoding_format: str) -> list[float] | str:
    if encoding_format == "base64":
        # Little-endian float32 bytes: what the OpenAI client asks for by default and decodes.
        return base64.b64encode(vector.astype("<f4").tobytes()).decode()
    return vector.tolist()
