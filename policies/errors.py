"""Errors a client caused or must know about: one type for the whole fleet.

Model servers, the controller and the ingress raise `ApiError`; the ingress renders it in
the envelope of the dialect the request came in (`dialects/errors.py`). An error that a
dialect words its own way (a context overflow, which clients parse) is a subclass that keeps
its numbers.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Any

from pydantic import ValidationError


class ErrorCode(StrEnum):
    """Every `code` the fleet answers with (README, "Errors", lists each). A 400 without a
    code is a schema or value error, named by its `param`."""

    CONTEXT_LENGTH_EXCEEDED = "context_length_exceeded"
    INVALID_API_KEY = "invalid_api_key"
    MODEL_NOT_FOUND = "model_not_found"
    RESPONSE_NOT_FOUND = "response_not_found"
    REQUEST_TIMEOUT = "request_timeout"
    REQUEST_TOO_LARGE = "request_too_large"
    INSUFFICIENT_MEMORY = "insufficient_memory"
    MODEL_LOAD_FAILED = "model_load_failed"
    MODEL_UNAVAILABLE = "model_unavailable"
    CONTROLLER_UNAVAILABLE = "controller_unavailable"
    NODE_UNAVAILABLE = "node_unavailable"
    MODEL_UNLOAD_FAILED = "model_unload_failed"
    NOT_READY = "not_ready"
    MODEL_BUSY = "model_busy"
    RATE_LIMIT_EXCEEDED = "rate_limit_exceeded"
    MODEL_NOT_LOADED = "model_not_loaded"


class ApiError(Exception):
    """An error the client caused or must know about, rendered as the OpenAI error envelope.

    Arguments are positional in `Exception.args` so the error survives pickling across Ray.
    """

    def __init__(
        self,
        status: int,
        message: str,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(status, message, type, param, code, headers)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = headers or {}

    def __str__(self) -> str:
        return self.summary()

    def summary(self) -> str:
        """One line: status, type and message (also for the copy Ray wraps, whose str is a traceback)."""
        return f"{self.status} {self.type}: {self.message}"

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.type, self.param, self.code)


def find_api_error(error: BaseException) -> ApiError | None:
    """The ApiError behind an exception, also when Ray wrapped it on its way from a replica."""
    while error is not None:
        if isinstance(error, ApiError):
            return error
        error = getattr(error, "cause", None) or error.__cause__
    return None


def error_body(
    message: str, type: str, param: str | None = None, code: str | None = None
) -> dict[str, Any]:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


# -- one constructor per code: the wording, status and headers of each refusal ---------------


def model_not_found(model: str) -> ApiError:
    return ApiError(
        404,
        f"The model '{model}' does not exist. GET /v1/models lists the models this server has.",
        param="model",
        code=ErrorCode.MODEL_NOT_FOUND,
    )


def response_not_found(response_id: str, param: str) -> ApiError:
    return ApiError(
        404,
        f"No stored response {response_id!r}: it never existed, was not stored, was deleted or "
        "expired (responses_ttl)",
        param=param,
        code=ErrorCode.RESPONSE_NOT_FOUND,
    )


def invalid_admin_key() -> ApiError:
    return ApiError(
        401,
        "Admin endpoints need the header 'Authorization: Bearer <admin_api_key>'",
        "authentication_error",
        code=ErrorCode.INVALID_API_KEY,
    )


def missing_or_wrong_key(presented: bool) -> ApiError:
    """The inference API, with `api_keys` set, without a valid one (`presented`: a key came)."""
    what = "The API key is not valid" if presented else "This server needs an API key"
    return ApiError(
        401,
        f"{what}: send it as 'Authorization: Bearer <key>' or 'x-api-key: <key>'",
        "authentication_error",
        code=ErrorCode.INVALID_API_KEY,
    )


def too_many_requests(key_name: str, max_concurrent: int) -> ApiError:
    return ApiError(
        429,
        f"API key {key_name!r} already runs {max_concurrent} request(s), its max_concurrent; "
        "retry when one has finished",
        "rate_limit_error",
        code=ErrorCode.RATE_LIMIT_EXCEEDED,
        headers={"retry-after": "1"},
    )


def may_not_load(model_id: str) -> ApiError:
    """A request whose API key has `may_load: false`, for a model that is not loaded."""
    return ApiError(
        503,
        f"Model {model_id} is not loaded, and this request's API key may not load models "
        "(may_load: false); use a loaded model or ask an operator to load it",
        "model_not_loaded",
        param="model",
        code=ErrorCode.MODEL_NOT_LOADED,
        headers={"x-should-retry": "false"},
    )


def request_too_large(limit: int) -> ApiError:
    return ApiError(
        413,
        f"The request body is larger than the server's limit of {limit} bytes (max_request_size in the config)",
        code=ErrorCode.REQUEST_TOO_LARGE,
    )


def request_timeout(seconds: float) -> ApiError:
    return ApiError(
        408,
        f"The request body did not arrive within {seconds:.0f} s (request_body_timeout)",
        code=ErrorCode.REQUEST_TIMEOUT,
    )


def not_ready(waiting: str) -> ApiError:
    return ApiError(503, f"Not ready: {waiting}", "service_unavailable", code=ErrorCode.NOT_READY)


def controller_unavailable(why: str) -> ApiError:
    """The fleet controller could not be reached (it restarts by itself within seconds)."""
    return ApiError(
        503,
        f"The fleet controller did not answer ({why}); retry in a few seconds",
        "controller_unavailable",
        code=ErrorCode.CONTROLLER_UNAVAILABLE,
        headers={"retry-after": "2"},
    )


def insufficient_memory(message: str, retry: bool) -> ApiError:
    """`retry`: waiting could help (busy models in the way); else it cannot fit at all."""
    return ApiError(
        503,
        message,
        "insufficient_memory",
        param="model",
        code=ErrorCode.INSUFFICIENT_MEMORY,
        headers={"retry-after": "5"} if retry else {"x-should-retry": "false"},
    )


def node_unavailable(message: str) -> ApiError:
    return ApiError(
        503, message, "node_unavailable", param="model", code=ErrorCode.NODE_UNAVAILABLE,
        headers={"retry-after": "5"},
    )


def model_load_failed(model_id: str, reason: str) -> ApiError:
    return ApiError(
        503, f"Model {model_id} failed to load: {reason}", "model_load_failed", param="model",
        code=ErrorCode.MODEL_LOAD_FAILED,
    )


def model_unload_failed(model_id: str, reason: str) -> ApiError:
    return ApiError(
        503, f"Model {model_id} could not be unloaded: {reason}", "model_unload_failed",
        param="model", code=ErrorCode.MODEL_UNLOAD_FAILED,
    )


def model_busy(model_id: str, doing: str, waited: float) -> ApiError:
    return ApiError(
        503,
        f"Model {model_id} {doing} after {waited:.0f} s; it is unpinned now, try the unload again later",
        "model_busy",
        param="model",
        code=ErrorCode.MODEL_BUSY,
    )


def model_not_ready_in_time(model_id: str, waited: float) -> ApiError:
    return ApiError(
        503,
        f"Model {model_id} was not ready within {waited:.0f} s (still loading, or the fleet "
        "controller did not answer); retry later",
        "model_unavailable",
        param="model",
        code=ErrorCode.MODEL_UNAVAILABLE,
        headers={"retry-after": "5"},
    )


def replica_lost(model_id: str) -> ApiError:
    return ApiError(
        503,
        f"Model {model_id}'s replica stopped while serving this request (its process or its "
        "node went down); the next request loads it again: retry in a few seconds",
        "model_unavailable",
        param="model",
        code=ErrorCode.MODEL_UNAVAILABLE,
        headers={"retry-after": "2"},
    )


def validation_error_to_api_error(error: ValidationError, body: Any) -> ApiError:
    """Pydantic's most specific complaint, named by its JSON path in `body`, as a 400.

    For a value that matches no member of a union pydantic reports one error per member;
    the deepest one is about the member the client meant (a list of parts, not a string).
    """
    deepest = max(error.errors(), key=lambda e: len(e["loc"]))
    path = ".".join(str(part) for part in json_path(deepest["loc"], body))
    message = deepest["msg"].removeprefix("Value error, ")  # pydantic's label for our own ValueErrors
    if path:
        message = f"{path}: {message}"
    return ApiError(400, message, param=path or None)


def json_path(loc: tuple[str | int, ...], body: Any) -> list[str | int]:
    """Pydantic's location of an error as a path in `body`: without the labels it adds for
    union members (`str`, `list[...]`) and for the discriminator tag it puts first inside
    a tagged object (a tool's `custom`)."""
    path, node, tagged = [], body, False
    for part in loc:
        in_body = (isinstance(node, list) and isinstance(part, int) and 0 <= part < len(node)) or (
            isinstance(node, dict) and part in node)
        is_tag = not tagged and isinstance(node, dict) and node.get("type") == part
        if in_body:
            node, tagged = node[part], False
        elif isinstance(part, str) and (_is_label(part) or is_tag):
            tagged = True
            continue
        else:  # a field the body lacks
            node = None
        path.append(part)
    return path


def _is_label(part: str) -> bool:
    return "[" in part or part in ("str", "int", "float", "bool", "none")


class ContextOverflow(ApiError):
    """The prompt, or the prompt plus the tokens asked for, does not fit the model's context.

    Worded as OpenAI words it; Anthropic's wording comes from the same numbers
    (`dialects/errors.py`), as clients parse both to retry with less.
    """

    def __init__(
        self, model_id: str, prompt_tokens: int, requested: int | None, context_length: int, param: str = "max_tokens"
    ):
        self.model_id, self.prompt_tokens = model_id, prompt_tokens
        self.requested, self.context_length, self.limit_param = requested, context_length, param
        total = prompt_tokens + (requested or 0)
        if requested is None:
            message = (f"This model's maximum context length is {context_length} tokens. However, your messages "
                       f"resulted in {prompt_tokens} tokens. Please reduce the length of the messages.")
        else:
            message = (f"This model's maximum context length is {context_length} tokens. However, you requested "
                       f"{total} tokens ({prompt_tokens} in the messages, {requested} in the completion). "
                       "Please reduce the length of the messages or completion.")
        super().__init__(400, message, param="messages" if requested is None else param,
                         code=ErrorCode.CONTEXT_LENGTH_EXCEEDED)

    def __reduce__(self) -> tuple[Any, ...]:
        # Crosses Ray pickled: rebuilt from its numbers, not from ApiError's arguments.
        return ContextOverflow, (self.model_id, self.prompt_tokens, self.requested, self.context_length,
                                 self.limit_param)
