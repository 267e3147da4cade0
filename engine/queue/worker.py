"""Running a batch of jobs on an executor, and the local worker thread: the one owner of the device.

`run_jobs` runs one batch and says how each job ended (`Outcome`, plain data); `settle` records that in the
job table. The `Worker` thread does both in this process; a Ray worker (engine/cluster/) runs `run_jobs` in
its own process and the dispatcher `settle`s what it sends back.

Nothing here touches the event loop: progress and results go through the job table, which stores them
and hands them to the service. A job's failure is that job's alone: an exception in a node, a
corrupt model file, an out-of-memory error (of the GPU or of the CPU allocator; it also frees the
caches) or its time limit becomes a message for its owner, and the thread goes on with the next job.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from engine.errors import JobCancelled, NodeExecutionError, NoodleError
from engine.events import Event, Executing, Progress
from engine.executor import Executor, RunResult
from engine.heap import return_freed_memory
from engine.queue.batching import SAMPLER_NODES, BatchMember, run_batch
from engine.queue.jobs import JobRecord, JobState
from engine.queue.state_table import JobTable

__all__ = ["BatchJob", "Outcome", "Worker", "free_memory", "is_out_of_memory", "message_for", "run_jobs", "settle"]

log = logging.getLogger(__name__)

# torch's CPU allocator when malloc fails: "[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator:
# can't allocate memory: you tried to allocate 1125899906842624 bytes. Error code 12 (Cannot allocate memory)"
CPU_ALLOCATION_FAILED = re.compile(r"can't allocate memory(?:: you tried to allocate (\d+) bytes)?")


def _causes(err: BaseException) -> list[BaseException]:
    """`err` and what it wraps: a node's failure, then each `__cause__`."""
    chain: list[BaseException] = []
    current: BaseException | None = err
    while current is not None and all(current is not seen for seen in chain):
        chain.append(current)
        current = current.cause if isinstance(current, NodeExecutionError) else current.__cause__
    return chain


def _cpu_allocation(err: BaseException) -> re.Match[str] | None:
    return next((match for cause in _causes(err) if isinstance(cause, RuntimeError)
                 and (match := CPU_ALLOCATION_FAILED.search(str(cause))) is not None), None)


def is_out_of_memory(err: BaseException) -> bool:
    """torch's CUDA OOM, Python's MemoryError, a backend's "out of memory" RuntimeError or the CPU allocator's
    "can't allocate memory", however wrapped."""
    return _cpu_allocation(err) is not None or any(
        isinstance(cause, (torch.cuda.OutOfMemoryError, MemoryError))
        or (isinstance(cause, RuntimeError) and "out of memory" in str(cause).lower()) for cause in _causes(err))


def message_for(err: BaseException, device: torch.device) -> str:
    """What the owner of a failed job is told."""
    where = f" while running node {err.node_id} ({err.class_type})" if isinstance(err, NodeExecutionError) else ""
    if is_out_of_memory(err):
        cpu = _cpu_allocation(err)
        gpu = any(isinstance(cause, torch.cuda.OutOfMemoryError) for cause in _causes(err))
        what = "GPU" if gpu or (device.type == "cuda" and cpu is None) else "machine"
        asked = f", asking for {_size(int(cpu[1]))} at once" if cpu is not None and cpu[1] else ""
        return (f"the {what} ran out of memory{where}{asked}; the caches were freed: try a smaller size or batch, "
                "or fewer LoRAs")
    if isinstance(err, NoodleError):
        return str(err)
    return (f"the engine failed unexpectedly{where} ({type(err).__name__}: {err}); try again, and tell the "
            "server owner if it keeps happening")


def _size(nbytes: int) -> str:
    """1125899906842624 -> "1.0 PiB": what a person reads in an error message."""
    value = float(nbytes)
    for unit in ("bytes", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024:
            return f"{nbytes} bytes" if unit == "bytes" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} PiB"


# what a listener reports: (node, value, max, sampler?, seconds over `steps` sampler steps or None, steps)
Report = Callable[[str, int, int, bool, "float | None", int], None]


@dataclass(frozen=True)
class Outcome:
    """How one job of a batch ended on its executor, in plain data: a Ray worker sends it back as it is."""

    result: dict[str, Any] | None = None  # RunResult.to_dict() when it ran
    error: str | None = None  # what its owner is told (message_for) when it failed
    interrupted: bool = False  # stopped by its interrupt check: a cancel, its time limit, a stop, a batch-mate's
    out_of_memory: bool = False


class StepListener:
    """A job's executor events -> `report`; the batch's first job also times sampler steps (for the ETAs)."""

    def __init__(self, report: Report, *, timed: bool) -> None:
        self.report, self.timed = report, timed
        self.sampler = False
        self.last: tuple[int, float] | None = None

    def __call__(self, event: Event) -> None:
        if isinstance(event, Executing):
            self.sampler, self.last = event.class_type in SAMPLER_NODES, None
        elif isinstance(event, Progress):
            seconds = None
            steps = 0
            if self.sampler and self.timed:
                now = time.perf_counter()
                if self.last is not None and event.value > self.last[0]:
                    seconds, steps = now - self.last[1], event.value - self.last[0]
                self.last = (event.value, now)
            self.report(event.node, event.value, event.max, self.sampler, seconds, steps)


@dataclass(frozen=True)
class BatchJob:
    """One job of a batch as an executor runs it: the local worker's and a Ray worker's input."""

    job_id: str
    prompt: Any  # a ValidatedPrompt, or the API workflow to validate
    report: Report
    interrupted: Callable[[], bool]


def run_jobs(executor: Executor, jobs: Sequence[BatchJob]) -> list[Outcome]:
    """Run one batch (compatible jobs: batching.py) on `executor`; each job's outcome, never an exception.
    An out-of-memory error frees every model and cache, as ComfyUI does."""
    listeners = [StepListener(job.report, timed=index == 0) for index, job in enumerate(jobs)]
    raw: list[RunResult | Exception]
    try:
        if len(jobs) == 1:
            raw = [executor.run(jobs[0].prompt, prompt_id=jobs[0].job_id, listener=listeners[0],
                                is_cancelled=jobs[0].interrupted)]
        else:
            members = [BatchMember(job.prompt, job.job_id, listener, job.interrupted)
                       for job, listener in zip(jobs, listeners)]
            raw = run_batch(executor, members)
    except Exception as err:  # a solo job's failure; for a batch, a bug of ours: every job fails with it
        if len(jobs) > 1:
            log.exception("the engine failed running %s", [job.job_id for job in jobs])
        raw = [err] * len(jobs)
    if any(isinstance(o, Exception) and is_out_of_memory(o) for o in raw):
        free_memory(executor)
    return [Outcome(result=o.to_dict()) if isinstance(o, RunResult)
            else Outcome(interrupted=True) if isinstance(o, JobCancelled)
            else Outcome(error=message_for(o, executor.device), out_of_memory=is_out_of_memory(o)) for o in raw]


def settle(table: JobTable, batch: list[JobRecord], outcomes: Sequence[Outcome]) -> None:
    """Record how each job of a batch ended: done, failed, cancelled, or back in the queue."""
    put_back: list[JobRecord] = []
    alone: list[JobRecord] = []
    for job, outcome in zip(batch, outcomes):
        if outcome.result is not None:
            table.finish(job, JobState.DONE, result=outcome.result)
        elif outcome.interrupted and job.cancel_requested:
            who = "" if job.cancel_by is None else f" by {job.cancel_by.user_id}"
            table.finish(job, JobState.CANCELLED, error=f"cancelled{who} while it was running")
        elif outcome.interrupted and (elapsed := table.overtime(job)) is not None:
            # each job's own limit: a batch stopped for one of its jobs puts the others back
            table.finish(job, JobState.FAILED, error=table.overtime_message(elapsed))
        elif outcome.interrupted:
            put_back.append(job)  # the service is stopping, or a batch-mate was cancelled
        elif len(batch) > 1 and outcome.out_of_memory:
            alone.append(job)  # a batch may not fit where each job alone does
        else:
            table.finish(job, JobState.FAILED, error=outcome.error or "failed")
    if put_back:
        table.requeue(put_back)
    if alone:
        table.requeue(alone, solo=True)


def free_memory(executor: Executor) -> None:
    """After an out-of-memory error, as ComfyUI does: every model and cached output goes."""
    log.warning("out of memory: unloading every model and clearing the caches")
    executor.models.unload_all()
    executor.cache.clear()
    executor.models.prompt_cache.clear()


class Worker(threading.Thread):
    """Runs the table's jobs on the executor in this process, one batch at a time, until the table stops
    ([engine] workers = "local"; engine/cluster/ runs them on Ray workers instead)."""

    # a queue quiet this long gives the CPU heap's kept memory back (engine/heap.py): a burst of jobs keeps it,
    # an idle bot does not sit on it
    idle_seconds = 30.0

    def __init__(self, executor: Executor, table: JobTable) -> None:
        super().__init__(name="noodle-engine", daemon=True)
        self.executor, self.table = executor, table

    def run(self) -> None:
        while True:
            if not self.table.wait_for_jobs(self.idle_seconds):
                return_freed_memory()
            try:
                batch = self.table.next_batch()
            except Exception:  # the store could not be written: those jobs stay queued in it
                log.exception("could not start the next jobs")
                continue
            if not batch:
                return
            try:
                settle(self.table, batch, run_jobs(self.executor, [self.batch_job(job) for job in batch]))
            except Exception as err:  # a bug of ours: fail what is left of the batch, keep the thread
                log.exception("the engine failed running %s", [job.job_id for job in batch])
                for job in batch:
                    if job.state is JobState.RUNNING:
                        self.table.finish(job, JobState.FAILED, error=message_for(err, self.executor.device))

    def batch_job(self, job: JobRecord) -> BatchJob:
        def report(node: str, value: int, maximum: int, sampler: bool, seconds: float | None, steps: int) -> None:
            self.table.progress([job], node, value, maximum, sampler=sampler, seconds=seconds, steps=steps)

        prompt = job.prompt if job.prompt is not None else job.workflow
        return BatchJob(job.job_id, prompt, report, lambda: self.table.interrupted(job))
