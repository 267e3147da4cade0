"""Presses of the buttons under a result (bot/discord_app/buttons.py): U1-U4, V1-V4, 🔁, Vary, Zoom out, Pan run
through `studio.actions.run`; 🗑️ deletes, ℹ️ shows the details, ✏️ opens the remix modal (bot/discord_app/remix.py).

Every press is acknowledged first (a private "thinking" defer, before any database or engine call: Discord drops an
interaction unanswered after 3 s), except ✏️, whose response must be the modal. The generation comes from the
custom_id, never from the message, so a month-old result works too. Whoever presses owns the new job (their queue
cap counts; permissions as Discord resolved them), and it is followed in the private response with the status
lines /imagine shows, ending with a link to the posted result.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import discord
from discord.ext import commands

from bot.core.actions import Action
from bot.core.safety.gate import BLOCKED_TEXT
from bot.core.storage.records import Generation
from bot.discord_app.buttons import HANDLER_COG
from bot.discord_app.cogs.interaction import announce_and_follow, reply
from bot.discord_app.cogs.tasks import CogTasks
from bot.discord_app.limits import details_messages, filesize_limit
from bot.discord_app.post import requester_of
from bot.discord_app.remix import RemixModal
from engine.errors import NoodleError

if TYPE_CHECKING:
    from bot.core.studio import Studio

__all__ = ["ResultButtons"]

log = logging.getLogger(__name__)
OLD_BUTTON = ("❌ This button is from an older Noodle and means nothing to this one; react with 🔁 or 🔀, or run "
              "/imagine again")


class ResultButtons(commands.Cog, name=HANDLER_COG):
    """Turns button presses on results into Studio calls."""

    def __init__(self, studio: Studio, *, status_every: float = 2.0) -> None:
        self.studio = studio
        self.status_every = status_every
        self.tasks = CogTasks()

    async def cog_unload(self) -> None:
        """Stop following jobs (their results are still posted by the Studio)."""
        await self.tasks.cancel_all()

    async def press(self, interaction: discord.Interaction[Any], generation_id: int, action: Action | None) -> None:
        """Answer one press of `action` on result `generation_id`."""
        arrived = self.studio.clock()  # the token's 15 minutes count from here
        if action is not None and action.name == "remix":
            await self._remix(interaction, generation_id)
            return
        await interaction.response.defer(ephemeral=True, thinking=True)
        if action is None:
            await reply(interaction, OLD_BUTTON)
            return
        who = requester_of(interaction)
        if await self.studio.moderation.is_blocked(who.guild_id, who.user_id):
            await reply(interaction, f"⛔ {BLOCKED_TEXT}")
            return
        try:
            if action.name == "delete":
                await self._delete(interaction, await self.studio.generations.delete(generation_id, who))
            elif action.name == "details":
                await self._details(interaction, generation_id)
            else:
                ticket = await self.studio.actions.run(generation_id, action, who)
                await announce_and_follow(self.tasks, self.studio, interaction, ticket, self.status_every, arrived)
        except NoodleError as err:
            await reply(interaction, f"❌ {err}")

    async def _remix(self, interaction: discord.Interaction[Any], generation_id: int) -> None:
        """The modal is the response; a result that cannot be remixed is said so privately instead."""
        who = requester_of(interaction)
        if await self.studio.moderation.is_blocked(who.guild_id, who.user_id):
            await interaction.response.send_message(f"⛔ {BLOCKED_TEXT}", ephemeral=True)
            return
        try:
            form = await self.studio.actions.remix_form(generation_id, who)
        except NoodleError as err:
            await interaction.response.send_message(f"❌ {err}", ephemeral=True)
            return
        await interaction.response.send_modal(RemixModal(self, generation_id, form, key=interaction.id))

    async def _delete(self, interaction: discord.Interaction[Any], generation: Generation) -> None:
        """The result is retired (files gone); its message goes too."""
        message = interaction.message
        try:
            if message is not None and (not generation.message_id or str(message.id) == generation.message_id):
                await message.delete()
            elif generation.message_id and interaction.channel is not None:
                channel: Any = interaction.channel
                await channel.get_partial_message(int(generation.message_id)).delete()
        except discord.HTTPException as err:
            log.info("result message of #%s was not deleted: %s", generation.id, err)
            await reply(interaction, f"🗑️ #{generation.id} is deleted; its message could not be removed "
                                     f"({err.status}): delete it by hand")
            return
        await reply(interaction, f"🗑️ Deleted #{generation.id}")

    async def _details(self, interaction: discord.Interaction[Any], generation_id: int) -> None:
        """The details, workflow JSON and the full PNGs the message does not carry, as private follow-ups."""
        generation = await self.studio.generations.usable(generation_id, requester_of(interaction))
        details = await self.studio.generations.details(generation_id, requester_of(interaction))
        message = interaction.message
        attached = [attachment.filename for attachment in message.attachments] if message is not None else []
        parts = await details_messages(generation, details, filesize_limit(interaction), attached=attached)
        for n, (text, files) in enumerate(parts):
            if n == 0:
                await interaction.edit_original_response(content=text or None, attachments=files)
            else:
                await interaction.followup.send(content=text or discord.utils.MISSING, files=files, ephemeral=True)
