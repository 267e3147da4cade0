"""The worker thread: the one owner of the device. Takes batches off the job table and runs them.

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
from collections.abc import Callable

import torch

from engine.errors import JobCancelled, NodeExecutionError, NoodleError
from engine.events import Event, Executing, Progress
from engine.executor import Executor, RunResult
from engine.queue.batching import SAMPLER_NODES, BatchMember, run_batch
from engine.queue.jobs import JobRecord, JobState
from engine.queue.state_table import JobTable

__all__ = ["Worker", "is_out_of_memory", "message_for"]

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


class _Listener:
    """A job's executor events -> the table's progress; the batch's first job also times sampler steps."""

    def __init__(self, table: JobTable, job: JobRecord, *, timed: bool) -> None:
        self.table, self.job, self.timed = table, job, timed
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
            self.table.progress([self.job], event.node, event.value, event.max, sampler=self.sampler,
                                seconds=seconds, steps=steps)


class Worker(threading.Thread):
    """Runs the table's jobs on the executor, one batch at a time, until the table stops."""

    def __init__(self, executor: Executor, table: JobTable) -> None:
        super().__init__(name="noodle-engine", daemon=True)
        self.executor, self.table = executor, table

    def run(self) -> None:
        while True:
            try:
                batch = self.table.next_batch()
            except Exception:  # the store could not be written: those jobs stay queued in it
                log.exception("could not start the next jobs")
                continue
            if not batch:
                return
            try:
                self._run(batch)
            except Exception as err:  # a bug of ours: fail what is left of the batch, keep the thread
                log.exception("the engine failed running %s", [job.job_id for job in batch])
                for job in batch:
                    if job.state is JobState.RUNNING:
                        self.table.finish(job, JobState.FAILED, error=message_for(err, self.executor.device))

    def _run(self, batch: list[JobRecord]) -> None:
        listeners = [_Listener(self.table, job, timed=index == 0) for index, job in enumerate(batch)]
        if len(batch) == 1:
            outcomes: list[RunResult | Exception] = [self._solo(batch[0], listeners[0])]
        else:
            members = [BatchMember(self._prompt(job), job.job_id, listener, self._interrupt(job))
                       for job, listener in zip(batch, listeners)]
            outcomes = run_batch(self.executor, members)
        if any(isinstance(o, Exception) and is_out_of_memory(o) for o in outcomes):
            self._free_memory()
        put_back: list[JobRecord] = []
        alone: list[JobRecord] = []
        for job, outcome in zip(batch, outcomes):
            if isinstance(outcome, RunResult):
                self.table.finish(job, JobState.DONE, result=outcome.to_dict())
            elif isinstance(outcome, JobCancelled) and job.cancel_requested:
                who = "" if job.cancel_by is None else f" by {job.cancel_by.user_id}"
                self.table.finish(job, JobState.CANCELLED, error=f"cancelled{who} while it was running")
            elif isinstance(outcome, JobCancelled) and (elapsed := self.table.overtime(job)) is not None:
                # each job's own limit: a batch stopped for one of its jobs puts the others back
                self.table.finish(job, JobState.FAILED, error=self.table.overtime_message(elapsed))
            elif isinstance(outcome, JobCancelled):
                put_back.append(job)  # the service is stopping, or a batch-mate was cancelled
            elif len(batch) > 1 and is_out_of_memory(outcome):
                alone.append(job)  # a batch may not fit where each job alone does
            else:
                self.table.finish(job, JobState.FAILED, error=message_for(outcome, self.executor.device))
        if put_back:
            self.table.requeue(put_back)
        if alone:
            self.table.requeue(alone, solo=True)

    def _solo(self, job: JobRecord, listener: _Listener) -> RunResult | Exception:
        try:
            return self.executor.run(self._prompt(job), prompt_id=job.job_id, listener=listener,
                                     is_cancelled=self._interrupt(job))
        except Exception as err:  # the job's failure, told to its owner by _run
            return err

    @staticmethod
    def _prompt(job: JobRecord) -> object:
        return job.prompt if job.prompt is not None else job.workflow

    def _interrupt(self, job: JobRecord) -> Callable[[], bool]:
        return lambda: self.table.interrupted(job)

    def _free_memory(self) -> None:
        """After an out-of-memory error, as ComfyUI does: every model and cached output goes."""
        log.warning("out of memory: unloading every model and clearing the caches")
        self.executor.models.unload_all()
        self.executor.cache.clear()
        self.executor.models.prompt_cache.clear()
