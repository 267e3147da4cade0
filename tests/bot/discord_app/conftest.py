"""SimCord fixtures for the tests of bot/discord_app/: the real NoodleBot (discord.py's real HTTP and gateway layers,
the cogs, the Studio, SQLite, the engine on the tiny models) against SimCord's in-memory Discord. Only the network is
simulated.

`world` is one running bot in a guild with a #art channel and members; `world.restart()` is SimCord's
`restart_bot()` with a fresh NoodleBot on the same database file, as a process restart would be. The engine's and the
followers' idle waits are declared to SimCord through the one seam for them (engine/idle.py).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import pytest
import simcord

from bot.discord_app.client import NoodleBot
from bot.settings import Settings
from engine.executor import Executor
from engine.idle import idle_waits_through

SETTLE_S = 120.0  # what SimCord waits for the bot's work to settle: a few tiny-model jobs at most


@dataclass
class World:
    """A running Noodle on SimCord: the env, the guild, its #art channel and two members."""

    env: simcord.Env
    settings: Settings
    executor: Executor
    guild: Any
    channel: Any
    alice: Any
    bob: Any

    @property
    def bot(self) -> NoodleBot:
        return self.env.bot  # type: ignore[return-value]

    async def restart(self) -> None:
        """A new process: a fresh NoodleBot on the same database, the virtual Discord unchanged."""
        await self.env.restart_bot(NoodleBot(self.settings, executor=self.executor))

    def bot_messages(self, channel: Any = None) -> list[Any]:
        """The messages Noodle posted in `channel` (default #art), oldest first."""
        where = channel or self.channel
        return [m for m in where.history() if m.author.id == self.bot.user.id]


@pytest.fixture
async def discord_env(settings: Settings, bot_executor: Executor) -> AsyncIterator[simcord.Env]:
    """SimCord running NoodleBot (the simcord plugin selects its clock while the test runs)."""
    env = simcord.Env(NoodleBot(settings, executor=bot_executor), settle_timeout=SETTLE_S)

    async def declared(awaitable: Any) -> Any:
        return await env.external_wait(awaitable, reason="Noodle idle: the engine's queue or a job's end")

    with idle_waits_through(declared):
        await env.start()
        try:
            yield env
        finally:
            await env.shutdown()
    env.raise_errors()


@pytest.fixture
def world(discord_env: simcord.Env, settings: Settings, bot_executor: Executor) -> World:
    guild = discord_env.create_guild("Noodle test server")
    channel = guild.create_text_channel("art")
    alice = guild.add_member(discord_env.create_user("alice"))
    bob = guild.add_member(discord_env.create_user("bob"))
    return World(discord_env, settings, bot_executor, guild, channel, alice, bob)
