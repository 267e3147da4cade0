"""Reactions on posted results through the real discord.py's raw reaction events on SimCord: 🔁 🔀 1️⃣-4️⃣ 🗑️ ℹ️,
who owns the new job, what someone else may not do, and reactions on a result posted before a restart."""

from __future__ import annotations

import json

from tests.bot.discord_app.e2e_support import SMALL, emojis


async def _posted(world, **options):
    await world.alice.slash(world.channel, "imagine", prompt="a paper boat", seed=21, **{**SMALL, **options})
    await world.env.settle()
    return world.bot_messages()[-1]


def _results(world):
    return [m for m in world.bot_messages() if m.attachments]


async def _react(world, who, message, emoji):
    await who.react(message, emoji)
    await world.env.settle()


async def test_a_reroll_by_someone_else_is_their_job_posted_as_a_new_message(world) -> None:
    original = await _posted(world)
    await _react(world, world.bob, original, "🔁")
    assert len(_results(world)) == 2
    reroll = _results(world)[-1]
    assert reroll.content == f"<@{world.bob.id}>" and "Reroll" in reroll.embeds[0].title  # bob owns it
    stored = await world.bot.store.by_message(reroll.id)
    assert stored.requester_id == str(world.bob.id) and stored.kind == "reroll"
    assert len(world.bot_messages()) == 2  # the reroll's status line is gone once the result is out
    again = world.channel.history()[0]
    assert "🔁" in emojis(again)  # bob's own 🔁 was taken back off (the bot's stays)


async def test_variations_from_the_shuffle_and_the_digits_of_a_batch(world) -> None:
    original = await _posted(world, batch=2)
    await _react(world, world.alice, original, "2️⃣")
    second = await world.bot.store.by_message(_results(world)[-1].id)
    assert second.kind == "variation" and second.request["variation_of_image"] == 2
    await _react(world, world.alice, original, "🔀")
    first = await world.bot.store.by_message(_results(world)[-1].id)
    assert first.kind == "variation" and first.request["variation_of_image"] == 1


async def test_delete_by_someone_else_is_refused_and_the_requester_deletes(world) -> None:
    original = await _posted(world)
    await _react(world, world.bob, original, "🗑️")
    assert [m.id for m in world.bot_messages()] == [original.id]
    [refusal] = world.bot_messages(world.bob.user.dm_channel)
    assert "only the requester" in refusal.content and "Manage Messages" in refusal.content
    await _react(world, world.alice, original, "🗑️")
    assert not world.bot_messages()
    generation = await world.bot.store.get(1)
    assert generation.state == "deleted"


async def test_details_are_sent_by_dm_with_the_workflow_file(world) -> None:
    original = await _posted(world)
    workflow = (await world.bot.store.by_message(original.id)).workflow
    await _react(world, world.bob, original, "ℹ️")
    [dm] = world.bot_messages(world.bob.user.dm_channel)
    assert "Seed: 21" in dm.content
    [attached] = [a for a in dm.attachments if a.filename.endswith("-workflow.json")]
    assert json.loads(await attached.read()) == workflow
    assert len(world.bot_messages()) == 1  # nothing public


async def test_other_emoji_are_ignored(world) -> None:
    original = await _posted(world)
    await _react(world, world.bob, original, "👍")
    assert len(world.bot_messages()) == 1 and not world.bot_messages(world.bob.user.dm_channel)


async def test_reactions_on_a_result_from_before_a_restart_still_work(world) -> None:
    original = await _posted(world)
    await world.restart()
    await _react(world, world.bob, original, "🔁")
    reroll = await world.bot.store.by_message(_results(world)[-1].id)
    assert reroll.parent_id == (await world.bot.store.by_message(original.id)).id
    assert reroll.requester_id == str(world.bob.id)
    await _react(world, world.bob, original, "ℹ️")
    assert "Seed: 21" in world.bot_messages(world.bob.user.dm_channel)[-1].content
