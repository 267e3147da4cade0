"""A queued job's data: who asked, its state, the events a front end follows, the row a /queue shows.

The package (engine/queue/__init__.py) exports these as its API; job_store.py stores `JobRecord`s; the
job table (state_table.py) changes them under its lock.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Literal

from engine.validate import ValidatedPrompt

__all__ = ["ACTIVE", "ENDED", "EventKind", "JobEvent", "JobInfo", "JobRecord", "JobState", "Owner", "WorkerInfo"]


@dataclass(frozen=True)
class Owner:
    """Who a job belongs to: fairness and caps count per user."""

    user_id: str  # a Discord user id as a string, or "console:<name>"
    guild_id: str | None = None


class JobState(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"


ACTIVE = (JobState.QUEUED, JobState.RUNNING)
# a job's last states, and the kinds of its last event: the one spelling of "ended" (the bot reads it too)
ENDED = frozenset({JobState.DONE, JobState.FAILED, JobState.CANCELLED})

EventKind = Literal["queued", "position", "started", "progress", "done", "failed", "cancelled"]


@dataclass(frozen=True)
class JobEvent:
    """Something that happened to a job, for a front end to show."""

    job_id: str
    kind: EventKind
    position: int | None = None  # kind queued/position: 1 = next to run
    eta_s: float | None = None  # seconds until done, from recent step times (None before any step ran)
    node: str | None = None  # kind progress: the node id running
    value: int | None = None  # kind progress: sampler step
    max: int | None = None
    result: dict | None = None  # kind done: RunResult.to_dict() (prompt_id, outputs, meta)
    error: str | None = None  # kind failed/cancelled: a message a user can act on

    @property
    def final(self) -> bool:
        """The last event of a job: done, failed or cancelled."""
        return self.kind in ENDED


@dataclass(frozen=True)
class JobInfo:
    """A job as /queue lists it, and what a front end reads back after a restart."""

    job_id: str
    owner: Owner
    state: JobState
    position: int | None
    eta_s: float | None
    extra: dict  # what the front end stored at submit (channel id, request...)
    created_at: float
    error: str | None
    result: dict | None
    attempts: int
    cancel_requested: bool = False  # a running job asked to stop at its next sampler step
    worker: str | None = None  # the engine worker running it (or that ran it last), [engine] workers = "ray"


@dataclass(frozen=True)
class WorkerInfo:
    """An engine worker as /queue and the admin view show it."""

    name: str
    host: str
    device: str  # "cuda:0 (NVIDIA H200)", "cpu"
    state: str  # idle, running, starting, refused (its models differ: `note`), dead
    holds: tuple[str, ...]  # checkpoints in memory, least recently used first
    running: tuple[str, ...]  # job ids
    jobs_done: int
    loads: int  # checkpoint loads so far
    note: str = ""
    joined: bool = False  # started by `noodle worker` on its own machine, not by the bot


@dataclass(eq=False)
class JobRecord:
    """A job as the service keeps it; the job table changes it under its lock, the store writes it."""

    job_id: str
    owner: Owner
    workflow: dict[str, Any]  # the API-format graph as submitted
    extra: dict[str, Any]
    created_at: float
    seq: int = 0  # FairQueue's order (fairness.py), stored so a restart keeps it
    line: int = 0
    state: JobState = JobState.QUEUED
    attempts: int = 0  # times it started running
    front: bool = False  # put back after it started (crash, stop, a batch-mate's cancel): runs first
    error: str | None = None
    result: dict[str, Any] | None = None
    # not stored: worked out again from the workflow after a restart
    prompt: ValidatedPrompt | None = None
    key: str | None = None  # batch compatibility (batching.py)
    steps: int = 0
    solo: bool = False  # ran out of memory in a batch: run it alone
    cancel_by: Owner | None = field(default=None)
    cancel_requested: bool = False
    worker: str | None = None  # the engine worker it runs on ([engine] workers = "ray")

    def info(self, position: int | None = None, eta_s: float | None = None) -> JobInfo:
        return JobInfo(self.job_id, self.owner, self.state, position, eta_s, dict(self.extra), self.created_at,
                       self.error, self.result, self.attempts, self.cancel_requested, self.worker)
