"""Generated text, as it streams, split into answer, reasoning and tool calls."""

from __future__ import annotations

from typing import Literal

from policies.events import Content, Reasoning, ToolCall
from policies.tool_calls import ToolFormat

Parsed = Content | Reasoning | ToolCall


class OutputParser:
    """Feed text pieces as they are generated; get back what they turned out to be.

    Text that could be the start of a marker (think or tool call) is held back until the
    next piece shows whether it is one, so a marker split across tokens is still found, and
    a tool call is only given once whole and parsed: whatever the pieces, the events are the
    same as for the whole text at once. A call that does not parse, or never closes, is
    given back as the text it was.

    `think` is the model's (open, close) reasoning markers; a reasoning block is only
    recognised at the start of the answer, as templates put it. `in_reasoning` is for
    templates that open it in the prompt (DeepSeek-R1 distills): the text is reasoning until
    the close marker.
    """

    def __init__(self, tool_format: ToolFormat | None, think: tuple[str, str] | None, in_reasoning: bool = False):
        self.format = tool_format
        self.open, self.close = think or ("", "")
        self.mode: Literal["reasoning", "text", "call", "bare"] = "reasoning" if in_reasoning else "text"
        self.pending = ""
        # Nothing but whitespace answered yet: a reasoning block or a bare call may still open.
        self.answer_fresh = True
        self.think_allowed = bool(self.open) and not in_reasoning
        # Whitespace after a marker is layout, not answer (Qwen3's template strips it too).
        self.strip = in_reasoning

    def feed(self, piece: str) -> list[Parsed]:
        self.pending += piece
        out: list[Parsed] = []
        while self._step(out):
            pass
        return out

    def finish(self, truncated: bool = False) -> list[Parsed]:
        """What the held-back text was. `truncated`: the answer was cut at max_tokens, so a
        call still being written is dropped, never given back as raw markup."""
        out: list[Parsed] = []
        text, self.pending = self.pending, ""
        if self.strip:
            text = text.lstrip()
        if self.mode == "reasoning":
            _append(out, Reasoning(text))
        elif self.mode in ("call", "bare") and self.format is not None and truncated:
            pass
        elif self.mode == "call" and self.format is not None:
            if self.format.end:  # never closed: cut short
                _append(out, Content(self.format.start + text))
            else:
                _call(self.format, out, text, self.format.start + text)
        elif self.mode == "bare" and self.format is not None:
            _call(self.format, out, text, text)
        else:
            _append(out, Content(text))
        return out

    def _step(self, out: list[Parsed]) -> bool:
        """Consume what `pending` decides; True when it should be looked at again."""
        if self.strip:
            self.pending = self.pending.lstrip()
            if not self.pending:
                return False
            self.strip = False
        if self.mode == "reasoning":
            return self._reasoning(out)
        if self.mode == "text":
            return self._text(out)
        if self.mode == "call" and self.format is not None and self.format.end:
            fmt = self.format
            end = self.pending.find(fmt.end)
            if end < 0:
                return False
            body, self.pending = self.pending[:end], self.pending[end + len(fmt.end) :]
            self.mode = "text"
            self.strip = _call(fmt, out, body, fmt.start + body + fmt.end)
            return True
        return False  # a call that runs to the end of the answer, or a bare one: until finish()

    def _reasoning(self, out: list[Parsed]) -> bool:
        end = self.pending.find(self.close)
        if end < 0:
            keep = _partial_marker(self.pending, self.close)
            _append(out, Reasoning(self.pending[: len(self.pending) - keep]))
            self.pending = self.pending[len(self.pending) - keep :]
            return False
        _append(out, Reasoning(self.pending[:end]))
        self.pending = self.pending[end + len(self.close) :]
        self.mode, self.strip, self.answer_fresh = "text", True, True
        return True

    def _text(self, out: list[Parsed]) -> bool:
        if self.answer_fresh:
            head = self.pending.lstrip()
            if not head:
                return False
            if self.think_allowed:
                if head.startswith(self.open):
                    self.pending = head[len(self.open) :]
                    self.mode, self.strip, self.think_allowed = "reasoning", True, False
                    return True
                if self.open.startswith(head):
                    return False
            if self.format is not None and self.format.bare and head.startswith("{"):
                self.mode = "bare"
                return False
            self.answer_fresh = self.think_allowed = False
        if self.format is None:
            _append(out, Content(self.pending))
            self.pending = ""
            return False
        start = self.pending.find(self.format.start)
        if start < 0:
            keep = _partial_marker(self.pending, self.format.start)
            _append(out, Content(self.pending[: len(self.pending) - keep]))
            self.pending = self.pending[len(self.pending) - keep :]
            return False
        _append(out, Content(self.pending[:start]))
        self.pending = self.pending[start + len(self.format.start) :]
        self.mode = "call"
        return True


def _call(tool_format: ToolFormat, out: list[Parsed], body: str, as_text: str) -> bool:
    """The calls in `body`, or `as_text` as content when it is not calls; True if calls."""
    try:
        calls = tool_format.parse(body)
    except ValueError:
        _append(out, Content(as_text))
        return False
    out.extend(calls)
    return True


def _append(out: list[Parsed], event: Content | Reasoning) -> None:
    if event.text:
        out.append(event)


def _partial_marker(text: str, marker: str) -> int:
    """Length of the longest suffix of `text` that begins `marker`."""
    for length in range(min(len(marker) - 1, len(text)), 0, -1):
        if text.endswith(marker[:length]):
            return length
    return 0
