"""Stored Responses API answers, for `previous_response_id`, `GET` and `DELETE`.

One JSON file per answer in `responses_dir`: every ingress replica on the host sees the same
store, and answers outlive a restart of the ingress or of the whole server (no process of
its own to keep alive). Bounded: entries live `responses_ttl`, and at most `responses_max`
are kept (the oldest go first).
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import time
from pathlib import Path
from typing import Any

# Response ids are ours ("resp_" and hex); anything else never names a file.
_ID = re.compile(r"^resp_[0-9a-f]{32}$")


class ResponseStore:
    def __init__(self, directory: str, ttl_seconds: float, limit: int):
        self.directory = Path(directory).expanduser()
        self.ttl = ttl_seconds
        self.limit = limit

    async def put(self, response_id: str, record: dict[str, Any]) -> None:
        """Keep a record: {"response": the Response object, "chat": the conversation so far}."""
        await asyncio.to_thread(self._put, response_id, record)

    async def get(self, response_id: str) -> dict[str, Any] | None:
        return await asyncio.to_thread(self._get, response_id)

    async def delete(self, response_id: str) -> bool:
        return await asyncio.to_thread(self._delete, response_id)

    def _path(self, response_id: str) -> Path | None:
        return self.directory / f"{response_id}.json" if _ID.match(response_id) else None

    def _put(self, response_id: str, record: dict[str, Any]) -> None:
        path = self._path(response_id)
        if path is None:
            raise ValueError(f"not a response id: {response_id!r}")
        self.directory.mkdir(parents=True, exist_ok=True)
        partial = path.with_suffix(f".{os.getpid()}.partial")
        partial.write_text(json.dumps(record, separators=(",", ":")))
        os.replace(partial, path)  # readers never see half a record
        self._prune()

    def _get(self, response_id: str) -> dict[str, Any] | None:
        path = self._path(response_id)
        try:
            if path is None or time.time() - path.stat().st_mtime > self.ttl:
                return None
            return json.loads(path.read_text())
        except (OSError, ValueError):
            return None

    def _delete(self, response_id: str) -> bool:
        path = self._path(response_id)
        if path is None or self._get(response_id) is None:
            return False
        path.unlink(missing_ok=True)
        return True

    def _prune(self) -> None:
        """Forget expired records, and the oldest beyond the limit."""
        entries = []
        for path in self.directory.glob("resp_*.json"):
            try:
                entries.append((path.stat().st_mtime, path))
            except OSError:
                continue
        entries.sort(reverse=True)
        now = time.time()
        for rank, (mtime, path) in enumerate(entries):
            if rank >= self.limit or now - mtime > self.ttl:
                path.unlink(missing_ok=True)
