"""The rows of the bot's history as frozen dataclasses: a generation (one request, one posted message) and
its jobs (one per image for /imagine, each with its own seed and workflow; one for a /workflow, which
may write several images).

bot/core/storage/store.py reads and writes them; the services, the cards and both front ends only read them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from engine.queue import ENDED

__all__ = ["ENDED", "NOT_DONE", "TERMINAL", "Generation", "GenerationKind", "GenerationState", "JobRow",
           "JobRowState", "NewGeneration", "Outcome"]

# upscale: U1-U4; outpaint: zoom out and pan; remix: ✏️ (the parent's request with an edited prompt and numbers)
GenerationKind = Literal["imagine", "reroll", "variation", "workflow", "upscale", "outpaint", "remix"]
# `submitting`: stored, its jobs not yet in the engine's queue; the rest as the engine's JobState
JobRowState = Literal["submitting", "queued", "running", "done", "failed", "cancelled"]
GenerationState = Literal["submitting", "queued", "running", "done", "failed", "cancelled", "deleted"]

# ENDED (a job's last states) is the engine's set; a generation has one more way to be over
TERMINAL: frozenset[str] = ENDED | {"deleted"}
NOT_DONE: frozenset[str] = ENDED - {"done"}  # ended without its result: failed or cancelled


@dataclass(frozen=True)
class NewGeneration:
    """What is known when a request is accepted, before the engine has its jobs."""

    kind: GenerationKind
    front: str
    requester_id: str
    request: dict[str, Any]
    params: dict[str, Any]
    model_name: str
    images: list[tuple[int, dict[str, Any]]]  # (seed, workflow) per image, in order
    guild_id: str | None = None
    channel_id: str | None = None
    parent_id: int | None = None


@dataclass(frozen=True)
class JobRow:
    """One image's engine job."""

    idx: int
    job_id: str | None
    seed: int
    workflow: dict[str, Any]
    state: JobRowState
    result: dict[str, Any] | None = None
    image_path: str | None = None  # the first PNG (the only one of an /imagine job)
    error: str | None = None
    started_at: float | None = None
    finished_at: float | None = None
    image_paths: tuple[str, ...] = ()  # every PNG the job wrote, in output order (schema 3 on)

    @property
    def ended(self) -> bool:
        """The job will not change any more."""
        return self.state in ENDED

    @property
    def paths(self) -> list[str]:
        """Every PNG of this job; rows written before schema 3 know only their one `image_path`."""
        return list(self.image_paths) or ([self.image_path] if self.image_path else [])


@dataclass(frozen=True)
class Outcome:
    """What settling a generation writes: its verdict and the numbers the card shows."""

    state: Literal["done", "failed", "cancelled"]  # done: at least one image
    images: dict[int, str]  # idx -> the job's first PNG path as SaveImage wrote it
    tokens: dict[str, Any]
    cached: list[str]
    timings: dict[str, float]
    model_hash: str | None
    finished_at: float
    error: str | None = None
    # idx -> every PNG path of the job, in output order (a /workflow job may write several); a job
    # missing here has just its `images` path
    all_images: dict[int, list[str]] = field(default_factory=dict)


@dataclass(frozen=True)
class Generation:
    """One request: its options, the params its images share, its jobs, and where its result went."""

    id: int
    kind: GenerationKind
    parent_id: int | None
    front: str
    state: GenerationState
    requester_id: str
    guild_id: str | None
    channel_id: str | None
    message_id: str | None
    request: dict[str, Any]
    params: dict[str, Any]
    model_name: str
    model_hash: str | None
    created_at: float
    jobs: tuple[JobRow, ...] = ()
    tokens: dict[str, Any] = field(default_factory=dict)
    cached: list[str] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    error: str | None = None
    started_at: float | None = None
    finished_at: float | None = None
    posted_at: float | None = None
    deleted_at: float | None = None
    nsfw_scores: tuple[float, ...] = ()  # open_nsfw's score of each image (schema 4 on; none before review)
    safety: str | None = None  # allow | spoiler | block: what the server's rules did with it (None: not reviewed)

    @property
    def nsfw_score(self) -> float | None:
        """The highest image score, or None when nothing was scored."""
        return max(self.nsfw_scores) if self.nsfw_scores else None

    @property
    def job_id(self) -> str | None:
        """The first image's job id: the one a result shows and `react JOB` takes (any of them works)."""
        return self.jobs[0].job_id if self.jobs else None

    @property
    def job_ids(self) -> list[str]:
        """Every image's job id, in order (those the engine accepted)."""
        return [job.job_id for job in self.jobs if job.job_id]

    @property
    def images(self) -> list[str]:
        """The PNG paths of the images that came out, in the message's order (job by job)."""
        return [path for job in self.jobs for path in job.paths]

    @property
    def image_seeds(self) -> list[int]:
        """The seed of each image that came out, in the same order as `images` (its job's seed)."""
        return [job.seed for job in self.jobs for _ in job.paths]

    @property
    def seed(self) -> int:
        """The first image's seed; image n has seed + n - 1."""
        return self.jobs[0].seed if self.jobs else int(self.params.get("seed", 0))

    @property
    def workflow(self) -> dict[str, Any]:
        """The first image's workflow (the others differ only in the sampler's seed)."""
        return self.jobs[0].workflow if self.jobs else {}

    @property
    def queue_wait_s(self) -> float | None:
        """Seconds between the request and the worker starting its first image."""
        return None if self.started_at is None else max(0.0, self.started_at - self.created_at)

    @property
    def generation_s(self) -> float | None:
        """Seconds the engine spent on the slowest image (a batch's images share the sampler run)."""
        return self.timings.get("total")

    @property
    def private(self) -> bool:
        """Its result goes to the requester's DMs (/settings private, /imagine private:), rerolls included."""
        return bool(self.request.get("private"))

    @property
    def is_terminal(self) -> bool:
        """Settled (done, failed, cancelled) or deleted."""
        return self.state in TERMINAL

    @property
    def all_ended(self) -> bool:
        """Every image's job has ended (so the generation can be settled)."""
        return bool(self.jobs) and all(job.ended for job in self.jobs)
