"""Background work in a deployment's event loop: tasks that outlive the request that
started them, one task per key at a time, and rounds that repeat."""

from __future__ import annotations

import asyncio
import contextvars
import inspect
from typing import Any, Awaitable, Callable

from policies.logs import module_logger

logger = module_logger(__name__)


def spawn(work: Awaitable[Any], log: bool = True) -> asyncio.Task:
    """Run `work` in a fresh context: it outlives the request that started it, and Serve
    cancels the calls a request makes (a load waiting for its replica) when that request is.
    A failure is logged unless `log` is False (its awaiter handles it)."""
    task = asyncio.get_running_loop().create_task(work, context=contextvars.Context())
    if log:
        task.add_done_callback(_log_failure)
    return task


def _log_failure(task: asyncio.Task) -> None:
    if not task.cancelled() and task.exception() is not None:
        logger.error("background task failed", exc_info=task.exception())


class SingleFlight:
    """At most one task per key: asking again while one runs joins it."""

    def __init__(self) -> None:
        self.running: dict[str, asyncio.Task] = {}

    def __contains__(self, key: str) -> bool:
        return key in self.running

    def __getitem__(self, key: str) -> asyncio.Task:
        return self.running[key]

    def get(self, key: str) -> asyncio.Task | None:
        return self.running.get(key)

    def join(self, key: str, work: Callable[[str], Awaitable[None]]) -> asyncio.Task:
        """The task running `work(key)`, started if none runs."""
        task = self.running.get(key)
        if task is None:
            task = self.start(key, work(key))
        return task

    def start(self, key: str, work: Awaitable[Any]) -> asyncio.Task:
        """Start `work` as the key's task now, in place of any (registered at once, so a
        caller that looks right after always finds it)."""
        task = spawn(work, log=False)
        self.running[key] = task

        def forget(_: asyncio.Task) -> None:
            if self.running.get(key) is task:
                del self.running[key]

        task.add_done_callback(forget)
        return task


class Changes:
    """What waiters wait on: they re-check their condition after each change. `on_change`
    runs first (the gauges show the state that woke them)."""

    def __init__(self, on_change: Callable[[], None]):
        self.on_change = on_change
        self._condition = asyncio.Condition()

    async def notify(self) -> None:
        self.on_change()
        async with self._condition:
            self._condition.notify_all()

    async def wait(self, timeout: float) -> None:
        """Until the next change, or `timeout` seconds."""
        async with self._condition:
            try:
                await asyncio.wait_for(self._condition.wait(), timeout)
            except asyncio.TimeoutError:
                pass


async def every(work: Callable[[], Awaitable[None] | None], seconds: float, after: asyncio.Event) -> None:
    """Run `work` every `seconds` once `after` is set; one failed round does not end it."""
    await after.wait()
    while True:
        await asyncio.sleep(seconds)
        try:
            done = work()
            if inspect.isawaitable(done):
                await done
        except Exception:
            logger.exception("task %s failed; next round in %.1f s", work.__name__, seconds)
