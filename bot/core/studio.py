"""`Studio`: what a front end holds. It builds Noodle's services once, each with its dependencies given explicitly,
and starts and stops the one that runs in the background (the result collector).

    studio = Studio(engine, store, settings, front="discord", publisher=publisher)
    await studio.start()
    ticket = await studio.generations.imagine({"prompt": "a red fox"}, who, origin)
    async for event in studio.results.follow(ticket.job_id): ...

The services, and what each needs:

- `models` (services/models.py): the models folder, architectures, the request context; the engine;
- `user_defaults` (services/user_settings.py): /settings; the store, `models`;
- `presets` (services/server_presets.py): server presets and /imagine's layering; the store, `models`,
  `user_defaults`;
- `queue` (services/queue.py): requests into the engine's queue, /queue; the engine, the store;
- `workers` (services/workers.py): /queue's engine section, the workers and what each holds and runs; the engine,
  the store;
- `workflows` (services/workflows.py): /workflow and its reroll; the engine, `queue`, `user_defaults`;
- `generations` (services/generations.py): /imagine, 🔁, 🔀, 🗑️, ℹ️, /history; all of the above;
- `actions` (services/actions.py): the buttons under a result that make a new image (U1-U4 upscale, V1-V4 and
  vary subtle/strong, reroll, zoom out, pan, the remix form and its submission); `generations`;
- `gate` (safety/gate.py): the server's rules at every door, and the NSFW classifier's verdict on results; the
  store. `moderation` (services/moderation.py): /rules and /mod over it.
- `results` (results/collector.py): stores what the engine reports, reviews and posts results, follows requests.

Nothing here knows Discord or terminals: a front end passes a `Publisher` (bot/core/front_end.py) and
calls the services. `clock` is the one clock the front ends follow jobs by (status throttles, the token deadline):
monotonic, so a skewed or jumping wall clock changes nothing, and given so a test can drive it.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from bot.core.front_end import Publisher
from bot.core.requests.imagine import Allowed
from bot.core.results.collector import ResultCollector
from bot.core.results.retention import Retention
from bot.core.safety.gate import SafetyGate
from bot.core.safety.nsfw import NsfwScorer
from bot.core.services.actions import ResultActions
from bot.core.services.generations import Generations
from bot.core.services.models import ModelChoices
from bot.core.services.moderation import Moderation
from bot.core.services.queue import RequestQueue
from bot.core.services.server_presets import ServerPresets
from bot.core.services.user_settings import UserDefaults
from bot.core.services.workers import EngineWorkers
from bot.core.services.workflows import Workflows
from bot.core.storage.store import Store
from bot.settings import Settings
from engine.queue import EngineService

__all__ = ["Studio"]


class Studio:
    """The transport-free services both front ends call, built around one engine service and one store."""

    def __init__(self, engine: EngineService, store: Store, settings: Settings, *, front: str,
                 publisher: Publisher | None = None, clock: Callable[[], float] = time.monotonic,
                 home_server: str | None = None) -> None:
        self.settings, self.front, self.clock = settings, front, clock
        self.allowed = Allowed.from_settings(settings)
        self.models = ModelChoices(engine, settings, self.allowed)
        self.user_defaults = UserDefaults(store, self.models)
        self.presets = ServerPresets(store, self.models, self.user_defaults)
        scorer = NsfwScorer(settings.safety.threads) if settings.safety.classifier else None
        # home_server: the server whose rules apply to requests that name none (the console is one of its own)
        self.gate = SafetyGate(store, settings.safety, scorer, home_server=home_server,
                               owner_negative=settings.bot.default_negative, syntax=settings.engine.prompt_syntax)
        self.gate.report = getattr(publisher, "report", None)  # a front end with log channels posts reports
        self.moderation = Moderation(self.gate, store)
        self.queue = RequestQueue(engine, store, front=front, per_user_max=settings.queue.per_user_max,
                                  gate=self.gate)
        self.workers = EngineWorkers(engine, store)
        self.workflows = Workflows(engine, settings, self.queue, self.user_defaults)
        self.generations = Generations(engine, store, settings, models=self.models, presets=self.presets,
                                       user_defaults=self.user_defaults, queue=self.queue, workflows=self.workflows)
        self.actions = ResultActions(self.generations, settings)
        retention = Retention(store, settings.bot, settings.retention, input_dir=engine.input_dir,
                              output_dir=engine.output_dir)
        self.results = ResultCollector(engine, store, front=front, publisher=publisher,
                                       publish_timeout=settings.bot.publish_timeout_seconds, retention=retention,
                                       gate=self.gate)

    async def start(self) -> None:
        """Collect results from the engine (what ended while nobody listened first)."""
        await self.results.start()

    async def stop(self, timeout: float = 10.0) -> None:
        """Stop collecting; results still being stored or posted are redone at the next start."""
        await self.results.stop(timeout)
        await self.gate.drain()
