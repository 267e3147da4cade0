"""Settling finished work: the Studio's half that listens to the engine, stores what ended and posts results.

One task reads `engine.subscribe()` (every job's events): a started job marks its request running, an
ended job is stored, and when every image of a request has ended the request is settled (its outcome
written) and handed to the front end's `Publisher` once. At start, `reconcile` does the same for what
ended or stayed unposted while no process listened, so results survive a restart.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Coroutine
from typing import Any

import aiosqlite

from bot.errors import GenerationNotFound
from bot.outcome import outcome_of
from bot.records import Generation
from bot.store import PENDING, Store
from bot.tickets import Publisher
from engine.errors import NoodleError
from engine.service import EngineService, JobEvent, JobState

__all__ = ["Settled", "Settler"]

log = logging.getLogger(__name__)
ENDED_EVENTS = ("done", "failed", "cancelled")
Settled = tuple[Generation, str | None]  # the stored generation, and why it could not be posted (if so)


class Settler:
    """Keeps the store in step with the engine and posts each settled request once."""

    def __init__(self, engine: EngineService, store: Store, *, front: str, publisher: Publisher | None,
                 publish_timeout: float) -> None:
        self.engine = engine
        self.store = store
        self.front = front
        self.publisher = publisher
        self.publish_timeout = publish_timeout
        self._pump_task: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._locks: dict[int, asyncio.Lock] = {}
        self._waiting: dict[int, asyncio.Future[Settled]] = {}
        self._settled: OrderedDict[int, Settled] = OrderedDict()
        self._followers: dict[int, int] = {}

    async def start(self) -> None:
        """Listen to the engine, then settle what ended or stayed unposted while nobody listened."""
        # subscribed before reconciling, so no event falls in between
        self._pump_task = asyncio.create_task(self._pump(self.engine.subscribe()), name=f"{self.front}-settler")
        await self.reconcile()

    async def stop(self, timeout: float = 10.0) -> None:
        """Cancel the listener and any result still being stored or posted (a restart redoes them)."""
        tasks = [t for t in (self._pump_task, *self._tasks) if t is not None]
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=timeout)
        for future in self._waiting.values():
            future.cancel()
        self._pump_task = None

    async def wait_settled(self, generation_id: int) -> Settled:
        """The settled generation (stored, posted if this front posts it), waiting up to the publish timeout."""
        if generation_id in self._settled:
            return self._settled[generation_id]
        generation = await self.store.get(generation_id)
        if generation_id in self._settled:  # settled while we read: no await from here to the future below
            return self._settled[generation_id]
        if generation is None:
            raise GenerationNotFound(f"Noodle has no record of #{generation_id}")
        if generation.is_terminal and not self._must_post(generation):
            return generation, None
        future = self._waiting.setdefault(generation_id, asyncio.get_running_loop().create_future())
        if generation.all_ended and generation.state in PENDING:
            self._spawn(self.settle(generation_id))  # a follower that got here before the pump did
        return await asyncio.wait_for(asyncio.shield(future), timeout=self.publish_timeout)

    def _must_post(self, generation: Generation) -> bool:
        return (generation.state == "done" and generation.posted_at is None and generation.front == self.front
                and self.publisher is not None)

    async def _pump(self, events: AsyncIterator[JobEvent]) -> None:
        async for event in events:
            try:
                if event.kind == "started":
                    started = time.time()
                    if await self.store.mark_running(event.job_id, started) is None and await self._adopt(event.job_id):
                        await self.store.mark_running(event.job_id, started)
                elif event.kind in ENDED_EVENTS:
                    await self._job_ended(event.job_id, event.kind, event.result, event.error)
            except (NoodleError, aiosqlite.Error) as err:  # one bad event must not stop results for everyone
                log.exception("could not record %s of job %s: %s", event.kind, event.job_id, err)

    async def _job_ended(self, job_id: str, kind: str, result: dict[str, Any] | None, error: str | None) -> None:
        state = kind if kind in ENDED_EVENTS else "failed"
        if state == "done" and result is None:
            state, error = "failed", "the engine reported no result"
        generation_id = await self.store.end_job(job_id, state, result=result, error=error)
        if generation_id is None and await self._adopt(job_id):
            generation_id = await self.store.end_job(job_id, state, result=result, error=error)
        if generation_id is None:
            log.warning("job %s ended but no generation records it (another program's job?)", job_id)
            return
        generation = await self.store.get(generation_id)
        if generation is not None and generation.all_ended and generation.state in PENDING:
            self._spawn(self.settle(generation_id))

    async def _adopt(self, job_id: str) -> bool:
        """Link a job to its image when its events overtook the Studio's own bookkeeping (fast jobs, restarts)."""
        for info in self.engine.jobs(states=tuple(JobState)):
            if info.job_id == job_id and "generation_id" in info.extra:
                await self.store.attach_job(int(info.extra["generation_id"]), int(info.extra.get("idx", 1)), job_id)
                return True
        return False

    def _spawn(self, coroutine: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def settle(self, generation_id: int) -> None:
        """Write a request's outcome and post it, once, whichever path (pump, reconcile, follower) gets here first."""
        lock = self._locks.setdefault(generation_id, asyncio.Lock())
        problem: str | None = None
        generation: Generation | None = None
        async with lock:
            # someone follows it now (a front end showing its status): they report a failure, not us. Read before
            # the awaits below, while a follower may see the settled row and stop following.
            watched = bool(self._followers.get(generation_id))
            try:
                generation = await self.store.get(generation_id)
                if generation is not None and generation.state in PENDING and generation.all_ended:
                    outcome = await asyncio.to_thread(outcome_of, self.engine.executor, generation)
                    await self.store.settle(generation_id, outcome)
                    generation = await self.store.get(generation_id) or generation
                if generation is not None and self.publisher is not None and generation.front == self.front:
                    if self._must_post(generation):
                        message_id = await asyncio.wait_for(self.publisher.publish(generation), self.publish_timeout)
                        await self.store.mark_posted(generation.id, message_id, time.time())
                        generation = await self.store.get(generation_id) or generation
                    elif generation.state in ("failed", "cancelled") and not watched \
                            and not self._followers.get(generation_id):
                        await self.publisher.publish_failure(generation)
            except (NoodleError, OSError, TimeoutError, aiosqlite.Error) as err:
                log.exception("#%s ended but its result could not be stored or posted", generation_id)
                problem = f"the result could not be posted: {err}"
        if self._locks.get(generation_id) is lock and not lock.locked():
            del self._locks[generation_id]
        future = self._waiting.pop(generation_id, None) if generation is None or generation.state not in PENDING \
            else None
        if generation is None:
            if future is not None and not future.done():
                future.set_exception(GenerationNotFound(f"Noodle has no record of #{generation_id}"))
            return
        if generation.state in PENDING:
            return  # not every image has ended yet
        settled = (generation, problem)
        self._settled[generation_id] = settled
        while len(self._settled) > 512:  # followers arriving late find it here; older ones read the store
            self._settled.popitem(last=False)
        if future is not None and not future.done():
            future.set_result(settled)

    async def reconcile(self) -> None:
        """After a restart: record jobs that ended unheard, settle what can be, post what never was."""
        infos = {info.job_id: info for info in self.engine.jobs(states=tuple(JobState))}
        by_image = {(info.extra.get("generation_id"), info.extra.get("idx", 1)): info for info in infos.values()}
        for generation in await self.store.pending():
            for job in generation.jobs:
                job_id = job.job_id
                if job_id is None:  # stopped between the store and the queue: link it if the queue has it
                    info = by_image.get((generation.id, job.idx))
                    if info is None:
                        await self._abandon(generation)
                        break
                    await self.store.attach_job(generation.id, job.idx, info.job_id)
                    job_id = info.job_id
                if job.ended:
                    continue
                # a job that ended while nobody listened is no longer active: the engine's table still has it
                info = infos.get(job_id) or await self.engine.info(job_id)
                if info is None:
                    await self.store.end_job(job_id, "failed", error="the queue lost this job in a restart; run it "
                                                                     "again")
                elif info.state in (JobState.DONE, JobState.FAILED, JobState.CANCELLED):
                    await self._job_ended(job_id, str(info.state), info.result, info.error)
            else:
                refreshed = await self.store.get(generation.id)
                if refreshed is not None and refreshed.all_ended and refreshed.state in PENDING:
                    self._spawn(self.settle(generation.id))
        for generation in await self.store.unposted(self.front):
            self._spawn(self.settle(generation.id))

    async def _abandon(self, generation: Generation) -> None:
        """A request cut off while being queued: take its queued images back out and record it as failed."""
        for job_id in generation.job_ids:
            await self.engine.cancel(job_id)
        for job in generation.jobs:
            if job.job_id is not None and not job.ended:
                await self.store.end_job(job.job_id, "cancelled", error="Noodle stopped while queueing this request")
        await self.store.discard(generation.id)
