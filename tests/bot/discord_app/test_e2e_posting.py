"""Posting a result through Discord's failures, on SimCord: a 500 or a 429 on the message is retried after its
backoff and the result posted once; a channel that keeps failing gets the result when it answers again.

Time is SimCord's: the publisher's backoff and the collector's reposts wait on virtual time, which
`env.advance_time` moves; no test sleeps.
"""

from __future__ import annotations

from typing import Any

import pytest

from tests.bot.discord_app.e2e_support import SMALL

MESSAGES = "/channels/*/messages"


def _results(world: Any) -> list[Any]:
    """Result messages (the ones with a PNG) Noodle posted in #art."""
    return [m for m in world.bot_messages() if m.attachments]


@pytest.mark.parametrize("status", [500, 502, 429])
async def test_one_failure_while_posting_is_retried_and_the_result_posted_once(world: Any, status: int) -> None:
    world.env.inject_error("POST", MESSAGES, status=status, times=1)
    result = await world.alice.slash(world.channel, "imagine", prompt="a red fox", **SMALL)
    assert _results(world) == []  # the first try failed; the retry waits its backoff (1 s: no retry_after)
    await world.env.advance_time(1.0)
    posted = _results(world)
    assert len(posted) == 1 and posted[0].attachments[0].filename.endswith(".png")
    await world.env.advance_time(60.0)  # nothing else is posted later: not twice
    assert len(_results(world)) == 1
    assert result.response is not None and result.response.content.startswith("✅ Done: #1")
    generation = await world.bot.studio.generations.by_message(posted[0].id)
    assert generation is not None and generation.id == 1  # the store recorded the message the post made


async def test_a_channel_that_keeps_failing_gets_the_result_when_it_answers_again(world: Any) -> None:
    # four tries (the first and three retries after 1, 2 and 4 s) fail, then Discord answers again
    world.env.inject_error("POST", MESSAGES, status=503, times=4)
    await world.alice.slash(world.channel, "imagine", prompt="a patient fox", **SMALL)
    await world.env.advance_time(7.0)
    assert _results(world) == []  # given up for now, kept unposted: never lost
    stored = await world.bot.store.unposted("discord")
    assert [g.id for g in stored] == [1]
    await world.env.advance_time(30.0)  # the collector's first repost (REPOST_DELAYS)
    assert len(_results(world)) == 1
    assert await world.bot.store.unposted("discord") == []
    await world.env.advance_time(600.0)
    assert len(_results(world)) == 1
