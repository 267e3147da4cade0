"""/imagine driven like Discord drives it: a thin fake interaction, the real cog, Studio, SQLite and engine."""

from __future__ import annotations

import asyncio
import io
from typing import Any

import discord
from PIL import Image

from bot.discord_app.cogs.imagine import imagine_cog
from bot.core.requests.imagine import Allowed
from engine.pngmeta import read_png_texts
from tests.bot.conftest import WAIT, Env
from tests.bot.fakes import FakeAttachment, FakeInteraction


async def _imagine(env: Env, interaction: FakeInteraction, **options: Any) -> Any:
    cog = imagine_cog(env.studio, Allowed.from_settings(env.settings), status_every=0.5)
    await cog.imagine.callback(cog, interaction, **options)
    return cog


def _posted(env: Env, count: int = 1) -> list[Any]:
    """The results in the channel, read after `_done`: the verdict links the posted message, so it comes after."""
    results = env.channel.results()
    assert len(results) == count, f"{len(results)} results posted, {count} expected"
    return results


async def _done(cog: Any) -> None:
    """Wait for the cog's status tasks (they end with the job's verdict)."""
    await asyncio.wait_for(asyncio.gather(*cog._tasks), WAIT)


def field(embed: discord.Embed, name: str) -> str:
    return next(f.value for f in embed.fields if f.name == name)


async def test_acknowledges_first_then_shows_the_queue_then_posts_the_result_in_the_channel(env: Env) -> None:
    interaction = FakeInteraction(user_id=42)
    cog = await _imagine(env, interaction, prompt="a red fox <lora:tiny-lora-a:0.8>", negative="blurry", seed=42,
                         steps=4, width=64, height=64, loras="tiny-lora-b:0.5:0.25", sampler="euler",
                         scheduler="karras")
    assert interaction.response.calls == [("defer", {"ephemeral": True, "thinking": True})]
    assert interaction.edits[0].startswith(("⏳ Queued", "🎨 Starting")) and "seed 42" in interaction.edits[0]
    await _done(cog)
    [message] = _posted(env)
    assert message.content == "<@42>"
    assert message.reactions == ["🔁", "🔀", "🗑️", "ℹ️"]
    embed = message.embed
    assert embed.description == "a red fox"  # the tag is taken out of the text that is encoded
    assert field(embed, "Seed") == "42" and field(embed, "Negative") == "blurry"
    assert field(embed, "Steps · CFG · Sampler") == "4 · 7 · euler/karras"
    assert field(embed, "LoRAs") == "tiny-lora-b 0.5/0.25, tiny-lora-a 0.8"
    assert field(embed, "Size") == "64×64"
    assert field(embed, "Tokens") == "prompt 3/75 · negative 1/75"
    assert field(embed, "Model").startswith("tiny-sd15 (") and "hash pending" not in field(embed, "Model")
    generation = await env.store.by_message(message.id)
    assert generation.job_id in embed.footer.text and f"#{generation.id}" in embed.footer.text
    png = message.files[0].data
    assert "prompt" in Image.open(io.BytesIO(png)).text and png == open(generation.images[0], "rb").read()
    assert interaction.edits[-1].startswith("✅ Done") and str(message.id) in interaction.edits[-1]
    gaps = [b - a for a, b in zip(interaction.edit_times, interaction.edit_times[1:])]
    assert all(gap >= 0.5 * 0.99 for gap in gaps)  # status_every: edits never closer together


async def test_a_refusal_is_private_and_nothing_is_downloaded_or_queued(env: Env) -> None:
    interaction = FakeInteraction()
    big = FakeAttachment(b"x", filename="huge.png", size=50 * 1024 * 1024)
    await _imagine(env, interaction, prompt="a fox", image=big)
    assert interaction.response.calls[0][1]["ephemeral"] is True
    assert interaction.edits[-1].startswith("❌ image: 'huge.png' is 52.4 MB; the limit is")
    assert big.reads == 0 and not env.engine.jobs() and not await env.store.recent()
    text = FakeAttachment(b"hello", filename="notes.txt", content_type="text/plain")
    await _imagine(env, interaction, prompt="a fox", image=text)
    assert "is text/plain, not an image" in interaction.edits[-1]
    await _imagine(env, interaction, prompt="a fox", model="tiny-sdxxl")
    assert "checkpoint 'tiny-sdxxl' is not in models/checkpoints; closest: 'tiny-sdxl.safetensors'" \
        in interaction.edits[-1]
    await _imagine(env, interaction, prompt="a fox", width=100)
    assert "width 100 is not a multiple of 8" in interaction.edits[-1]
    assert not env.channel.sent and not await env.store.recent()


async def test_sdxl_checkpoints_are_built_by_their_architecture(env: Env) -> None:
    cog = await _imagine(env, FakeInteraction(), prompt="a castle", model="tiny-sdxl", steps=2, seed=9)
    await _done(cog)
    [message] = _posted(env)
    generation = await env.store.by_message(message.id)
    assert generation.workflow["4"]["inputs"]["ckpt_name"] == "tiny-sdxl.safetensors"
    assert generation.params["width"] == 64  # the tiny models' own size; real SDXL defaults to 1024
    assert read_png_texts(generation.images[0])["parameters"].endswith("Version: Noodle")


async def test_autocomplete_offers_the_models_folder(env: Env) -> None:
    cog = imagine_cog(env.studio, Allowed.from_settings(env.settings))
    model = cog.imagine._params["model"].autocomplete
    values = [c.value for c in await model(FakeInteraction(), "sdx")]
    # the tiny models hold more than one SDXL file (tiny-sdxl-inpainting too): each offered one matches
    assert "tiny-sdxl.safetensors" in values and all("sdx" in value for value in values)
    loras = cog.imagine._params["loras"].autocomplete
    assert [c.value for c in await loras(FakeInteraction(), "tiny-lora-a:0.7, tiny-lora-b")] == \
        ["tiny-lora-a:0.7, tiny-lora-b:1.0"]


def _png_bytes(mode: str, color: Any, size: tuple[int, int] = (64, 64)) -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, size, color).save(buffer, format="PNG")
    return buffer.getvalue()


async def test_a_control_image_with_a_controlnet_guides_the_picture_and_the_card_says_so(env: Env) -> None:
    hint = FakeAttachment(_png_bytes("RGB", (255, 255, 255)), filename="edges.png")
    cog = await _imagine(env, FakeInteraction(), prompt="a house", control_image=hint,
                         controlnet="tiny-controlnet-sd15", control_strength=1.5, control_canny=False, steps=2,
                         width=64, height=64)
    await _done(cog)
    [message] = _posted(env)
    assert field(message.embed, "ControlNet") == "tiny-controlnet-sd15 · strength 1.5 · control image as given"
    generation = await env.store.by_message(message.id)
    assert generation.workflow["22"]["inputs"]["control_net_name"] == "tiny-controlnet-sd15.safetensors"
    assert hint.reads == 1


async def test_a_transparent_attachment_is_inpainted_and_the_card_says_inpaint(env: Env) -> None:
    hole = FakeAttachment(_png_bytes("RGBA", (30, 120, 200, 0)), filename="hole.png")
    cog = await _imagine(env, FakeInteraction(), prompt="a blue wall", image=hole, steps=2)
    await _done(cog)
    [message] = _posted(env)
    assert "64×64 · inpaint (the image's transparent area), denoise 0.75" in field(message.embed, "Size")
    generation = await env.store.by_message(message.id)
    assert generation.workflow["15"]["class_type"] == "SetLatentNoiseMask"


async def test_a_bad_control_image_is_refused_before_download(env: Env) -> None:
    interaction = FakeInteraction()
    big = FakeAttachment(b"x", filename="huge.png", size=50 * 1024 * 1024)
    await _imagine(env, interaction, prompt="a fox", control_image=big, controlnet="tiny-controlnet-sd15")
    assert interaction.edits[-1].startswith("❌ control_image: 'huge.png' is 52.4 MB; the limit is")
    assert big.reads == 0
    text = FakeAttachment(b"hello", filename="notes.txt", content_type="text/plain")
    await _imagine(env, interaction, prompt="a fox", control_image=text, controlnet="tiny-controlnet-sd15")
    assert "control_image: 'notes.txt' is text/plain, not an image" in interaction.edits[-1]
    await _imagine(env, interaction, prompt="a fox", controlnet="tiny-controlnet-sd1")
    assert "needs a control image" in interaction.edits[-1]
    assert not env.channel.sent and not await env.store.recent()


async def test_autocomplete_offers_the_controlnets(env: Env) -> None:
    cog = imagine_cog(env.studio, Allowed.from_settings(env.settings))
    controlnet = cog.imagine._params["controlnet"].autocomplete
    assert [c.value for c in await controlnet(FakeInteraction(), "sdxl")] == ["tiny-controlnet-sdxl.safetensors"]
    assert len(await controlnet(FakeInteraction(), "")) == 2
