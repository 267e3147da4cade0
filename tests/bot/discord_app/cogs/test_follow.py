"""The /imagine follower's private status message: its first line, and the token deadline on the Studio's one
injected clock, counted from when the command reached the bot (never from the snowflake's wall-clock time)."""

from __future__ import annotations

import asyncio
import datetime
import time
import uuid
from typing import Any

import pytest

from bot.core.requests.imagine import Allowed
from bot.discord_app.cogs.imagine import imagine_cog
from bot.discord_app.cogs.interaction import TOKEN_SECONDS
from tests.bot.conftest import WAIT, Env, last_event
from tests.bot.fakes import FakeInteraction
from tests.engine.queue.service_support import GATE_SEED, Gate

SMALL = {"steps": 4, "width": 64, "height": 64}


class ShiftedClock:
    """Monotonic time plus an offset a test moves: the follower's deadline without waiting minutes."""

    def __init__(self) -> None:
        self.offset = 0.0

    def __call__(self) -> float:
        return time.monotonic() + self.offset


async def _imagine(env: Env, interaction: FakeInteraction, **options: Any) -> Any:
    cog = imagine_cog(env.studio, Allowed.from_settings(env.settings), status_every=0.2)
    await cog.imagine.callback(cog, interaction, **{**SMALL, **options})
    return cog


async def _done(cog: Any) -> None:
    await asyncio.wait_for(asyncio.gather(*cog._tasks), WAIT)


def _held_until_running(env: Env, gate: Gate, monkeypatch: pytest.MonkeyPatch) -> None:
    """Hand back each submitted job only once the worker runs it: the ticket then has no queue place."""
    submit = env.engine.submit

    async def submit_and_start(*args: Any, **kwargs: Any) -> Any:
        handle = await submit(*args, **kwargs)
        await gate.wait_entered()
        return handle

    monkeypatch.setattr(env.engine, "submit", submit_and_start)


async def test_a_job_that_starts_at_once_is_announced_as_starting(env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    gate = Gate(monkeypatch)
    _held_until_running(env, gate, monkeypatch)
    interaction = FakeInteraction()
    cog = await _imagine(env, interaction, prompt="a fox", seed=GATE_SEED, negative=uuid.uuid4().hex)
    assert interaction.edits[0].startswith("🎨 Starting: ") and "Queued" not in interaction.edits[0]
    gate.open()
    await _done(cog)
    assert interaction.edits[-1].startswith("✅ Done")


@pytest.mark.parametrize("skew_hours", [-3, 3])
async def test_a_skewed_wall_clock_still_follows_to_the_verdict(env: Env, skew_hours: int) -> None:
    interaction = FakeInteraction()
    # the snowflake's time as a host whose wall clock is hours off would compare it: the token is not dead
    interaction.created_at = datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(hours=skew_hours)
    cog = await _imagine(env, interaction, prompt="a fox", seed=7)
    await _done(cog)
    assert interaction.edits[-1].startswith("✅ Done")


@pytest.mark.parametrize(("after", "followed"), [(TOKEN_SECONDS - 60, True), (TOKEN_SECONDS, False)])
async def test_following_ends_at_the_token_deadline_after_arrival_on_the_injected_clock(
        env: Env, monkeypatch: pytest.MonkeyPatch, after: float, followed: bool) -> None:
    clock = ShiftedClock()
    env.studio.clock = clock
    gate = Gate(monkeypatch)
    interaction = FakeInteraction()
    cog = await _imagine(env, interaction, prompt="a fox", seed=GATE_SEED, negative=uuid.uuid4().hex)
    await gate.wait_entered()
    clock.offset = after  # `after` seconds since the command arrived, on the Studio's clock
    gate.open()
    await _done(cog)
    assert interaction.edits[-1].startswith("✅ Done") is followed
    # the result is posted by the Studio either way
    job_id = interaction.edits[0].rsplit("· job ", 1)[1]
    final = await asyncio.wait_for(last_event(env.studio.results.follow(job_id)), WAIT)
    assert final.kind == "done" and len(env.channel.results()) == 1
