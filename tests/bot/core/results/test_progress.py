"""The follower's merged events: its waits for the engine's news go through the one idle seam (engine/idle.py),
and wrapping that seam changes nothing it yields."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable
from typing import Any

from bot.core.results.progress import merged_events
from engine.idle import idle_waits_through
from engine.queue import JobEvent

EVENTS = [JobEvent("j", "queued", position=2), JobEvent("j", "position", position=1), JobEvent("j", "started"),
          JobEvent("j", "progress", node="3", value=1, max=2), JobEvent("j", "progress", node="3", value=2, max=2),
          JobEvent("j", "done")]


class _Handle:
    """A job's stream that never waits itself: every idle wait seen comes from the follower."""

    async def events(self) -> AsyncIterator[JobEvent]:
        for event in EVENTS:
            yield event


class _Engine:
    def handle(self, job_id: str) -> _Handle:
        return _Handle()


async def _follow() -> list[tuple[str, Any]]:
    merged = merged_events(_Engine(), ["j"])  # type: ignore[arg-type]
    return await asyncio.wait_for(_collect(merged), 10)


async def _collect(events: AsyncIterator[Any]) -> list[tuple[str, Any]]:
    return [(event.kind, event.position if event.kind == "position" else event.value) async for event in events]


async def test_the_followers_waits_go_through_the_idle_seam_and_behave_the_same() -> None:
    plain = await _follow()
    declared: list[Awaitable[Any]] = []

    async def external_wait(awaitable: Awaitable[Any]) -> Any:  # what SimCord's env.external_wait would be
        declared.append(awaitable)
        return await awaitable

    with idle_waits_through(external_wait):
        wrapped = await _follow()
    assert wrapped == plain == [("position", 2), ("position", 1), ("started", None), ("progress", 1),
                                ("progress", 2)]
    assert len(declared) >= len(EVENTS)  # one wait per event taken off the follower's queue, at least
    count = len(declared)
    await _follow()
    assert len(declared) == count  # outside the block nothing is wrapped
