"""Where generated text must stop for the client's `stop` sequences, as it streams."""

from __future__ import annotations


class StopMatcher:
    """Feed text pieces as they are generated; get back what is safe to send.

    Text that could be the start of a stop sequence is held back until the next piece
    shows whether it is one, so a stop sequence never reaches the client, even when it is
    split across tokens.
    """

    def __init__(self, stops: list[str]):
        self.stops = [s for s in stops if s]
        self.pending = ""
        self.stopped = False
        self.matched: str | None = None  # the stop sequence that ended the text

    def feed(self, piece: str) -> str:
        if self.stopped:
            return ""
        self.pending += piece
        hits = [(i, s) for s in self.stops if (i := self.pending.find(s)) >= 0]
        if hits:
            at, self.matched = min(hits)
            self.stopped = True
            out, self.pending = self.pending[:at], ""
            return out
        keep = self._longest_partial_stop()
        out = self.pending[: len(self.pending) - keep]
        self.pending = self.pending[len(out) :]
        return out

    def flush(self) -> str:
        out, self.pending = ("" if self.stopped else self.pending), ""
        return out

    def _longest_partial_stop(self) -> int:
        """Length of the longest suffix of `pending` that begins some stop sequence."""
        best = 0
        for stop in self.stops:
            for length in range(min(len(stop) - 1, len(self.pending)), best, -1):
                if self.pending.endswith(stop[:length]):
                    best = length
                    break
        return best
