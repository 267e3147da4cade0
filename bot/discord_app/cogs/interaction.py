"""What every cog does with an interaction besides its own command: find the Studio it was built with, offer
choices and autocompletes, answer, read an attachment, and follow a queued job in the private status message.

The cogs import these from here and never from one another, so each cog module holds one command family.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Any

import discord
from discord import app_commands

from bot.core.cards.card import truncate
from bot.core.cards.result import message_link
from bot.core.errors import RequestInvalid
from bot.core.front_end import StudioEvent, Ticket
from bot.core.results.status import accepted_text, relay
from bot.core.safety.gate import blocked_text
from bot.discord_app.cogs.tasks import CogTasks
from bot.discord_app.limits import MAX_CONTENT
from bot.discord_app.post import InteractionStatus
from engine.errors import NoodleError

if TYPE_CHECKING:
    from bot.core.studio import Studio

__all__ = ["MAX_CHOICES", "announce_and_follow", "answer", "checkpoint_choices", "file_choices", "fixed_choices",
           "matching_choices",
           "preset_choices", "read_attachment", "reply", "require_studio"]

log = logging.getLogger(__name__)
# Discord shows at most 25 suggestions, each at most 100 characters
MAX_CHOICES, MAX_CHOICE_CHARS = 25, 100
# Discord drops an unanswered command after 3 s and the interaction token after 15 min; edits
# through the token stop a little before that (the result itself is posted as a channel message).
TOKEN_SECONDS = 14 * 60
DOWNLOAD_SECONDS = 30.0


def require_studio(studio: Studio | None) -> Studio:
    """The cog's Studio; a cog built only to print the command schema has none."""
    if studio is None:
        raise RuntimeError("this cog was built to print the command schema; give it a Studio to run commands")
    return studio


def fixed_choices(names: tuple[str, ...]) -> list[app_commands.Choice[str]]:
    """A fixed choice list for an option (samplers, schedulers, styles), as many as Discord shows."""
    return [app_commands.Choice(name=name, value=name) for name in names[:MAX_CHOICES]]


def matching_choices(names: tuple[str, ...], current: str) -> list[app_commands.Choice[str]]:
    """An autocomplete's answer from a fixed list too long for Discord's 25 choices (ComfyUI's 42 samplers):
    the names holding what was typed, those starting with it first."""
    typed = current.strip().lower()
    found = sorted((name for name in names if typed in name.lower()),
                   key=lambda name: not name.lower().startswith(typed))
    return [app_commands.Choice(name=name, value=name) for name in found[:MAX_CHOICES]]


async def checkpoint_choices(studio: Studio, current: str) -> list[app_commands.Choice[str]]:
    """Checkpoints of the models folder matching what was typed (listed off the event loop)."""
    return await file_choices(studio, "checkpoints", current)


async def file_choices(studio: Studio, folder: str, current: str) -> list[app_commands.Choice[str]]:
    """Files of a models folder (`checkpoints`, `controlnet`) matching what was typed (listed off the event loop)."""
    names = await studio.models.names(folder, current)
    fitting = [name for name in names if len(name) <= MAX_CHOICE_CHARS]
    return [app_commands.Choice(name=name, value=name) for name in fitting[:MAX_CHOICES]]


async def preset_choices(studio: Studio, interaction: discord.Interaction,
                         current: str) -> list[app_commands.Choice[str]]:
    """This server's presets matching what was typed."""
    guild = str(interaction.guild_id) if interaction.guild_id else None
    names = await studio.presets.names(guild, current)
    return [app_commands.Choice(name=name, value=name) for name in names[:MAX_CHOICES]]


async def reply(interaction: discord.Interaction, text: str) -> None:
    """Put `text` in the deferred answer (cut to Discord's 2000 characters, with an ellipsis so the cut shows); a
    failed edit is logged, not raised."""
    try:
        await interaction.edit_original_response(content=truncate(text, MAX_CONTENT))
    except discord.HTTPException as err:
        log.info("could not answer the interaction: %s", err)


async def answer(interaction: discord.Interaction, work: Any) -> None:
    """Acknowledge privately, run `work` (a coroutine returning the text), show its text or its error (/preset,
    /rules, /mod)."""
    await interaction.response.defer(ephemeral=True, thinking=True)
    try:
        text = await work
    except NoodleError as err:
        text = f"❌ {err}"
    except Exception:  # a bug or a database error: the member is answered (not left at "thinking…"), the log says
        log.exception("/%s failed", getattr(interaction.command, "qualified_name", "a command"))
        text = "❌ that failed on the bot's side and was logged for its owner; try again in a moment"
    await reply(interaction, text)


async def read_attachment(attachment: discord.Attachment, option: str) -> bytes:
    """An attachment's bytes (its size already checked); a failed or slow download says to attach it again."""
    try:
        return await asyncio.wait_for(attachment.read(), timeout=DOWNLOAD_SECONDS)
    except (discord.HTTPException, asyncio.TimeoutError) as err:
        raise RequestInvalid(f"{option}: {attachment.filename!r} could not be downloaded ({err}); attach it again") \
            from err


async def announce_and_follow(tasks: CogTasks, studio: Studio, interaction: discord.Interaction, ticket: Ticket,
                              every: float, arrived: float) -> None:
    """Say the job is queued (or starting), then keep that private message up to date until the verdict (/imagine,
    /workflow). `arrived` is the Studio's clock when the command reached the bot: the token's deadline counts
    from it, never from the interaction's snowflake time, which a skewed wall clock would put anywhere."""
    await reply(interaction, f"{accepted_text(ticket.position)}: {ticket.summary} · job {ticket.job_id}")
    tasks.spawn(_follow(studio, interaction, ticket, studio.clock(), every, arrived), name=f"status-{ticket.job_id}")


async def _follow(studio: Studio, interaction: discord.Interaction, ticket: Ticket, replied_at: float,
                  every: float, arrived: float) -> None:
    # the token lives 15 minutes from the command; edits through it stop a little before
    await relay(studio.results.follow(ticket.job_id), InteractionStatus(interaction), every=every,
                deadline=arrived + TOKEN_SECONDS, clock=studio.clock, shown_at=replied_at, finish=_verdict)


def _verdict(final: StudioEvent) -> str:
    """The last status line: a link to the posted result, or why there is none."""
    generation = final.generation
    if final.kind == "done" and generation is not None and generation.safety == "block":
        return blocked_text(generation)
    if final.kind == "done" and generation is not None and not final.error:
        return f"✅ Done: #{generation.id} {message_link(generation)}".rstrip()
    return f"❌ {final.error or 'the job failed'}"

