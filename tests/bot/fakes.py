"""Thin fakes at the Discord edge only: what an interaction, a channel, a message and the client record.

Everything behind them is real (the cogs, the Studio, SQLite, the engine on the tiny models), as
discord.py's own tests drive real commands with a mock interaction built from a payload.
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import discord

_ids = itertools.count(900_000_000_000_000_001)
DEFAULT_FILESIZE_LIMIT = discord.utils.DEFAULT_FILE_SIZE_LIMIT_BYTES  # 10 MiB: unboosted guilds and DMs


def _refuse_long(content: str | None) -> None:
    """Discord's answer to a message text over its 2,000 characters: 400, nothing changed."""
    if content is not None and len(content) > 2000:
        raise http_error(400, "Invalid Form Body: content must be 2000 or fewer in length")


def http_error(status: int, message: str = "", *, retry_after: float | None = None) -> discord.HTTPException:
    """The exception discord.py raises for a Discord answer of `status` (Forbidden, NotFound, DiscordServerError,
    else HTTPException); a 429's `retry_after` rides in the Retry-After header, as Discord sends it."""
    headers = {} if retry_after is None else {"Retry-After": str(retry_after)}
    response = SimpleNamespace(status=status, reason=message or "Error", headers=headers)
    body = {"code": 0, "message": message}
    kind = {403: discord.Forbidden, 404: discord.NotFound}.get(status) or \
        (discord.DiscordServerError if status >= 500 else discord.HTTPException)
    return kind(response, body)


@dataclass
class SentFile:
    """A discord.File as it left: its name and the exact bytes."""

    filename: str
    data: bytes


class FakeMessage:
    """A sent message: its content, embed and files as sent; edits, reactions and deletion recorded."""

    def __init__(self, channel: FakeChannel, content: str | None, embed: discord.Embed | None,
                 files: list[SentFile], nonce: str | int | None = None) -> None:
        self.id = next(_ids)
        self.channel = channel
        self.content, self.embed, self.files = content, embed, files
        self.nonce = nonce
        self.reactions: list[str] = []
        self.removed_reactions: list[tuple[str, int]] = []
        self.edits: list[str] = []
        self.deleted = False

    @property
    def attachments(self) -> list[SentFile]:
        """The files as discord.Message.attachments lists them (each has its `filename`)."""
        return self.files

    async def add_reaction(self, emoji: Any) -> None:
        self.reactions.append(str(emoji))

    async def remove_reaction(self, emoji: Any, member: Any) -> None:
        self.removed_reactions.append((str(emoji), member.id))

    async def edit(self, *, content: str | None = None, **_: Any) -> None:
        _refuse_long(content)
        self.content = content
        self.edits.append(content or "")

    async def delete(self) -> None:
        self.deleted = True


class FakeChannel:
    """A text channel that records what was sent; `manage` lists user ids with Manage Messages here.

    It refuses what Discord refuses (over 10 files, over its guild's `filesize_limit` in all, an embed over 6000
    characters), honours a repeated nonce as `enforce_nonce` does (the first message comes back, no second),
    and raises the errors given to `fail_next` at the next sends. `guild=None` makes it a DM channel.
    """

    def __init__(self, channel_id: int = 555, *, manage: set[int] | None = None,
                 filesize_limit: int = DEFAULT_FILESIZE_LIMIT, guild: bool = True) -> None:
        self.id = channel_id
        self.sent: list[FakeMessage] = []
        self.manage = manage or set()
        self.guild = SimpleNamespace(id=777, filesize_limit=filesize_limit) if guild else None
        self.sends = 0  # tries, failed ones included
        self._failures: list[tuple[BaseException, bool]] = []

    def fail_next(self, *errors: BaseException, after_sending: bool = False) -> None:
        """Make the next sends raise these errors, in order; `after_sending`: the message is made first (a 5xx
        that Discord answered after creating it)."""
        self._failures.extend((error, after_sending) for error in errors)

    async def send(self, content: str | None = None, *, embed: discord.Embed | None = None,
                   files: list[discord.File] | None = None, nonce: str | int | None = None,
                   **_: Any) -> FakeMessage:
        self.sends += 1
        failure = self._failures.pop(0) if self._failures else None
        if failure is not None and not failure[1]:
            raise failure[0]
        sent = [SentFile(f.filename, f.fp.read()) for f in files or []]
        limit = self.guild.filesize_limit if self.guild is not None else DEFAULT_FILESIZE_LIMIT
        if len(sent) > 10:
            raise http_error(400, "Invalid Form Body: files: Must be 10 or fewer in length.")
        if sum(len(f.data) for f in sent) > limit:
            raise http_error(413, "Request entity too large")
        if embed is not None and len(embed) > 6000:
            raise http_error(400, "Invalid Form Body: embeds.0: Embed size exceeds maximum size of 6000")
        earlier = next((m for m in self.sent if nonce is not None and m.nonce == nonce), None)
        message = earlier or FakeMessage(self, content, embed, sent, nonce)
        if earlier is None:
            self.sent.append(message)
        if failure is not None:
            raise failure[0]
        return message

    async def fetch_message(self, message_id: int) -> FakeMessage:
        for message in self.sent:
            if message.id == int(message_id):
                return message
        raise http_error(404, "Unknown Message")

    def get_partial_message(self, message_id: int) -> FakeMessage:
        for message in self.sent:
            if message.id == int(message_id):
                return message
        raise AssertionError(f"no message {message_id} in channel {self.id}")

    def permissions_for(self, member: Any) -> discord.Permissions:
        return discord.Permissions(manage_messages=member.id in self.manage)

    def results(self) -> list[FakeMessage]:
        """Messages holding PNGs: the posted results."""
        return [m for m in self.sent if m.files]


class FakeUser:
    """A user who can be DMed; `closed` DMs raise as Discord does."""

    def __init__(self, user_id: int, *, closed: bool = False) -> None:
        self.id = user_id
        self.display_name = f"user{user_id}"
        self.closed = closed
        self.dms: list[tuple[str, list[SentFile]]] = []
        self.dm_channel = FakeChannel(channel_id=10_000 + user_id, guild=False)  # the DM channel: messages with ids

    async def send(self, content: str | None = None, *, embed: discord.Embed | None = None,
                   files: list[discord.File] | None = None, **kwargs: Any) -> FakeMessage:
        if self.closed:
            raise discord.Forbidden(SimpleNamespace(status=403, reason="Forbidden"), "Cannot send messages to this user")
        before = len(self.dm_channel.sent)
        message = await self.dm_channel.send(content, embed=embed, files=files, **kwargs)
        if len(self.dm_channel.sent) > before:
            self.dms.append((content or "", message.files))
        return message


class FakeClient:
    """The bot as the cogs and the publisher see it: its user, channels and users by id."""

    def __init__(self, *channels: FakeChannel) -> None:
        self.user = SimpleNamespace(id=1)
        self.channels = {c.id: c for c in channels}
        self.users: dict[int, FakeUser] = {}

    def get_channel(self, channel_id: int) -> FakeChannel | None:
        return self.channels.get(channel_id)

    async def fetch_channel(self, channel_id: int) -> FakeChannel:
        raise discord.NotFound(SimpleNamespace(status=404, reason="Not Found"), "Unknown Channel")

    def get_user(self, user_id: int) -> FakeUser:
        return self.users.setdefault(user_id, FakeUser(user_id))

    async def fetch_user(self, user_id: int) -> FakeUser:
        return self.get_user(user_id)


@dataclass
class FakeResponse:
    calls: list[tuple[str, dict[str, Any]]] = field(default_factory=list)

    async def defer(self, **kwargs: Any) -> None:
        self.calls.append(("defer", kwargs))

    def is_done(self) -> bool:
        return bool(self.calls)


class FakeInteraction:
    """A slash command's interaction: records defer and every edit of its (private) response."""

    def __init__(self, user_id: int = 42, channel_id: int = 555, guild_id: int | None = 777,
                 manage_messages: bool = False, manage_guild: bool = False) -> None:
        self.permissions = discord.Permissions(manage_messages=manage_messages, manage_guild=manage_guild)
        self.user = SimpleNamespace(id=user_id, display_name=f"user{user_id}", guild_permissions=self.permissions)
        self.channel_id, self.guild_id = channel_id, guild_id
        self.response = FakeResponse()
        self.created_at = discord.utils.utcnow()
        self.edits: list[str] = []
        self.edit_times: list[float] = []

    async def edit_original_response(self, *, content: str | None = None, **_: Any) -> None:
        _refuse_long(content)
        self.edits.append(content or "")
        self.edit_times.append(time.monotonic())


class FakeAttachment:
    """An attachment as Discord describes it; `read()` returns its bytes."""

    def __init__(self, data: bytes, filename: str = "start.png", content_type: str | None = "image/png",
                 size: int | None = None) -> None:
        self.data, self.filename, self.content_type = data, filename, content_type
        self.size = len(data) if size is None else size
        self.reads = 0

    async def read(self) -> bytes:
        self.reads += 1
        return self.data


def reaction(message_id: int, user_id: int, emoji: str, *, channel_id: int = 555, guild_id: int | None = 777,
             member: Any = None) -> discord.RawReactionActionEvent:
    """The real raw event discord.py builds from a gateway payload (what on_raw_reaction_add receives)."""
    data: dict[str, Any] = {"message_id": str(message_id), "channel_id": str(channel_id), "user_id": str(user_id),
                            "type": 0, "burst": False}
    if guild_id is not None:
        data["guild_id"] = str(guild_id)
    event = discord.RawReactionActionEvent(data, discord.PartialEmoji(name=emoji), "REACTION_ADD")
    event.member = member if member is not None else (SimpleNamespace(id=user_id, display_name=f"user{user_id}")
                                                       if guild_id is not None else None)
    return event
