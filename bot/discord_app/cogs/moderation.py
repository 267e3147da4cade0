"""/rules and /mod history|block|unblock|blocked: a server's moderators keep Noodle within their rules.

No `from __future__ import annotations`: discord.py reads the options from the signature. The commands are
server-only and Discord shows them to members with Manage Server (/rules) or Manage Messages (/mod) by default;
the Studio checks the permission again in code (bot/core/services/moderation.py), whatever a server's
integration settings let through. Every answer is private to the moderator.
"""

from typing import TYPE_CHECKING, Any, Optional

import discord
from discord import app_commands
from discord.ext import commands

from bot.discord_app.cogs.interaction import answer, require_studio
from bot.discord_app.post import requester_of

if TYPE_CHECKING:
    from bot.core.studio import Studio

__all__ = ["Moderation"]

Action = app_commands.Range[str, 1, 10]
ACTION_CHOICES = [app_commands.Choice(name=name, value=name) for name in ("allow", "spoiler", "block")]
CHANNEL_CHOICES = [*ACTION_CHOICES, app_commands.Choice(name="default (remove the channel's own rule)",
                                                        value="default")]


class Moderation(commands.Cog):
    """A server's rules for Noodle, and its moderators' tools."""

    def __init__(self, studio: "Optional[Studio]") -> None:
        self.studio = studio  # None: built for `--print-commands` only

    @app_commands.command(name="rules", description="Show or change this server's rules for Noodle (needs Manage "
                                                    "Server)")
    @app_commands.guild_only()
    @app_commands.default_permissions(manage_guild=True)
    @app_commands.describe(
        threshold="NSFW score (0-1) from which a result counts as NSFW; 0.8 is Yahoo's 'very likely'",
        normal="What happens to such a result in channels not marked NSFW",
        nsfw="What happens to such a result in channels marked NSFW (age-restricted)",
        channel="A channel with its own rule (give action: too)", action="That channel's rule",
        ban="Words to refuse in prompts, comma-separated (nud* matches a word's start)",
        unban="Words to take off the banned list, comma-separated",
        ban_pattern="A regular expression to refuse in prompts", unban_pattern="A pattern to take off the list",
        negative="Negative prompt added to every request (- clears it)",
        allow_checkpoints="Only these checkpoints (comma-separated names or globs; - allows all)",
        block_checkpoints="Never these checkpoints (- clears)", allow_loras="Only these LoRAs (- allows all)",
        block_loras="Never these LoRAs (- clears)",
        log_channel="Where blocked results and refused requests are reported",
        no_log_channel="Stop reporting to a log channel", reset="Go back to the bot owner's defaults first")
    @app_commands.choices(normal=ACTION_CHOICES, nsfw=ACTION_CHOICES, action=CHANNEL_CHOICES)
    async def rules(self, interaction: discord.Interaction,
                    threshold: Optional[app_commands.Range[float, 0.0, 1.0]] = None,
                    normal: Optional[str] = None, nsfw: Optional[str] = None,
                    channel: Optional[discord.TextChannel] = None, action: Optional[str] = None,
                    ban: Optional[app_commands.Range[str, 1, 1000]] = None,
                    unban: Optional[app_commands.Range[str, 1, 1000]] = None,
                    ban_pattern: Optional[app_commands.Range[str, 1, 100]] = None,
                    unban_pattern: Optional[app_commands.Range[str, 1, 100]] = None,
                    negative: Optional[app_commands.Range[str, 1, 1000]] = None,
                    allow_checkpoints: Optional[str] = None, block_checkpoints: Optional[str] = None,
                    allow_loras: Optional[str] = None, block_loras: Optional[str] = None,
                    log_channel: Optional[discord.TextChannel] = None, no_log_channel: Optional[bool] = None,
                    reset: Optional[bool] = None) -> None:
        """Show the rules, or change the options given (the others stay)."""
        options: dict[str, Any] = {
            "threshold": threshold, "normal": normal, "nsfw": nsfw, "action": action, "ban": ban, "unban": unban,
            "ban_pattern": ban_pattern, "unban_pattern": unban_pattern, "negative": negative,
            "allow_checkpoints": allow_checkpoints, "block_checkpoints": block_checkpoints,
            "allow_loras": allow_loras, "block_loras": block_loras,
            "channel": str(channel.id) if channel is not None else None,
            "log_channel": str(log_channel.id) if log_channel is not None else "-" if no_log_channel else None,
            "reset": "true" if reset else None,
        }
        await answer(interaction, require_studio(self.studio).moderation.rules(requester_of(interaction), options))

    mod = app_commands.Group(name="mod", description="Moderate Noodle here (needs Manage Server or Manage Messages)",
                             guild_only=True, default_permissions=discord.Permissions(manage_messages=True))

    @mod.command(name="history", description="A member's recent requests, their NSFW scores and what the rules did")
    @app_commands.describe(user="The member")
    async def history(self, interaction: discord.Interaction, user: discord.User) -> None:
        """A member's latest requests and refusals here."""
        await answer(interaction, require_studio(self.studio).moderation.history(requester_of(interaction),
                                                                                  str(user.id)))

    @mod.command(name="block", description="Refuse a member's Noodle commands and reactions here")
    @app_commands.describe(user="The member", reason="Why (they are told, and the log channel shows it)")
    async def block(self, interaction: discord.Interaction, user: discord.User,
                    reason: Optional[app_commands.Range[str, 0, 200]] = None) -> None:
        """Block a member here."""
        await answer(interaction, require_studio(self.studio).moderation.block(requester_of(interaction),
                                                                                str(user.id), reason or ""))

    @mod.command(name="unblock", description="Let a blocked member use Noodle here again")
    @app_commands.describe(user="The member")
    async def unblock(self, interaction: discord.Interaction, user: discord.User) -> None:
        """Lift a block."""
        await answer(interaction, require_studio(self.studio).moderation.unblock(requester_of(interaction),
                                                                                  str(user.id)))

    @mod.command(name="blocked", description="Who is blocked from Noodle here")
    async def blocked(self, interaction: discord.Interaction) -> None:
        """The blocked members."""
        await answer(interaction, require_studio(self.studio).moderation.blocked(requester_of(interaction)))
