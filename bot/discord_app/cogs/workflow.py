"""/workflow file:<attachment>: run an uploaded ComfyUI API-format workflow, acknowledged at once, then live status.

The attachment is refused by the size Discord reports before a byte of it is downloaded; the Studio
checks the bytes again, parses, validates and queues them as one job (bot/core/services/workflows.py). As with
/imagine, the status and any refusal are private to the member and the result is posted in the
channel (or their DMs, for private results); the status follows through the helpers both cogs share
(cogs/interaction.py).
"""

from typing import TYPE_CHECKING, Optional

import discord
from discord import app_commands
from discord.ext import commands

from bot.core.requests.workflow_file import check_size
from bot.discord_app.cogs.interaction import announce_and_follow, read_attachment, reply, require_studio
from bot.discord_app.cogs.tasks import CogTasks
from bot.discord_app.post import origin_of, requester_of
from engine.errors import NoodleError

if TYPE_CHECKING:
    from bot.core.studio import Studio

__all__ = ["Workflow"]


class Workflow(commands.Cog):
    """Run ComfyUI workflows people upload."""

    def __init__(self, studio: "Optional[Studio]", *, status_every: float = 2.0) -> None:
        self.studio = studio  # None: built for `--print-commands` only
        self.status_every = status_every
        self._tasks = CogTasks()

    async def cog_unload(self) -> None:
        """Stop following jobs (their results are still posted by the Studio)."""
        await self._tasks.cancel_all()

    @app_commands.command(name="workflow", description="Run a ComfyUI workflow: the JSON that ComfyUI's Save (API "
                                                        "Format) writes")
    @app_commands.describe(file="The workflow .json, exported with Save (API Format) / Export (API) in ComfyUI",
                           private="Send the result to your DMs instead of this channel (/settings keeps it for you)")
    async def workflow(self, interaction: discord.Interaction, file: discord.Attachment,
                       private: Optional[bool] = None) -> None:
        """Queue the workflow and follow it in a private status message; the result is posted like /imagine's."""
        studio = require_studio(self.studio)
        arrived = studio.clock()  # the token's 15 minutes count from here (interaction.py)
        # Acknowledge first: the download, the checks and the queue may take longer than Discord's 3 seconds.
        await interaction.response.defer(ephemeral=True, thinking=True)
        try:
            data = await _download(file, studio.settings.limits.max_workflow_bytes)
            ticket = await studio.workflows.run(data, file.filename, requester_of(interaction), origin_of(interaction),
                                               private=private)
        except NoodleError as err:
            await reply(interaction, f"❌ {err}")
            return
        await announce_and_follow(self._tasks, studio, interaction, ticket, self.status_every, arrived)


async def _download(attachment: discord.Attachment, limit: int) -> bytes:
    """The attachment's bytes, refused by the size Discord reports before a byte is downloaded."""
    check_size(attachment.filename, attachment.size, limit)
    return await read_attachment(attachment, "workflow")
