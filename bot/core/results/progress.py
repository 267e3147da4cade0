"""One request's progress from its images' jobs: the engine reports per job, a person wants one status.

`merged_events` reads every job's event stream (each replays from the job's latest state, so a
late follower still starts from the truth) and yields one stream: the best queue position among
the images still waiting, the start of the first, sampler steps with how many images are finished.
It ends when every job has ended; the result collector then waits for the stored, posted result.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from typing import Any

from bot.core.front_end import StudioEvent
from bot.core.storage.records import ENDED
from engine.idle import idle_wait
from engine.queue import EngineService

__all__ = ["merged_events"]

# No engine event for this long means something is badly wrong; the follower stops waiting and says so.
SILENCE_SECONDS = 6 * 3600
_END = object()


async def merged_events(engine: EngineService, job_ids: Sequence[str]) -> AsyncIterator[StudioEvent]:
    """Position, start and progress across `job_ids`, until all of them ended (the verdict is not yielded)."""
    queue: asyncio.Queue[Any] = asyncio.Queue()
    primary = job_ids[0]

    async def read(job_id: str) -> None:
        try:
            handle = engine.handle(job_id)
            if handle is not None:
                async for event in handle.events():
                    queue.put_nowait(event)
        finally:
            queue.put_nowait(_END)

    readers = [asyncio.create_task(read(job_id), name=f"follow-{job_id}") for job_id in job_ids]
    positions: dict[str, int] = {}
    open_streams, ended, started = len(job_ids), 0, False
    try:
        while open_streams:
            try:
                async with asyncio.timeout(SILENCE_SECONDS):  # in this task: an idle wait declared where it waits
                    event = await idle_wait(queue.get())
            except TimeoutError:
                raise TimeoutError(f"no news of job {primary} from the engine for {SILENCE_SECONDS // 3600} hours") \
                    from None
            if event is _END:
                open_streams -= 1
                continue
            if event.kind in ("queued", "position") and event.position is not None:
                positions[event.job_id] = event.position
                yield StudioEvent("position", primary, position=min(positions.values()), eta_s=event.eta_s,
                                  images=len(job_ids), images_done=ended)
            elif event.kind == "started":
                positions.pop(event.job_id, None)
                if not started:
                    started = True
                    yield StudioEvent("started", primary, images=len(job_ids), images_done=ended)
            elif event.kind == "progress":
                yield StudioEvent("progress", primary, value=event.value, max=event.max, node=event.node,
                                  images=len(job_ids), images_done=ended)
            elif event.kind in ENDED:
                positions.pop(event.job_id, None)
                ended += 1
    finally:
        for reader in readers:
            reader.cancel()
        await asyncio.wait(readers, timeout=5)
