"""One seam for the long idle waits: an engine stream or a follower waiting on an empty `asyncio.Queue` (or the
job's end) for what only the worker thread or another task will send, and waits for time to pass (`idle_sleep`:
the publisher's backoff, the collector's reposts).

Every such wait goes through `idle_wait`, so a harness that runs the bot on a simulated event loop (SimCord
declares them with `env.external_wait`) can wrap the waits in one place instead of patching each call site:

    with idle_waits_through(env.external_wait):
        ...

Without a wrapper `idle_wait(x)` is `await x`: behaviour is unchanged. The bot imports this from the engine
(front ends -> bot.core -> engine), never the reverse.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

__all__ = ["IdleWrapper", "idle_sleep", "idle_wait", "idle_waits_through"]

T = TypeVar("T")
IdleWrapper = Callable[[Awaitable[Any]], Awaitable[Any]]
_wrappers: list[IdleWrapper] = []  # the innermost `idle_waits_through` wins


async def idle_sleep(seconds: float) -> None:
    """A wait for time to pass (a retry's backoff, a repost's delay): an idle wait too, so a simulated loop's clock
    (SimCord's `advance_time`) is what ends it."""
    await idle_wait(asyncio.sleep(seconds))


async def idle_wait(awaitable: Awaitable[T]) -> T:
    """Wait for `awaitable`, which something outside this task completes (a queue's `get()`, an event's
    `wait()`): through the installed wrapper, if any."""
    if _wrappers:
        return await _wrappers[-1](awaitable)  # type: ignore[no-any-return]
    return await awaitable


@contextmanager
def idle_waits_through(wrapper: IdleWrapper) -> Iterator[None]:
    """Send every idle wait started inside the block through `wrapper(awaitable)`, which must await it."""
    _wrappers.append(wrapper)
    try:
        yield
    finally:
        _wrappers.remove(wrapper)
