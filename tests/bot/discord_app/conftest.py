"""SimCord fixtures for the tests of bot/discord_app/: the real NoodleBot (discord.py's real HTTP and gateway layers,
the cogs, the Studio, SQLite, the engine on the tiny models) against SimCord's in-memory Discord. Only the network is
simulated.

`world` is one running bot in a guild with a #art channel and members; `world.restart()` is SimCord's
`restart_bot()` with a fresh NoodleBot on the same database file, as a process restart would be. The engine's and the
followers' idle waits are declared to SimCord through the one seam for them (engine/idle.py).
"""

from __future__ import annotations

import asyncio
import threading
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
        """A new process: the old bot's engine and database stop (as when its process ends), then a fresh NoodleBot
        starts on the same database, the virtual Discord unchanged."""
        await self.bot.stop_core()
        await self.env.restart_bot(NoodleBot(self.settings, executor=self.executor))

    def bot_messages(self, channel: Any = None) -> list[Any]:
        """The messages Noodle posted in `channel` (default #art), oldest first."""
        where = channel or self.channel
        return [m for m in where.history() if m.author.id == self.bot.user.id]


def settle_with_the_engine(env: simcord.Env) -> None:
    """Make every settle (after each actor's action, `env.settle()`, a restart) also wait until the engine's queue
    is empty, no request is left unsettled in the store, and what the last events started has settled too.

    The engine runs jobs on its own worker thread, which SimCord cannot see: every bot-side wait on it is declared
    (engine/idle.py), so SimCord would call the bot settled while an image is still being made. A test that holds a
    job on purpose (the Gate) sets `env.wait_for_engine = False` first.
    """
    original = env._settle_internal

    async def settle(**options: Any) -> None:
        await original(**options)
        for _ in range(int(SETTLE_S / 0.02)):
            bot = env.bot
            engine = getattr(bot, "engine", None)
            if not getattr(env, "wait_for_engine", True) or engine is None or getattr(bot, "_core_stopped", True) \
                    or not (engine.jobs() or await bot.store.pending()):  # type: ignore[attr-defined]
                break
            await asyncio.to_thread(threading.Event().wait, 0.02)  # a real moment for the worker thread, off the loop
            await original(**options)
        await original(**options)  # what the last job's end started (storing, posting) settles as well

    env._settle_internal = settle  # type: ignore[method-assign]


@pytest.fixture
async def discord_env(settings: Settings, bot_executor: Executor) -> AsyncIterator[simcord.Env]:
    """SimCord running NoodleBot (the simcord plugin selects its clock while the test runs)."""
    env = simcord.Env(NoodleBot(settings, executor=bot_executor), settle_timeout=SETTLE_S)

    async def declared(awaitable: Any) -> Any:
        return await env.external_wait(awaitable, reason="Noodle idle: the engine's queue or a job's end")

    settle_with_the_engine(env)
    with idle_waits_through(declared):
        await env.start()
        try:
            yield env
        finally:
            # SimCord detaches a bot without closing it: its engine worker thread and database would outlive the test
            await env.bot.stop_core()  # type: ignore[attr-defined]
            await env.shutdown()
    env.raise_errors()


@pytest.fixture
def world(discord_env: simcord.Env, settings: Settings, bot_executor: Executor) -> World:
    guild = discord_env.create_guild("Noodle test server")
    channel = guild.create_text_channel("art")
    alice = guild.add_member(discord_env.create_user("alice"))
    bob = guild.add_member(discord_env.create_user("bob"))
    return World(discord_env, settings, bot_executor, guild, channel, alice, bob)
