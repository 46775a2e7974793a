"""The HTTP surface: OpenAI-compatible routes. It validates, routes and formats; it never
runs a model. Every error leaves as the OpenAI error envelope."""


import asyncio
import base64
import json
import logging
import secrets
import time
import uuid
from typing import Any, AsyncIterator, NoReturn, TypeVar

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ValidationError
from ray import serve
from ray.exceptions import RayActorError
from ray.serve.handle import DeploymentHandle
from starlette.exceptions import HTTPException as StarletteHTTPException

from deployments.leases import LeaseKeeper
from deployments.media import ImagePolicy, ImageRef, load_images
from deployments.openai_types import (
    ApiError,
    ChatCompletionRequest,
    CompletionRequest,
    EmbeddingRequest,
    ImagePart,
    PreloadRequest,
    TextJob,
    error_body,
    model_not_found,
    validation_error_to_api_error,
)
from deployments.registry import CHAT, COMPLETIONS, EMBEDDINGS, Capabilities
from policies.config import INGRESS_NAME, AppConfig, ModelEntry, parse_duration
from policies.constraints import Constraint
from policies.events import Content, Event, Finish, Logprobs, Reasoning, TokenLogprob, ToolCall
from policies.ledger import Lease
from policies.tool_calls import FORMATS
from policies.memory import parse_size

logger = logging.getLogger("ray.serve")

app = FastAPI(title="mlx-fleet", description="Many MLX models behind one OpenAI-compatible API.")

Body = TypeVar("Body", bound=BaseModel)

# No request schema nests deeper than a few levels; a deeper body is an attack on the parser.
MAX_JSON_DEPTH = 64


def find_api_error(error: BaseException) -> ApiError | None:
    """The ApiError behind an exception, also when Ray wrapped it on its way from a replica."""
    while error is not None:
        if isinstance(error, ApiError):
            return error
        error = getattr(error, "cause", None) or error.__cause__
    return None


def error_response(error: ApiError) -> JSONResponse:
    return JSONResponse(error.body(), status_code=error.status, headers=error.headers)


@app.exception_handler(Exception)
async def _any_error(request: Request, error: Exception) -> JSONResponse:
    api_error = find_api_error(error)
    if api_error is not None:
        return error_response(api_error)
    logger.exception("unexpected error on %s %s", request.method, request.url.path)
    return JSONResponse(
        error_body(f"Internal server error: {type(error).__name__}", "server_error"),
        status_code=500,
    )


@app.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
    kind = "not_found_error" if error.status_code == 404 else "invalid_request_error"
    message = f"{request.method} {request.url.path}: {error.detail}"
    return JSONResponse(error_body(message, kind), status_code=error.status_code)


@app.exception_handler(RequestValidationError)
async def _validation_error(request: Request, error: RequestValidationError) -> JSONResponse:
    first = error.errors()[0]
    path = ".".join(str(part) for part in first["loc"])
    return JSONResponse(
        error_body(f"{path}: {first['msg']}", "invalid_request_error", path), status_code=400
    )


class Reply:
    """OpenAI response objects for one request, chat or legacy completion shaped, from the
    generation's events. A streamed reply's chunks add up to the plain reply."""

    def __init__(self, model: str, chat: bool, logprobs: bool = False):
        self.model = model
        self.chat = chat
        self.logprobs = logprobs
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
        return self._object(kind, [choice], usage=finish.usage())

    def opening(self, with_usage: bool) -> dict[str, Any]:
        """A chat stream's first chunk: the role, empty content."""
        return self._chunk({"role": "assistant", "content": ""}, None, with_usage)

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
        return self._object(kind, [], usage=finish.usage())

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


def sse(data: Any) -> str:
    return f"data: {json.dumps(data, separators=(',', ':'))}\n\n"


def decode_json(raw: bytes) -> Any:
    """The body as JSON: strict (no NaN or Infinity) and at most MAX_JSON_DEPTH levels deep."""
    too_deep = ApiError(400, f"The request body nests JSON more than {MAX_JSON_DEPTH} levels deep")
    try:
        data = json.loads(raw, parse_constant=_refuse_constant)
    except RecursionError:
        raise too_deep from None
    except ValueError as error:
        raise ApiError(400, f"The request body is not valid JSON: {error}") from None
    if json_depth(data, MAX_JSON_DEPTH) > MAX_JSON_DEPTH:
        raise too_deep
    return data


def _refuse_constant(name: str) -> NoReturn:
    raise ValueError(f"{name} is not a JSON value")


def json_depth(value: Any, stop_after: int) -> int:
    """How deeply arrays and objects nest in `value` (a scalar is 0); counting stops past
    `stop_after`."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        node, depth = stack.pop()
        children = node.values() if isinstance(node, dict) else node if isinstance(node, list) else None
        if children is None:
            continue
        deepest = max(deepest, depth)
        if deepest > stop_after:
            break
        stack.extend((child, depth + 1) for child in children)
    return deepest


def replica_lost(model_id: str) -> ApiError:
    return ApiError(
        503,
        f"Model {model_id}'s replica stopped while serving this request; it is being "
        "restarted, retry in a few seconds",
        "model_unavailable",
        param="model",
        code="model_unavailable",
        headers={"retry-after": "2"},
    )


@serve.deployment(name=INGRESS_NAME, ray_actor_options={"num_cpus": 0}, max_ongoing_requests=1000)
@serve.ingress(app)
class Ingress:
    def __init__(
        self,
        config: AppConfig,
        catalog: list[ModelEntry],
        capabilities: dict[str, Capabilities],
        controller: DeploymentHandle,
        models: dict[str, DeploymentHandle],
    ):
        self.config = config
        self.catalog = {entry.id: entry for entry in catalog}
        self.capabilities = capabilities
        self.image_policy = ImagePolicy(
            max_side=config.image_max_side,
            max_bytes=parse_size(config.image_max_bytes),
            timeout_s=parse_duration(config.image_fetch_timeout),
            allow_hosts=tuple(config.image_allow_hosts),
        )
        self.controller = controller
        self.models = models
        self.leases = LeaseKeeper(
            controller,
            # A request waits for its model's load, and through a controller restart.
            acquire_timeout=config.load_wait_seconds + 60,
            lease_ttl=config.lease_ttl_seconds,
        )
        self.started = int(time.time())
        self._tasks: set[asyncio.Task] = set()

    # -- routes -------------------------------------------------------------------------------

    @app.get("/health")
    async def health(self) -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/health/ready")
    async def ready(self) -> JSONResponse:
        readiness = await self.controller.readiness.remote()
        if readiness["ready"]:
            return JSONResponse({"status": "ready"})
        pending = readiness["pinned_not_loaded"]
        waiting = f"pinned models not loaded yet: {', '.join(pending)}" if pending else "starting up"
        return JSONResponse(
            error_body(f"Not ready: {waiting}", "service_unavailable", code="not_ready"),
            status_code=503,
        )

    @app.get("/v1/models")
    async def list_models(self) -> dict[str, Any]:
        statuses = await self.controller.statuses.remote()
        return {
            "object": "list",
            "data": [self._model_card(entry, statuses[entry.id]) for entry in self.catalog.values()],
        }

    @app.get("/v1/models/{model_id:path}")
    async def get_model(self, model_id: str) -> dict[str, Any]:
        entry = self._entry(model_id)
        statuses = await self.controller.statuses.remote()
        return self._model_card(entry, statuses[entry.id])

    @app.post("/v1/chat/completions")
    async def chat_completions(self, request: Request):
        body = await self._parse(request, ChatCompletionRequest)
        entry = self._entry(body.model, CHAT)
        refs = [
            ImageRef(part.image_url.url, f"messages.{i}.content.{j}.image_url")
            for i, message in enumerate(body.messages)
            for j, part in enumerate(message.content if isinstance(message.content, list) else [])
            if isinstance(part, ImagePart)
        ]
        vision = self.capabilities[entry.type].accepts_images
        if refs and not vision:
            raise ApiError(400, f"Model {entry.id} does not support vision", param="messages")
        if len(refs) > self.config.max_images_per_request:
            raise ApiError(
                400,
                f"at most {self.config.max_images_per_request} images per request, got {len(refs)}",
                param="messages",
            )
        constraint = self._constraint(entry, body)
        images = await load_images(refs, self.image_policy) if refs else []
        job = TextJob(
            sampling=body.sampling(),
            messages=[m.for_template(vision) for m in body.messages],
            images=images,
            tools=body.tools_offered,
            template_kwargs=body.template_kwargs,
            constraint=constraint,
            logprobs=body.logprobs_wanted,
        )
        return await self._generate(entry, job, Reply(entry.id, chat=True, logprobs=body.logprobs), body)

    @app.post("/v1/completions")
    async def completions(self, request: Request):
        body = await self._parse(request, CompletionRequest)
        entry = self._entry(body.model, COMPLETIONS)
        self._require(entry, "logprobs", body.logprobs is not None, "logprobs")
        job = TextJob(sampling=body.sampling(), prompt=body.prompt_text, logprobs=body.logprobs)
        reply = Reply(entry.id, chat=False, logprobs=body.logprobs is not None)
        return await self._generate(entry, job, reply, body)

    @app.post("/v1/embeddings")
    async def embeddings(self, request: Request) -> dict[str, Any]:
        body = await self._parse(request, EmbeddingRequest)
        entry = self._entry(body.model, EMBEDDINGS)
        lease = await self.leases.acquire(entry.id)
        try:
            embedded = await self.models[entry.id].embed.remote(body.texts, lease.id)
        except RayActorError:
            self._model_failed(entry.id)
        finally:
            self.leases.release(lease)
        return {
            "object": "list",
            "data": [
                {"object": "embedding", "embedding": encode_vector(vector, body.encoding_format), "index": i}
                for i, vector in enumerate(embedded.vectors)
            ],
            "model": entry.id,
            "usage": {"prompt_tokens": embedded.prompt_tokens, "total_tokens": embedded.prompt_tokens},
        }

    @app.get("/admin/models")
    async def admin_models(self, request: Request) -> dict[str, Any]:
        self._require_admin(request)
        return await self.controller.admin_view.remote()

    @app.post("/admin/models/{model_id:path}/load")
    async def admin_load(self, model_id: str, request: Request) -> dict[str, Any]:
        self._require_admin(request)
        entry = self._entry(model_id)
        body = await self._parse(request, PreloadRequest, empty_ok=True)
        await self.controller.preload.remote(entry.id, body.pin)
        return await self._admin_model(entry.id)

    @app.post("/admin/models/{model_id:path}/unload")
    async def admin_unload(self, model_id: str, request: Request) -> dict[str, Any]:
        self._require_admin(request)
        entry = self._entry(model_id)
        await self.controller.unload.remote(entry.id)
        return await self._admin_model(entry.id)

    # -- helpers ------------------------------------------------------------------------------

    def _require_admin(self, request: Request) -> None:
        key = self.config.admin_api_key
        if key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        # Bytes: compare_digest refuses non-ASCII text, and a header may carry any byte.
        if scheme.lower() != "bearer" or not secrets.compare_digest(token.strip().encode(), key.encode()):
            raise ApiError(
                401,
                "Admin endpoints need the header 'Authorization: Bearer <admin_api_key>'",
                "authentication_error",
                code="invalid_api_key",
            )

    async def _admin_model(self, model_id: str) -> dict[str, Any]:
        view = await self.controller.admin_view.remote()
        return next(model for model in view["models"] if model["id"] == model_id)

    def _model_card(self, entry: ModelEntry, state: dict[str, Any]) -> dict[str, Any]:
        return {
            "id": entry.id,
            "object": "model",
            "created": self.started,
            "owned_by": "mlx-fleet",
            "type": entry.type,
            "family": entry.family,
            "status": state["status"],
            "pinned": state["pinned"],
            "context_length": entry.context_length,
            "capabilities": self._features(entry),
        }

    def _features(self, entry: ModelEntry) -> dict[str, bool]:
        kind = self.capabilities[entry.type]
        return {
            "chat": CHAT in kind.endpoints,
            "completions": COMPLETIONS in kind.endpoints,
            "embeddings": EMBEDDINGS in kind.endpoints,
            "vision": kind.accepts_images,
            "tools": kind.tools and entry.tool_format is not None,
            "structured_output": kind.structured_output,
            "reasoning": entry.think is not None,
            "logprobs": kind.logprobs,
        }

    def _require(self, entry: ModelEntry, feature: str, wanted: bool, param: str) -> None:
        if wanted and not self._features(entry)[feature]:
            raise ApiError(400, f"Model {entry.id} does not support {feature.replace('_', ' ')}", param=param)

    def _constraint(self, entry: ModelEntry, body: ChatCompletionRequest) -> Constraint | None:
        """What a chat's answer must be (a forced tool call in the model's own format, or the
        JSON of response_format), refused here if it does not compile."""
        self._require(entry, "tools", bool(body.tools_offered), "tools")
        self._require(entry, "structured_output", body.structured, "response_format")
        self._require(entry, "logprobs", body.logprobs, "logprobs")
        self._require(entry, "reasoning", body.reasoning_effort is not None, "reasoning_effort")
        constraint = body.constraint
        if constraint is None:
            return None
        problem = constraint.error(FORMATS.get(entry.tool_format or ""))
        if problem:
            param = "tools" if constraint.schema is None else "response_format.json_schema.schema"
            raise ApiError(400, f"The schema cannot be used for constrained decoding: {problem}", param=param)
        return constraint

    def _entry(self, model_id: str, endpoint: str | None = None) -> ModelEntry:
        entry = self.catalog.get(model_id)
        if entry is None:
            raise model_not_found(model_id)
        if endpoint and endpoint not in self.capabilities[entry.type].endpoints:
            raise ApiError(
                400,
                f"Model {entry.id} is a {entry.type} model and does not serve /v1/{endpoint}",
                param="model",
            )
        return entry

    async def _parse(self, request: Request, schema: type[Body], empty_ok: bool = False) -> Body:
        content_type = request.headers.get("content-type", "application/json")
        media_type = content_type.split(";")[0].strip().lower()
        if media_type != "application/json" and not media_type.endswith("+json"):
            raise ApiError(
                400,
                f"Content-Type must be application/json, got {content_type!r} "
                "(with curl, add -H 'Content-Type: application/json')",
            )
        raw = await self._read_body(request)
        if empty_ok and not raw.strip():
            raw = b"{}"
        data = decode_json(raw)
        if not isinstance(data, dict):
            raise ApiError(400, "The request body must be a JSON object")
        try:
            return schema.model_validate(data)
        except ValidationError as error:
            raise validation_error_to_api_error(error) from None

    async def _read_body(self, request: Request) -> bytes:
        limit = self.config.max_request_bytes
        too_large = ApiError(
            413,
            f"The request body is larger than the server's limit of {limit} bytes "
            "(max_request_size in the config)",
            code="request_too_large",
        )
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > limit:
            raise too_large
        chunks, size = [], 0
        seconds = self.config.request_body_seconds
        try:
            async with asyncio.timeout(seconds):
                async for chunk in request.stream():
                    size += len(chunk)
                    if size > limit:
                        raise too_large
                    chunks.append(chunk)
        except TimeoutError:
            raise ApiError(
                408,
                f"The request body did not arrive within {seconds:.0f} s (request_body_timeout)",
                code="request_timeout",
            ) from None
        return b"".join(chunks)

    async def _generate(self, entry: ModelEntry, job: TextJob, reply: Reply, body) -> Any:
        lease = await self.leases.acquire(entry.id)
        handle = self.models[entry.id]
        if not body.stream:
            try:
                events = await handle.generate.remote(job, lease.id)
            except RayActorError:
                self._model_failed(entry.id)
            finally:
                self.leases.release(lease)
            return reply.full(events)
        events = handle.options(stream=True).stream.remote(job, lease.id)
        try:
            # Errors before the first token (bad template, context too long) still get a
            # proper status code instead of a 200 stream carrying an error.
            first = await events.__anext__()
        except BaseException as error:
            events.cancel()
            self.leases.release(lease)
            if isinstance(error, RayActorError):
                self._model_failed(entry.id)
            raise
        stream = self._sse(entry.id, lease, first, events, reply, body.include_usage)
        self.leases.release_when_collected(stream, lease)
        return StreamingResponse(stream, media_type="text/event-stream")

    async def _sse(
        self,
        model_id: str,
        lease: Lease,
        first: Any,
        events: AsyncIterator,
        reply: Reply,
        with_usage: bool,
    ) -> AsyncIterator[str]:
        try:
            if reply.chat:
                yield sse(reply.opening(with_usage))
            batch = first
            while True:
                for chunk in reply.chunks(batch, with_usage):
                    yield sse(chunk)
                if batch and isinstance(batch[-1], Finish):
                    if with_usage:
                        yield sse(reply.usage_chunk(batch[-1]))
                    break
                batch = await events.__anext__()
            yield "data: [DONE]\n\n"
        except asyncio.CancelledError:
            events.cancel()
            raise
        except Exception as error:
            api_error = find_api_error(error)
            if api_error is None and isinstance(error, RayActorError):
                api_error = self._model_lost(model_id)
            if api_error is None:
                logger.exception("stream from model %s failed", model_id)
                api_error = ApiError(500, f"Generation failed: {type(error).__name__}", "server_error")
            yield sse(api_error.body())
        finally:
            self.leases.release(lease)

    def _model_failed(self, model_id: str) -> NoReturn:
        """A model call failed because its replica died: 503 for this request."""
        raise self._model_lost(model_id) from None

    def _model_lost(self, model_id: str) -> ApiError:
        logger.warning("model %s's replica died during a request; asking the controller to check it", model_id)
        task = asyncio.get_running_loop().create_task(self._check_replica(model_id))
        self._tasks.add(task)  # held until done: the loop keeps only weak references
        task.add_done_callback(self._tasks.discard)
        return replica_lost(model_id)

    async def _check_replica(self, model_id: str) -> None:
        try:
            await self.controller.check_replica.remote(model_id)
        except Exception as error:  # the controller's own round checks it again soon
            logger.warning("asking the controller to check model %s failed: %r", model_id, error)
