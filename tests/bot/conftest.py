"""Bot fixtures: the real Studio over a real SQLite file in tmp_path and the real engine on the tiny models.

One executor for the session (models load once); each test gets its own database, engine service,
Studio and fake Discord channel, and `Env.restart()` stops them all and starts new ones on the same
database file, as a process restart would.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from bot.discord_app.post import DiscordPublisher
from bot.core.studio import Studio
from bot.settings import BotSettings, Settings
from bot.core.storage.store import Store
from bot.core.front_end import Requester, StudioEvent, Ticket
from engine.executor import Executor
from engine.queue import EngineService
from engine.settings import ModelsSettings
from tests.bot.fakes import FakeChannel, FakeClient
from tests.conftest import tiny_executor

WAIT = 120.0  # seconds any test waits for a job, at most (tiny models take well under one)


@pytest.fixture(scope="session")
def bot_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("bot-engine")


@pytest.fixture(scope="session")
def bot_executor(tiny_models: Path, bot_root: Path) -> Executor:
    return tiny_executor(tiny_models, bot_root, Settings().limits)


@pytest.fixture
def settings(tmp_path: Path, tiny_models: Path, bot_executor: Executor) -> Settings:
    return Settings(
        models=ModelsSettings(dir=tiny_models),
        engine=bot_executor.settings,
        bot=BotSettings(database=tmp_path / "noodle.sqlite3", default_model="tiny-sd15.safetensors",
                        status_edit_seconds=0.5, default_steps=4),
    )


@dataclass
class Env:
    """One running Noodle: store, engine service and Studio posting to a fake Discord channel."""

    settings: Settings
    executor: Executor
    front: str = "discord"
    channel: FakeChannel = field(default_factory=FakeChannel)
    client: FakeClient = field(init=False)
    store: Any = None
    engine: Any = None
    studio: Any = None

    def __post_init__(self) -> None:
        self.client = FakeClient(self.channel)

    async def start(self) -> Env:
        self.store = await Store.open(self.settings.bot.database)
        self.engine = EngineService(self.executor, self.settings.bot.database, self.settings.queue)
        await self.engine.start()
        self.studio = Studio(self.engine, self.store, self.settings, front=self.front,
                             publisher=DiscordPublisher(self.client))
        await self.studio.start()
        return self

    async def stop(self) -> None:
        await self.studio.stop()
        await self.engine.stop()
        await self.store.close()

    async def restart(self) -> None:
        """Stop everything and start again on the same database file (the fake Discord stays)."""
        await self.stop()
        await self.start()

    async def run(self, options: dict[str, Any], who: Requester | None = None) -> StudioEvent:
        """Submit /imagine options and follow the job to its verdict."""
        request = await self.studio.generations.parse({"steps": 4, "width": 64, "height": 64, **options})
        ticket = await self.studio.generations.submit(request, who or Requester("42", "777"), _origin(self.channel))
        return await self.finish(ticket)

    async def finish(self, ticket: Ticket) -> StudioEvent:
        return await asyncio.wait_for(last_event(self.studio.results.follow(ticket.job_id)), WAIT)


def _origin(channel: FakeChannel) -> Any:
    from bot.core.front_end import Origin

    return Origin(str(channel.id), "777")


async def last_event(events: AsyncIterator[StudioEvent]) -> StudioEvent:
    final = None
    async for event in events:
        final = event
    assert final is not None
    return final


@pytest.fixture
async def env(settings: Settings, bot_executor: Executor) -> AsyncIterator[Env]:
    running = await Env(settings, bot_executor).start()
    try:
        yield running
    finally:
        await running.stop()
