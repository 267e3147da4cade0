"""A request whose job runs past [queue] job_time_limit_seconds is settled as failed, with the limit named."""

from __future__ import annotations

import re

from bot.settings import Settings
from engine.executor import Executor
from engine.settings import QueueSettings
from tests.bot.conftest import Env


async def test_a_request_past_the_job_time_limit_is_settled_as_failed_with_the_limit_named(
        settings: Settings, bot_executor: Executor) -> None:
    # a millisecond: the job is past it at its first text encode, sampler step or node check, wherever
    limited = settings.model_copy(update={"queue": QueueSettings(job_time_limit_seconds=0.001)})
    env = await Env(limited, bot_executor).start()
    try:
        final = await env.run({"prompt": "a fox that takes too long", "seed": 5})
        generation = await env.store.get(final.generation.id)
    finally:
        await env.stop()
    assert final.kind == "failed"
    assert re.search(r"stopped after [0-9.]+ s: the limit is 0\.001 s \(\[queue\] job_time_limit_seconds in "
                     r"config\.toml\); use fewer steps or a smaller size", final.error or "")
    assert generation.state == "failed" and not generation.images
    assert not env.channel.results()  # no image posted
