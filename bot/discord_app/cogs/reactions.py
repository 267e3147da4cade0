"""Reactions on a posted result: 🔁 reroll, 🔀 (or 1️⃣-4️⃣) variation, 🗑️ delete, ℹ️ details.

Handled from raw reaction events and matched by message id in SQLite (as discord.py's
reaction_roles example does), so they work on messages from before a restart that no cache
holds. Whoever reacts owns the new job: the queue's per-user limits apply to them, and their
/settings private too (a private parent stays private; a private member's version goes to their DMs).
What a member may do to someone else's result is the Studio's to say (bot/core/services/access.py).
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Any

import discord
from discord.ext import commands

from bot.core.cards.card import truncate
from bot.core.front_end import Origin, Requester, Ticket
from bot.core.results.status import accepted_text, relay
from bot.core.safety.gate import BLOCKED_TEXT
from bot.core.storage.records import Generation
from bot.discord_app.cogs.tasks import CogTasks
from bot.discord_app.limits import DM_FILESIZE_LIMIT, MAX_CONTENT, details_messages
from bot.discord_app.post import (DELETE, DETAILS, REROLL, VARIATION, VARIATION_DIGITS, ChannelStatus, only_mentioning,
                                  resolve_channel)
from engine.errors import NoodleError

if TYPE_CHECKING:
    from bot.core.studio import Studio

__all__ = ["Reactions"]

log = logging.getLogger(__name__)
# A reaction job's status line is a plain message (channel or DM): no token to expire, but we stop
# watching after an hour all the same (the result is posted by the Studio either way).
FOLLOW_SECONDS = 60 * 60
NOTICE_SECONDS = 30  # how long a public "I could not DM you" notice stays


class Reactions(commands.Cog):
    """Turns reactions on results into Studio calls."""

    def __init__(self, bot: Any, studio: Studio, *, status_every: float = 2.0) -> None:
        self.bot = bot
        self.studio = studio
        self.status_every = status_every
        self._tasks = CogTasks()

    async def cog_unload(self) -> None:
        """Stop following jobs (their results are still posted by the Studio)."""
        await self._tasks.cancel_all()

    @commands.Cog.listener()
    async def on_raw_reaction_add(self, payload: discord.RawReactionActionEvent) -> None:
        """Find the result by message id and run the action the emoji names."""
        me = getattr(self.bot, "user", None)
        if me is not None and payload.user_id == me.id:
            return  # our own reactions under a fresh result
        emoji = str(payload.emoji)
        if emoji not in (REROLL, VARIATION, DELETE, DETAILS, *VARIATION_DIGITS):
            return
        generation = await self.studio.generations.by_message(payload.message_id)
        if generation is None:
            return  # not one of our results
        try:
            channel = await resolve_channel(self.bot, payload.channel_id)
        except NoodleError as err:  # a result in a channel we can no longer see: nothing to answer in
            log.info("reaction on #%s ignored: %s", generation.id, err)
            return
        who = _requester(payload, channel)
        if await self.studio.moderation.is_blocked(who.guild_id, who.user_id):
            await self._tell(who.user_id, channel, f"⛔ {BLOCKED_TEXT}")
            return
        try:
            if emoji == REROLL:
                ticket = await self.studio.generations.reroll(generation.id, who, _origin(payload))
                await self._watch(channel, ticket, who, f"reroll of #{generation.id}", REROLL)
            elif emoji == VARIATION or emoji in VARIATION_DIGITS:
                index = 1 if emoji == VARIATION else VARIATION_DIGITS.index(emoji) + 1
                ticket = await self.studio.generations.variation(generation.id, who, index, _origin(payload))
                await self._watch(channel, ticket, who, f"variation of #{generation.id}, image {index}", VARIATION)
            elif emoji == DELETE:
                await self._delete(channel, generation, who)
                return
            else:
                await self._details(generation, who, channel)
        except NoodleError as err:
            await self._tell(who.user_id, channel, f"❌ {err}")
        await _unreact(channel, payload)

    async def _watch(self, channel: Any, ticket: Ticket, who: Requester, what: str, emoji: str) -> None:
        """Show the new job's status as a message, removed once its result is posted: in the channel, or in the
        reactor's DMs when the new result is private (the status must not announce it where the result is not)."""
        generation = await self.studio.generations.by_job(ticket.job_id)
        private = generation is not None and generation.private
        label = f"{emoji} your {what}" if private else f"{emoji} <@{who.user_id}>'s {what}"
        try:
            where = await self._user(who.user_id) if private else channel
            message = await where.send(f"{label}: {accepted_text(ticket.position)} · job {ticket.job_id}",
                                       allowed_mentions=discord.AllowedMentions.none())
        except discord.HTTPException as err:
            log.info("no status line for job %s: %s", ticket.job_id, err)
            return
        self._tasks.spawn(self._follow(ChannelStatus(message), ticket, label), name=f"status-{ticket.job_id}")

    async def _follow(self, status: ChannelStatus, ticket: Ticket, label: str) -> None:
        final = await relay(self.studio.results.follow(ticket.job_id), _Prefixed(status, label),
                            every=self.status_every, deadline=self.studio.clock() + FOLLOW_SECONDS,
                            clock=self.studio.clock, shown_at=self.studio.clock(),
                            finish=lambda event: None if event.kind == "done" and not event.error else
                            f"❌ {event.error or 'the job failed'}")
        if final is not None and final.kind == "done" and not final.error:
            await status.remove()  # the result is its own message now

    async def _delete(self, channel: Any, generation: Generation, who: Requester) -> None:
        try:
            await self.studio.generations.delete(generation.id, who)
        except NoodleError as err:
            await self._tell(who.user_id, channel, f"❌ {err}")
            return
        if generation.message_id:
            try:
                await channel.get_partial_message(int(generation.message_id)).delete()
            except discord.HTTPException as err:
                log.info("result message %s of #%s was not deleted: %s", generation.message_id, generation.id, err)

    async def _details(self, generation: Generation, who: Requester, channel: Any) -> None:
        """The details and workflow JSON by DM, with the full PNGs the result message does not carry (a grid's
        PNGs kept for ℹ️, previews sent for PNGs too big for the server), in as many DMs as Discord's limit needs."""
        details = await self.studio.generations.details(generation.id, who)
        attached = await _attachment_names(channel, generation.message_id)
        for text, files in await details_messages(generation, details, DM_FILESIZE_LIMIT, attached=attached):
            if not await self._dm(who.user_id, channel, text, files):
                return  # DMs closed: told once

    async def _tell(self, user_id: str, channel: Any, text: str) -> None:
        """A private answer to someone who reacted: a DM, or a short-lived notice if DMs are closed."""
        await self._dm(user_id, channel, text, [])

    async def _dm(self, user_id: str, channel: Any, text: str, files: list[discord.File]) -> bool:
        """Send a DM; False (and a short public notice) when it could not be sent."""
        try:
            user = await self._user(user_id)
            await user.send(content=truncate(text, MAX_CONTENT) or None, files=files)
            return True
        except discord.HTTPException as err:
            log.info("could not DM %s: %s", user_id, err)
            try:
                await channel.send(f"<@{user_id}> I could not send you a direct message ({err.status}); allow DMs "
                                   "from server members to get details and errors", delete_after=NOTICE_SECONDS,
                                   allowed_mentions=only_mentioning(user_id))
            except discord.HTTPException as notice_err:
                log.info("could not tell %s either: %s", user_id, notice_err)
            return False

    async def _user(self, user_id: str) -> Any:
        """A user to DM, from the cache or the API (a restart empties the cache)."""
        return self.bot.get_user(int(user_id)) or await asyncio.wait_for(self.bot.fetch_user(int(user_id)), 15)


class _Prefixed:
    """A status sink that keeps the reaction's label in front of each line."""

    def __init__(self, status: ChannelStatus, label: str) -> None:
        self.status, self.label = status, label

    async def update(self, text: str) -> None:
        await self.status.update(f"{self.label}: {text}")


async def _attachment_names(channel: Any, message_id: str | None) -> list[str]:
    """The file names on a posted result, to leave out of ℹ️; none when it cannot be read (then ℹ️ sends all)."""
    if not message_id:
        return []
    try:
        message = await asyncio.wait_for(channel.fetch_message(int(message_id)), 15)
    except (discord.HTTPException, TimeoutError) as err:
        log.info("result message %s not read back: %s", message_id, err)
        return []
    return [attachment.filename for attachment in message.attachments]


def _requester(payload: discord.RawReactionActionEvent, channel: Any) -> Requester:
    member = payload.member
    manage = False
    if member is not None and hasattr(channel, "permissions_for"):
        manage = bool(channel.permissions_for(member).manage_messages)
    return Requester(str(payload.user_id), str(payload.guild_id) if payload.guild_id else None,
                     getattr(member, "display_name", ""), manage)


def _origin(payload: discord.RawReactionActionEvent) -> Origin:
    return Origin(str(payload.channel_id), str(payload.guild_id) if payload.guild_id else None)


async def _unreact(channel: Any, payload: discord.RawReactionActionEvent) -> None:
    """Take the person's reaction back off so they can use it again (needs Manage Messages; optional)."""
    try:
        await channel.get_partial_message(payload.message_id).remove_reaction(payload.emoji,
                                                                              discord.Object(payload.user_id))
    except discord.HTTPException as err:
        log.debug("reaction left in place on %s: %s", payload.message_id, err)
