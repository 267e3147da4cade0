"""/queue's engine section: the engine's workers, what each holds and what each runs, as the caller may see it.

Everyone sees each worker's name, device, state and the checkpoints it holds: it tells a member why their request
waits (every card busy) or starts fast (a card already holds its model). What a worker runs is a request number
only for a request the caller may moderate (their own, or any of their server's with Manage Messages): request
numbers are sequential, and naming someone else's private or other-server request would confirm it exists
(bot/core/services/access.py). Moderators (Manage Messages: the admin view) also see each worker's host, its
checkpoint loads and jobs done, and why a refused or dead worker is out.

With the one in-process worker ([engine] workers = "local", the default) the section is one short line, so a
one-GPU owner's /queue reads as before plus "Engine: this machine (cpu) · holds tiny-sd15 · idle".
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import PurePosixPath

from bot.core.front_end import Requester
from bot.core.services.access import may_moderate
from bot.core.storage.store import Store
from engine.queue import EngineService
from engine.queue.jobs import WorkerInfo

__all__ = ["EngineWorkers", "WorkerView", "append_section", "short_checkpoint", "workers_text"]

# the model file endings a checkpoint name is shown without
MODEL_SUFFIXES = frozenset({".safetensors", ".sft", ".ckpt", ".pt", ".pth", ".bin", ".gguf"})
LOCAL = "local"  # the name EngineService gives its one in-process worker


def short_checkpoint(name: str) -> str:
    """`sd15/tiny-sd15.safetensors` -> `tiny-sd15`: the file name without its folder and model file ending."""
    path = PurePosixPath(name.replace("\\", "/"))
    return path.stem if path.suffix.lower() in MODEL_SUFFIXES else path.name or name


@dataclass(frozen=True)
class WorkerView:
    """One engine worker as the caller may see it."""

    name: str
    host: str
    device: str
    state: str  # idle, running, starting, refused, dead
    holds: tuple[str, ...]  # checkpoint names, shortened, least recently used first
    requests: tuple[int, ...]  # the requests it runs that the caller may moderate, by number
    others: int  # the requests it runs that the caller may not see named
    jobs_done: int
    loads: int
    note: str = ""
    joined: bool = False

    @classmethod
    def of(cls, info: WorkerInfo, requests: tuple[int, ...] = (), others: int = 0) -> WorkerView:
        return cls(info.name, info.host, info.device, info.state, tuple(short_checkpoint(n) for n in info.holds),
                   requests, others, info.jobs_done, info.loads, info.note, info.joined)

    @property
    def local(self) -> bool:
        return self.name == LOCAL

    def line(self, moderator: bool = False) -> str:
        """`vm-1 · cuda:0 (NVIDIA H200) · holds sd15, sdxl · running #12`, and for a moderator its host, loads,
        jobs done and note: `vm-2 on box-b (joined) · cpu · holds nothing · refused: models differ (...)`."""
        name = "this machine" if self.local else self.name
        if moderator and self.host and not self.local:
            name += f" on {self.host}"
        if self.joined:
            name += " (joined)"
        parts = [f"{name} ({self.device})" if self.local else name]
        if self.device and not self.local:
            parts.append(self.device)
        parts += [f"holds {', '.join(self.holds)}" if self.holds else "holds nothing", self._doing(moderator)]
        if moderator:
            loads = f"{self.loads} checkpoint load{'' if self.loads == 1 else 's'}"
            done = f"{self.jobs_done} job{'' if self.jobs_done == 1 else 's'} done"
            # the in-process worker does not count its jobs (EngineService.workers): a 0 there would mislead
            parts.append(loads if self.local else f"{loads}, {done}")
        return " · ".join(parts)

    def _doing(self, moderator: bool) -> str:
        if self.state != "running" or not (self.requests or self.others):
            return f"{self.state}: {self.note}" if moderator and self.note else self.state
        named = ", ".join(f"#{number}" for number in self.requests)
        if not named:
            return "running"
        return f"running {named}" + (f" and {self.others} other request{'s' if self.others > 1 else ''}"
                                     if self.others else "")


def workers_text(views: list[WorkerView], moderator: bool = False) -> str:
    """The engine section: one line for the one local worker, else a heading and a line per worker."""
    if not views:
        return "Engine: no workers yet (starting)."
    if len(views) == 1 and views[0].local:
        return f"Engine: {views[0].line(moderator)}"
    up = sum(1 for view in views if view.state in ("idle", "running"))
    heading = f"Engine workers ({up} of {len(views)} up):" if up < len(views) else f"Engine workers ({len(views)}):"
    return "\n".join([heading, *(f"- {view.line(moderator)}" for view in views)])


def append_section(text: str, section: str, limit: int) -> str:
    """`text`, then as many whole lines of `section` as fit in `limit` characters: the caller's own list comes
    first, the engine section is what gives way (a message limit, as Discord's 2000 characters)."""
    if len(text) >= limit:
        return text[:limit]
    kept = []
    room = limit - len(text) - 1  # the blank line between them
    for line in section.splitlines():
        if len(line) + 1 > room:
            break
        kept.append(line)
        room -= len(line) + 1
    return "\n\n".join([text, "\n".join(kept)]) if kept else text


class EngineWorkers:
    """/queue's engine section: `engine.workers()` with each running job told as the caller may see it."""

    def __init__(self, engine: EngineService, store: Store) -> None:
        self.engine, self.store = engine, store

    async def views(self, who: Requester) -> list[WorkerView]:
        """Every worker; a running request named by number only if `who` may moderate it."""
        views = []
        for info in self.engine.workers():
            named: dict[int, None] = {}  # a batch runs several images of one request: name it once
            hidden: set[int | str] = set()
            for job_id in info.running:
                generation = await self.store.by_job(job_id)
                if generation is not None and may_moderate(generation, who):
                    named[generation.id] = None
                else:  # another program's job has no request: counted, as someone else's is
                    hidden.add(generation.id if generation is not None else job_id)
            views.append(WorkerView.of(info, tuple(named), len(hidden)))
        return views

    async def text(self, who: Requester) -> str:
        """The engine section of /queue for `who`; the admin view for a member with Manage Messages."""
        return workers_text(await self.views(who), moderator=who.can_manage_messages)
