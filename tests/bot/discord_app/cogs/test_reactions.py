"""Reactions on posted results, from raw events matched by message id: rerolls, variations, delete, details,
permissions, and a restart between posting and reacting."""

from __future__ import annotations

import asyncio
import json
import os
from typing import Any

from bot.discord_app.cogs.reactions import Reactions
from bot.core.front_end import Requester
from tests.bot.conftest import WAIT, Env
from tests.bot.fakes import FakeMessage, reaction


async def _posted(env: Env, options: dict[str, Any] | None = None) -> FakeMessage:
    final = await env.run({"prompt": "a paper boat", "seed": 21, **(options or {})}, Requester("42", "777"))
    return env.channel.get_partial_message(int(final.generation.message_id))


async def _react(env: Env, message: FakeMessage, user_id: int, emoji: str, **kwargs: Any) -> Reactions:
    cog = Reactions(env.client, env.studio, status_every=0.5)
    await cog.on_raw_reaction_add(reaction(message.id, user_id, emoji, **kwargs))
    await asyncio.wait_for(asyncio.gather(*cog._tasks), WAIT)
    return cog


async def test_delete_needs_the_requester_or_manage_messages(env: Env) -> None:
    original = await _posted(env)
    generation = await env.store.by_message(original.id)
    await _react(env, original, 13, "🗑️")
    assert not original.deleted and all(os.path.exists(p) for p in generation.images)
    [(text, _)] = env.client.get_user(13).dms
    assert "only the requester" in text and "Manage Messages" in text
    env.channel.manage.add(14)
    await _react(env, original, 14, "🗑️")
    assert original.deleted and not any(os.path.exists(p) for p in generation.images)
    assert (await env.store.get(generation.id)).state == "deleted"
    await _react(env, original, 42, "🔁")
    assert "was deleted" in env.client.get_user(42).dms[-1][0] and len(env.channel.results()) == 1


async def test_details_are_sent_privately_with_the_workflow_file(env: Env) -> None:
    original = await _posted(env)
    generation = await env.store.by_message(original.id)
    await _react(env, original, 77, "ℹ️")
    [(text, files)] = env.client.get_user(77).dms
    assert "Seed: 21" in text and "A1111 parameters" in text
    assert files[0].filename.endswith("-workflow.json") and json.loads(files[0].data) == generation.workflow
    env.client.get_user(78).closed = True
    await _react(env, original, 78, "ℹ️")
    notice = env.channel.sent[-1]
    assert "<@78> I could not send you a direct message" in notice.content and not notice.files


async def test_limits_apply_to_whoever_reacts(env: Env) -> None:
    original = await _posted(env, {"batch": 2})
    env.studio.queue.per_user_max = 1
    await _react(env, original, 61, "🔁")  # a reroll of two images needs two places
    assert "needs 2 place(s)" in env.client.get_user(61).dms[-1][0]
    assert len(env.channel.results()) == 1
