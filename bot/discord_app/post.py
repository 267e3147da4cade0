"""Discord's side of showing things: results posted as channel messages, status sinks, who reacted or asked.

Results go out as new channel messages with the PNG bytes exactly as SaveImage wrote them (so
their `prompt` and `parameters` chunks stay intact) and never through the interaction token,
which dies 15 minutes after the command; the bot adds the reactions that drive 🔁 🔀 🗑️ ℹ️.
"""

from __future__ import annotations

import asyncio
import io
import logging
from pathlib import Path
from typing import Any

import discord

from bot.core.cards.card import truncate
from bot.core.cards.result import failure_text, result_card
from bot.core.errors import GenerationNotFound
from bot.core.front_end import Origin, Requester
from bot.core.requests.workflow_file import is_workflow
from bot.core.storage.records import Generation
from bot.discord_app.embeds import to_embed
from engine.errors import NoodleError

__all__ = ["REACTIONS", "VARIATION_DIGITS", "ChannelStatus", "DiscordPublisher", "InteractionStatus",
           "PublishError", "origin_of", "reactions_for", "requester_of", "resolve_channel"]

log = logging.getLogger(__name__)

REROLL, VARIATION, DELETE, DETAILS = "🔁", "🔀", "🗑️", "ℹ️"
REACTIONS = (REROLL, VARIATION, DELETE, DETAILS)
# On a batch, 1️⃣..4️⃣ ask for a variation of that image (🔀 takes the first)
VARIATION_DIGITS = ("1️⃣", "2️⃣", "3️⃣", "4️⃣")
NEEDED = "Send Messages, Attach Files, Embed Links and Add Reactions"
MAX_FILES = 10  # Discord's limit of attachments on one message; a /workflow may write more images


class PublishError(NoodleError):
    """A result that Discord would not take (missing permission, deleted channel)."""


def reactions_for(generation: Generation) -> tuple[str, ...]:
    """The reactions the bot adds under a result: the four actions, and a digit per image of a batch."""
    if is_workflow(generation):  # 🔀 varies /imagine results only
        return (REROLL, DELETE, DETAILS)
    count = len(generation.images)
    return REACTIONS + (VARIATION_DIGITS[:count] if count > 1 else ())


def requester_of(interaction: discord.Interaction) -> Requester:
    """The person behind a command, with the permissions Discord resolved for this channel."""
    user = interaction.user
    return Requester(str(user.id), str(interaction.guild_id) if interaction.guild_id else None,
                     getattr(user, "display_name", str(user)), bool(interaction.permissions.manage_messages),
                     bool(interaction.permissions.manage_guild))


def origin_of(interaction: discord.Interaction) -> Origin:
    """Where a command's result is posted: the channel it was used in."""
    return Origin(str(interaction.channel_id) if interaction.channel_id else None,
                  str(interaction.guild_id) if interaction.guild_id else None)


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
    included."""

    def __init__(self, client: Any) -> None:
        self.client = client

    async def publish(self, generation: Generation) -> str | None:
        """Send the PNGs and the card as a new message, add the reactions, return the message id.

        A private result (/settings private, /imagine private:) goes to the requester's DMs instead of the
        channel; reactions work there too.
        """
        private = generation.private
        if generation.channel_id is None and not private:
            raise GenerationNotFound(f"#{generation.id} has no channel to post to")
        shown = generation.images[:MAX_FILES]
        blobs = await asyncio.to_thread(lambda: [(Path(p).name, Path(p).read_bytes()) for p in shown])
        files = [discord.File(io.BytesIO(data), filename=name) for name, data in blobs]
        embed = to_embed(result_card(generation))
        if len(generation.images) > len(shown):
            embed.add_field(name="Not attached", value=f"{len(generation.images) - len(shown)} more image(s): Discord "
                            f"takes {MAX_FILES} files a message", inline=False)
        try:
            if private:
                user = await self._user(generation.requester_id)
                message = await user.send(embed=embed, files=files)
            else:
                channel = await resolve_channel(self.client, int(generation.channel_id or 0))
                mention = discord.AllowedMentions(users=[discord.Object(int(generation.requester_id))]) \
                    if generation.requester_id.isdigit() else discord.AllowedMentions.none()
                content = f"<@{generation.requester_id}>" if generation.requester_id.isdigit() else None
                message = await channel.send(content=content, embed=embed, files=files, allowed_mentions=mention)
        except discord.Forbidden as err:
            if private:
                raise PublishError("Noodle may not send you direct messages, and your results are private: allow "
                                   "DMs from server members, or turn private results off with /settings private: "
                                   "False") from err
            raise PublishError(f"Noodle may not post in channel {generation.channel_id}: it needs {NEEDED} "
                               "there") from err
        except discord.HTTPException as err:
            raise PublishError(f"Discord refused the result ({err.status}: {err.text}); the PNGs are kept and "
                               "ℹ️ still works once posted") from err
        for emoji in reactions_for(generation):
            try:
                await message.add_reaction(emoji)
            except discord.HTTPException as err:  # the result is out; people can still react by hand
                log.warning("could not add %s to message %s: %s", emoji, message.id, err)
                break
        return str(message.id)

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
                               allowed_mentions=discord.AllowedMentions(users=True))
        except discord.HTTPException as err:
            raise PublishError(f"could not report the failure of #{generation.id}: {err}") from err

    async def _user(self, user_id: str) -> Any:
        """A user to DM, from the cache or the API."""
        if not user_id.isdigit():
            raise PublishError(f"{user_id} is not a Discord user; private results need one")
        return self.client.get_user(int(user_id)) or await asyncio.wait_for(self.client.fetch_user(int(user_id)), 15)


class InteractionStatus:
    """The status shown in the command's own (private) response, edited through the interaction token."""

    def __init__(self, interaction: discord.Interaction) -> None:
        self.interaction = interaction

    async def update(self, text: str) -> None:
        try:
            await self.interaction.edit_original_response(content=text)
        except discord.HTTPException as err:  # an expired token or a deleted response: the result still posts
            log.info("status edit failed: %s", err)


class ChannelStatus:
    """A status line as a channel message (jobs started by a reaction have no interaction to answer)."""

    def __init__(self, message: Any) -> None:
        self.message = message

    async def update(self, text: str) -> None:
        try:
            await self.message.edit(content=text)
        except discord.HTTPException as err:
            log.info("status edit failed: %s", err)

    async def remove(self) -> None:
        """Delete the status line once the result is posted."""
        try:
            await self.message.delete()
        except discord.HTTPException as err:
            log.info("status delete failed: %s", err)
