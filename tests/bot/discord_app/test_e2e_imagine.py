"""/imagine end to end through the real discord.py on SimCord: defer, status edits, the posted result (PNG with its
recipe, card, reactions), refusals, img2img, private results in DMs, /workflow, /settings and /preset."""

from __future__ import annotations

import pytest
from simcord.interactions import OptionError

from tests.bot.discord_app.e2e_support import SMALL, emojis, field, png_file, png_texts, status_edits, workflow_file


async def test_imagine_acknowledges_privately_shows_status_then_posts_the_png_card_and_reactions(world) -> None:
    result = await world.alice.slash(world.channel, "imagine", prompt="a red fox", seed=5, negative="blurry",
                                     **SMALL)
    await world.env.settle()
    callback = next(e for e in world.env.http_requests if e.path.endswith("/callback"))
    assert callback.json == {"type": 5, "data": {"flags": 64}}  # deferred, ephemeral, before anything else
    assert result.acknowledged and result.ephemeral
    edits = status_edits(world.env, result)
    assert edits[0].startswith(("🎨 Starting: ", "⏳ Queued")) and "seed 5" in edits[0]
    assert not any("Queued (queued)" in text for text in edits)
    [message] = world.bot_messages()
    assert edits[-1].startswith("✅ Done: #1") and str(message.id) in edits[-1]
    assert message.content == f"<@{world.alice.id}>"
    [attachment] = message.attachments
    texts = png_texts(await attachment.read())
    assert "KSampler" in texts["prompt"]  # the ComfyUI API graph that made it
    assert "Seed: 5," in texts["parameters"] and "Negative prompt: blurry" in texts["parameters"]
    [embed] = message.embeds
    assert embed.description == "a red fox" and field(embed, "Seed") == "5" and field(embed, "Size") == "64×64"
    assert field(embed, "Negative") == "blurry" and field(embed, "Steps · CFG · Sampler").startswith("2 · ")
    assert emojis(message) == ["🔁", "🔀", "🗑️", "ℹ️"]
    assert not world.channel.history(viewer=world.bob)[:-1]  # bob sees the result only, never alice's status


async def test_a_batch_posts_one_grid_with_the_pngs_and_a_digit_per_image(world) -> None:
    await world.alice.slash(world.channel, "imagine", prompt="two pears", seed=100, batch=2, **SMALL)
    await world.env.settle()
    [message] = world.bot_messages()
    names = [a.filename for a in message.attachments]
    assert names[0].endswith("-grid.png") and len(names) == 3
    assert field(message.embeds[0], "Seed") == "#1 100 · #2 101"
    assert emojis(message)[4:] == ["1️⃣", "2️⃣"]
    for attachment, seed in zip(message.attachments[1:], (100, 101), strict=True):
        assert f"Seed: {seed}," in png_texts(await attachment.read())["parameters"]


@pytest.mark.parametrize(("options", "said"), [
    ({"width": 100}, "width 100 is not a multiple of 8"),
    ({"model": "tiny-sdxxl"}, "checkpoint 'tiny-sdxxl' is not in models/checkpoints; closest: 'tiny-sdxl"),
    ({"image": ("notes.txt", b"hello")}, "is text/plain, not an image"),
    ({"controlnet": "tiny-controlnet-sd15"}, "needs a control image"),
])
async def test_bad_options_are_refused_privately_and_nothing_is_queued(world, options, said) -> None:
    result = await world.alice.slash(world.channel, "imagine", prompt="a fox", **{**SMALL, **options})
    await world.env.settle()
    assert result.ephemeral
    [text] = status_edits(world.env, result)
    assert text.startswith("❌ ") and said in text
    assert not world.bot_messages() and not await world.bot.store.recent()


async def test_discord_itself_refuses_options_out_of_the_commands_ranges(world) -> None:
    with pytest.raises(OptionError):
        await world.alice.slash(world.channel, "imagine", prompt="a fox", steps=0)
    with pytest.raises(OptionError):
        await world.alice.slash(world.channel, "imagine", prompt="a fox", width=4096)
    assert not world.bot_messages()


async def test_an_attached_image_makes_img2img_at_its_size(world) -> None:
    await world.alice.slash(world.channel, "imagine", prompt="a blue wall", image=png_file((72, 64)), denoise=0.5,
                            steps=2)
    await world.env.settle()
    [message] = world.bot_messages()
    assert "72×64 · img2img, denoise 0.5" in field(message.embeds[0], "Size")


async def test_imagine_private_goes_to_dms_and_reactions_work_there(world) -> None:
    result = await world.alice.slash(world.channel, "imagine", prompt="a secret fox", private=True, seed=3, **SMALL)
    await world.env.settle()
    assert not world.bot_messages()  # nothing in #art
    dm = world.alice.user.dm_channel
    [message] = world.bot_messages(dm)
    assert message.attachments and emojis(message) == ["🔁", "🔀", "🗑️", "ℹ️"]
    assert status_edits(world.env, result)[-1].startswith("✅ Done")
    await world.alice.user.set_reaction(message, "🔁", reacted=True)
    await world.env.settle()
    results = [m for m in world.bot_messages(dm) if m.attachments]
    assert len(results) == 2 and "Reroll" in results[-1].embeds[0].title
    assert not world.bot_messages()


async def test_settings_private_sends_later_results_to_dms_until_cleared(world) -> None:
    shown = await world.alice.slash(world.channel, "settings", private=True, steps=2)
    assert status_edits(world.env, shown)[-1].startswith("✅ ") and "private" in status_edits(world.env, shown)[-1]
    await world.alice.slash(world.channel, "imagine", prompt="a fox", width=64, height=64)
    await world.env.settle()
    [message] = world.bot_messages(world.alice.user.dm_channel)
    assert field(message.embeds[0], "Steps · CFG · Sampler").startswith("2 · ")  # the default applied
    assert not world.bot_messages()
    cleared = await world.alice.slash(world.channel, "settings", clear=True)
    assert status_edits(world.env, cleared)[-1].startswith("✅ ")
    await world.bob.slash(world.channel, "imagine", prompt="a fox", **SMALL)  # bob's defaults were never touched
    await world.env.settle()
    assert len(world.bot_messages()) == 1


async def test_workflow_runs_an_attached_api_json_and_refuses_a_bad_one(world) -> None:
    await world.alice.slash(world.channel, "imagine", prompt="a fox", seed=11, **SMALL)
    await world.env.settle()
    [first] = world.bot_messages()
    workflow = (await world.bot.store.by_message(first.id)).workflow
    result = await world.bob.slash(world.channel, "workflow", file=workflow_file(workflow))
    await world.env.settle()
    assert status_edits(world.env, result)[-1].startswith("✅ Done")
    posted = world.bot_messages()[-1]
    assert posted.id != first.id and posted.content == f"<@{world.bob.id}>"
    assert posted.attachments and emojis(posted) == ["🔁", "🗑️", "ℹ️"]  # 🔀 varies /imagine results only
    bad = await world.bob.slash(world.channel, "workflow", file=("broken.json", b"{not json"))
    await world.env.settle()
    assert status_edits(world.env, bad)[-1].startswith("❌ ") and len(world.bot_messages()) == 2


async def test_presets_need_manage_server_and_imagine_uses_them(world) -> None:
    refused = await world.alice.slash(world.channel, "preset create", name="tiny", steps=2, width=64, height=64)
    assert status_edits(world.env, refused)[-1].startswith("❌ ") and "Manage Server" in \
        status_edits(world.env, refused)[-1]
    import discord
    mods = world.guild.create_role("mods", permissions=discord.Permissions(manage_guild=True))
    carol = world.guild.add_member(world.env.create_user("carol"), roles=[mods])
    made = await carol.slash(world.channel, "preset create", name="tiny", steps=2, width=64, height=64)
    assert status_edits(world.env, made)[-1].startswith("✅ Saved preset")
    listed = await world.alice.slash(world.channel, "preset list")
    assert "tiny" in status_edits(world.env, listed)[-1]
    await world.alice.slash(world.channel, "imagine", prompt="a fox", preset="tiny")
    await world.env.settle()
    [message] = world.bot_messages()
    assert field(message.embeds[0], "Size") == "64×64"
    assert field(message.embeds[0], "Steps · CFG · Sampler").startswith("2 · ")
