"""Discord's side of showing things: results posted as channel messages, status sinks, who reacted or asked.

Results go out as new channel messages with the PNG bytes exactly as SaveImage wrote them (so
their `prompt` and `parameters` chunks stay intact) and never through the interaction token,
which dies 15 minutes after the command; the bot adds the reactions that drive 🔁 🔀 🗑️ ℹ️.
A batch of 2-4 shows as one grid; what a message would carry past Discord's limits goes as previews,
the full PNGs on ℹ️ (bot/discord_app/limits.py). A 5xx or 429 while posting is retried with backoff,
then left to the result collector's reposts; one nonce for every try keeps a result from posting twice.
"""

from __future__ import annotations

import asyncio
import io
import itertools
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any, TypeVar

import discord

from bot.core.cards.card import truncate
from bot.core.cards.result import failure_text, result_card
from bot.core.errors import GenerationNotFound
from bot.core.front_end import Origin, Requester
from bot.core.requests.workflow_file import is_workflow
from bot.core.safety.gate import blocked_text
from bot.core.storage.records import Generation
from bot.discord_app.buttons import result_view
from bot.discord_app.embeds import to_embed
from bot.discord_app.limits import MAX_CONTENT, GridFiles, Outgoing, filesize_limit, fit_embed, plan_message
from engine.errors import NoodleError
from engine.idle import idle_sleep

__all__ = ["REACTIONS", "RETRY_DELAYS", "VARIATION_DIGITS", "ChannelStatus", "DiscordPublisher", "InteractionStatus",
           "PublishError", "is_nsfw", "only_mentioning", "origin_of", "parent_of", "reactions_for", "requester_of",
           "resolve_channel", "result_nonce", "retry_wait", "spoilered"]

log = logging.getLogger(__name__)

REROLL, VARIATION, DELETE, DETAILS = "🔁", "🔀", "🗑️", "ℹ️"
REACTIONS = (REROLL, VARIATION, DELETE, DETAILS)
# On a batch, 1️⃣..4️⃣ ask for a variation of that image (🔀 takes the first)
VARIATION_DIGITS = ("1️⃣", "2️⃣", "3️⃣", "4️⃣")
NEEDED = "Send Messages, Attach Files, Embed Links and Add Reactions"
# A 5xx or 429 past discord.py's own retries is tried again after these waits; then the collector's REPOST_DELAYS
RETRY_DELAYS: tuple[float, ...] = (1.0, 2.0, 4.0)
MAX_RETRY_AFTER = 60.0  # a 429 asking for longer is left to the collector's reposts
T = TypeVar("T")


class PublishError(NoodleError):
    """A result that Discord would not take (missing permission, deleted channel)."""


def result_nonce(generation: Generation) -> str:
    """The nonce every try of posting one result sends (25 characters at most, as Discord allows)."""
    return f"nd{generation.id}-{int(generation.created_at)}"[:25]


def retry_wait(err: Exception, tries: int, delays: tuple[float, ...]) -> float | None:
    """Seconds to wait before trying again after `err` on try `tries` (0-based), or None: not to retry.

    5xx and 429 are retried, each after the next of `delays`; a 429 waits its `retry_after` instead when Discord
    gives one (discord.RateLimited has it; a plain 429 HTTPException may carry a Retry-After header), unless it
    is over MAX_RETRY_AFTER. Other 4xx (Forbidden, NotFound, a bad request) never are: the same request fails
    the same way.
    """
    if tries >= len(delays):
        return None
    if isinstance(err, discord.RateLimited):
        after: float | None = err.retry_after
    elif isinstance(err, discord.HTTPException) and err.status == 429:
        after = _retry_after_header(err)
    elif isinstance(err, discord.HTTPException) and err.status >= 500:
        return delays[tries]
    else:
        return None
    if after is None:
        return delays[tries]
    return after if 0 <= after <= MAX_RETRY_AFTER else None


def _retry_after_header(err: discord.HTTPException) -> float | None:
    headers = getattr(err.response, "headers", None) or {}
    try:
        return float(headers.get("Retry-After", ""))
    except (TypeError, ValueError):
        return None


def _why(err: Exception) -> str:
    if isinstance(err, discord.RateLimited):
        return f"429: too many requests, retry in {err.retry_after:.1f} s"
    if isinstance(err, discord.HTTPException):
        return f"{err.status}: {err.text or getattr(err.response, 'reason', '') or 'no reason given'}"
    return str(err)


def reactions_for(generation: Generation) -> tuple[str, ...]:
    """The reactions the bot adds under a result: the four actions, and a digit per image of a batch."""
    if is_workflow(generation):  # 🔀 varies /imagine results only
        return (REROLL, DELETE, DETAILS)
    count = len(generation.images)
    return REACTIONS + (VARIATION_DIGITS[:count] if count > 1 else ())


def requester_of(interaction: discord.Interaction) -> Requester:
    """The person behind a command, with their permissions in the server (their roles'), not the ones Discord
    resolved for this channel (`interaction.permissions`, overwrites included): what they allow here (/mod block
    and history, another member's result) reaches across the server, so a member given Manage Messages in one
    channel must not moderate them all. Outside a server: none."""
    user = interaction.user
    granted = getattr(user, "guild_permissions", None) if interaction.guild_id else None
    granted = granted if isinstance(granted, discord.Permissions) else discord.Permissions.none()
    return Requester(str(user.id), str(interaction.guild_id) if interaction.guild_id else None,
                     getattr(user, "display_name", str(user)), bool(granted.manage_messages),
                     bool(granted.manage_guild))


def origin_of(interaction: discord.Interaction) -> Origin:
    """Where a command's result is posted: the channel it was used in (whether Discord marks it NSFW, and the
    channel it is a thread of)."""
    channel = getattr(interaction, "channel", None)
    return Origin(str(interaction.channel_id) if interaction.channel_id else None,
                  str(interaction.guild_id) if interaction.guild_id else None, is_nsfw(channel), parent_of(channel))


def parent_of(channel: Any) -> str | None:
    """The id of the channel a thread is in; None for anything that is no thread."""
    parent = getattr(channel, "parent_id", None) if isinstance(channel, discord.Thread) else None
    return str(parent) if parent else None


def is_nsfw(channel: Any) -> bool:
    """Whether Discord marks `channel` age-restricted (a thread: its parent; a DM never)."""
    check = getattr(channel, "is_nsfw", None)
    return bool(check()) if callable(check) else False


def spoilered(name: str) -> str:
    """A file name Discord shows behind a spoiler."""
    return name if name.startswith("SPOILER_") else f"SPOILER_{name}"


async def resolve_channel(client: Any, channel_id: int) -> Any:
    """A channel by id from the cache, else from the API (messages from before a restart are not cached)."""
    channel = client.get_channel(channel_id)
    if channel is not None:
        return channel
    try:
        return await asyncio.wait_for(client.fetch_channel(channel_id), timeout=15)
    except (discord.NotFound, discord.Forbidden) as err:
        raise PublishError(f"channel {channel_id} is gone or hidden from Noodle ({err.text or err.status}); "
                           "invite the bot there again or use /imagine elsewhere") from err


class DiscordPublisher:
    """Posts finished generations to their channel; the result collector calls it once per result, restarts
    included.

    `grid_files` is [bot] grid_files; `sleep` waits between retries (tests pass one that records and returns).
    """

    def __init__(self, client: Any, *, grid_files: GridFiles = "attach",
                 sleep: Callable[[float], Awaitable[Any]] = idle_sleep,
                 retry_delays: tuple[float, ...] = RETRY_DELAYS) -> None:
        self.client = client
        self.grid_files: GridFiles = grid_files
        self.sleep = sleep
        self.retry_delays = retry_delays

    async def publish(self, generation: Generation) -> str | None:
        """Send the grid or PNGs and the card as a new message, add the reactions, return the message id.

        A private result (/settings private, /imagine private:) goes to the requester's DMs instead of the
        channel; reactions work there too. What is attached fits the destination's limits (bot/discord_app/
        limits.py); the card says what went to ℹ️ instead.
        """
        private = generation.private
        if generation.safety == "block":  # the server's rules hold it back: its requester hears why, privately
            await self._tell_blocked(generation)
            return None
        if generation.channel_id is None and not private:
            raise GenerationNotFound(f"#{generation.id} has no channel to post to")
        destination = await self._retrying(lambda: self._destination(generation))
        blobs = await asyncio.to_thread(lambda: [(Path(p).name, Path(p).read_bytes()) for p in generation.images])
        outgoing = await asyncio.to_thread(plan_message, blobs, limit=filesize_limit(destination), private=private,
                                           grid_files=self.grid_files, grid_name=f"noodle-{generation.id}-grid.png")
        if generation.safety == "spoiler":  # over the threshold where the rules say spoiler: every file hidden
            outgoing = replace(outgoing, files=tuple((spoilered(name), data) for name, data in outgoing.files))
        embed = to_embed(result_card(generation))
        for name, value in outgoing.notes:
            embed.add_field(name=name, value=value, inline=False)
        embed = fit_embed(embed)
        message = await self._retrying(lambda: self._send(destination, generation, embed, outgoing))
        for emoji in reactions_for(generation):
            try:
                await message.add_reaction(emoji)
            except discord.HTTPException as err:  # the result is out; people can still react by hand
                log.warning("could not add %s to message %s: %s", emoji, message.id, err)
                break
        return str(message.id)

    async def _destination(self, generation: Generation) -> Any:
        """The requester (a private result) or the channel the result goes to."""
        if generation.private:
            try:
                return await self._user(generation.requester_id)
            except discord.NotFound as err:
                raise PublishError(f"Discord has no user {generation.requester_id} to send #{generation.id} "
                                   "to") from err
        return await resolve_channel(self.client, int(generation.channel_id or 0))

    async def _send(self, destination: Any, generation: Generation, embed: discord.Embed, outgoing: Outgoing) -> Any:
        """One try at sending the result message (the two `send` calls)."""
        # fresh File objects each try: discord.py closes them after a send, failed or not
        files = [discord.File(io.BytesIO(data), filename=name) for name, data in outgoing.files]
        nonce = result_nonce(generation)
        try:
            if generation.private:
                return await destination.send(embed=embed, files=files, nonce=nonce, view=result_view(generation))
            content = f"<@{generation.requester_id}>" if generation.requester_id.isdigit() else None
            return await destination.send(content=content, embed=embed, files=files,
                                          allowed_mentions=only_mentioning(generation.requester_id),
                                          nonce=nonce, view=result_view(generation))
        except discord.Forbidden as err:
            if generation.private:
                raise PublishError("Noodle may not send you direct messages, and your results are private: allow "
                                   "DMs from server members, or turn private results off with /settings private: "
                                   "False") from err
            raise PublishError(f"Noodle may not post in channel {generation.channel_id}: it needs {NEEDED} "
                               "there") from err

    async def _retrying(self, attempt: Callable[[], Awaitable[T]]) -> T:
        """`attempt()`, again after each of `retry_delays` while Discord answers 5xx or 429 (a 429 waits its
        `retry_after`); any other refusal, or the last try's, is a PublishError for the collector, whose
        REPOST_DELAYS post the result once the channel answers again.

        Why a retry cannot post twice: every try of one result sends the same `nonce` with discord.py's
        `enforce_nonce`, so if a try that answered 5xx did create the message, Discord hands back that message
        instead of making a second (for a few minutes; the collector's first repost comes after 30 s). A 429 was
        refused before anything was made. A dropped connection or a timeout is not retried here at all: it goes
        to the collector as it is, and its repost carries the same nonce.
        """
        for tries in itertools.count():
            try:
                return await attempt()
            except (discord.HTTPException, discord.RateLimited) as err:
                status = getattr(err, "status", 429)
                wait = retry_wait(err, tries, self.retry_delays)
                if wait is None:
                    if status == 429 or status >= 500:
                        raise PublishError(f"Discord did not take the result ({_why(err)}) after {tries + 1} "
                                           "tries; Noodle posts it again when the channel answers") from err
                    raise PublishError(f"Discord refused the result ({_why(err)}); the PNGs are kept and ℹ️ still "
                                       "works once posted") from err
                log.warning("Discord answered %s; trying again in %.1f s", _why(err), wait)
                await self.sleep(wait)
        raise AssertionError("unreachable")

    async def _tell_blocked(self, generation: Generation) -> None:
        """DM the requester that their result was held back; a closed DM is logged (their status line said it)."""
        try:
            await (await self._user(generation.requester_id)).send(content=blocked_text(generation))
        except (discord.HTTPException, PublishError, TimeoutError) as err:
            log.info("could not tell %s that #%s was held back: %s", generation.requester_id, generation.id, err)

    async def channel_is_nsfw(self, channel_id: str) -> bool:
        """Whether Discord marks channel `channel_id` NSFW (the result collector's rule choice)."""
        return is_nsfw(await resolve_channel(self.client, int(channel_id)))

    async def channel_parent(self, channel_id: str) -> str | None:
        """The channel thread `channel_id` is in (whose /rules channel rule it follows); None for a channel."""
        return parent_of(await resolve_channel(self.client, int(channel_id)))

    async def report(self, guild_id: str, channel_id: str, text: str, images: Sequence[str]) -> None:
        """Post a moderation report to a server's log channel, a held-back result's first image behind a spoiler."""
        channel = await resolve_channel(self.client, int(channel_id))
        if str(getattr(getattr(channel, "guild", None), "id", guild_id)) != guild_id:
            raise PublishError(f"log channel {channel_id} is not in server {guild_id}; set it again with /rules")
        files = []
        limit = filesize_limit(channel)
        for path in images[:1]:
            data = await asyncio.to_thread(Path(path).read_bytes)
            if len(data) <= limit:
                files.append(discord.File(io.BytesIO(data), filename=spoilered(Path(path).name)))
        await channel.send(content=truncate(text, 1900), files=files, allowed_mentions=discord.AllowedMentions.none())

    async def publish_failure(self, generation: Generation) -> None:
        """Tell the requester that a job nobody was watching failed: in the channel, or by DM if private."""
        text = truncate(failure_text(generation), 1900)
        try:
            if generation.private:
                await (await self._user(generation.requester_id)).send(content=text)
                return
            if generation.channel_id is None:
                return
            channel = await resolve_channel(self.client, int(generation.channel_id))
            await channel.send(f"<@{generation.requester_id}> {text}",
                               allowed_mentions=only_mentioning(generation.requester_id))
        except discord.HTTPException as err:
            raise PublishError(f"could not report the failure of #{generation.id}: {err}") from err

    async def _user(self, user_id: str) -> Any:
        """A user to DM, from the cache or the API."""
        if not user_id.isdigit():
            raise PublishError(f"{user_id} is not a Discord user; private results need one")
        return self.client.get_user(int(user_id)) or await asyncio.wait_for(self.client.fetch_user(int(user_id)), 15)


def only_mentioning(user_id: str) -> discord.AllowedMentions:
    """Mentions that ping `user_id` alone (nobody, if it is no Discord id). Spelt out field by field: an
    AllowedMentions(users=True) leaves everyone and roles at discord.py's default, which is True, so a member's
    "@everyone" quoted in an error text would ping the whole server."""
    users = [discord.Object(int(user_id))] if user_id.isdigit() else False
    return discord.AllowedMentions(everyone=False, roles=False, users=users, replied_user=False)


class InteractionStatus:
    """The status shown in the command's own (private) response, edited through the interaction token."""

    def __init__(self, interaction: discord.Interaction) -> None:
        self.interaction = interaction

    async def update(self, text: str) -> None:
        try:
            await self.interaction.edit_original_response(content=truncate(text, MAX_CONTENT))
        except discord.HTTPException as err:  # an expired token or a deleted response: the result still posts
            log.info("status edit failed: %s", err)


class ChannelStatus:
    """A status line as a channel message (jobs started by a reaction have no interaction to answer)."""

    def __init__(self, message: Any) -> None:
        self.message = message

    async def update(self, text: str) -> None:
        try:
            await self.message.edit(content=truncate(text, MAX_CONTENT))
        except discord.HTTPException as err:
            log.info("status edit failed: %s", err)

    async def remove(self) -> None:
        """Delete the status line once the result is posted."""
        try:
            await self.message.delete()
        except discord.HTTPException as err:
            log.info("status delete failed: %s", err)
