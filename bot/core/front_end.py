"""The values the services and the front ends pass each other: who asks, where the answer goes, what comes back.

Plain frozen dataclasses and one Protocol; nothing here talks to Discord, a terminal or the engine.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Protocol

from bot.core.storage.records import Generation

__all__ = ["Details", "Origin", "Publisher", "Requester", "StudioEvent", "Ticket"]


@dataclass(frozen=True)
class Requester:
    """Who asks: a Discord user id (as text) or `console:<name>`, and what the front end knows they may do."""

    user_id: str
    guild_id: str | None = None
    name: str = ""
    # Discord's Manage Messages in the result's channel: lets a moderator delete anyone's result
    can_manage_messages: bool = False
    # Discord's Manage Server in the guild: lets a member create, change and delete the server's presets
    manage_server: bool = False


@dataclass(frozen=True)
class Origin:
    """Where a result is posted: a channel id (Discord) or nothing (the console)."""

    channel_id: str | None = None
    guild_id: str | None = None
    nsfw: bool = False  # Discord marks the channel NSFW (age-restricted): its own rule for NSFW images (/rules)
    parent_id: str | None = None  # a thread's channel, whose /rules channel rule the thread follows


@dataclass(frozen=True)
class Ticket:
    """A queued job as its requester first sees it."""

    job_id: str  # the first image's job: what results show and `react` takes
    generation_id: int
    position: int | None
    kind: str
    summary: str
    job_ids: tuple[str, ...] = ()


@dataclass(frozen=True)
class StudioEvent:
    """One step of a followed job: its queue position, its start, sampler progress, then done or failed."""

    kind: Literal["position", "started", "progress", "done", "failed"]
    job_id: str
    position: int | None = None
    eta_s: float | None = None
    value: int | None = None
    max: int | None = None
    node: str | None = None
    images: int = 1  # images of the request (one engine job each)
    images_done: int = 0
    generation: Generation | None = None
    error: str | None = None


@dataclass(frozen=True)
class Details:
    """ℹ️ details: the card and A1111 parameters as text, and the workflow JSON as a file."""

    text: str
    workflow_json: str
    filename: str


class Publisher(Protocol):
    """A front end's way of showing a finished job; the result collector calls it once per result, restarts
    included."""

    async def publish(self, generation: Generation) -> str | None:
        """Show the result; return the message id that reactions will name (None where there is none)."""
        ...

    async def publish_failure(self, generation: Generation) -> None:
        """Tell the requester that a job nobody was following failed (e.g. one resumed after a restart)."""
        ...
