"""The Responses API store: files that outlive processes, bounded by age and count."""

from __future__ import annotations

import asyncio
import os
import time

from deployments.response_store import ResponseStore


def rid(n: int) -> str:
    return f"resp_{n:032x}"


def test_records_survive_a_new_store_on_the_same_directory(tmp_path):
    asyncio.run(ResponseStore(str(tmp_path), 60, 10).put(rid(1), {"response": {"id": rid(1)}, "chat": []}))
    again = ResponseStore(str(tmp_path), 60, 10)  # another ingress replica, or after a restart
    assert asyncio.run(again.get(rid(1))) == {"response": {"id": rid(1)}, "chat": []}
    assert asyncio.run(again.delete(rid(1))) is True
    assert asyncio.run(again.get(rid(1))) is None and asyncio.run(again.delete(rid(1))) is False


def test_expired_and_oldest_records_are_forgotten(tmp_path):
    store = ResponseStore(str(tmp_path), ttl_seconds=60, limit=3)
    for n in range(5):
        asyncio.run(store.put(rid(n), {"n": n}))
        os.utime(tmp_path / f"{rid(n)}.json", (time.time() - 10 + n, time.time() - 10 + n))
    asyncio.run(store.put(rid(9), {"n": 9}))
    kept = sorted(p.name for p in tmp_path.iterdir())
    assert kept == [f"{rid(n)}.json" for n in (3, 4, 9)]
    old = tmp_path / f"{rid(3)}.json"
    os.utime(old, (time.time() - 120, time.time() - 120))
    assert asyncio.run(store.get(rid(3))) is None and asyncio.run(store.get(rid(4))) == {"n": 4}


def test_only_our_ids_name_files(tmp_path):
    store = ResponseStore(str(tmp_path), 60, 10)
    assert asyncio.run(store.get("../../etc/passwd")) is None
    assert asyncio.run(store.delete("resp_../x")) is False
