"""Waiting for a call whose reason to wait may go away first: a model's node that left the
cluster, a lease the controller took back. A call to a replica that will never come would
otherwise wait for good in Serve's router."""

from __future__ import annotations

import asyncio
from typing import Awaitable, Callable, TypeVar

T = TypeVar("T")


class Abandoned(Exception):
    """What the call was waited for went away first; the call was cancelled."""


async def unless(
    gone: asyncio.Future,
    work: Awaitable[T],
    every: float | None = None,
    meanwhile: Callable[[], None] | None = None,
) -> T:
    """`work`'s result, unless `gone` resolves first: then `work` is cancelled and Abandoned
    raised. While both are pending, `meanwhile()` runs every `every` seconds (to learn sooner
    whether `gone` should resolve). Cancelling the caller cancels `work`."""
    task = asyncio.ensure_future(work)
    try:
        while not (task.done() or gone.done()):
            await asyncio.wait([task, gone], timeout=every, return_when=asyncio.FIRST_COMPLETED)
            if meanwhile is not None and not (task.done() or gone.done()):
                meanwhile()
    except asyncio.CancelledError:
        task.cancel()
        raise
    if not task.done():
        task.cancel()
        raise Abandoned()
    return task.result()
