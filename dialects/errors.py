"""How each API dialect writes an error (`policies.errors.ApiError`): OpenAI's
`{"error": {...}}`, Anthropic's `{"type": "error", "error": {...}}`, each in the wording its
clients parse.
"""

from __future__ import annotations

from typing import Any

from policies.errors import ApiError, ContextOverflow

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
        "error": {"type": ANTHROPIC_TYPES.get(error.status, "api_error"), "message": anthropic_message(error)},
    }


def anthropic_message(error: ApiError) -> str:
    """Anthropic's own wording for a context overflow, which Claude Code parses to retry
    with a smaller max_tokens; every other error keeps its message."""
    if not isinstance(error, ContextOverflow):
        return error.message
    if error.requested is None:
        return f"prompt is too long: {error.prompt_tokens} tokens > {error.context_length} maximum"
    return (f"input length and `max_tokens` exceed context limit: {error.prompt_tokens} + {error.requested} > "
            f"{error.context_length}, decrease input length or `max_tokens` and try again")
