"""Stored Responses API answers, for `previous_response_id`, `GET` and `DELETE`.

A deployment of its own, so every ingress replica sees the same store and an ingress that
restarts loses nothing. Bounded: entries live `responses_ttl` and at most `responses_max`
are kept (the oldest go first). They live in memory: a restart of this deployment (or of the
server) forgets them, and a continuation of a forgotten response is a 404.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from typing import Any

from ray import serve

from policies.config import RESPONSES_NAME, AppConfig


@serve.deployment(name=RESPONSES_NAME, num_replicas=1, ray_actor_options={"num_cpus": 0})
class ResponseStore:
    def __init__(self, config: AppConfig):
        self.ttl = config.responses_ttl_seconds
        self.limit = config.responses_max
        self._entries: OrderedDict[str, tuple[float, dict[str, Any]]] = OrderedDict()

    def put(self, response_id: str, record: dict[str, Any]) -> None:
        """Keep a record: {"response": the Response object, "chat": the conversation so far}."""
        self._expire()
        self._entries[response_id] = (time.monotonic() + self.ttl, record)
        while len(self._entries) > self.limit:
            self._entries.popitem(last=False)

    def get(self, response_id: str) -> dict[str, Any] | None:
        self._expire()
        entry = self._entries.get(response_id)
        return None if entry is None else entry[1]

    def delete(self, response_id: str) -> bool:
        self._expire()
        return self._entries.pop(response_id, None) is not None

    def _expire(self) -> None:
        now = time.monotonic()
        while self._entries:
            oldest = next(iter(self._entries))
            if self._entries[oldest][0] > now:
                break
            del self._entries[oldest]
