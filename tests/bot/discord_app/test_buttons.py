"""The buttons under every result, through SimCord (discord.py's real HTTP and gateway layers, the real bot, Studio,
SQLite and engine on the tiny models): drawn on every result, pressed after a restart on the old message, owned by
whoever presses, working in DMs, 🗑️ and ℹ️. Jobs stay at 64 px and 2 steps."""

from __future__ import annotations

import io
from typing import Any

from PIL import Image

from bot.core.actions import custom_id, parse_action
from tests.bot.discord_app.conftest import World


def _ids(message: Any) -> list[str]:
    return [child.custom_id for row in message.components for child in row.children]


def _faces(message: Any) -> list[str]:
    return [child.label or str(child.emoji) for row in message.components for child in row.children]


def _generation_id(message: Any) -> int:
    return int(_ids(message)[0].split(":")[1])


async def _imagine(world: World, actor: Any = None, **options: Any) -> Any:
    result = await (actor or world.alice).slash(world.channel, "imagine", prompt="a red fox", steps=2, width=64,
                                                height=64, **options)
    await world.env.settle()
    return result


async def _png_size(attachment: Any) -> tuple[int, int]:
    return Image.open(io.BytesIO(await attachment.read())).size


async def test_imagine_to_upscale_to_a_restart_and_vary_on_the_old_message(world: World) -> None:
    shown = await _imagine(world, batch=2)
    assert shown.acknowledged and shown.ephemeral
    assert shown.response.content.startswith("✅ Done: #1")
    result = world.bot_messages()[-1]
    assert result.attachments and result.embeds
    assert _faces(result) == ["U1", "U2", "🔁", "V1", "V2", "✏️", "🗑️", "ℹ️"]
    assert {str(r.emoji) for r in result.reactions} >= {"🔁", "🔀", "🗑️", "ℹ️"}

    pressed = await world.alice.click(result, label="U2")
    await world.env.settle()
    assert pressed.acknowledged and pressed.ephemeral
    assert pressed.response.content.startswith("✅ Done: #2")
    upscaled = world.bot_messages()[-1]
    assert await _png_size(upscaled.attachments[0]) == (128, 128)
    assert "Vary (strong)" in _faces(upscaled) and "Zoom out 2×" in _faces(upscaled)
    assert custom_id(2, parse_action(["pan", "left"])) in _ids(upscaled)

    await world.restart()
    old = world.channel.history()[[m.id for m in world.channel.history()].index(upscaled.id)]
    again = await world.alice.click(old, label="Vary (strong)")
    await world.env.settle()
    assert again.acknowledged and again.response.content.startswith("✅ Done: #3")
    assert len(world.bot_messages()) == 3 and world.bot_messages()[-1].attachments


async def test_whoever_presses_owns_the_job_and_their_cap_refuses(world: World) -> None:
    await _imagine(world)
    result = world.bot_messages()[-1]
    world.bot.studio.queue.per_user_max = 0  # bob at his cap: alice's result does not lend him hers
    refused = await world.bob.click(result, label="U1")
    await world.env.settle()
    assert refused.acknowledged and refused.response.content.startswith("❌")
    world.bot.studio.queue.per_user_max = 4
    pressed = await world.bob.click(result, label="V1")
    await world.env.settle()
    assert pressed.response.content.startswith("✅ Done: #2")
    made = await world.bot.studio.generations.get(2)
    assert made.requester_id == str(world.bob.id) and made.parent_id == 1


async def test_a_private_results_buttons_work_in_dms(world: World) -> None:
    await _imagine(world, private=True)
    dm = world.alice.user.dm_channel
    result = [m for m in dm.history() if m.attachments][-1]
    assert "U1" in _faces(result)
    pressed = await world.alice.user.click(result, label="U1")
    await world.env.settle()
    assert pressed.acknowledged and pressed.response.content.startswith("✅ Done: #2")
    assert len([m for m in dm.history() if m.attachments]) == 2


async def test_delete_is_refused_to_others_and_done_for_the_owner(world: World) -> None:
    await _imagine(world)
    result = world.bot_messages()[-1]
    trash = custom_id(_generation_id(result), parse_action(["delete"]))
    refused = await world.bob.click(result, custom_id=trash)
    assert refused.ephemeral and refused.response.content.startswith("❌ only the requester")
    assert world.bot_messages()
    done = await world.alice.click(result, custom_id=trash)
    assert done.response.content == "🗑️ Deleted #1"
    assert world.bot_messages() == []


async def test_details_come_as_private_files(world: World) -> None:
    await _imagine(world)
    result = world.bot_messages()[-1]
    shown = await world.bob.click(result, custom_id=custom_id(1, parse_action(["details"])))
    assert shown.ephemeral
    names = [a.filename for a in shown.response.attachments]
    assert "noodle-1-workflow.json" in names and "#1" in shown.response.content
