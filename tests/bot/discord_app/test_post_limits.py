"""Discord's limits, checked before a result is sent: previews past a server's filesize_limit (and the card says
so), 10 files a message, embeds within 6000 characters, ℹ️'s full PNGs split within the limit; and retries: a
5xx or 429 tried again after backoff (a 429 after its retry_after), once posted, a 403 not retried at all.

Plain unit tests: hand-built generations with real PNGs in tmp_path, the publisher over tests/bot/fakes.py's
channel (which refuses what Discord refuses), and a sleep that records instead of waiting.
"""

from __future__ import annotations

import asyncio
import io
import time
from pathlib import Path
from typing import Any

import discord
import numpy as np
import pytest
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from bot.core.cards.details import details_of
from bot.core.storage.records import Generation, JobRow
from bot.discord_app import limits
from bot.discord_app.limits import DM_FILESIZE_LIMIT, MAX_FILES, details_messages, filesize_limit, fit_embed
from bot.discord_app.post import RETRY_DELAYS, ChannelStatus, DiscordPublisher, InteractionStatus, PublishError
from tests.bot.conftest import WAIT, Env
from tests.bot.fakes import FakeChannel, FakeClient, FakeInteraction, http_error

ids = iter(range(1, 10_000))


class Sleeps(list[float]):
    """The publisher's sleep: records each wait and returns at once."""

    async def __call__(self, seconds: float) -> None:
        self.append(seconds)


def _png(path: Path, side: int, seed: int) -> str:
    """A noisy PNG (noise does not compress: its size is known) with a recipe chunk, as SaveImage writes one."""
    pixels = np.random.default_rng(seed).integers(0, 256, (side, side, 3), dtype=np.uint8)
    info = PngInfo()
    info.add_text("parameters", f"a test image\nSteps: 4, Seed: {seed}, Size: {side}x{side}")
    Image.fromarray(pixels).save(path, format="PNG", pnginfo=info)
    return str(path)


def _generation(tmp_path: Path, count: int = 1, *, side: int = 128, prompt: str = "a paper boat",
                private: bool = False, **params: Any) -> Generation:
    generation_id = next(ids)
    jobs = tuple(JobRow(n, f"job{generation_id}-{n}", 100 + n, {}, "done",
                        image_paths=(_png(tmp_path / f"noodle_{generation_id:03d}_{n:02d}_.png", side, n),))
                 for n in range(1, count + 1))
    return Generation(
        id=generation_id, kind="imagine", parent_id=None, front="discord", state="done", requester_id="42",
        guild_id="777", channel_id="555", message_id=None, request={"private": private} if private else {},
        params={"prompt": prompt, "negative": "", "steps": 4, "cfg": 7.0, "sampler_name": "euler",
                "scheduler": "normal", "width": side, "height": side, "loras": [], **params},
        model_name="tiny-sd15.safetensors", model_hash="abcd1234", created_at=time.time(), jobs=jobs)


def _publisher(channel: FakeChannel, **kwargs: Any) -> tuple[DiscordPublisher, Sleeps]:
    sleeps = Sleeps()
    return DiscordPublisher(FakeClient(channel), sleep=sleeps, **kwargs), sleeps


def _fields(message: Any) -> dict[str, str]:
    return {f.name: f.value for f in message.embed.fields}


def _bytes(files: list[Any]) -> int:
    return sum(len(f.data) for f in files)


async def test_a_server_with_a_small_limit_gets_previews_and_the_card_says_so(tmp_path: Path) -> None:
    generation = _generation(tmp_path, side=256)  # ~197 KB of PNG
    channel = FakeChannel(filesize_limit=64 * 1024)
    publisher, _ = _publisher(channel)
    await publisher.publish(generation)
    [message] = channel.sent
    [preview] = message.files
    assert preview.filename.endswith("-preview.webp") and len(preview.data) <= 64 * 1024
    with Image.open(io.BytesIO(preview.data)) as image:
        assert image.format == "WEBP"
    assert _fields(message)["Full PNGs"] == \
        "too big for this server's 64 KB limit: previews shown here; ℹ️ sends them"

    # ℹ️ sends the full PNG (bytes untouched, recipe in it) in a DM, within Discord's DM limit
    details = details_of(generation, "a test image")
    sent = await details_messages(generation, details, DM_FILESIZE_LIMIT,
                                  attached=[a.filename for a in message.attachments])
    [(text, files)] = sent
    assert "Seed" in text and [f.filename for f in files] == [details.filename, Path(generation.images[0]).name]
    assert files[1].fp.read() == Path(generation.images[0]).read_bytes()


async def test_a_batch_is_one_grid_with_its_pngs_beside_it_or_kept_for_details(tmp_path: Path) -> None:
    generation = _generation(tmp_path, 4, side=64)
    channel = FakeChannel()
    publisher, _ = _publisher(channel)
    await publisher.publish(generation)
    grid, *pngs = channel.sent[-1].files
    assert grid.filename == f"noodle-{generation.id}-grid.png" and Image.open(io.BytesIO(grid.data)).size == (128, 128)
    assert [f.data for f in pngs] == [Path(p).read_bytes() for p in generation.images]  # each with its recipe

    publisher.grid_files = "details"
    generation = _generation(tmp_path, 4, side=64)  # another result: one result's tries share a nonce
    await publisher.publish(generation)
    message = channel.sent[-1]
    assert [f.filename for f in message.files] == [f"noodle-{generation.id}-grid.png"]
    assert _fields(message)["Full PNGs"] == "ℹ️ sends each image's PNG, with its recipe"
    sent = await details_messages(generation, details_of(generation, None), DM_FILESIZE_LIMIT,
                                  attached=[a.filename for a in message.attachments])
    assert [f.filename for _, files in sent for f in files][1:] == [Path(p).name for p in generation.images]


async def test_past_the_limit_a_grid_goes_as_a_preview_beside_the_pngs_then_alone(tmp_path: Path) -> None:
    generation = _generation(tmp_path, 2, side=128)  # two ~49 KB PNGs, a ~98 KB grid PNG
    png_bytes = sum(Path(p).stat().st_size for p in generation.images)
    roomy = FakeChannel(filesize_limit=png_bytes + 20_000)
    await _publisher(roomy)[0].publish(generation)
    grid, *pngs = roomy.sent[0].files
    assert grid.filename.endswith("-grid-preview.webp") and len(pngs) == 2 and "Full PNGs" not in _fields(roomy.sent[0])
    tight = FakeChannel(filesize_limit=png_bytes - 1000)
    await _publisher(tight)[0].publish(generation)
    [alone] = tight.sent[0].files
    assert alone.filename.endswith("-grid-preview.webp") and "ℹ️ sends them" in _fields(tight.sent[0])["Full PNGs"]


async def test_a_message_takes_ten_files_and_details_sends_the_rest(tmp_path: Path) -> None:
    generation = _generation(tmp_path, 12, side=32)  # a /workflow may write more than ten
    channel = FakeChannel()
    await _publisher(channel)[0].publish(generation)
    [message] = channel.sent
    assert len(message.files) == MAX_FILES
    assert _fields(message)["Not attached"] == "2 more image(s): Discord takes 10 files a message"
    sent = await details_messages(generation, details_of(generation, None), DM_FILESIZE_LIMIT,
                                  attached=[a.filename for a in message.attachments])
    assert [f.filename for f in sent[0][1]][1:] == [Path(p).name for p in generation.images[10:]]


async def test_a_long_prompt_and_long_fields_fit_the_6000_character_embed(tmp_path: Path) -> None:
    loras = [{"name": f"a-rather-long-lora-name-number-{n:02d}.safetensors", "strength_model": 0.8,
              "strength_clip": 0.8} for n in range(40)]
    generation = _generation(tmp_path, prompt="a fox, " * 600, negative="blurry, " * 500, loras=loras,
                             preset="p" * 300, style="s" * 300)
    channel = FakeChannel()  # refuses an embed over 6000 characters, as Discord does
    await _publisher(channel)[0].publish(generation)
    embed = channel.sent[0].embed
    assert len(embed) <= 6000 and len(embed.description) <= 4096 and embed.description.endswith("…")
    assert all(len(f.value) <= 1024 and len(f.name) <= 256 for f in embed.fields)


def test_fit_embed_keeps_every_discord_limit() -> None:
    embed = discord.Embed(title="t" * 300, description="d" * 5000)
    for n in range(30):
        embed.add_field(name=f"{n}" + "n" * 300, value="v" * 2000)
    embed.set_footer(text="f" * 3000)
    embed.set_author(name="a" * 300)
    fitted = fit_embed(embed)
    assert len(fitted) <= 6000 and len(fitted.fields) == 25 and len(fitted.title) <= 256
    assert fitted.fields[-1].value == "6 more: ℹ️ details has them" and fitted.fields[0].name.startswith("0n")
    assert len(fitted.footer.text) <= 2048 and len(fitted.author.name) <= 256
    small = discord.Embed(title="ok", description="short")
    assert fit_embed(small).to_dict() == small.to_dict()  # within the limits: untouched


async def test_details_split_the_full_pngs_within_the_limit(tmp_path: Path) -> None:
    generation = _generation(tmp_path, 3, side=128)  # ~49 KB each
    sizes = [Path(p).stat().st_size for p in generation.images]
    limit = sizes[0] + sizes[1] - 100  # two never fit one message
    huge = Path(_png(tmp_path / "noodle_huge_.png", 256, 9))
    generation = Generation(**{**generation.__dict__, "jobs": generation.jobs + (
        JobRow(4, "job-huge", 9, {}, "done", image_paths=(str(huge),)),)})
    sent = await details_messages(generation, details_of(generation, None), limit)
    files = [[(f.filename, f.fp.read()) for f in message_files] for _, message_files in sent]
    assert all(sum(len(data) for _, data in message) <= limit and len(message) <= MAX_FILES for message in files)
    pngs = [data for message in files for name, data in message if name.endswith(".png")]
    assert pngs == [Path(p).read_bytes() for p in generation.images[:3]]  # in order, bytes untouched
    assert len(sent) >= 3 and "(1/" in sent[1][0]
    assert f"noodle_huge_.png ({huge.stat().st_size / 2**20:.1f} MB) is over" in sent[-1][0] and str(huge) in sent[-1][0]


async def test_a_500_then_success_posts_once_after_backoff(tmp_path: Path) -> None:
    generation = _generation(tmp_path)
    channel = FakeChannel()
    channel.fail_next(http_error(500, "Internal Server Error"))
    publisher, sleeps = _publisher(channel)
    message_id = await publisher.publish(generation)
    assert sleeps == [RETRY_DELAYS[0]] and channel.sends == 2
    assert [str(m.id) for m in channel.sent] == [message_id] and channel.sent[0].reactions


async def test_a_5xx_after_discord_made_the_message_does_not_post_it_twice(tmp_path: Path) -> None:
    generation = _generation(tmp_path)
    channel = FakeChannel()
    channel.fail_next(http_error(502, "Bad Gateway"), after_sending=True)  # made, then the answer was lost
    publisher, sleeps = _publisher(channel)
    message_id = await publisher.publish(generation)
    assert sleeps == [1.0] and channel.sends == 2  # retried with the same nonce: Discord returns the first
    assert [str(m.id) for m in channel.sent] == [message_id]


@pytest.mark.parametrize("error, wait", [(discord.RateLimited(7.5), 7.5),
                                         (http_error(429, "You are being rate limited.", retry_after=3.25), 3.25),
                                         (http_error(429, "You are being rate limited."), 1.0)])
async def test_a_429_waits_its_retry_after(tmp_path: Path, error: Exception, wait: float) -> None:
    channel = FakeChannel()
    channel.fail_next(error)
    publisher, sleeps = _publisher(channel)
    await publisher.publish(_generation(tmp_path))
    assert sleeps == [wait] and len(channel.sent) == 1


async def test_a_403_is_not_retried(tmp_path: Path) -> None:
    channel = FakeChannel()
    channel.fail_next(http_error(403, "Missing Permissions"))
    publisher, sleeps = _publisher(channel)
    with pytest.raises(PublishError, match="needs Send Messages, Attach Files"):
        await publisher.publish(_generation(tmp_path))
    assert sleeps == [] and channel.sends == 1 and not channel.sent


async def test_after_the_tries_the_collector_gets_a_publish_error(tmp_path: Path) -> None:
    channel = FakeChannel()
    channel.fail_next(*(http_error(503, "Service Unavailable") for _ in range(4)))
    publisher, sleeps = _publisher(channel)
    with pytest.raises(PublishError, match=r"\(503: Service Unavailable\) after 4 tries; Noodle posts it again"):
        await publisher.publish(_generation(tmp_path))
    assert sleeps == [1.0, 2.0, 4.0] and not channel.sent


async def test_a_429_asking_for_too_long_is_left_to_the_collector(tmp_path: Path) -> None:
    channel = FakeChannel()
    channel.fail_next(discord.RateLimited(3600.0))
    publisher, sleeps = _publisher(channel)
    with pytest.raises(PublishError, match="after 1 tries"):
        await publisher.publish(_generation(tmp_path))
    assert sleeps == []


def test_the_limit_is_the_guilds_and_dms_take_the_default() -> None:
    assert filesize_limit(FakeChannel(filesize_limit=50 * 2**20)) == 50 * 2**20
    assert filesize_limit(FakeChannel(guild=False)) == filesize_limit(object()) == DM_FILESIZE_LIMIT == 10 * 2**20


async def test_a_private_result_over_the_dm_limit_gets_previews(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(limits, "DM_FILESIZE_LIMIT", 100_000)  # a DM's 10 MiB, scaled to the test's PNG
    client = FakeClient(FakeChannel())
    await DiscordPublisher(client, sleep=Sleeps()).publish(_generation(tmp_path, private=True, side=256))
    [message] = client.get_user(42).dm_channel.sent
    assert message.files[0].filename.endswith("-preview.webp") and len(message.files[0].data) <= 100_000
    assert "Discord's 98 KB limit for direct messages" in _fields(message)["Full PNGs"]


async def test_details_on_a_grid_kept_for_details_dm_the_full_pngs(env: Env) -> None:
    from bot.discord_app.cogs.reactions import Reactions
    from bot.core.front_end import Requester
    from tests.bot.fakes import reaction

    env.studio.results.publisher.grid_files = "details"
    final = await env.run({"prompt": "two pears", "seed": 3, "batch": 2}, Requester("42", "777"))
    message = env.channel.get_partial_message(int(final.generation.message_id))
    assert [f.filename for f in message.files] == [f"noodle-{final.generation.id}-grid.png"]
    cog = Reactions(env.client, env.studio, status_every=0.5)
    await cog.on_raw_reaction_add(reaction(message.id, 77, "ℹ️"))
    await asyncio.wait_for(asyncio.gather(*cog._tasks), WAIT)
    [(text, files)] = env.client.get_user(77).dms
    assert "Seed" in text and [f.data for f in files[1:]] == [Path(p).read_bytes() for p in final.generation.images]


async def test_a_status_longer_than_a_message_is_cut_to_fit_instead_of_refused() -> None:
    # a failure reason can quote a member's text at any length; Discord refuses a 2,001-character edit outright,
    # which left the status at "Starting" with no word of the failure
    reason = "❌ image 1 failed: " + "a" * 5000
    interaction = FakeInteraction()
    await InteractionStatus(interaction).update(reason)  # type: ignore[arg-type]
    message = await FakeChannel().send("⏳ Queued")
    await ChannelStatus(message).update(reason)
    for shown in (interaction.edits[-1], message.edits[-1]):
        assert len(shown) == limits.MAX_CONTENT and shown.startswith("❌ image 1 failed: aaa") and shown.endswith("…")
