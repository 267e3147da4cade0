"""Status relay: edits at most every `every` seconds, the held-back line shown when the window opens."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from bot.core.results.status import accepted_text, relay
from bot.core.front_end import StudioEvent

EVERY = 0.2  # seconds between edits in these tests (2.0 on Discord)


class Sink:
    def __init__(self) -> None:
        self.shown: list[tuple[float, str]] = []
        self.changed = asyncio.Event()

    async def update(self, text: str) -> None:
        self.shown.append((asyncio.get_running_loop().time(), text))
        self.changed.set()


async def _events(steps: int, gate: asyncio.Event) -> AsyncIterator[StudioEvent]:
    yield StudioEvent("position", "j", position=2)
    for step in range(1, steps + 1):  # a burst of steps, faster than any edit may follow
        yield StudioEvent("progress", "j", value=step, max=steps)
    await gate.wait()  # then the job is quiet for a while before it finishes
    yield StudioEvent("done", "j")


async def test_edits_are_throttled_and_the_latest_line_is_not_lost() -> None:
    loop, gate, sink = asyncio.get_running_loop(), asyncio.Event(), Sink()
    task = asyncio.create_task(relay(_events(10, gate), sink, every=EVERY, deadline=loop.time() + 30,
                                       clock=loop.time))

    async def shows_the_last_step() -> None:
        while not (sink.shown and "step 10/10" in sink.shown[-1][1]):
            sink.changed.clear()
            await sink.changed.wait()

    await asyncio.wait_for(shows_the_last_step(), 10)  # shown once the window opened, with no new event
    gate.set()
    final = await asyncio.wait_for(task, 10)
    assert final is not None and final.kind == "done"
    assert sink.shown[0][1].startswith("⏳ Queued: #2") and len(sink.shown) == 2
    assert sink.shown[1][0] - sink.shown[0][0] >= EVERY * 0.99


async def test_a_deadline_ends_the_relay_without_a_verdict() -> None:
    loop, gate, sink = asyncio.get_running_loop(), asyncio.Event(), Sink()
    final = await asyncio.wait_for(relay(_events(2, gate), sink, every=EVERY, deadline=loop.time() + 0.3,
                                         clock=loop.time), 10)
    assert final is None


async def test_the_verdict_waits_for_the_window_after_a_fresh_reply() -> None:
    loop, gate, sink = asyncio.get_running_loop(), asyncio.Event(), Sink()
    gate.set()
    replied = loop.time()
    final = await asyncio.wait_for(relay(_events(1, gate), sink, every=EVERY, deadline=replied + 30, clock=loop.time,
                                         shown_at=replied, finish=lambda event: f"✅ {event.kind}"), 10)
    assert final is not None and sink.shown[-1][1] == "✅ done"
    times = [replied] + [t for t, _ in sink.shown]
    assert all(later - earlier >= EVERY * 0.99 for earlier, later in zip(times, times[1:]))


def test_the_first_line_says_starting_when_the_job_has_no_queue_place() -> None:
    # no place: the worker took it at once; never "Queued (queued)"
    assert accepted_text(None) == "🎨 Starting"
    assert accepted_text(1) == "⏳ Queued (next)"
    assert accepted_text(3) == "⏳ Queued (#3 in the queue)"
