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


async def test_reroll_by_someone_else_is_their_job_posted_as_a_new_message(env: Env) -> None:
    original = await _posted(env)
    await _react(env, original, 99, "🔁")
    results = env.channel.results()
    assert len(results) == 2 and results[-1] is not original
    reroll = await env.store.by_message(results[-1].id)
    parent = await env.store.by_message(original.id)
    assert reroll.kind == "reroll" and reroll.parent_id == parent.id
    assert reroll.requester_id == "99" and results[-1].content == "<@99>"  # the reactor owns the job
    assert "🔁 Reroll of" in results[-1].embed.title and any(f.name == "Cached" for f in results[-1].embed.fields)
    status = [m for m in env.channel.sent if not m.files]
    assert status and all(m.deleted for m in status)  # the status line goes once the result is out
    assert ("🔁", 99) in original.removed_reactions  # free to react again


async def test_digits_pick_the_image_of_a_batch_for_a_variation(env: Env) -> None:
    original = await _posted(env, {"batch": 2})
    assert original.reactions[-2:] == ["1️⃣", "2️⃣"]
    await _react(env, original, 42, "2️⃣")
    variation = await env.store.by_message(env.channel.results()[-1].id)
    assert variation.kind == "variation" and variation.request["variation_of_image"] == 2
    await _react(env, original, 42, "🔀")
    assert (await env.store.by_message(env.channel.results()[-1].id)).request["variation_of_image"] == 1


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


async def test_the_requester_deletes_their_own_result(env: Env) -> None:
    original = await _posted(env)
    await _react(env, original, 42, "🗑️")
    assert original.deleted


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


async def test_other_reactions_and_messages_are_ignored(env: Env) -> None:
    original = await _posted(env)
    await _react(env, original, 42, "👍")
    await _react(env, original, 1, "🔁")  # the bot's own reaction under a fresh result
    stranger = await env.channel.send("not a result")
    await _react(env, stranger, 42, "🔁")
    assert len(env.channel.results()) == 1 and not env.engine.jobs()


async def test_reactions_work_after_a_restart_between_posting_and_reacting(env: Env) -> None:
    original = await _posted(env)
    await env.restart()  # new store, engine service and Studio on the same database file
    await _react(env, original, 55, "🔁")
    reroll = await env.store.by_message(env.channel.results()[-1].id)
    assert reroll.parent_id == (await env.store.by_message(original.id)).id and reroll.requester_id == "55"
    await _react(env, original, 56, "ℹ️")
    assert "Seed: 21" in env.client.get_user(56).dms[0][0]


async def test_limits_apply_to_whoever_reacts(env: Env) -> None:
    original = await _posted(env, {"batch": 2})
    env.studio.queue.per_user_max = 1
    await _react(env, original, 61, "🔁")  # a reroll of two images needs two places
    assert "needs 2 place(s)" in env.client.get_user(61).dms[-1][0]
    assert len(env.channel.results()) == 1
