"""The error catalogue: every code the fleet answers with is declared once (policies/errors.py),
built only there, and listed in the README's error table."""

from __future__ import annotations

import re
from pathlib import Path

from policies.errors import ErrorCode, insufficient_memory, model_busy, model_not_ready_in_time

ROOT = Path(__file__).resolve().parent.parent
# `type`s the table shows beside codes, or alone for errors without a code of their own.
TYPES = {"invalid_request_error", "authentication_error", "rate_limit_error"}


def readme_error_table() -> list[tuple[str, set[str]]]:
    text = (ROOT / "README.md").read_text()
    table = text.split("| status | `type` / `code` | when |", 1)[1].split("\n\n", 1)[0]
    rows = [line.split("|") for line in table.splitlines() if re.match(r"\| \d{3} \|", line)]
    return [(row[1].strip(), set(re.findall(r"`([a-z_]+)`", row[2]))) for row in rows]


def test_the_readme_lists_every_error_code_and_no_other():
    listed = set().union(*(names for _, names in readme_error_table()))
    assert {code.value for code in ErrorCode} <= listed
    assert listed - {code.value for code in ErrorCode} <= TYPES


def test_codes_are_built_only_in_the_catalogue():
    built = re.compile(r"""code=["'][a-z_]+["']|ErrorCode\.""")
    for folder in ("deployments", "dialects", "policies"):
        for path in (ROOT / folder).rglob("*.py"):
            if path == ROOT / "policies" / "errors.py":
                continue
            found = built.findall(path.read_text())
            assert not found, f"{path.relative_to(ROOT)} builds error codes itself: {found}"


def test_refusals_say_whether_retrying_helps():
    assert insufficient_memory("busy models in the way", retry=True).headers == {"retry-after": "5"}
    assert insufficient_memory("cannot fit", retry=False).headers == {"x-should-retry": "false"}
    assert model_not_ready_in_time("m", 60).headers["retry-after"]
    busy = model_busy("m", "is still loading", 30)
    assert (busy.status, busy.code, busy.param) == (503, "model_busy", "model")
    assert "30 s" in busy.message and "is still loading" in busy.message


def test_an_error_is_named_by_its_path_in_the_body_not_by_pydantic_labels():
    from policies.errors import json_path

    tool = {"tools": [{"type": "custom", "format": {}}]}
    assert json_path(("tools", 0, "custom", "format"), tool) == ["tools", 0, "format"]  # the tag left out
    block = {"messages": [{"content": [{"type": "text"}]}]}
    # A tag first, then a field the body lacks that has the tag's name.
    assert json_path(("messages", 0, "content", "list[union[...]]", 0, "text", "text"), block) == [
        "messages", 0, "content", 0, "text"]
    assert json_path(("messages", 0, "content", "str"), {"messages": [{"content": 5}]}) == ["messages", 0, "content"]
    assert json_path(("model",), {}) == ["model"]
