"""Errors a client caused or must know about, and how each API dialect writes them.

Model servers and the controller raise `ApiError`; the ingress renders it in the envelope of
the dialect the request came in (OpenAI's `{"error": {...}}`, Anthropic's
`{"type": "error", "error": {...}}`).
"""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError


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


def model_not_found(model: str) -> ApiError:
    return ApiError(
        404,
        f"The model '{model}' does not exist. GET /v1/models lists the models this server has.",
        param="model",
        code="model_not_found",
    )


def validation_error_to_api_error(error: ValidationError) -> ApiError:
    """Pydantic's most specific complaint, named by its JSON path, as a 400.

    For a value that matches no member of a union pydantic reports one error per member;
    the deepest one is about the member the client meant (a list of parts, not a string).
    """
    deepest = max(error.errors(), key=lambda e: len(e["loc"]))
    path = ".".join(str(part) for part in deepest["loc"] if not _is_union_label(part))
    message = deepest["msg"]
    if path:
        message = f"{path}: {message}"
    return ApiError(400, message, param=path or None)


def _is_union_label(part: str | int) -> bool:
    return isinstance(part, str) and ("[" in part or part in ("str", "int", "float", "bool", "none"))


# Anthropic names error types by status; 503 is its "overloaded".
ANTHROPIC_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    408: "timeout_error",
    413: "request_too_large",
    429: "rate_limit_error",
    503: "overloaded_error",
}


def anthropic_error_body(error: ApiError) -> dict[str, Any]:
    return {
        "type": "error",
        "error": {"type": ANTHROPIC_TYPES.get(error.status, "api_error"), "message": error.message},
    }
