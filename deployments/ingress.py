"""The HTTP surface: OpenAI (Chat Completions, Completions, Embeddings, Responses) and
Anthropic (Messages) routes, admin and health. It validates, routes and formats through
`dialects/`; it never runs a model. Every error leaves in the envelope of the dialect the
request came in."""


import asyncio
import contextvars
import json
import logging
import re
import secrets
import time
from typing import Any, AsyncIterator, Awaitable, Callable, NoReturn, Sequence, TypeVar

from fastapi.openapi.utils import get_openapi
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ValidationError
from ray import serve
from ray.exceptions import RayActorError, RayError
from ray.serve.handle import DeploymentHandle
from ray.serve.metrics import Counter
from starlette.exceptions import HTTPException as StarletteHTTPException

from deployments.logs import refusals_in_one_line
from deployments.leases import Hold, LeaseKeeper, LeaseLost
from deployments.media import ImagePolicy, ImageRef, load_images
from deployments.response_store import ResponseStore
from dialects import anthropic, openai, responses
from dialects.errors import anthropic_error_body
from dialects.protocol import ChatRequest, DialectRequest, Reply
from policies.errors import (
    ApiError,
    find_api_error,
    invalid_admin_key,
    missing_or_wrong_key,
    model_not_found,
    not_ready,
    replica_lost,
    request_timeout,
    request_too_large,
    response_not_found,
    validation_error_to_api_error,
)
from dialects.openai import ChatCompletionRequest, CompletionRequest, EmbeddingRequest, PreloadRequest, encode_vector
from policies.api_keys import ApiKey, KeyRing, KeySlots, bearer_token, give_back_slot, presented_key
from policies.capabilities import CHAT, COMPLETIONS, EMBEDDINGS, Capabilities
from policies.config import INGRESS_NAME, AppConfig, ModelEntry
from policies.events import Event, Finish
from policies.generation import GenerationRequest, with_adapter
from policies.tool_calls import FORMATS
from policies.logs import module_logger

logger = module_logger(__name__)

app = FastAPI(title="mlx-fleet", description="Many MLX models behind OpenAI's and Anthropic's APIs.")

Body = TypeVar("Body", bound=BaseModel)

# Request schemas the routes declare in /openapi.json; the routes read the raw body
# themselves (size, depth and encoding limits first), so FastAPI does not see them.
SCHEMAS: dict[str, dict[str, Any]] = {}


def json_body(schema: type[BaseModel], required: bool = True) -> dict[str, Any]:
    """A route's `openapi_extra`: its request body is `schema`, defined in components under
    its dialect's name (`anthropic.Tool` and `openai.Tool` are different schemas)."""
    dialect = schema.__module__.rsplit(".", 1)[-1]
    definition = schema.model_json_schema(ref_template=f"#/components/schemas/{dialect}.{{model}}", by_alias=True)
    SCHEMAS.update({f"{dialect}.{name}": part for name, part in definition.pop("$defs", {}).items()})
    SCHEMAS[f"{dialect}.{schema.__name__}"] = definition
    reference = {"$ref": f"#/components/schemas/{dialect}.{schema.__name__}"}
    return {"requestBody": {"required": required, "content": {"application/json": {"schema": reference}}}}


def openapi() -> dict[str, Any]:
    if app.openapi_schema is None:
        document = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
        document.setdefault("components", {}).setdefault("schemas", {}).update(SCHEMAS)
        app.openapi_schema = document
    return app.openapi_schema


app.openapi = openapi


class KeySlotRelease:
    """Gives an API key's slot back once the request's answer has been sent, streamed ones
    included (a route returns before its stream is)."""

    def __init__(self, inner: Any):
        self.inner = inner

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        try:
            await self.inner(scope, receive, send)
        finally:
            give_back_slot(scope)


app.add_middleware(KeySlotRelease)
T = TypeVar("T")
ChatRequestT = TypeVar("ChatRequestT", bound=ChatRequest)

# No request schema nests deeper than a few levels; a deeper body is an attack on the parser.
MAX_JSON_DEPTH = 64
# Routes declare their dialect as their OpenAPI tag; an error is answered in its envelope.
OPENAI, ANTHROPIC, ADMIN = "OpenAI", "Anthropic", "admin"
# Features a client insists on, comma-separated: a wish (reasoning) the model lacks is then a 400.
REQUIRE_HEADER = "x-mlx-fleet-require"


def warning_headers(warnings: Sequence[str]) -> dict[str, str]:
    """HTTP's Warning header (code 299, "miscellaneous persistent warning"), one value per
    warning: what the answer leaves out of the request."""
    if not warnings:
        return {}
    values = (w.replace('"', "'").encode("latin-1", "replace").decode("latin-1") for w in warnings)
    return {"Warning": ", ".join(f'299 mlx-fleet "{value}"' for value in values)}


def error_response(request: Request, error: ApiError) -> JSONResponse:
    """The error in the envelope of the dialect the request came in."""
    route = request.scope.get("route")  # the route the request matched, if any
    anthropic = route is not None and ANTHROPIC in getattr(route, "tags", ())
    body = anthropic_error_body(error) if anthropic else error.body()
    if error.status < 500:  # the client's doing: one line, no traceback
        level = logging.INFO if error.status in (400, 404) else logging.WARNING
        logger.log(level, "%s %s refused: %s", request.method, request.url.path, error.summary())
    return JSONResponse(body, status_code=error.status, headers=error.headers)


async def _any_error(request: Request, error: Exception) -> JSONResponse:
    api_error = find_api_error(error)
    if api_error is None:
        logger.exception("unexpected error on %s %s", request.method, request.url.path)
        api_error = ApiError(500, f"Internal server error: {type(error).__name__}", "server_error")
    return error_response(request, api_error)


# Starlette hands a handler for Exception to its outermost middleware, which re-raises after
# answering: Serve's proxy would log every refusal as a failed request with its traceback.
# Refusals (ours, or ours wrapped by Ray on their way from a replica) are answered inside.
for _refusal in (ApiError, RayError, Exception):
    app.add_exception_handler(_refusal, _any_error)


@app.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
    kind = "not_found_error" if error.status_code == 404 else "invalid_request_error"
    message = f"{request.method} {request.url.path}: {error.detail}"
    return error_response(request, ApiError(error.status_code, message, kind))


@app.exception_handler(RequestValidationError)
async def _validation_error(request: Request, error: RequestValidationError) -> JSONResponse:
    first = error.errors()[0]
    path = ".".join(str(part) for part in first["loc"])
    return error_response(request, ApiError(400, f"{path}: {first['msg']}", param=path))


SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")


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
    # UTF-8 cannot carry a surrogate: only a \uD800-\uDFFF escape can, so most bodies are
    # never walked.
    path = lone_surrogate_at(data) if SURROGATE_ESCAPE.search(raw) else None
    if path is not None:
        raise ApiError(400, f"{path or 'the body'}: the text holds a lone UTF-16 surrogate (such as \\ud800), "
                       "which is not a Unicode character; send valid UTF-8 text", param=path or None)
    return data


def lone_surrogate_at(value: Any) -> str | None:
    """The JSON path of the first string (or key) holding an unpaired surrogate escape, which
    json.loads accepts but no tokenizer can encode; None when every string is valid text."""
    stack: list[tuple[Any, str]] = [(value, "")]
    while stack:
        node, path = stack.pop()
        if isinstance(node, str):
            try:
                node.encode("utf-8")
            except UnicodeEncodeError:
                return path
        elif isinstance(node, dict):
            for key, child in node.items():
                child_path = f"{path}.{key}" if path else str(key)
                if lone_surrogate_at(key) is not None:
                    return child_path
                stack.append((child, child_path))
        elif isinstance(node, list):
            stack.extend((child, f"{path}.{i}" if path else str(i)) for i, child in enumerate(node))
    return None


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


@serve.deployment(name=INGRESS_NAME, ray_actor_options={"num_cpus": 0}, max_ongoing_requests=1000)
@serve.ingress(app)
class Ingress:
    def __init__(
        self,
        config: AppConfig,
        catalog: list[ModelEntry],
        capabilities: dict[str, Capabilities],
        controller: DeploymentHandle,
        models: dict[str, dict[str, DeploymentHandle]],
    ):
        refusals_in_one_line()
        self.config = config
        self.catalog = {entry.id: entry for entry in catalog}
        self.capabilities = capabilities
        self.image_policy = ImagePolicy(
            max_side=config.image_max_side,
            max_bytes=config.image_max_bytes,
            timeout_s=config.image_fetch_timeout,
            allow_hosts=tuple(config.image_allow_hosts),
        )
        self.controller = controller
        self.models = models
        self.stored_responses = ResponseStore(config.responses_dir, config.responses_ttl, config.responses_max)
        self.leases = LeaseKeeper(
            controller,
            # A request waits for its model's load, and through a controller restart.
            acquire_timeout=config.load_wait_timeout + 60,
            lease_ttl=config.lease_ttl,
        )
        self.started = int(time.time())
        self.keys = KeyRing([spec.to_key() for spec in config.api_keys]) if config.api_keys else None
        self.key_slots = KeySlots()
        self.key_requests = Counter("fleet_api_key_requests_total", "Requests per API key name.", tag_keys=("key",))
        self._tasks: set[asyncio.Task] = set()

    # -- health and catalog -------------------------------------------------------------------

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
        refusal = not_ready(waiting)
        return JSONResponse(refusal.body(), status_code=refusal.status)

    @app.get("/v1/models", tags=[OPENAI])
    async def list_models(self, request: Request) -> dict[str, Any]:
        caller = self._caller(request)
        statuses = await self.controller.statuses.remote()
        return {
            "object": "list",
            "data": [
                self._model_card(entry, statuses[entry.id])
                for entry in self.catalog.values()
                if caller is None or caller.allows(entry.id)
            ],
        }

    @app.get("/v1/models/{model_id:path}", tags=[OPENAI])
    async def get_model(self, model_id: str, request: Request) -> dict[str, Any]:
        entry = self._entry(model_id, caller=self._caller(request))
        statuses = await self.controller.statuses.remote()
        return self._model_card(entry, statuses[entry.id])

    # -- OpenAI -------------------------------------------------------------------------------

    @app.post("/v1/chat/completions", tags=[OPENAI], openapi_extra=json_body(ChatCompletionRequest))
    async def chat_completions(self, request: Request):
        return await self._generate(
            request, ChatCompletionRequest, CHAT, None,
            lambda entry, body: openai.Reply(entry.id, chat=True, logprobs=body.logprobs, include_usage=body.include_usage),
        )

    @app.post("/v1/completions", tags=[OPENAI], openapi_extra=json_body(CompletionRequest))
    async def completions(self, request: Request):
        return await self._generate(
            request, CompletionRequest, COMPLETIONS, None,
            lambda entry, body: openai.Reply(
                entry.id, chat=False, logprobs=body.logprobs is not None, include_usage=body.include_usage
            ),
        )

    @app.post("/v1/embeddings", tags=[OPENAI], openapi_extra=json_body(EmbeddingRequest))
    async def embeddings(self, request: Request) -> dict[str, Any]:
        caller = self._caller(request, counted=True)
        body = await self._parse(request, EmbeddingRequest)
        entry = self._entry(body.model, EMBEDDINGS, caller=caller)
        lease, embedded = await self._call(
            entry, lambda model, lease: model.embed.remote(body.texts, lease.id), caller
        )
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

    @app.post("/v1/responses", tags=[OPENAI], openapi_extra=json_body(responses.ResponsesRequest))
    async def create_response(self, request: Request):
        caller = self._caller(request, counted=True)
        body = await self._parse(request, responses.ResponsesRequest)
        entry = self._entry(body.model, CHAT, "/v1/responses", caller)
        earlier = await self._stored_chat(body.previous_response_id)
        images = await self._images(entry, body.image_urls())
        conversation = body.conversation(earlier, self._vision(entry))
        job = body.to_generation(body.chat(conversation), images)
        warnings = await self._check(entry, job, body, request)
        reply = responses.Reply(entry.id, body)
        store = self._response_storer(reply, body.store, conversation)
        return await self._respond(entry, job, reply, body.stream, caller, after=store, warnings=warnings)

    @app.get("/v1/responses/{response_id}", tags=[OPENAI])
    async def get_response(self, response_id: str, request: Request) -> dict[str, Any]:
        self._caller(request)
        record = await self.stored_responses.get(response_id)
        if record is None:
            raise response_not_found(response_id, "response_id")
        return record["response"]

    @app.delete("/v1/responses/{response_id}", tags=[OPENAI])
    async def delete_response(self, response_id: str, request: Request) -> dict[str, Any]:
        self._caller(request)
        if not await self.stored_responses.delete(response_id):
            raise response_not_found(response_id, "response_id")
        return {"id": response_id, "object": "response", "deleted": True}

    # -- Anthropic ----------------------------------------------------------------------------

    @app.post("/v1/messages", tags=[ANTHROPIC], openapi_extra=json_body(anthropic.MessagesRequest))
    async def messages(self, request: Request):
        return await self._generate(
            request, anthropic.MessagesRequest, CHAT, "/v1/messages", lambda entry, body: anthropic.Reply(entry.id)
        )

    @app.post("/v1/messages/count_tokens", tags=[ANTHROPIC], openapi_extra=json_body(anthropic.CountTokensRequest))
    async def count_tokens(self, request: Request) -> dict[str, int]:
        caller = self._caller(request, counted=True)
        body = await self._parse(request, anthropic.CountTokensRequest)
        entry = self._entry(body.model, CHAT, "/v1/messages/count_tokens", caller)
        if entry.type != "text-generation":
            raise ApiError(400, f"Model {entry.id} cannot count tokens (only text models can)", param="model")
        job = body.to_generation(vision=False, images=[])
        await self._check(entry, job, body, request)
        lease, tokens = await self._call(entry, lambda model, lease: model.count_tokens.remote(job, lease.id), caller)
        self.leases.release(lease)
        return {"input_tokens": tokens}

    @app.get("/admin/models", tags=[ADMIN])
    async def admin_models(self, request: Request) -> dict[str, Any]:
        self._require_admin(request)
        view = await self.controller.admin_view.remote()
        return {**view, "api_keys": self.key_slots.view(self.keys.keys if self.keys else [])}

    @app.post("/admin/models/{model_id:path}/load", tags=[ADMIN], openapi_extra=json_body(PreloadRequest, required=False))
    async def admin_load(self, model_id: str, request: Request) -> dict[str, Any]:
        self._require_admin(request)
        entry = self._entry(model_id)
        body = await self._parse(request, PreloadRequest, empty_ok=True)
        await self.controller.preload.remote(entry.id, body.pin)
        return await self._admin_model(entry.id)

    @app.post("/admin/models/{model_id:path}/unload", tags=[ADMIN])
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
        # Bytes: compare_digest refuses non-ASCII text, and a header may carry any byte.
        token = bearer_token(request.headers.get("authorization"))
        if token is None or not secrets.compare_digest(token, key.encode()):
            raise invalid_admin_key()

    def _caller(self, request: Request, counted: bool = False) -> ApiKey | None:
        """The API key the request presents; None when the server has no keys. 401 when it
        presents none that is valid. A `counted` request (one that runs on a model) takes one
        of the key's `max_concurrent` slots until its answer is sent (`KeySlots`), else 429."""
        if self.keys is None:
            return None
        presented = presented_key(request.headers.get("authorization"), request.headers.get("x-api-key"))
        key = self.keys.find(presented)
        if key is None:
            raise missing_or_wrong_key(presented is not None)
        if counted:
            self.key_slots.take(key, request.scope)
            self.key_requests.inc(tags={"key": key.name})
        return key

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
            **({"parent": entry.base} if entry.base else {}),
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

    def _vision(self, entry: ModelEntry) -> bool:
        return self.capabilities[entry.type].accepts_images

    async def _generate(
        self,
        request: Request,
        schema: type[ChatRequestT],
        capability: str,
        path: str | None,
        reply_for: Callable[[ModelEntry, ChatRequestT], Reply],
    ) -> Any:
        """Every generating route but Responses (which needs its stored history first): the
        body parsed, the model chosen, its images fetched, the request checked against the
        model, then answered whole or streamed in the dialect's reply."""
        caller = self._caller(request, counted=True)
        body = await self._parse(request, schema)
        entry = self._entry(body.model, capability, path, caller)
        images = await self._images(entry, body.image_urls())
        job = body.to_generation(self._vision(entry), images)
        warnings = await self._check(entry, job, body, request)
        return await self._respond(entry, job, reply_for(entry, body), body.stream, caller, warnings=warnings)

    async def _check(
        self, entry: ModelEntry, job: GenerationRequest, body: DialectRequest, request: Request
    ) -> list[str]:
        """Refuse what the model cannot do (400 naming the field that asked for it), and a
        constraint that does not compile (compiled off the event loop: a large schema takes
        long enough to hold up every other request); the warnings for what the answer leaves
        out. A wish the client insists on (`x-mlx-fleet-require: reasoning`) is a need."""
        features = self._features(entry)
        insisted = {f.strip() for f in request.headers.get(REQUIRE_HEADER, "").split(",") if f.strip()}
        wishes = body.wishes()
        needs = {**body.needs(), **{feature: param for feature, param in wishes.items() if feature in insisted}}
        for feature, param in needs.items():
            if not features[feature]:
                raise ApiError(400, f"Model {entry.id} does not support {feature.replace('_', ' ')}", param=param)
        if job.constraint is not None:
            problem = await asyncio.to_thread(job.constraint.error, FORMATS.get(entry.tool_format or ""))
            if problem:
                raise ApiError(400, f"The schema cannot be used for constrained decoding: {problem}",
                               param=body.constraint_param)
        unmet = [f"{param} ignored: model {entry.id} does not support {feature.replace('_', ' ')}"
                 for feature, param in wishes.items() if not features[feature]]
        return unmet + body.ignored()

    async def _images(self, entry: ModelEntry, urls: list[tuple[str, str]]) -> list[Any]:
        if not urls:
            return []
        if not self._vision(entry):
            raise ApiError(400, f"Model {entry.id} does not support vision", param="messages")
        if len(urls) > self.config.max_images_per_request:
            raise ApiError(
                400,
                f"at most {self.config.max_images_per_request} images per request, got {len(urls)}",
                param="messages",
            )
        return await load_images([ImageRef(url, param) for url, param in urls], self.image_policy)

    async def _stored_chat(self, response_id: str | None) -> list[dict[str, Any]]:
        if response_id is None:
            return []
        record = await self.stored_responses.get(response_id)
        if record is None:
            raise response_not_found(response_id, "previous_response_id")
        return record["chat"]

    def _response_storer(self, reply: "responses.Reply", store: bool, conversation: list[dict[str, Any]]):
        """What to do once a Responses answer is complete: keep it, with the conversation and
        the answer as sent, for later requests that continue it (instructions are not
        carried over)."""

        async def keep(events: list[Event]) -> None:
            if not store or reply.finished is None:
                return
            chat = conversation + reply.turns()
            await self.stored_responses.put(reply.id, {"response": reply.finished, "chat": chat})

        return keep

    def _entry(
        self, model_id: str, endpoint: str | None = None, path: str | None = None, caller: ApiKey | None = None
    ) -> ModelEntry:
        """The model, if it serves `endpoint` (a capability); the refusal names `path`, the
        route that asked (the Messages and Responses routes need the chat capability). A
        model the caller's API key may not use does not exist for it."""
        entry = self.catalog.get(model_id)
        if entry is None or (caller is not None and not caller.allows(model_id)):
            raise model_not_found(model_id)
        if endpoint and endpoint not in self.capabilities[entry.type].endpoints:
            raise ApiError(
                400,
                f"Model {entry.id} is a {entry.type} model and does not serve {path or '/v1/' + endpoint}",
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
            raise validation_error_to_api_error(error, data) from None

    async def _read_body(self, request: Request) -> bytes:
        limit = self.config.max_request_size
        too_large = request_too_large(limit)
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > limit:
            raise too_large
        chunks, size = [], 0
        seconds = self.config.request_body_timeout
        try:
            async with asyncio.timeout(seconds):
                async for chunk in request.stream():
                    size += len(chunk)
                    if size > limit:
                        raise too_large
                    chunks.append(chunk)
        except TimeoutError:
            raise request_timeout(seconds) from None
        return b"".join(chunks)

    async def _respond(
        self, entry: ModelEntry, job: GenerationRequest, reply: Reply, stream: bool, caller: ApiKey | None,
        after: Any = None, warnings: list[str] = (),
    ) -> Any:
        """Generate under a lease and answer in the reply's dialect, whole or streamed.
        `after(events)` runs once the answer is complete (Responses keeps it); `warnings`
        say what the answer leaves out of the request."""
        headers = warning_headers(warnings)
        job = with_adapter(job, entry)
        if not stream:
            lease, events = await self._call(entry, lambda model, lease: model.generate.remote(job, lease.id), caller)
            self.leases.release(lease)
            body = reply.full(events)
            if after is not None:
                await after(events)
            return JSONResponse(body, headers=headers)

        async def open_stream(model: DeploymentHandle, lease: Hold) -> tuple[Any, list[Event]]:
            # Errors before the first token (bad template, context too long) still get a
            # proper status code instead of a 200 stream carrying an error.
            batches = model.options(stream=True).stream.remote(job, lease.id)
            try:
                return batches, await batches.__anext__()
            except BaseException:
                batches.cancel()
                raise

        lease, (batches, first) = await self._call(entry, open_stream, caller)
        stream_body = self._sse(entry.id, lease, first, batches, reply, after)
        self.leases.release_when_collected(stream_body, lease)
        return StreamingResponse(stream_body, media_type="text/event-stream", headers=headers)

    async def _sse(
        self,
        model_id: str,
        lease: Hold,
        first: list[Event],
        batches: AsyncIterator,
        reply: Reply,
        after: Any,
    ) -> AsyncIterator[str]:
        events: list[Event] = []
        try:
            for line in reply.opening():
                yield line
            batch = first
            while True:
                events += batch
                for line in reply.batch(batch):
                    yield line
                if batch and isinstance(batch[-1], Finish):
                    break
                batch = await batches.__anext__()
            for line in reply.closing():
                yield line
        except asyncio.CancelledError:
            batches.cancel()
            raise
        except Exception as error:
            api_error = find_api_error(error)
            if api_error is None and isinstance(error, RayActorError):
                api_error = self._model_lost(model_id)
            if api_error is None:
                logger.exception("stream from model %s failed", model_id)
                api_error = ApiError(500, f"Generation failed: {type(error).__name__}", "server_error")
            for line in reply.failure(api_error):
                yield line
            return
        finally:
            self.leases.release(lease)
        if after is not None:
            await after(events)

    async def _call(
        self, entry: ModelEntry, call: Callable[[DeploymentHandle, Hold], Awaitable[T]], caller: ApiKey | None = None
    ) -> tuple[Hold, T]:
        """`call(model, lease)` on the model's deployment where the controller placed it,
        under a lease the caller releases.

        A lease lost before the model answered (its node left the cluster) means nothing was
        generated: the call is made once more, wherever the model is placed then.
        """
        retried = False
        while True:
            lease = await self.leases.acquire(entry.id, may_load=caller is None or caller.may_load)
            try:
                return lease, await self.leases.guarded(lease, call(self.models[entry.id][lease.node], lease))
            except LeaseLost:
                self.leases.release(lease)
                if retried:
                    self._model_failed(entry.id)
                retried = True
                logger.warning("model %s's node %s left before it answered; asking where it is now", entry.id, lease.node)
            except RayActorError:
                self.leases.release(lease)
                self._model_failed(entry.id)
            except BaseException:
                self.leases.release(lease)
                raise

    def _model_failed(self, model_id: str) -> NoReturn:
        """A model call failed because its replica died: 503 for this request."""
        raise self._model_lost(model_id) from None

    def _model_lost(self, model_id: str) -> ApiError:
        logger.warning("model %s's replica died during a request; asking the controller to check it", model_id)
        # Not the request's child call: its client leaving must not cancel the check.
        task = asyncio.get_running_loop().create_task(self._check_replica(model_id), context=contextvars.Context())
        self._tasks.add(task)  # held until done: the loop keeps only weak references
        task.add_done_callback(self._tasks.discard)
        return replica_lost(model_id)

    async def _check_replica(self, model_id: str) -> None:
        try:
            await self.controller.check_replica.remote(model_id)
            # Its node may have left, taking the lease along: later requests must not use it.
            await self.leases.renew()
        except Exception as error:  # the controller's own round checks it again soon
            logger.warning("asking the controller to check model %s failed: %r", model_id, error)
