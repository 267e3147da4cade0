"""Moderation end to end through the real discord.py on SimCord, the real open_nsfw classifier and the tiny models:
/rules and /mod permissions checked in code, over-threshold results held back, spoilered or posted by the channel's
rule (with the log channel's report and /mod history), banned words, blocked members at every door (slash command,
reaction, button, remix form), and the enforced negative on the posted card and PNG.

The over-threshold result is a /workflow of LoadImage -> SaveImage on `high_image()` (tests/bot/core/safety/
test_nsfw.py: about 0.80 on the classifier), so its result scores as high, with no sampling; the tests set
`/rules threshold: 0.6` first. Tiny-model results score about 0.01.
"""

from __future__ import annotations

from typing import Any

import discord
import pytest
from simcord.backend.errors import SetupError

from bot.core.actions import custom_id, parse_action
from bot.core.safety.gate import BLOCKED_TEXT, blocked_text
from tests.bot.core.safety.test_nsfw import high_image
from tests.bot.discord_app.conftest import World
from tests.bot.discord_app.e2e_support import SMALL, field, mark_nsfw, png_texts, status_edits, workflow_file

HIGH_FILE = "moderation-high.png"


def _said(world: World, result: Any) -> str:
    """The last thing the bot answered an interaction (its status edits, or its one private message)."""
    edits = status_edits(world.env, result)
    return edits[-1] if edits else result.response.content


def _moderator(world: World, name: str = "carol", **permissions: bool) -> Any:
    """A member whose role has `permissions` (default: Manage Server and Manage Messages)."""
    role = world.guild.create_role(f"{name}-role", permissions=discord.Permissions(
        **(permissions or {"manage_guild": True, "manage_messages": True})))
    return world.guild.add_member(world.env.create_user(name), roles=[role])


def _let_use(world: World, command: str, member: Any) -> None:
    """The server's integration settings let `member` use `command`, whatever its default permissions say."""
    root = world.env.backend.find_command(command, world.guild.id, type=1)
    world.guild.set_command_permissions(int(root["id"]), {member: True})


async def _rules(world: World, moderator: Any, **options: Any) -> str:
    shown = await moderator.slash(world.channel, "rules", **options)
    text = _said(world, shown)
    assert text.startswith("rules saved:"), text
    return text


def _high_workflow(world: World, *, batch: bool = False) -> dict[str, Any]:
    """A workflow whose result is the synthetic image the classifier scores about 0.80 (twice, as a batch of two:
    a grid and two PNGs)."""
    high_image().save(world.settings.engine.input_dir / HIGH_FILE)
    workflow: dict[str, Any] = {
        "1": {"class_type": "LoadImage", "inputs": {"image": HIGH_FILE}},
        "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "moderation"}}}
    if batch:
        workflow["3"] = {"class_type": "ImageBatch", "inputs": {"image1": ["1", 0], "image2": ["1", 0]}}
        workflow["2"]["inputs"]["images"] = ["3", 0]
    return workflow


async def _run_high(world: World, channel: Any, *, batch: bool = False) -> Any:
    result = await world.alice.slash(channel, "workflow", file=workflow_file(_high_workflow(world, batch=batch)))
    await world.env.settle()
    return result


def _dms(world: World, member: Any) -> list[str]:
    dm = member.user.dm_channel
    return [m.content for m in world.bot_messages(dm)] if dm is not None else []


async def test_rules_is_refused_in_code_without_manage_server_and_saved_with_it(world: World) -> None:
    with pytest.raises(SetupError):  # Discord hides /rules from members without Manage Server by default
        await world.alice.slash(world.channel, "rules")
    _let_use(world, "rules", world.alice)  # ... but a server may show it to anyone: the bot checks again
    for options in ({}, {"threshold": 0.1, "normal": "allow"}):
        refused = _said(world, await world.alice.slash(world.channel, "rules", **options))
        assert refused.startswith("❌ ") and "Manage Server" in refused
    untouched = await world.bot.studio.gate.rules(str(world.guild.id))
    assert untouched == type(untouched).defaults(world.settings.safety)

    carol = _moderator(world, manage_guild=True)
    saved = await _rules(world, carol, threshold=0.6, normal="spoiler", ban="nude, gore*")
    assert "NSFW threshold: 0.60" in saved and "in normal channels: spoiler" in saved
    assert "banned words: nude, gore*" in saved
    shown = _said(world, await carol.slash(world.channel, "rules"))
    assert shown == saved.removeprefix("rules saved:\n")
    stored = await world.bot.studio.gate.rules(str(world.guild.id))
    assert stored.threshold == 0.6 and stored.normal == "spoiler" and stored.banned_words == ("nude", "gore*")


async def test_an_over_threshold_result_is_held_back_reported_and_in_the_members_history(world: World) -> None:
    carol = _moderator(world)
    log_channel = world.guild.create_text_channel("mod-log")
    await _rules(world, carol, threshold=0.6, log_channel=log_channel)
    result = await _run_high(world, world.channel)
    assert world.bot_messages() == []  # nothing in #art
    generation = await world.bot.store.get(1)
    assert generation.safety == "block" and generation.nsfw_score >= 0.6
    told = blocked_text(generation)
    assert told.startswith("🚫 #1 was not posted") and f"{generation.nsfw_score:.2f}" in told
    assert _said(world, result) == told  # the private status says it
    assert _dms(world, world.alice) == [told]  # and a DM
    [report] = world.bot_messages(log_channel)
    assert "held back #1" in report.content and f"<@{world.alice.id}>" in report.content
    [image] = report.attachments
    assert image.filename.startswith("SPOILER_") and image.filename.endswith(".png")
    history = _said(world, await carol.slash(world.channel, "mod history", user=world.alice))
    [line] = [line for line in history.splitlines() if "#1 " in line]
    assert f"NSFW {generation.nsfw_score:.2f}" in line and "held back" in line


async def test_with_the_spoiler_rule_every_file_of_the_result_is_a_spoiler(world: World) -> None:
    carol = _moderator(world)
    await _rules(world, carol, threshold=0.6, normal="spoiler")
    result = await _run_high(world, world.channel, batch=True)
    [posted] = world.bot_messages()
    names = [a.filename for a in posted.attachments]
    assert len(names) == 3 and all(name.startswith("SPOILER_") for name in names), names  # the grid and each PNG
    assert _said(world, result).startswith("✅ Done: #1") and not _dms(world, world.alice)
    generation = await world.bot.store.get(1)
    assert generation.safety == "spoiler" and generation.nsfw_score >= 0.6


async def test_a_tiny_model_result_stays_under_the_threshold_and_is_posted_plainly(world: World) -> None:
    carol = _moderator(world)
    await _rules(world, carol, threshold=0.6, normal="spoiler")
    await world.alice.slash(world.channel, "imagine", prompt="a red fox", **SMALL)
    await world.env.settle()
    [posted] = world.bot_messages()
    assert posted.attachments and not any(a.filename.startswith("SPOILER_") for a in posted.attachments)
    generation = await world.bot.store.get(1)
    assert generation.safety == "allow" and generation.nsfw_score < 0.6


async def test_in_a_channel_marked_nsfw_the_result_is_posted_as_it_is(world: World) -> None:
    carol = _moderator(world)
    await _rules(world, carol, threshold=0.6)  # normal channels: block; NSFW channels: allow (the defaults)
    lounge = world.guild.create_text_channel("after-dark")
    mark_nsfw(world.bot, lounge)
    result = await _run_high(world, lounge)
    [posted] = world.bot_messages(lounge)
    assert posted.attachments and not any(a.filename.startswith("SPOILER_") for a in posted.attachments)
    assert _said(world, result).startswith("✅ Done: #1") and not _dms(world, world.alice)
    generation = await world.bot.store.get(1)
    assert generation.safety == "allow" and generation.nsfw_score >= 0.6  # over the threshold, and allowed here


async def test_a_banned_word_is_refused_through_spelling_tricks_reported_and_listed(world: World) -> None:
    carol = _moderator(world)
    log_channel = world.guild.create_text_channel("mod-log")
    await _rules(world, carol, ban="nude", log_channel=log_channel)
    result = await world.alice.slash(world.channel, "imagine", prompt="the n.u.d.e figure", **SMALL)
    await world.env.settle()
    refused = _said(world, result)
    assert refused.startswith("❌ ") and "the word 'nude'" in refused
    assert world.bot_messages() == [] and await world.bot.store.recent() == []  # nothing queued
    [report] = world.bot_messages(log_channel)
    assert report.content.startswith(f"🚫 refused imagine by <@{world.alice.id}>: ")
    assert "the word 'nude'" in report.content and "> the n.u.d.e figure" in report.content
    history = _said(world, await carol.slash(world.channel, "mod history", user=world.alice))
    assert "refused imagine: " in history and "the word 'nude'" in history


async def test_a_banned_word_spelled_out_after_a_one_letter_word_is_refused(world: World) -> None:
    carol = _moderator(world)
    await _rules(world, carol, ban="nude")
    result = await world.alice.slash(world.channel, "imagine", prompt="a n.u.d.e figure", **SMALL)
    await world.env.settle()
    assert _said(world, result).startswith("❌ ") and "the word 'nude'" in _said(world, result)
    assert world.bot_messages() == []


async def test_a_blocked_member_is_refused_at_every_door_until_unblocked(world: World) -> None:
    carol = _moderator(world, manage_messages=True)  # Manage Messages alone is enough for /mod
    await world.alice.slash(world.channel, "imagine", prompt="a paper boat", **SMALL)
    await world.env.settle()
    [original] = world.bot_messages()
    blocked = _said(world, await carol.slash(world.channel, "mod block", user=world.bob, reason="spam"))
    assert blocked.startswith("blocked ") and await world.bot.studio.moderation.is_blocked(str(world.guild.id),
                                                                                              str(world.bob.id))

    command = await world.bob.slash(world.channel, "imagine", prompt="a fox", **SMALL)
    await world.env.settle()
    assert command.ephemeral and command.response.content.startswith("⛔ ") and BLOCKED_TEXT in _said(world, command)
    await world.bob.react(original, "🔁")
    await world.env.settle()
    assert _dms(world, world.bob) == [f"⛔ {BLOCKED_TEXT}"]
    pressed = await world.bob.click(original, custom_id=custom_id(1, parse_action(["reroll"])))
    await world.env.settle()
    assert pressed.ephemeral and pressed.response.content == f"⛔ {BLOCKED_TEXT}"
    remix = await world.bob.click(original, custom_id=custom_id(1, parse_action(["remix"])))
    assert remix.modal is None and remix.response.content == f"⛔ {BLOCKED_TEXT}"
    assert [m.id for m in world.bot_messages()] == [original.id]  # none of it made anything
    assert [g.id for g in await world.bot.store.recent()] == [1]

    unblocked = _said(world, await carol.slash(world.channel, "mod unblock", user=world.bob))
    assert unblocked.startswith("unblocked ")
    again = await world.bob.slash(world.channel, "imagine", prompt="a fox", **SMALL)
    await world.env.settle()
    assert _said(world, again).startswith("✅ Done: #2")


async def test_mod_is_refused_in_code_without_manage_server_or_manage_messages(world: World) -> None:
    with pytest.raises(SetupError):  # hidden by default ...
        await world.alice.slash(world.channel, "mod blocked")
    _let_use(world, "mod", world.alice)  # ... shown by the server's settings: the bot checks again
    for name, options in (("mod block", {"user": world.bob}), ("mod history", {"user": world.bob}),
                          ("mod blocked", {})):
        refused = _said(world, await world.alice.slash(world.channel, name, **options))
        assert refused.startswith("❌ ") and "Manage Server or Manage Messages" in refused
    assert not await world.bot.studio.moderation.is_blocked(str(world.guild.id), str(world.bob.id))


async def test_the_enforced_negative_is_appended_on_the_card_the_png_and_the_graph(world: World) -> None:
    carol = _moderator(world)
    saved = await _rules(world, carol, negative="ugly, watermark")
    assert "enforced negative: ugly, watermark" in saved
    await world.alice.slash(world.channel, "imagine", prompt="a red fox", negative="blurry", **SMALL)
    await world.env.settle()
    [posted] = world.bot_messages()
    assert field(posted.embeds[0], "Negative") == "blurry, ugly, watermark"
    texts = png_texts(await posted.attachments[0].read())
    assert "Negative prompt: blurry, ugly, watermark" in texts["parameters"]
    assert "ugly, watermark" in texts["prompt"]  # the sampler's negative conditioning got it too


async def test_a_thread_follows_the_rule_of_the_channel_it_is_in(world: World) -> None:
    """A channel's own /rules rule held only for the channel's id: a member who opened a thread in it got results
    the channel blocks, under the server's rule of normal channels."""
    carol = _moderator(world)
    await _rules(world, carol, threshold=0.6, normal="spoiler", channel=world.channel, action="block")
    thread = world.env.backend.create_thread(world.channel.id, "fox pictures", world.alice.id)
    await world.env.settle()
    [in_thread] = [handle for handle in world.channel.threads if handle.id == thread.id]
    result = await _run_high(world, in_thread)
    assert world.bot_messages(in_thread) == []
    assert _dms(world, world.alice) == [blocked_text(await world.bot.store.get(1))]
    assert (await world.bot.store.get(1)).safety == "block" and _said(world, result).startswith("🚫 ")


async def test_manage_messages_in_one_channel_only_is_no_power_over_the_server(world: World) -> None:
    """/mod acts across the server; the permissions Discord resolves for the command's channel include that
    channel's overwrites, so a member given Manage Messages in one channel blocked members everywhere."""
    dave = world.guild.add_member(world.env.create_user("dave"))
    corner = world.guild.create_text_channel("dave-corner", overwrites={
        dave: discord.PermissionOverwrite(manage_messages=True)})
    _let_use(world, "mod", dave)
    refused = _said(world, await dave.slash(corner, "mod block", user=world.bob))
    assert refused.startswith("❌ ") and "Manage Server or Manage Messages" in refused
    assert not await world.bot.studio.moderation.is_blocked(str(world.guild.id), str(world.bob.id))
    carol = _moderator(world, manage_messages=True)  # a role's Manage Messages is the server's
    assert _said(world, await carol.slash(corner, "mod block", user=world.bob)).startswith("blocked ")
