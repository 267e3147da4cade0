"""Mentions, on SimCord: whatever a member writes ("@everyone", a role mention) and the bot echoes back stays text.
Every message the bot sends pings at most the requester; Discord reads that from each payload's allowed_mentions."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from tests.bot.discord_app.e2e_support import SMALL, posts

HOSTILE = "@everyone @here <@&123456789012345678> a fox"


def _pings(entry: Any) -> tuple[list[str], list[str]]:
    """What a logged message request lets Discord ping: its parse list and its users."""
    mentions = entry.json.get("allowed_mentions") or {}
    return mentions.get("parse", []), mentions.get("users", [])


async def test_a_result_and_an_unwatched_failure_ping_only_the_requester(world: Any) -> None:
    await world.alice.slash(world.channel, "imagine", prompt=HOSTILE, **SMALL)
    await world.env.settle()
    [result] = posts(world.env, world.channel.id)
    assert _pings(result) == ([], [world.alice.id])
    # a job nobody followed (the bot restarted while it was queued) fails with a reason quoting the member's text
    generation = await world.bot.studio.generations.by_message(world.bot_messages()[0].id)
    failed = replace(generation, state="failed", error=f"the prompt {HOSTILE!r} could not be read")
    await world.bot.studio.results.publisher.publish_failure(failed)
    failure = posts(world.env, world.channel.id)[-1]
    assert "@everyone" in failure.json["content"]  # said as it was written ...
    assert _pings(failure) == ([], [world.alice.id])  # ... and pings nobody but alice
    # every other message of the bot's (status edits, follow-ups) defaults to pinging nobody
    sent = [e for e in world.env.http_requests if e.method in ("POST", "PATCH") and isinstance(e.json, dict)
            and "content" in e.json]
    assert sent and all("everyone" not in _pings(e)[0] and "roles" not in _pings(e)[0] for e in sent)
