"""Private results on a real SQLite file with the real Studio and engine: /settings private and /imagine
private: send the result to the requester's DMs, rerolls from there stay private, closed DMs are said."""

from __future__ import annotations

import asyncio
import io
from typing import Any

import pytest

from bot.console.app import Console
from bot.discord_app.client import command_payloads
from bot.core.cards.result import history_line
from bot.core.errors import RequestInvalid
from bot.discord_app.cogs.reactions import Reactions
from bot.core.front_end import Requester
from tests.bot.conftest import WAIT, Env
from tests.bot.fakes import reaction

ALICE = Requester("42", "777", "alice")


async def imagine(env: Env, explicit: dict[str, Any], who: Requester = ALICE) -> Any:
    layered = await env.studio.presets.layered_options({"prompt": "a paper boat", "steps": 4, "width": 64, "height": 64,
                                                **explicit}, who)
    ticket = await env.studio.generations.submit(await env.studio.generations.parse(layered), who, _origin())
    return await env.finish(ticket)


def _origin() -> Any:
    from bot.core.front_end import Origin

    return Origin("555", "777")


async def test_the_setting_sends_results_to_dms_and_rerolls_from_there_stay_private(env: Env) -> None:
    assert (await env.studio.user_defaults.change(ALICE, {"private": "yes"}))["private"] is True
    await env.restart()  # kept in SQLite
    final = await imagine(env, {})
    assert final.kind == "done" and final.error is None
    assert env.channel.results() == []  # nothing in the channel
    user = env.client.get_user(42)
    [message] = user.dm_channel.results()
    generation = final.generation
    assert generation.request["private"] is True and generation.message_id == str(message.id)
    assert [f.filename for f in message.files] == [p.rsplit("/", 1)[-1] for p in generation.images]
    assert message.reactions[:4] == ["🔁", "🔀", "🗑️", "ℹ️"]
    assert history_line(await env.studio.generations.get(generation.id)).endswith("(sent to your DMs)")

    # 🔁 in the DM: a reroll, posted in the DM too (the request, private flag included, is the parent's)
    env.client.channels[user.dm_channel.id] = user.dm_channel
    cog = Reactions(env.client, env.studio, status_every=0.5)
    await cog.on_raw_reaction_add(reaction(message.id, 42, "🔁", channel_id=user.dm_channel.id, guild_id=None))
    await asyncio.wait_for(asyncio.gather(*cog._tasks), WAIT)
    assert len(user.dm_channel.results()) == 2 and env.channel.results() == []
    reroll = await env.store.by_message(user.dm_channel.results()[-1].id)
    assert reroll.kind == "reroll" and reroll.request["private"] is True


async def test_an_explicit_option_wins_over_the_setting(env: Env) -> None:
    await env.studio.user_defaults.change(ALICE, {"private": True})
    final = await imagine(env, {"private": False})
    assert final.error is None and len(env.channel.results()) == 1
    assert env.client.get_user(42).dm_channel.results() == []
    public = Requester("50", "777")  # no setting: public, unless asked for on the command
    await imagine(env, {"private": True}, public)
    assert len(env.client.get_user(50).dm_channel.results()) == 1 and len(env.channel.results()) == 1


async def test_closed_dms_are_said_and_nothing_goes_to_the_channel(env: Env) -> None:
    env.client.get_user(42).closed = True
    final = await imagine(env, {"private": True})
    assert "may not send you direct messages" in (final.error or "")
    assert "/settings private: False" in final.error
    assert env.channel.results() == []
    assert (await env.studio.generations.get(final.generation.id)).posted_at is None


async def test_bad_values_are_refused_with_what_is_allowed(env: Env) -> None:
    with pytest.raises(RequestInvalid, match="private: takes true or false"):
        await env.studio.user_defaults.change(ALICE, {"private": "maybe"})
    assert await env.studio.user_defaults.get(ALICE) == {}


async def test_the_option_is_on_imagine_and_settings(settings: Any) -> None:
    payload = {command["name"]: command for command in await command_payloads(settings)}
    for name in ("imagine", "settings"):
        [option] = [o for o in payload[name]["options"] if o["name"] == "private"]
        assert option["type"] == 5 and not option.get("required", False)  # 5: boolean


async def test_the_console_keeps_the_setting(env: Env) -> None:
    out = io.StringIO()
    console = Console(env.studio, out, io.StringIO(), interactive=False, user="console:you")
    await console.handle("/settings private: on steps: 5")
    assert "private=True" in out.getvalue() and "steps=5" in out.getvalue()
    await console.handle("/settings private: sometimes")
    assert "error: private: takes true or false" in out.getvalue()


async def _react_and_wait(env: Env, message_id: int, user_id: int, emoji: str, **where: Any) -> Reactions:
    cog = Reactions(env.client, env.studio, status_every=0.5)
    await cog.on_raw_reaction_add(reaction(message_id, user_id, emoji, **where))
    await asyncio.wait_for(asyncio.gather(*cog._tasks), WAIT)
    return cog


async def test_a_private_members_reroll_and_variation_of_a_public_result_go_to_their_dms(env: Env) -> None:
    final = await imagine(env, {})  # Alice's, public
    [original] = env.channel.results()
    bob = Requester("50", "777", "bob")
    await env.studio.user_defaults.change(bob, {"private": True})
    for emoji, kind in (("🔁", "reroll"), ("🔀", "variation")):
        await _react_and_wait(env, original.id, 50, emoji)
        dm = env.client.get_user(50).dm_channel
        made = await env.store.by_message(dm.results()[-1].id)
        assert made.kind == kind and made.requester_id == "50" and made.private
        assert made.parent_id == final.generation.id
    assert env.channel.results() == [original]  # nothing of Bob's in the channel: no result...
    assert [m.content for m in env.channel.sent if not m.files] == []  # ...and no status line either
    statuses = [m for m in env.client.get_user(50).dm_channel.sent if not m.files]
    assert [m.content.split(":")[0] for m in statuses] == [f"🔁 your reroll of #{final.generation.id}",
                                                           f"🔀 your variation of #{final.generation.id}, image 1"]
    assert all(m.deleted for m in statuses)  # gone once the result was out, as in a channel

    # a member without the setting still rerolls in public
    await _react_and_wait(env, original.id, 51, "🔁")
    assert len(env.channel.results()) == 2
    assert not (await env.store.by_message(env.channel.results()[-1].id)).private


async def test_a_private_parent_stays_private_whatever_the_reactor_keeps_now(env: Env) -> None:
    await env.studio.user_defaults.change(ALICE, {"private": True})
    final = await imagine(env, {})
    await env.studio.user_defaults.change(ALICE, {"private": False})  # changed her mind since
    dm = env.client.get_user(42).dm_channel
    env.client.channels[dm.id] = dm
    [message] = dm.results()
    await _react_and_wait(env, message.id, 42, "🔀", channel_id=dm.id, guild_id=None)
    variation = await env.store.by_message(dm.results()[-1].id)
    assert variation.kind == "variation" and variation.private and env.channel.results() == []
    # through the Studio directly, from the server's channel: still private
    ticket = await env.studio.generations.reroll(final.generation.id, ALICE, _origin())
    reroll = (await env.finish(ticket)).generation
    assert reroll.private and len(dm.results()) == 3 and env.channel.results() == []


async def test_a_private_members_reroll_of_a_public_workflow_goes_to_their_dms(env: Env) -> None:
    import json

    from tests.engine.conftest import txt2img

    data = json.dumps(txt2img(seed=5, batch_size=1, filename_prefix="ComfyUI")).encode()
    final = await env.finish(await env.studio.workflows.run(data, "graph.json", ALICE, _origin()))
    assert final.error is None and not final.generation.private
    bob = Requester("50", "777", "bob")
    await env.studio.user_defaults.change(bob, {"private": True})
    reroll = (await env.finish(await env.studio.generations.reroll(final.generation.id, bob, _origin()))).generation
    assert reroll.kind == "reroll" and reroll.private and reroll.request["reroll_of"] == final.generation.id
    assert len(env.client.get_user(50).dm_channel.results()) == 1 and len(env.channel.results()) == 1
