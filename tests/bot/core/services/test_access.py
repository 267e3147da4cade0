"""One server's moderator reaches nothing of another server's (issue 12, point 15), on the real Studio, engine and
SQLite file: /queue cancel (command and button), 🗑️, ℹ️, 🔁 and 🔀 on another server's request, a DM one or a private
one answer exactly as a number that does not exist, and leave every row, file and job as it was."""

from __future__ import annotations

import os
from typing import Any

import pytest

from bot.discord_app.cogs.queue import CancelButton, queue_cog
from bot.core.errors import GenerationNotFound
from bot.core.front_end import Origin, Requester
from tests.bot.conftest import Env
from tests.bot.fakes import FakeInteraction
from tests.bot.core.services.test_queue import ComponentResponse, busy, queued  # noqa: F401  (busy: the fixture)
from tests.bot.discord_app.cogs.test_reactions import _posted, _react

ALICE = Requester("42", "777", "alice")
BOB = Requester("43", "777", "bob")
MOD_A = Requester("44", "777", "mod-a", can_manage_messages=True)  # a moderator of Alice's server
MOD_B = Requester("60", "888", "mod-b", can_manage_messages=True)  # a moderator of another server
MISSING = 987_654  # a number no test reaches


async def refusal(call: Any, generation_id: int) -> str:
    """The message of a refused call, checked to be word for word the one for a number that does not exist."""
    with pytest.raises(GenerationNotFound) as caught:
        await call(generation_id)
    with pytest.raises(GenerationNotFound) as missing:
        await call(MISSING)
    assert str(caught.value) == str(missing.value).replace(f"#{MISSING}", f"#{generation_id}")
    return str(caught.value)


async def state_of(env: Env) -> tuple[list[Any], set[str]]:
    """Every generation row and every file of the output folder: what a refusal must leave as it was."""
    files = {str(p) for p in env.settings.engine.output_dir.rglob("*") if p.is_file()}
    return [(g.id, g.state, g.message_id) for g in await env.store.recent(limit=100)], files


async def test_another_servers_moderator_cannot_cancel_and_learns_nothing(env: Env, busy: Any) -> None:
    ticket = await queued(env, ALICE)
    number = ticket.generation_id
    text = await refusal(lambda n: env.studio.queue.cancel(MOD_B, n), number)
    assert text == f"there is no request #{number}; /queue lists yours with their numbers"
    assert [e.generation_id for e in await env.studio.queue.entries(ALICE)] == [number]  # still queued

    # the Cancel button: a forged press from the other server gets the same words
    entry = (await env.studio.queue.entries(ALICE))[0]
    press = FakeInteraction(user_id=60, guild_id=888, manage_messages=True)
    press.response = ComponentResponse()  # type: ignore[assignment]
    await CancelButton(env.studio, entry).callback(press)  # type: ignore[arg-type]
    assert press.response.edits[0]["content"].startswith(f"❌ {text}\n")
    # and the /queue cancel: option
    command = FakeInteraction(user_id=60, guild_id=888, manage_messages=True)
    cog = queue_cog(env.studio)
    await cog.queue.callback(cog, command, cancel=number)
    assert command.edits[-1].startswith(f"❌ {text}\n")
    assert [e.generation_id for e in await env.studio.queue.entries(ALICE)] == [number]

    # numbers past SQLite's integers are missing too, not an OverflowError
    for huge in (0, -1, 2**63, 2**70):
        with pytest.raises(GenerationNotFound, match=f"there is no request #{huge};"):
            await env.studio.queue.cancel(MOD_B, huge)
    assert await env.studio.queue.cancel(MOD_A, number) == 1  # Alice's own server's moderator may


async def test_another_servers_moderator_cannot_touch_a_result(env: Env) -> None:
    original = await _posted(env)
    generation = await env.store.by_message(original.id)
    before = await state_of(env)
    hint = "results show their number in the footer"
    for call in (lambda n: env.studio.generations.delete(n, MOD_B), lambda n: env.studio.generations.details(n, MOD_B),
                 lambda n: env.studio.generations.reroll(n, MOD_B), lambda n: env.studio.generations.variation(n, MOD_B, 1)):
        assert await refusal(call, generation.id) == f"there is no generation #{generation.id}; {hint}"
    assert await state_of(env) == before and all(os.path.exists(p) for p in generation.images)

    # a forged reaction from the other server, its member a moderator there: told privately, nothing deleted
    env.channel.manage.add(60)
    await _react(env, original, 60, "🗑️", guild_id=888)
    assert not original.deleted and await state_of(env) == before
    [(told, _)] = env.client.get_user(60).dms
    assert told == f"❌ there is no generation #{generation.id}; {hint}"

    # in Alice's server: a member rerolls it (their job), its moderator deletes it
    ticket = await env.studio.generations.reroll(generation.id, BOB, Origin("555", "777"))
    assert (await env.finish(ticket)).error is None
    assert (await env.studio.generations.delete(generation.id, MOD_A)).id == generation.id
    assert not any(os.path.exists(p) for p in generation.images)


async def test_a_dm_result_is_only_its_requesters(env: Env) -> None:
    dm = env.client.get_user(42).dm_channel
    env.client.channels[dm.id] = dm
    alice_in_dms = Requester("42", None, "alice")
    request = await env.studio.generations.parse({"prompt": "a lantern", "steps": 4, "width": 64, "height": 64})
    final = await env.finish(await env.studio.generations.submit(request, alice_in_dms, Origin(str(dm.id), None)))
    generation = final.generation
    assert final.error is None and generation.guild_id is None and len(dm.results()) == 1
    before = await state_of(env)
    for who in (MOD_A, MOD_B, Requester("61", None, can_manage_messages=True)):
        for call in (lambda n: env.studio.generations.delete(n, who), lambda n: env.studio.generations.details(n, who),
                     lambda n: env.studio.generations.reroll(n, who)):
            await refusal(call, generation.id)
    assert await state_of(env) == before
    # Alice herself, in DMs or from a server
    assert "Seed:" in (await env.studio.generations.details(generation.id, alice_in_dms)).text
    assert "Seed:" in (await env.studio.generations.details(generation.id, ALICE)).text


async def test_a_private_result_is_hidden_from_its_own_server_too(env: Env) -> None:
    final = await env.run({"prompt": "a secret garden", "private": True}, ALICE)
    generation = final.generation
    assert final.error is None and generation.private and generation.guild_id == "777"
    before = await state_of(env)
    for who in (BOB, MOD_A):
        await refusal(lambda n: env.studio.generations.details(n, who), generation.id)
        await refusal(lambda n: env.studio.generations.delete(n, who), generation.id)
        await refusal(lambda n: env.studio.generations.reroll(n, who), generation.id)
    assert await state_of(env) == before
    assert (await env.studio.generations.delete(generation.id, ALICE)).id == generation.id

