"""The job table: every job's state, shared by the event loop's side of the service and the worker thread.

One lock guards the records, the fair order (fairness.py) and the running batch. Each state
change is written to the store (job_store.py) outside the lock, then told as a `JobEvent`
through `emit`, which the service makes thread-safe (`loop.call_soon_threadsafe`). Methods that write
run in a thread, never on the event loop: the worker's own, or `asyncio.to_thread` for the service's.
"""

from __future__ import annotations

import json
import logging
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

from engine.errors import QueueFull
from engine.queue.fairness import Entry, FairQueue, StepRate
from engine.queue.job_store import JobStore
from engine.queue.jobs import ACTIVE, ENDED, JobEvent, JobInfo, JobRecord, JobState, Owner
from engine.queue.messages import crashed_message, lost_message, seconds_text, who_text
from engine.settings import QueueSettings
from engine.validate import ValidatedPrompt

__all__ = ["JobTable", "Prepare"]

log = logging.getLogger(__name__)

# workflow -> (validated prompt, batch key, sampler steps); raises WorkflowInvalid
Prepare = Callable[[dict[str, Any]], tuple[ValidatedPrompt, "str | None", int]]
T = TypeVar("T")  # a worker, as the dispatcher names it
KEEP_FINISHED = 1000  # finished jobs kept in memory for handles and /queue history; the store keeps all


class JobTable:
    """Jobs in memory, in the fair order, stored and announced on every change."""

    def __init__(self, store: JobStore, settings: QueueSettings, prepare: Prepare,
                 emit: Callable[[JobEvent], None]) -> None:
        self.store, self.settings, self._prepare, self._emit = store, settings, prepare, emit
        self._cond = threading.Condition()
        self._queue = FairQueue()
        self._jobs: dict[str, JobRecord] = {}  # oldest first
        self._reserved: set[str] = set()  # admitted but not stored yet
        self._running: list[JobRecord] = []  # every running job (of every worker's batch)
        self._left: dict[str, int] = {}  # sampler steps each running job has left
        self._started: dict[str, float] = {}  # time.monotonic() when each running job started, for its time limit
        self._told: dict[str, int] = {}  # the position each queued job was last told
        self.rate = StepRate()
        self.lanes = 1  # workers running batches side by side (engine/cluster/ sets it): ETAs divide by it
        self.stopping = False

    # -- the service's side (called through asyncio.to_thread) ------------------------------

    def submit(self, workflow: dict[str, Any], owner: Owner, extra: dict[str, Any]) -> JobRecord:
        """Validate, check the caps, store, then queue: the job is durable before it can run."""
        prompt, key, steps = self._prepare(workflow)
        try:
            json.dumps(extra)
        except (TypeError, ValueError) as err:
            raise ValueError(f"extra is stored with the job as JSON and must be JSON-serializable: {err}") from err
        api = workflow if isinstance(workflow, dict) else prompt.workflow.to_api()
        job = JobRecord(uuid.uuid4().hex, owner, api, dict(extra), time.time(), prompt=prompt, key=key, steps=steps)
        with self._cond:
            self._check_caps(owner)
            job.seq = job.line = self._queue.ticket()
            self._jobs[job.job_id] = job
            self._reserved.add(job.job_id)
        try:
            self.store.insert(job)
        except BaseException:
            with self._cond:
                self._reserved.discard(job.job_id)
                self._jobs.pop(job.job_id, None)
            raise
        with self._cond:
            self._reserved.discard(job.job_id)
            self._enqueue(job)
            self._announce()
            self._cond.notify_all()
        return job

    def resume(self) -> list[JobRecord]:
        """Pick up the stored queue after a restart: queued jobs in their order, running ones retried once."""
        jobs = self.store.active()
        changed = []
        for job in jobs:
            if job.state is JobState.RUNNING:
                if self.settings.retry_running_once and job.attempts < 2:
                    # runs first; its attempts keep the run the crash cut short
                    job.state, job.front = JobState.QUEUED, True
                else:
                    job.state, job.error = JobState.FAILED, crashed_message(job.attempts, self.settings)
                changed.append(job)
            if job.state is JobState.QUEUED:
                try:
                    job.prompt, job.key, job.steps = self._prepare(job.workflow)
                except Exception as err:  # a model removed while Noodle was down: say so now
                    job.state, job.error = JobState.FAILED, f"this job could not run after a restart: {err}"
                    changed.append(job)
        self.store.save(changed)
        with self._cond:
            for job in jobs:
                self._jobs[job.job_id] = job
                if job.state is JobState.QUEUED:
                    self._enqueue(job)
            for job in jobs:
                if job.state is JobState.FAILED:
                    self._emit(JobEvent(job.job_id, "failed", error=job.error))
            self._announce()
            self._cond.notify_all()
        return jobs

    def cancel(self, job_id: str, by: Owner | None) -> bool:
        """Remove a queued job, or ask a running one to stop at its next sampler step; False if neither."""
        with self._cond:
            job = self._jobs.get(job_id)
            if job is None or job.state not in ACTIVE or job.job_id in self._reserved:
                return False
            if by is not None and by.user_id != job.owner.user_id:
                return False  # only the owner; moderators cancel with by=None
            if job.state is JobState.RUNNING:
                job.cancel_requested, job.cancel_by = True, by
                return True
            lines = self._queue.remove(job_id)
            self._apply_lines(lines)
            job.state, job.error = JobState.CANCELLED, f"cancelled{who_text(by)} while it was queued"
        self._write([job], lines)
        with self._cond:
            self._emit(JobEvent(job_id, "cancelled", error=job.error))
            self._announce()
            self._forget_old()
        return True

    def stop(self) -> None:
        """Start nothing new; the running batch stops at its next step and goes back to the queue."""
        with self._cond:
            self.stopping = True
            self._cond.notify_all()

    # -- reading (cheap: fine on the event loop) ------------------------------------------------

    def get(self, job_id: str) -> JobRecord | None:
        with self._cond:
            return self._jobs.get(job_id)

    def position(self, job_id: str) -> int | None:
        with self._cond:
            return self._queue.positions().get(job_id)

    def infos(self, owner: Owner | None, states: Iterable[JobState]) -> list[JobInfo]:
        """Jobs in the given states: running first, then queued in order, then the rest, newest first."""
        wanted = set(states)
        with self._cond:
            positions = self._queue.positions()
            etas = self._etas()
            jobs = [j for j in self._jobs.values() if j.state in wanted and j.job_id not in self._reserved
                    and (owner is None or j.owner.user_id == owner.user_id)]
        rank = {JobState.RUNNING: 0, JobState.QUEUED: 1}
        jobs.sort(key=lambda j: (rank.get(j.state, 2), positions.get(j.job_id, 0), -j.created_at))
        return [j.info(positions.get(j.job_id), etas.get(j.job_id)) for j in jobs]

    # -- the worker's side ------------------------------------------------------------------------

    def next_batch(self, poll_seconds: float = 1.0) -> list[JobRecord]:
        """Wait for queued jobs; take the next batch, marked running and stored. [] once stopping."""
        with self._cond:
            while not self.stopping and not len(self._queue):
                self._cond.wait(timeout=poll_seconds)
            if self.stopping:
                return []
            batch, lines = self._take(None)
        self._started_batches([batch], lines)
        return batch

    def wait_for_jobs(self, timeout: float) -> bool:
        """Block until a job is queued, `wake` is called or `timeout` s pass; whether any is queued (False once
        stopping)."""
        with self._cond:
            if not self.stopping and not len(self._queue):
                self._cond.wait(timeout=timeout)
            return not self.stopping and len(self._queue) > 0

    def wake(self) -> None:
        """Wake a `wait_for_jobs` (a worker became free)."""
        with self._cond:
            self._cond.notify_all()

    def start_routed(self, assign: Callable[[list[JobRecord]], list[tuple[T, JobRecord]]]
                     ) -> list[tuple[T, list[JobRecord]]]:
        """Several workers' next batches at once: `assign(queued jobs in the fair order)` picks (worker, job)
        pairs; each job starts a batch with the queued jobs that may share it (FairQueue.take). A pick whose job
        joined an earlier pick's batch is dropped: its worker stays free for the next call."""
        with self._cond:
            if self.stopping or not len(self._queue):
                return []
            picks = assign([self._jobs[entry.job_id] for entry in self._queue.order()])
            started: list[tuple[T, list[JobRecord]]] = []
            lines: dict[str, int] = {}
            for worker, job in picks:
                if job.state is not JobState.QUEUED:
                    continue
                batch, changed = self._take(job.job_id)
                lines.update(changed)
                started.append((worker, batch))
        self._started_batches([batch for _, batch in started], lines)
        return started

    def _take(self, head: str | None) -> tuple[list[JobRecord], dict[str, int]]:
        """Inside the lock: the batch starting with `head` (None: the next in the fair order), marked running."""
        entries, lines = self._queue.take(self.settings.batch_max, start=head)
        self._apply_lines(lines)
        batch = [self._jobs[e.job_id] for e in entries]
        started = time.monotonic()
        for job in batch:
            job.state = JobState.RUNNING
            job.attempts += 1
            self._started[job.job_id] = started  # the limit counts from here, not from the queue
            self._left[job.job_id] = max(j.steps for j in batch)
        self._running.extend(batch)
        return batch, lines

    def _started_batches(self, batches: list[list[JobRecord]], lines: dict[str, int]) -> None:
        jobs = [job for batch in batches for job in batch]
        if not jobs:
            return
        # durable before it runs: a crash from here on counts as an attempt
        self._write(jobs, lines)
        with self._cond:
            for job in jobs:
                self._emit(JobEvent(job.job_id, "started", eta_s=self._eta_of(job.job_id)))
            self._announce()

    def progress(self, jobs: list[JobRecord], node: str, value: int, maximum: int, *, sampler: bool,
                 seconds: float | None = None, steps: int = 0) -> None:
        """A node of the running batch moved on; `seconds` over `steps` sampler steps feed the step rate."""
        with self._cond:
            if sampler and seconds is not None:
                self.rate.observe(seconds, steps)
            for job in jobs:
                if sampler and job.job_id in self._left:
                    self._left[job.job_id] = max(0, maximum - value)
                self._emit(JobEvent(job.job_id, "progress", eta_s=self._eta_of(job.job_id), node=node, value=value,
                                    max=maximum))

    def finish(self, job: JobRecord, state: JobState, *, result: dict[str, Any] | None = None,
               error: str | None = None) -> None:
        """A running job ended: done, failed or cancelled."""
        with self._cond:
            job.state, job.result, job.error = state, result, error
            self._not_running(job)
        self._write([job])
        with self._cond:
            self._emit(JobEvent(job.job_id, str(state), result=result, error=error))  # type: ignore[arg-type]
            self._announce()
            self._forget_old()

    def requeue(self, jobs: list[JobRecord], *, solo: bool = False) -> None:
        """Put running jobs back in front (not counted as an attempt); `solo`: never batch them. One whose cancel
        came after its batch stopped (its owner cancels every image of a batch, one after another) is cancelled:
        `cancel` said yes to it."""
        cancelled: list[JobRecord] = []
        with self._cond:
            for job in jobs:
                self._not_running(job)  # a new run, a new deadline
                if job.cancel_requested:
                    job.state = JobState.CANCELLED
                    job.error = f"cancelled{who_text(job.cancel_by)} while it was running"
                    cancelled.append(job)
                    continue
                job.state, job.attempts, job.front = JobState.QUEUED, max(0, job.attempts - 1), True
                job.solo = job.solo or solo
                self._enqueue(job)
        self._write(jobs)
        with self._cond:
            for job in cancelled:
                self._emit(JobEvent(job.job_id, "cancelled", error=job.error))
            self._announce()
            if cancelled:
                self._forget_old()
            self._cond.notify_all()

    def lost(self, jobs: list[JobRecord], where: str) -> None:
        """Running jobs whose worker died (`where` says which): each runs once more, first in the queue, as after
        a crash of Noodle ([queue] retry_running_once; the run that died counts), or fails with why."""
        again: list[JobRecord] = []
        with self._cond:
            for job in jobs:
                if job.state is not JobState.RUNNING:
                    continue
                self._not_running(job)
                job.cancel_requested, job.cancel_by = False, None
                if self.settings.retry_running_once and job.attempts < 2 and not self.stopping:
                    job.state, job.front = JobState.QUEUED, True
                    self._enqueue(job)
                    again.append(job)
                else:
                    job.state, job.error = JobState.FAILED, lost_message(job.attempts, where, self.settings)
        self._write([job for job in jobs if job.state in (JobState.QUEUED, JobState.FAILED)])
        with self._cond:
            for job in jobs:
                if job.state is JobState.FAILED:
                    self._emit(JobEvent(job.job_id, "failed", error=job.error))
            self._announce()
            self._forget_old()
            self._cond.notify_all()
        if again:
            log.warning("%s died running %s; they run once more", where, [job.job_id for job in again])

    def interrupted(self, job: JobRecord) -> bool:
        """Whether the running `job` should stop at its next step (cancelled, past its time limit, or stopping)."""
        return job.cancel_requested or self.stopping or self.overtime(job) is not None

    def overtime(self, job: JobRecord) -> float | None:
        """Seconds the running `job` has run once that reaches [queue] job_time_limit_seconds; None before."""
        limit = self.settings.job_time_limit_seconds
        started = self._started.get(job.job_id)
        if not limit or started is None:
            return None
        elapsed = time.monotonic() - started
        return elapsed if elapsed >= limit else None

    def overtime_message(self, elapsed: float) -> str:
        """What the owner of a job stopped by the time limit is told."""
        return (f"stopped after {seconds_text(elapsed)} s: the limit is {self.settings.job_time_limit_seconds:g} s "
                "([queue] job_time_limit_seconds in config.toml); use fewer steps or a smaller size")

    def _write(self, jobs: list[JobRecord], lines: dict[str, int] | None = None) -> None:
        """Store state changes; a database error is logged and the queue goes on in memory."""
        try:
            self.store.save(jobs, lines)
        except sqlite3.Error:
            log.exception("could not store the state of jobs %s; they go on, but a restart would not know",
                          [job.job_id for job in jobs])

    # -- inside the lock --------------------------------------------------------------------------

    def _enqueue(self, job: JobRecord) -> None:
        key = None if job.solo else job.key
        self._queue.restore(Entry(job.job_id, job.owner.user_id, job.seq, job.line, job.steps, key, job.front))

    def _not_running(self, job: JobRecord) -> None:
        self._running = [j for j in self._running if j is not job]
        self._started.pop(job.job_id, None)
        self._left.pop(job.job_id, None)

    def _apply_lines(self, lines: dict[str, int]) -> None:
        for job_id, line in lines.items():
            self._jobs[job_id].line = line

    def _check_caps(self, owner: Owner) -> None:
        active = [j for j in self._jobs.values() if j.state in ACTIVE]
        mine = [j for j in active if j.owner.user_id == owner.user_id]
        limits = self.settings
        if len(mine) >= limits.per_user_max:
            raise QueueFull(f"you already have {len(mine)} jobs in the queue, the most one person may have "
                            f"(queue.per_user_max = {limits.per_user_max} in config.toml): {self._listing(mine)}; "
                            "wait for one to finish or cancel one")
        if len(active) >= limits.global_max:
            yours = f"; yours: {self._listing(mine)}" if mine else "; none of them is yours"
            raise QueueFull(f"the queue is full: {len(active)} jobs are queued or running, the most this server "
                            f"takes (queue.global_max = {limits.global_max} in config.toml){yours}; try again when "
                            "it is shorter")

    def _listing(self, jobs: list[JobRecord]) -> str:
        positions = self._queue.positions()
        return ", ".join(f"{j.job_id[:8]} ({'running' if j.state is JobState.RUNNING else 'queued'}"
                         f"{f', position {positions[j.job_id]}' if j.job_id in positions else ''})" for j in jobs)

    def _etas(self) -> dict[str, float | None]:
        etas = self._queued_etas()
        for job in self._running:
            etas[job.job_id] = self._eta_of(job.job_id)
        return etas

    def _queued_etas(self) -> dict[str, float | None]:
        # the first worker to be free starts the next job; `lanes` workers share what waits
        first_free = min(self._left.values(), default=0)
        return self._queue.etas(self.rate.value, first_free, lanes=self.lanes)

    def _eta_of(self, job_id: str) -> float | None:
        return None if self.rate.value is None else self._left.get(job_id, 0) * self.rate.value

    def _announce(self) -> None:
        """Tell each queued job its place when it is new or has changed."""
        positions = self._queue.positions()
        etas = self._queued_etas()
        for job_id, position in positions.items():
            told = self._told.get(job_id)
            if told != position:
                kind = "queued" if told is None and self._jobs[job_id].attempts == 0 else "position"
                self._emit(JobEvent(job_id, kind, position=position, eta_s=etas[job_id]))
        self._told = positions

    def _forget_old(self) -> None:
        finished = [job_id for job_id, job in self._jobs.items() if job.state in ENDED]
        for job_id in finished[:max(0, len(finished) - KEEP_FINISHED)]:
            del self._jobs[job_id]
