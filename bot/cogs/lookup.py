"""What several cogs share: the Studio they were built with, and the autocompletes of checkpoints and presets."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

import discord
from discord import app_commands

if TYPE_CHECKING:
    from bot.service import Studio

# Discord shows at most 25 suggestions, each at most 100 characters
MAX_CHOICES, MAX_CHOICE_CHARS = 25, 100


def require_studio(studio: Studio | None) -> Studio:
    """The cog's Studio; a cog built only to print the command schema has none."""
    if studio is None:
        raise RuntimeError("this cog was built to print the command schema; give it a Studio to run commands")
    return studio


async def checkpoint_choices(studio: Studio, current: str) -> list[app_commands.Choice[str]]:
    """Checkpoints of the models folder matching what was typed (listed off the event loop)."""
    names = await asyncio.to_thread(studio.checkpoints, current)
    return [app_commands.Choice(name=name, value=name) for name in names if len(name) <= MAX_CHOICE_CHARS][:MAX_CHOICES]


async def preset_choices(studio: Studio, interaction: discord.Interaction, current: str) -> list[app_commands.Choice[str]]:
    """This server's presets matching what was typed."""
    guild = str(interaction.guild_id) if interaction.guild_id else None
    names = await studio.preset_names(guild, current)
    return [app_commands.Choice(name=name, value=name) for name in names[:MAX_CHOICES]]
