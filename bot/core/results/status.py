"""The live status of a job for its requester: queue position, then sampler progress, shown through a sink
(an interaction's response on Discord, a channel message for reaction jobs, a bar in the console).

Edits are throttled: at most one per `every` seconds (Discord rate-limits message edits), and an
update held back by the throttle is still shown once the window opens, so the status is never
stale for longer than `every`. Every wait has a deadline: an interaction token dies after 15
minutes, and the result is posted by the Studio's publisher whether or not anyone still watches.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import AsyncIterator, Callable
from typing import Protocol

from bot.core.cards.result import status_text
from bot.core.front_end import StudioEvent
from engine.idle import idle_wait

__all__ = ["StatusSink", "accepted_text", "relay", "render"]


class StatusSink(Protocol):
    """Where status lines go."""

    async def update(self, text: str) -> None:
        """Replace the shown status with `text`."""
        ...


def render(event: StudioEvent) -> str:
    """The status line for one event."""
    return status_text(event.kind, position=event.position, eta_s=event.eta_s, value=event.value,
                       total=event.max, job_id=event.job_id, images=event.images, images_done=event.images_done)


def accepted_text(position: int | None) -> str:
    """The first status line, sent as the request is accepted: its place in the queue, or that it is starting
    (no place: the worker took it at once)."""
    if not position:
        return "🎨 Starting"
    return "⏳ Queued (next)" if position == 1 else f"⏳ Queued (#{position} in the queue)"


async def relay(events: AsyncIterator[StudioEvent], sink: StatusSink, *, every: float, deadline: float,
                clock: Callable[[], float], shown_at: float = -math.inf,
                finish: Callable[[StudioEvent], str | None] | None = None) -> StudioEvent | None:
    """Show `events` on `sink` until the job is done or failed, and return that last event.

    `shown_at` is when the sink last changed (a "queued" reply just sent counts); `finish(event)` gives
    the line for the verdict, shown once the throttle window allows (None: nothing). Returns None when
    the events end without a verdict or when `deadline` (a `clock()` time) passes. `clock` is the caller's
    (the Studio's): no default bound here, so one injected clock times every wait.
    """
    iterator = aiter(events)
    pending: str | None = None
    next_event: asyncio.Future[StudioEvent] = asyncio.ensure_future(anext(iterator))
    try:
        while True:
            now = clock()
            if now >= deadline:
                return None
            wait = deadline - now if pending is None else min(deadline - now, max(0.0, shown_at + every - now))
            # the next event comes from the engine's thread: an idle wait (engine/idle.py), bounded by the throttle
            done, _ = await idle_wait(asyncio.wait({next_event}, timeout=wait))
            if not done:
                if pending is not None and clock() >= shown_at + every:
                    await sink.update(pending)  # the throttle window opened: show the latest held-back line
                    shown_at, pending = clock(), None
                continue
            try:
                event = next_event.result()
            except StopAsyncIteration:
                return None
            if event.kind in ("done", "failed"):
                text = finish(event) if finish is not None else None
                if text is not None:
                    # bounded by `every`: the verdict waits for the window like any other edit
                    await asyncio.sleep(max(0.0, min(shown_at + every - clock(), every)))
                    await sink.update(text)
                return event
            pending = render(event)
            if clock() >= shown_at + every:
                await sink.update(pending)
                shown_at, pending = clock(), None
            next_event = asyncio.ensure_future(anext(iterator))
    finally:
        if not next_event.done():
            # the generator is suspended inside its own await: cancel that first, aclose() would refuse
            next_event.cancel()
            await asyncio.wait({next_event}, timeout=5)
        close = getattr(iterator, "aclose", None)
        if close is not None:
            await asyncio.wait_for(close(), timeout=5)
