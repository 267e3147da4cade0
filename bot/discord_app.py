"""The Discord client: a commands.Bot with non-privileged intents that owns the store, the engine service
and the Studio, adds the cogs and syncs the slash commands in `setup_hook`.

`noodle bot` runs it; `noodle bot --print-commands` prints `command_payloads()` without connecting.
The token comes from DISCORD_TOKEN and is only ever handed to discord.py.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from typing import Any

import discord
from discord import app_commands
from discord.ext import commands

from bot.cogs.imagine import imagine_cog
from bot.cogs.presets import presets_cog
from bot.cogs.queue import queue_cog
from bot.cogs.reactions import Reactions
from bot.cogs.user_settings import settings_cog
from bot.cogs.workflow import Workflow
from bot.discord_post import DiscordPublisher
from bot.request import Allowed
from bot.settings import Settings

__all__ = ["NoodleBot", "command_payloads", "intents", "run_bot"]

log = logging.getLogger(__name__)
SYNC_KEY = "synced_commands_sha256"


def intents() -> discord.Intents:
    """Only what Noodle needs, none of it privileged: guilds (channels, permissions) and reactions."""
    chosen = discord.Intents.none()
    chosen.guilds = True
    chosen.guild_reactions = True
    chosen.dm_reactions = True
    return chosen


async def command_payloads(settings: Settings) -> list[dict[str, Any]]:
    """Every application command as `tree.sync()` would send it, built without a connection."""
    bot = commands.Bot(command_prefix=commands.when_mentioned, intents=intents(), help_command=None)
    await bot.add_cog(imagine_cog(None, Allowed.from_settings(settings)))
    await bot.add_cog(presets_cog(None, Allowed.from_settings(settings), _style_names()))
    await bot.add_cog(settings_cog(None, Allowed.from_settings(settings)))
    await bot.add_cog(queue_cog(None))
    await bot.add_cog(Workflow(None))
    return [command.to_dict(bot.tree) for command in bot.tree.get_commands()]


def _style_names() -> tuple[str, ...]:
    from prompts.styles import load_styles

    return tuple(load_styles())


class NoodleBot(commands.Bot):
    """Noodle on Discord: slash commands in, channel messages with PNGs out."""

    def __init__(self, settings: Settings) -> None:
        super().__init__(command_prefix=commands.when_mentioned, intents=intents(), help_command=None)
        self.settings = settings
        self.store: Any = None
        self.engine: Any = None
        self.studio: Any = None
        self.tree.error(self._on_app_command_error)

    async def setup_hook(self) -> None:
        """Open the database, start the engine and the Studio, add the cogs, sync the commands if they changed."""
        from bot.service import Studio
        from bot.store import Store
        from engine.runtime import create_executor
        from engine.service import EngineService

        settings = self.settings
        self.store = await Store.open(settings.bot.database)
        executor = create_executor(settings.models, settings.engine, settings.limits)
        self.engine = EngineService(executor, settings.bot.database, settings.queue)
        await self.engine.start()
        self.studio = Studio(self.engine, self.store, settings, front="discord", publisher=DiscordPublisher(self))
        every = settings.bot.status_edit_seconds
        await self.add_cog(imagine_cog(self.studio, Allowed.from_settings(settings), status_every=every))
        await self.add_cog(presets_cog(self.studio, Allowed.from_settings(settings), _style_names()))
        await self.add_cog(settings_cog(self.studio, Allowed.from_settings(settings)))
        await self.add_cog(queue_cog(self.studio))
        await self.add_cog(Workflow(self.studio, status_every=every))
        await self.add_cog(Reactions(self, self.studio, status_every=every))
        await self.studio.start()
        await self._sync_if_changed()

    async def _sync_if_changed(self) -> None:
        """Sync only when the schema changed: Discord rate-limits command updates per day."""
        payload = json.dumps([c.to_dict(self.tree) for c in self.tree.get_commands()], sort_keys=True)
        digest = hashlib.sha256(payload.encode()).hexdigest()
        if await self.store.get_setting("bot", "global", SYNC_KEY) == digest:
            log.info("application commands unchanged; not syncing")
            return
        synced = await self.tree.sync()
        await self.store.put_setting("bot", "global", SYNC_KEY, digest)
        log.warning("synced %d application command(s)", len(synced))

    async def close(self) -> None:
        """Stop the cogs' status tasks, the Studio, the engine and the database, then disconnect."""
        for name in list(self.cogs):
            await self.remove_cog(name)
        if self.studio is not None:
            await self.studio.stop()
        if self.engine is not None:
            await self.engine.stop()
        if self.store is not None:
            await self.store.close()
        await super().close()

    async def on_ready(self) -> None:
        """Say once in the log that the bot is connected (and where)."""
        log.warning("Noodle is online as %s in %d server(s)", self.user, len(self.guilds))

    async def _on_app_command_error(self, interaction: discord.Interaction,
                                    error: app_commands.AppCommandError) -> None:
        """Anything a handler did not turn into a message: log it once, tell the person something went wrong."""
        reference = f"{int(time.time()):x}"
        log.error("command failed (ref %s)", reference, exc_info=error)
        text = f"❌ Something went wrong on Noodle's side (ref {reference}); the owner can find it in the log."
        try:
            if interaction.response.is_done():
                await interaction.edit_original_response(content=text)
            else:
                await interaction.response.send_message(text, ephemeral=True)
        except discord.HTTPException as err:
            log.info("could not report error %s: %s", reference, err)


def run_bot(settings: Settings) -> int:
    """Connect and run until stopped; the token is read from the settings and never printed."""
    if settings.discord_token is None:
        print("DISCORD_TOKEN is not set: create a bot at https://discord.com/developers/applications, then "
              "DISCORD_TOKEN=... noodle bot (or try `noodle chat` locally)")
        return 2
    bot = NoodleBot(settings)
    try:
        # log_handler=None: our logging is configured in bot/cli.py; discord.py never logs the token
        bot.run(settings.discord_token.get_secret_value(), log_handler=None)
    except discord.LoginFailure:
        print("Discord refused DISCORD_TOKEN: copy the bot token again from the Developer Portal (Bot tab)")
        return 2
    return 0
