"""Server-sent events, as every dialect streams them: compact JSON in a `data:` line, after
an `event:` line naming it where the dialect's clients read the name from there (Anthropic's
and the Responses API's)."""

from __future__ import annotations

import json
from typing import Any

DONE = "data: [DONE]\n\n"  # OpenAI's chat and completion streams end with it


def sse(data: Any, event: str | None = None) -> str:
    named = f"event: {event}\n" if event else ""
    return f"{named}data: {json.dumps(data, separators=(',', ':'))}\n\n"
