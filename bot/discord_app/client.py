"""The Discord client: a commands.Bot with non-privileged intents that owns the store, the engine service
and the Studio, adds the cogs and syncs the slash commands once logged in (`setup_hook`).

`noodle bot` runs it: the engine and the queue start first and keep running while Discord is unreachable
(each failed attempt is one line, retried with backoff, bot/discord_app/connect.py); results that end meanwhile
wait and are posted once connected. `noodle bot --print-commands` prints `command_payloads()` without
connecting. The token comes from DISCORD_TOKEN and is only ever handed to discord.py.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import time
from collections.abc import Sequence
from typing import Any

import discord
from discord import app_commands
from discord.ext import commands
from discord.utils import MISSING

from bot.core.requests.imagine import Allowed
from bot.core.safety.gate import BLOCKED_TEXT
from bot.core.storage.records import Generation
from bot.discord_app.cogs.imagine import imagine_cog
from bot.discord_app.cogs.moderation import Moderation
from bot.discord_app.buttons import ResultButton
from bot.discord_app.cogs.buttons import ResultButtons
from bot.discord_app.cogs.presets import presets_cog
from bot.discord_app.cogs.queue import queue_cog
from bot.discord_app.cogs.reactions import Reactions
from bot.discord_app.cogs.user_settings import settings_cog
from bot.discord_app.cogs.workflow import Workflow
from bot.discord_app.connect import (CONNECT_ERRORS, bad_token, describe, quiet_discord_logs, retry_delays,
                                     worth_retrying)
from bot.discord_app.post import DiscordPublisher
from bot.settings import Settings
from prompts.styles import load_styles

__all__ = ["ConnectedPublisher", "DiscordRefused", "NoodleBot", "command_payloads", "intents", "run_bot"]

log = logging.getLogger(__name__)
SYNC_KEY = "synced_commands_sha256"
MODERATOR_COMMANDS = ("rules", "mod")


def intents() -> discord.Intents:
    """Only what Noodle needs, none of it privileged: guilds (channels, permissions) and reactions."""
    chosen = discord.Intents.none()
    chosen.guilds = True
    chosen.guild_reactions = True
    chosen.dm_reactions = True
    return chosen


async def command_payloads(settings: Settings) -> list[dict[str, Any]]:
    """Every application command as `tree.sync()` would send it, built without a connection."""
    quiet_discord_logs()
    bot = commands.Bot(command_prefix=commands.when_mentioned, intents=intents(), help_command=None)
    await bot.add_cog(imagine_cog(None, Allowed.from_settings(settings)))
    await bot.add_cog(presets_cog(None, Allowed.from_settings(settings), _style_names()))
    await bot.add_cog(settings_cog(None, Allowed.from_settings(settings)))
    await bot.add_cog(queue_cog(None))
    await bot.add_cog(Workflow(None))
    await bot.add_cog(Moderation(None))
    return [command.to_dict(bot.tree) for command in bot.tree.get_commands()]


def _style_names() -> tuple[str, ...]:
    return tuple(load_styles())


class DiscordRefused(Exception):
    """Discord will not have this bot as configured (bad token, a refused command sync): trying again cannot help."""

    def __init__(self, line: str, exit_code: int) -> None:
        super().__init__(line)
        self.exit_code = exit_code


class ConnectedPublisher:
    """Posts through DiscordPublisher once the gateway is up: results that end while Discord is away wait here.

    The result collector bounds each wait ([bot] publish_timeout_seconds); what waited longer stays unposted in
    the store and `NoodleBot.on_ready` posts it.
    """

    def __init__(self, inner: DiscordPublisher, connected: asyncio.Event) -> None:
        self.inner = inner
        self.connected = connected

    async def publish(self, generation: Generation) -> str | None:
        """Post the result as soon as Discord is connected."""
        await self.connected.wait()
        return await self.inner.publish(generation)

    async def publish_failure(self, generation: Generation) -> None:
        """Report the failure as soon as Discord is connected."""
        await self.connected.wait()
        await self.inner.publish_failure(generation)

    async def channel_is_nsfw(self, channel_id: str) -> bool:
        """Whether the channel is marked NSFW, asked once Discord is connected."""
        await self.connected.wait()
        return await self.inner.channel_is_nsfw(channel_id)

    async def channel_parent(self, channel_id: str) -> str | None:
        """The channel a thread is in, asked once Discord is connected."""
        await self.connected.wait()
        return await self.inner.channel_parent(channel_id)

    async def report(self, guild_id: str, channel_id: str, text: str, images: Sequence[str]) -> None:
        """A moderation report for a log channel, sent once Discord is connected."""
        await self.connected.wait()
        await self.inner.report(guild_id, channel_id, text, images)


class NoodleBot(commands.Bot):
    """Noodle on Discord: slash commands in, channel messages with PNGs out."""

    def __init__(self, settings: Settings, *, executor: Any = None) -> None:
        quiet_discord_logs()  # before discord.Client.__init__, which logs the voice warnings
        # No message of Noodle's pings anyone unless it names them (only_mentioning): prompts, preset names and
        # error texts a member wrote are echoed back, and "@everyone" or a role mention in them must stay text
        super().__init__(command_prefix=commands.when_mentioned, intents=intents(), help_command=None,
                         allowed_mentions=discord.AllowedMentions.none())
        self.settings = settings
        # an executor already holding the models (tests share one across bots); None: `start_core` makes one
        self._executor = executor
        self.store: Any = None
        self.engine: Any = None
        self.studio: Any = None
        self.connected = asyncio.Event()  # the gateway is up: results may be posted
        self._repost: asyncio.Task[None] | None = None
        self._core_stopped = False
        self.tree.error(self._on_app_command_error)
        self.tree.interaction_check = self._not_blocked  # type: ignore[method-assign]

    async def start_core(self) -> None:
        """Open the database, start the engine and the Studio, add the cogs: none of it needs Discord."""
        from bot.core.studio import Studio
        from bot.core.storage.store import Store
        from engine.executor import create_executor
        from engine.queue import EngineService

        settings = self.settings
        self.store = await Store.open(settings.bot.database)
        executor = self._executor or create_executor(settings.models, settings.engine_here(), settings.limits)
        self.engine = EngineService(executor, settings.bot.database, settings.queue, settings.cluster())
        await self.engine.start()
        publisher = ConnectedPublisher(DiscordPublisher(self, grid_files=settings.bot.grid_files), self.connected)
        self.studio = Studio(self.engine, self.store, settings, front="discord", publisher=publisher)
        every = settings.bot.status_edit_seconds
        await self.add_cog(imagine_cog(self.studio, Allowed.from_settings(settings), status_every=every))
        await self.add_cog(presets_cog(self.studio, Allowed.from_settings(settings), _style_names()))
        await self.add_cog(settings_cog(self.studio, Allowed.from_settings(settings)))
        await self.add_cog(queue_cog(self.studio))
        await self.add_cog(Workflow(self.studio, status_every=every))
        await self.add_cog(Moderation(self.studio))
        await self.add_cog(Reactions(self, self.studio, status_every=every))
        await self.add_cog(ResultButtons(self.studio, status_every=every))
        self.add_dynamic_items(ResultButton)  # every result's buttons, whenever they were posted
        await self.studio.start()

    async def setup_hook(self) -> None:
        """Run by every successful login: start the core if `start_core` has not, sync the commands if changed."""
        if self.studio is None:
            await self.start_core()
        await self._sync_if_changed()

    async def _sync_if_changed(self) -> None:
        """Sync only when the schema changed: Discord rate-limits command updates per day."""
        payload = json.dumps([c.to_dict(self.tree) for c in self.tree.get_commands()], sort_keys=True)
        digest = hashlib.sha256(payload.encode()).hexdigest()
        if await self.store.get_setting("bot", "global", SYNC_KEY) == digest:
            log.info("application commands unchanged; not syncing")
            return
        try:
            synced = await self.tree.sync()
        except discord.HTTPException as err:
            if worth_retrying(err):
                raise
            # a bulk overwrite is all or nothing: the server keeps the commands it had
            raise DiscordRefused(f"Discord refused the slash commands ({err.status}: {err.text}); the server keeps "
                                 "its previous ones. This is a bug in Noodle: please report it with this line", 1) \
                from err
        await self.store.put_setting("bot", "global", SYNC_KEY, digest)
        log.warning("synced %d application command(s)", len(synced))

    async def keep_connecting(self, token: str) -> None:
        """Log in and stay connected; while Discord cannot be reached, say why in one line and try again later.

        Raises DiscordRefused when Discord refuses the bot itself (a bad token), which waiting cannot fix.
        """
        bot = self.settings.bot
        delays = retry_delays(bot.connect_retry_first_seconds, bot.connect_retry_max_seconds)
        while not self.is_closed():
            try:
                await self.login(token)
                await self.connect(reconnect=True)  # discord.py reconnects a lost gateway by itself
                return
            except (discord.LoginFailure, *CONNECT_ERRORS) as err:
                if bad_token(err):
                    raise DiscordRefused("Discord refused DISCORD_TOKEN: copy the bot token again from the "
                                         "Developer Portal (Bot tab)", 2) from err
                if not worth_retrying(err) or self.is_closed():
                    raise DiscordRefused(f"Discord refused the connection: {describe(err)}", 1) from err
                delay = next(delays)
                log.warning("cannot reach Discord: %s; queued jobs keep running; retrying in %g s (doubling up to "
                            "[bot] connect_retry_max_seconds = %g)", describe(err), delay,
                            bot.connect_retry_max_seconds)
                await self._forget_http_session()
                await asyncio.sleep(delay)

    async def _forget_http_session(self) -> None:
        """Close the failed login's HTTP session so the next login opens a fresh one.

        discord.py's static_login opens a new aiohttp session on every call; the old one, left open, is reported
        as "Unclosed client session" later. Closing it also closes its connector, so the next login must make one.
        """
        await self.http.close()
        self.http.connector = MISSING

    async def stop_core(self) -> None:
        """Stop the cogs' status tasks, the Studio, the engine (its worker thread) and the database; once.

        `close` runs it before disconnecting; a harness that drops the bot without closing its connection (SimCord's
        restart_bot) runs it itself, or the engine's worker would live on beside the next one on the same queue."""
        if self._core_stopped:
            return
        self._core_stopped = True
        if self._repost is not None:
            self._repost.cancel()
        for name in list(self.cogs):
            await self.remove_cog(name)
        if self.studio is not None:
            await self.studio.stop()
        if self.engine is not None:
            await self.engine.stop()
        if self.store is not None:
            await self.store.close()

    async def close(self) -> None:
        """Stop the core (`stop_core`), then disconnect."""
        await self.stop_core()
        await super().close()

    async def on_ready(self) -> None:
        """Say once in the log that the bot is connected (and where); post what ended while it was not."""
        log.warning("Noodle is online as %s in %d server(s)", self.user, len(self.guilds))
        self.connected.set()
        if self.studio is not None and (self._repost is None or self._repost.done()):
            self._repost = asyncio.create_task(self._post_unposted(), name="discord-repost")

    async def on_resumed(self) -> None:
        """The gateway session came back: results may be posted again."""
        self.connected.set()

    async def on_disconnect(self) -> None:
        """The gateway is down: results wait (in ConnectedPublisher) until it is back."""
        self.connected.clear()

    async def _post_unposted(self) -> None:
        """Post the results whose posting gave up while Discord was away (they stay unposted in the store)."""
        for generation in await self.store.unposted("discord"):
            await self.studio.results.settle(generation.id)

    async def _not_blocked(self, interaction: discord.Interaction) -> bool:
        """Every slash command of a member this server blocked (/mod block) is refused, privately; /rules and /mod
        stay open (they need Manage Server or Manage Messages anyway)."""
        if self.studio is None or interaction.type != discord.InteractionType.application_command:
            return True  # autocomplete answers no command; buttons and the remix form check in their handlers
        data: Any = interaction.data or {}
        if data.get("name") in MODERATOR_COMMANDS:
            return True
        if not await self.studio.moderation.is_blocked(str(interaction.guild_id) if interaction.guild_id else None,
                                                       str(interaction.user.id)):
            return True
        await interaction.response.send_message(f"⛔ {BLOCKED_TEXT}", ephemeral=True)
        return False

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


async def serve(settings: Settings, token: str) -> int:
    """Start the engine and the Studio, then keep connecting to Discord until stopped; the exit code."""
    bot = NoodleBot(settings)
    async with bot:  # closes the Studio, the engine and the store however this ends
        await bot.start_core()
        try:
            await bot.keep_connecting(token)
        except DiscordRefused as err:
            print(err)
            return err.exit_code
    return 0


def run_bot(settings: Settings) -> int:
    """Connect and run until stopped; the token is read from the settings and never printed."""
    if settings.discord_token is None:
        print("DISCORD_TOKEN is not set: create a bot at https://discord.com/developers/applications, then "
              "DISCORD_TOKEN=... noodle bot (or try `noodle chat` locally)")
        return 2
    # discord.py logs through our logging (configured in bot/cli.py); it never logs the token
    try:
        return asyncio.run(serve(settings, settings.discord_token.get_secret_value().strip()))
    except KeyboardInterrupt:  # Ctrl-C: `serve` has closed everything on the way out
        return 0
