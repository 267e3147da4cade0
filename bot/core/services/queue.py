"""The Studio's side of the engine's queue: putting a request in (recorded first, all or nothing, one queue place
per image), and /queue: a member's requests with their place and ETA, and cancelling them.

The engine queues one job per image; a member thinks in requests (`#12`, the number on the status line
and the result), so jobs are grouped by the generation they belong to. Cancelling a request cancels all
its images: queued ones leave the queue, a running one stops at its next sampler step, and the request
settles as cancelled (bot/core/results/collector.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from bot.core.cards.card import truncate
from bot.core.cards.result import request_label
from bot.core.errors import NotAllowed, RequestInvalid
from bot.core.front_end import Origin, Requester, Ticket
from bot.core.safety.gate import SafetyGate
from bot.core.services.access import may_moderate, not_found, reachable
from bot.core.storage.records import NewGeneration
from bot.core.storage.store import Store
from engine.queue import EngineService, JobInfo, JobState, Owner

__all__ = ["QueueEntry", "RequestQueue", "queue_text"]


@dataclass(frozen=True)
class QueueEntry:
    """One request of the caller's that has images queued or running."""

    generation_id: int
    kind: str
    prompt: str
    images: int  # images of the request still queued or running
    running: bool
    position: int | None  # the place of its first queued image (1 runs next); None while it runs
    eta_s: float | None  # seconds until its last image is done, at the recent step rate; None before any rate
    cancelling: bool = False  # cancelled while running: it stops at its next sampler step
    worker: str | None = None  # the engine worker(s) it runs on, named only when there are several

    def line(self) -> str:
        """`#12 imagine · "a red fox…" · 2 images · queued, position 3, about 40 s`."""
        images = f" · {self.images} images" if self.images > 1 else ""
        where = ("cancelling (stops at its next step)" if self.cancelling else "running" if self.running
                 else f"queued, position {self.position}" if self.position else "queued")
        if self.running and self.worker and not self.cancelling:
            where += f" on {self.worker}"
        eta = f", about {_duration(self.eta_s)} left" if self.eta_s is not None else ""
        return f"#{self.generation_id} {self.kind} · \"{self.prompt}\"{images} · {where}{eta}"


def queue_text(entries: list[QueueEntry], how_to_cancel: str = "Cancel one with /queue cancel: NUMBER.") -> str:
    """The caller's queue as lines, then how to cancel."""
    if not entries:
        return "Nothing of yours is queued or running."
    return "\n".join([*(entry.line() for entry in entries), how_to_cancel])


class RequestQueue:
    """Requests into the engine's queue, and /queue's list and cancel."""

    def __init__(self, engine: EngineService, store: Store, *, front: str, per_user_max: int,
                 gate: SafetyGate | None = None) -> None:
        self.engine, self.store, self.front, self.per_user_max = engine, store, front, per_user_max
        self.gate = gate  # the server's rules, checked on every request's final graphs (bot/core/safety/gate.py)

    def check_room(self, who: Requester, count: int) -> None:
        """A batch needs one queue place per image: say so before queueing half of it."""
        active = len(self.engine.jobs(Owner(who.user_id, who.guild_id)))
        if active + count > self.per_user_max:
            raise RequestInvalid(f"this needs {count} place(s) in the queue and you have {active} of "
                                 f"{self.per_user_max} in use ([queue] per_user_max); wait for a result or ask for "
                                 "fewer images")

    async def enqueue(self, new: NewGeneration, who: Requester, origin: Origin, summary: str) -> Ticket:
        """Record a request, then queue one job per workflow of `new.images` (/imagine's images, a /workflow's
        one graph): all or nothing, so a refusal leaves no row and no job behind.

        Every door passes here, so the server's rules are applied here: a blocked member, a banned word in any
        prompt box, a model the server does not allow are refused; the enforced negative is written in."""
        if self.gate is not None:
            new = await self.gate.admit(new, who)
        owner = Owner(who.user_id, who.guild_id)
        generation = await self.store.add(new)
        handles: list[Any] = []
        try:
            for idx, (_, workflow) in enumerate(new.images, 1):
                handle = await self.engine.submit(workflow, owner, extra={
                    "generation_id": generation.id, "idx": idx, "front": self.front, "channel_id": origin.channel_id})
                handles.append(handle)
                await self.store.attach_job(generation.id, idx, handle.job_id)
        except BaseException:
            # all or nothing: a refused image takes its siblings back out of the queue
            for handle in handles:
                await self.engine.cancel(handle.job_id)
            await self.store.discard(generation.id)
            raise
        await self.store.mark_queued(generation.id)
        positions = [p for p in (h.position() for h in handles) if p is not None]
        return Ticket(handles[0].job_id, generation.id, min(positions, default=None), new.kind, summary,
                      tuple(h.job_id for h in handles))

    async def entries(self, who: Requester) -> list[QueueEntry]:
        """`who`'s requests with queued or running images: running first, then by place in the queue."""
        grouped: dict[int, list[JobInfo]] = {}
        several = len(self.engine.workers()) > 1  # one worker: naming it says nothing
        for info in self.engine.jobs(Owner(who.user_id, who.guild_id)):
            if "generation_id" in info.extra:  # jobs of other programs sharing the queue have none
                grouped.setdefault(int(info.extra["generation_id"]), []).append(info)
        entries = []
        for generation_id, infos in grouped.items():
            generation = await self.store.get(generation_id)
            prompt = "" if generation is None else request_label(generation)
            positions = [info.position for info in infos if info.position is not None]
            etas = [info.eta_s for info in infos]
            entries.append(QueueEntry(
                generation_id, generation.kind if generation else "request", truncate(prompt, 60), len(infos),
                any(info.state == JobState.RUNNING for info in infos), min(positions, default=None),
                None if any(eta is None for eta in etas) else max(etas),  # type: ignore[type-var]
                # every image still listed was asked to stop: the request is on its way out, not running on
                cancelling=all(info.cancel_requested for info in infos),
                worker=_running_on(infos) if several else None))
        entries.sort(key=lambda e: (not e.running, e.position or 0, e.generation_id))
        return entries

    async def cancel(self, who: Requester, generation_id: int) -> int:
        """Cancel every queued or running image of request #`generation_id`; returns how many were stopped.

        The requester may cancel their own; a member with Manage Messages anyone's in their own server (as with
        🗑️). Another server's request, a DM one or someone's private one is answered as a number that does not
        exist (bot/core/services/access.py): numbers are sequential, the answer must not confirm that one is in use.
        """
        generation = await reachable(self.store, generation_id, who)
        if generation is None:
            raise not_found(generation_id, "request", "/queue lists yours with their numbers")
        mine = generation.requester_id == who.user_id
        if not may_moderate(generation, who):
            raise NotAllowed(f"#{generation_id} is someone else's request; only they or members with Manage "
                             "Messages can cancel it")
        by = Owner(who.user_id, who.guild_id) if mine else None
        stopped = 0
        for job in generation.jobs:
            if job.job_id is not None and not job.ended and await self.engine.cancel(job.job_id, by):
                stopped += 1
        if not stopped:
            raise RequestInvalid(f"#{generation_id} has nothing queued or running (it is {generation.state}); "
                                 "/queue lists what can still be cancelled")
        return stopped


def _running_on(infos: list[JobInfo]) -> str | None:
    """The workers a request's running images are on, each named once (a batch runs on one)."""
    names = dict.fromkeys(info.worker for info in infos if info.worker and info.state == JobState.RUNNING)
    return ", ".join(names) or None


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{max(1, round(seconds))} s"
    return f"{seconds / 60:.0f} min"
