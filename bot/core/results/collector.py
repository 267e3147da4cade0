"""The result collector: listens to the engine, stores what ended, posts each result once, and follows a request
for a front end.

One task reads `engine.subscribe()` (every job's events): a started job marks its request running, an
ended job is stored, and when every image of a request has ended the request is settled (its outcome
written) and handed to the front end's `Publisher` once. At start, `reconcile` does the same for what
ended or stayed unposted while no process listened, so results survive a restart. `follow` is a front
end's view of one request: its merged progress (bot/core/results/progress.py), then the settled verdict;
while someone follows, a failure is theirs to tell, not the publisher's.

When the database cannot be written (a full disk), the request that could not be recorded fails anyway:
in memory, its follower told at once, its PNGs removed (nothing would find them again), its other images
cancelled; the failure is written as soon as a later write gets through (every engine event retries).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Coroutine, Iterable
from dataclasses import replace
from typing import Any

import aiosqlite

from bot.core.errors import GenerationNotFound
from bot.core.front_end import Publisher, StudioEvent
from bot.core.results.files import remove_files, written_files
from bot.core.results.progress import merged_events
from bot.core.results.retention import Retention
from bot.core.results.verdict import outcome_of
from bot.core.safety.gate import SafetyGate
from bot.core.storage.records import ENDED, NOT_DONE, Generation
from bot.core.storage.store import PENDING, WRITE_FAILED, Store
from engine.disk import is_disk_full
from engine.errors import NoodleError
from engine.idle import idle_sleep, idle_wait
from engine.queue import EngineService, JobEvent, JobState

__all__ = ["ResultCollector", "Settled"]

log = logging.getLogger(__name__)
Settled = tuple[Generation, str | None]  # the stored generation, and why it could not be posted (if so)
# A result Discord would not take (a 5xx past discord.py's own retries, a channel hidden for a while) is posted
# again after these waits, the last repeated, for as long as the bot runs: it is never lost, nor left to a restart.
REPOST_DELAYS: tuple[float, ...] = (30.0, 60.0, 120.0, 300.0, 600.0)


class ResultCollector:
    """Keeps the store in step with the engine, posts each settled request once, follows requests."""

    def __init__(self, engine: EngineService, store: Store, *, front: str, publisher: Publisher | None,
                 publish_timeout: float, retention: Retention | None = None,
                 repost_delays: tuple[float, ...] = REPOST_DELAYS, gate: SafetyGate | None = None) -> None:
        self.engine = engine
        self.gate = gate  # scores each result and decides, by the server's rules, how it is shown
        self.repost_delays = repost_delays
        self._reposts: dict[int, int] = {}  # generation id -> failed posts so far
        self.retention = retention
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
        # requests failed in memory because the database could not record them, until it takes the failure
        self._unstored: dict[int, Generation] = {}

    async def start(self) -> None:
        """Listen to the engine, then settle what ended or stayed unposted while nobody listened."""
        # subscribed before reconciling, so no event falls in between
        self._pump_task = asyncio.create_task(self._pump(self.engine.subscribe()), name=f"{self.front}-results")
        await self.reconcile()
        if self.retention is not None:  # after reconciling: what a restart settles is no longer "queued"
            self.retention.start()

    async def stop(self, timeout: float = 10.0) -> None:
        """Cancel the listener, the retention task and any result still being stored or posted (a restart redoes
        them)."""
        if self.retention is not None:
            await self.retention.stop()
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
        generation = self._unstored.get(generation_id) or await self.store.get(generation_id)
        if generation_id in self._settled:  # settled while we read: no await from here to the future below
            return self._settled[generation_id]
        if generation is None:
            raise GenerationNotFound(f"Noodle has no record of #{generation_id}")
        if generation.is_terminal and not self._must_post(generation):
            return generation, None
        future = self._waiting.setdefault(generation_id, asyncio.get_running_loop().create_future())
        if generation.all_ended and generation.state in PENDING:
            self._spawn(self.settle(generation_id))  # a follower that got here before the pump did
        # the pump settles it when the engine's last job ends: an idle wait (engine/idle.py)
        return await idle_wait(asyncio.wait_for(asyncio.shield(future), timeout=self.publish_timeout))

    async def follow(self, job_id: str) -> AsyncIterator[StudioEvent]:
        """A request's position, start and progress (over all its images), then `done` (stored, posted) or `failed`."""
        generation = await self.store.by_job(job_id)
        if generation is None:
            raise GenerationNotFound(f"Noodle has no record of job {job_id}")
        self._followers[generation.id] = self._followers.get(generation.id, 0) + 1
        try:
            async for event in merged_events(self.engine, generation.job_ids or [job_id]):
                yield event
            settled, problem = await self.wait_settled(generation.id)
            kind = "done" if settled.state == "done" else "failed"
            yield StudioEvent(kind, job_id, images=len(settled.jobs), images_done=len(settled.images),
                              generation=settled, error=problem or (settled.error if kind == "failed" else None))
        finally:
            self._followers[generation.id] -= 1
            if not self._followers[generation.id]:
                del self._followers[generation.id]

    def _must_post(self, generation: Generation) -> bool:
        return (generation.state == "done" and generation.posted_at is None and generation.front == self.front
                and self.publisher is not None)

    async def _pump(self, events: AsyncIterator[JobEvent]) -> None:
        async for event in events:
            try:
                if self._unstored and event.kind != "progress":  # each retry is a write: not at every step
                    await self._store_unstored()
                if event.kind == "started":
                    started = time.time()
                    if await self.store.mark_running(event.job_id, started) is None and await self._adopt(event.job_id):
                        await self.store.mark_running(event.job_id, started)
                elif event.kind in ENDED:
                    await self._job_ended(event.job_id, event.kind, event.result, event.error)
            except (NoodleError, aiosqlite.Error) as err:  # one bad event must not stop results for everyone
                log.exception("could not record %s of job %s: %s", event.kind, event.job_id, err)

    async def _job_ended(self, job_id: str, kind: str, result: dict[str, Any] | None, error: str | None) -> None:
        state = kind if kind in ENDED else "failed"
        if state == "done" and result is None:
            state, error = "failed", "the engine reported no result"
        try:
            generation_id = await self.store.end_job(job_id, state, result=result, error=error)
            if generation_id is None and await self._adopt(job_id):
                generation_id = await self.store.end_job(job_id, state, result=result, error=error)
        except WRITE_FAILED as err:  # the end happened all the same: fail its request rather than hang it
            unrecorded = await self.store.by_job(job_id)
            if unrecorded is None:
                raise
            failed = f"image {_idx_of(unrecorded, job_id)} failed: {error}" if state == "failed" and error else None
            await self._fail_unstored(unrecorded, err, results=[result], reason=failed)
            self._spawn(self.settle(unrecorded.id))
            return
        if generation_id is None:
            log.warning("job %s ended but no generation records it (another program's job?)", job_id)
            return
        generation = await self.store.get(generation_id)
        if state == "done" and (generation_id in self._unstored or _state_of(generation, job_id) != "done"):
            # an image that ended after its request failed (a full disk): no message will show it, so no file stays
            await asyncio.to_thread(remove_files, written_files(self.engine.output_dir, [result]))
            return
        if generation is not None and generation.all_ended and generation.state in PENDING:
            self._spawn(self.settle(generation_id))

    async def _adopt(self, job_id: str) -> bool:
        """Link a job to its image when its events overtook `RequestQueue.enqueue`'s bookkeeping (fast jobs,
        restarts)."""
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
        await idle_wait(lock.acquire())  # another settle of the same request may be posting it: an idle wait
        try:
            # someone follows it now (a front end showing its status): they report a failure, not us. Read before
            # the awaits below, while a follower may see the settled row and stop following.
            watched = bool(self._followers.get(generation_id))
            try:
                # failed in memory (the database refused it) until _store_unstored records it
                generation = self._unstored.get(generation_id) or await self.store.get(generation_id)
                if generation is not None and generation.state in PENDING and generation.all_ended:
                    outcome = await asyncio.to_thread(outcome_of, self.engine, generation)
                    try:
                        await self.store.settle(generation_id, outcome)
                        generation = await self.store.get(generation_id) or generation
                    except WRITE_FAILED as err:
                        generation = await self._fail_unstored(generation, err, reason=outcome.error)
                if generation is not None and self.publisher is not None and generation.front == self.front:
                    if self._must_post(generation):
                        if self._reposts.get(generation_id, 0) < 0:
                            # a settle that waited behind a post Discord just refused: the scheduled repost tries
                            # again after its delay, not this one at once
                            problem = "Discord did not take the result yet; Noodle posts it when the channel answers"
                        else:
                            if self.gate is not None and generation.safety is None:  # scored once, off the loop
                                nsfw, parent = await self._channel_facts(generation)
                                generation = await self.gate.review(generation, nsfw_channel=nsfw, parent_id=parent)
                            await self._post(generation)
                            generation = await self.store.get(generation_id) or generation
                    elif generation.state in NOT_DONE and not watched \
                            and not self._followers.get(generation_id) and generation_id not in self._settled:
                        await self.publisher.publish_failure(generation)
            except (NoodleError, OSError, TimeoutError, aiosqlite.Error) as err:
                log.exception("#%s ended but its result could not be stored or posted", generation_id)
                problem = f"the result could not be posted: {err}"
                if generation is not None and self._must_post(generation):
                    self._repost_later(generation_id)
        finally:
            lock.release()
        if self._locks.get(generation_id) is lock and not lock.locked():
            del self._locks[generation_id]
        self._announce(generation_id, generation, problem)

    async def _channel_facts(self, generation: Generation) -> tuple[bool, str | None]:
        """Whether the front end says the result's channel (where a private one was asked for) is marked NSFW, and
        the channel it is a thread of; (False, None) when it cannot tell, so the stricter rule of normal channels
        applies."""
        ask = getattr(self.publisher, "channel_is_nsfw", None)
        parent = getattr(self.publisher, "channel_parent", None)
        if ask is None or generation.channel_id is None:
            return False, None
        try:
            nsfw = bool(await asyncio.wait_for(ask(generation.channel_id), timeout=15))
            return nsfw, (await asyncio.wait_for(parent(generation.channel_id), timeout=15) if parent else None)
        except Exception as err:  # noqa: BLE001 - unknown means normal: a result is never shown by mistake
            log.warning("#%s: could not tell whether channel %s is NSFW (%s); its normal rule applies",
                        generation.id, generation.channel_id, err)
            return False, None

    def _repost_later(self, generation_id: int) -> None:
        """Try posting `generation_id` again after the next of `repost_delays` (one retry pending at a time)."""
        if generation_id in self._reposts and self._reposts[generation_id] < 0:
            return  # a retry is already waiting
        failures = abs(self._reposts.get(generation_id, 0)) + 1
        delay = self.repost_delays[min(failures, len(self.repost_delays)) - 1]
        self._reposts[generation_id] = -failures  # negative: waiting

        async def again() -> None:
            await idle_sleep(delay)
            self._reposts[generation_id] = failures
            log.info("posting #%s again (try %d)", generation_id, failures + 1)
            await self.settle(generation_id)
            if generation_id in self._reposts and self._reposts[generation_id] > 0:
                generation = await self.store.get(generation_id)
                if generation is None or not self._must_post(generation):
                    del self._reposts[generation_id]  # posted (or gone): nothing more to retry

        self._spawn(again())

    async def _post(self, generation: Generation) -> None:
        """Post a result and record its message, as one step a stop cannot cut in two: a message Discord took but
        the store never recorded would be posted again by the next start's reconcile (seen as a duplicate result
        after a restart). A stop waits for the post in hand (up to the publish timeout), then goes on stopping."""
        assert self.publisher is not None
        publisher = self.publisher

        async def post_and_record() -> None:
            # Discord's answer (and the publisher's backoff before a retry): an idle wait, engine/idle.py
            message_id = await idle_wait(asyncio.wait_for(publisher.publish(generation), self.publish_timeout))
            await self.store.mark_posted(generation.id, message_id, time.time())

        posting = asyncio.ensure_future(post_and_record())
        try:
            await idle_wait(asyncio.shield(posting))  # the post above, in its own task so a stop cannot cut it
        except asyncio.CancelledError:
            await asyncio.wait([posting], timeout=self.publish_timeout + 5.0)
            if posting.done() and not posting.cancelled() and posting.exception() is not None:
                log.warning("#%s: posting during a stop failed: %s", generation.id, posting.exception())
            raise

    def _announce(self, generation_id: int, generation: Generation | None, problem: str | None) -> None:
        """Hand a settled generation to whoever waits for it (and to followers arriving late)."""
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

    async def _fail_unstored(self, generation: Generation, err: BaseException, *,
                             results: Iterable[dict[str, Any] | None] = (), reason: str | None = None) -> Generation:
        """The database refused to record `generation`'s end: fail it in memory now (settle announces it), store
        that later.

        Its PNGs are removed (no row would lead to them: they could only fill the disk further) and its
        images still queued or running are cancelled, since the request has failed as a whole."""
        log.error("#%s could not be recorded (%s); it fails now and is stored as failed once the database takes "
                  "writes again", generation.id, err, exc_info=err)
        if is_disk_full(err):
            why = (f"the disk holding the database ({self.store.path.name}) is full, so Noodle could not record "
                   "this request and removed its images")
            advice = ": free space on it (or ask the server owner to), then run it again"
        else:
            why = f"Noodle's database could not record this request ({err}) and removed its images"
            advice = ": try again, and tell the server owner if it keeps happening"
        # a job that failed on the same full disk already says what to do: once is enough
        message = f"{reason}; {why}" if reason else why
        message += "" if reason and advice in reason else advice
        known = [job.result for job in generation.jobs] + list(results)
        await asyncio.to_thread(remove_files, written_files(self.engine.output_dir, known))
        for job in generation.jobs:
            if job.job_id is not None and not job.ended:
                await self.engine.cancel(job.job_id)
        now = time.time()
        jobs = tuple(job if job.state in NOT_DONE else replace(
            job, state="failed", error=why + advice, result=None, image_path=None, image_paths=(),
            finished_at=job.finished_at or now) for job in generation.jobs)
        failed = replace(generation, state="failed", error=message, finished_at=now, jobs=jobs)
        self._unstored[generation.id] = failed
        return failed

    async def _store_unstored(self) -> None:
        """Write the failures kept in memory while the database refused them; the rest wait for the next try."""
        for generation_id, failed in list(self._unstored.items()):
            try:
                await self.store.fail(generation_id, failed.error or "failed", failed.finished_at or time.time())
            except WRITE_FAILED as err:
                log.warning("the database still refuses writes (%s); %d failed requests wait to be recorded", err,
                            len(self._unstored))
                return
            del self._unstored[generation_id]
            log.info("#%s is now recorded as failed", generation_id)

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
                        # read again: the images linked just above are in the row now, and go out with the rest
                        await self._abandon(await self.store.get(generation.id) or generation)
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
                elif info.state in ENDED:
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


def _idx_of(generation: Generation, job_id: str) -> int:
    return next((job.idx for job in generation.jobs if job.job_id == job_id), 1)


def _state_of(generation: Generation | None, job_id: str) -> str | None:
    return next((job.state for job in generation.jobs if job.job_id == job_id), None) if generation else None

