"""/queue: the caller's requests in the queue, with place and ETA, and a Cancel button for each; then the engine's
workers, what each holds and runs (bot/core/services/workers.py).

The answer is private (ephemeral). The buttons are a discord.py View on that answer: pressing one
cancels through the Studio (which checks that the presser may) and redraws the list. `cancel:` does
the same without buttons, for a request number read off a status line or a result.
"""

import logging
from typing import TYPE_CHECKING, Optional

import discord
from discord import app_commands
from discord.ext import commands

from bot.core.front_end import Requester
from bot.core.requests.imagine import DISCORD_INT_MAX
from bot.core.services.queue import QueueEntry, queue_text
from bot.core.services.workers import append_section
from bot.discord_app.cogs.interaction import reply, require_studio
from bot.discord_app.limits import MAX_CONTENT
from bot.discord_app.post import requester_of
from engine.errors import NoodleError

if TYPE_CHECKING:
    from bot.core.studio import Studio

__all__ = ["CancelButton", "QueueView", "cancel_line", "queue_cog"]

log = logging.getLogger(__name__)
# Discord: at most 25 buttons on a message (5 rows of 5)
MAX_BUTTONS = 25
VIEW_SECONDS = 10 * 60


class CancelButton(discord.ui.Button):  # type: ignore[type-arg]
    """Cancels one request, then shows the caller's queue again."""

    def __init__(self, studio: "Studio", entry: QueueEntry) -> None:
        super().__init__(label=f"Cancel #{entry.generation_id}", style=discord.ButtonStyle.danger,
                         custom_id=f"noodle-cancel-{entry.generation_id}")
        self.studio = studio
        self.generation_id = entry.generation_id

    async def callback(self, interaction: discord.Interaction) -> None:
        who = requester_of(interaction)
        head = await cancel_line(self.studio, who, self.generation_id)
        text, view = await queue_answer(self.studio, who, f"{head}\n")
        try:
            await interaction.response.edit_message(content=text, view=view)
        except discord.HTTPException as err:
            log.info("could not redraw /queue: %s", err)


class QueueView(discord.ui.View):
    """A Cancel button per listed request still to cancel (the first 25; one already cancelling has none)."""

    def __init__(self, studio: "Studio", entries: list[QueueEntry]) -> None:
        super().__init__(timeout=VIEW_SECONDS)
        for entry in [entry for entry in entries if not entry.cancelling][:MAX_BUTTONS]:
            self.add_item(CancelButton(studio, entry))


async def cancel_line(studio: "Studio", who: Requester, generation_id: int) -> str:
    """Cancel request #`generation_id` for `who`; the outcome as the answer's first line."""
    try:
        stopped = await studio.queue.cancel(who, generation_id)
    except NoodleError as err:
        return f"❌ {err}"
    return f"🛑 Cancelled #{generation_id} ({stopped} image(s) stopped)."


async def queue_answer(studio: "Studio", who: Requester, head: str = "") -> tuple[str, Optional[QueueView]]:
    """`head`, the list, then the engine's workers, in one message (the workers give way first); and its buttons
    (None when there is nothing to cancel)."""
    entries = await studio.queue.entries(who)
    text = head + queue_text(entries, "Cancel one with its button, or /queue cancel: NUMBER.")
    text = append_section(text, await studio.workers.text(who), MAX_CONTENT)
    return text, (QueueView(studio, entries) if any(not entry.cancelling for entry in entries) else None)


def queue_cog(studio: "Optional[Studio]") -> commands.Cog:
    """The /queue cog; `studio` None builds it for `--print-commands` only."""

    def need_studio() -> "Studio":
        return require_studio(studio)

    class Queue(commands.Cog):
        """Your place in the queue."""

        @app_commands.command(name="queue", description="Your queued and running requests, with place and ETA; "
                                                        "cancel them")
        @app_commands.describe(cancel="Cancel this request (its number, as in #12)")
        async def queue(self, interaction: discord.Interaction,
                        cancel: Optional[app_commands.Range[int, 1, DISCORD_INT_MAX]] = None) -> None:
            """List (after cancelling `cancel`, if given), privately."""
            await interaction.response.defer(ephemeral=True, thinking=True)
            who = requester_of(interaction)
            head = f"{await cancel_line(need_studio(), who, cancel)}\n" if cancel is not None else ""
            text, view = await queue_answer(need_studio(), who, head)
            if view is None:
                await reply(interaction, text)
                return
            try:
                await interaction.edit_original_response(content=text, view=view)
            except discord.HTTPException as err:
                log.info("could not answer /queue: %s", err)

    return Queue()
