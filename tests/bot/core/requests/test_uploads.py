"""Uploaded images through the real Studio on a real SQLite file and the tiny models: an /imagine attachment, a
🔀 variation's source and LoadImage in a /workflow all decode with engine/images_io.py, so they refuse the same
files, see the same 16-bit brightness and the same upright size (the card's size is the result's size)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from bot.core.errors import RequestInvalid
from bot.core.requests.imagine import ImageUpload
from bot.core.front_end import Origin, Requester, StudioEvent
from tests.bot.conftest import Env
from tests.bot.core.services.test_generations import _refused
from tests.engine.test_images_io import GREY_16, apng, encode, exif_rotated_jpeg, grey16_png

ALICE = Requester("42", "777", "alice")


async def imagine_with(env: Env, data: bytes, filename: str = "upload.png") -> StudioEvent:
    """/imagine with an attachment and no size (an image sets it), followed to its verdict."""
    upload = ImageUpload(filename=filename, content_type="image/png", data=data)
    request = await env.studio.generations.parse({"prompt": "a wall", "steps": 4, "seed": 3, "image": upload})
    return await env.finish(await env.studio.generations.submit(request, ALICE, Origin(str(env.channel.id), "777")))


async def load_and_save(env: Env, name: str) -> StudioEvent:
    """A /workflow of LoadImage -> SaveImage of `name` in the input folder: the pixels LoadImage made."""
    workflow = {"1": {"class_type": "LoadImage", "inputs": {"image": name}},
                "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "loaded"}}}
    ticket = await env.studio.workflows.run(json.dumps(workflow).encode(), "load.json", ALICE,
                                           Origin(str(env.channel.id), "777"))
    return await env.finish(ticket)


def card_size(env: Env) -> str:
    message = env.channel.results()[-1]
    return next(field.value for field in message.embed.fields if field.name == "Size")


@pytest.mark.parametrize("fmt", ["BMP", "GIF", "TIFF"])
async def test_an_attachment_in_another_format_is_refused_naming_it(env: Env, fmt: str) -> None:
    data = encode(Image.new("RGB", (64, 64), (10, 200, 30)), fmt)  # submitted as "in.png", image/png
    message = await _refused(env, {}, image=data)
    assert message == (f"image: 'in.png' is a {fmt} file; Noodle decodes only PNG, JPEG or WebP images: save it "
                       "as PNG or JPEG and try again")


async def test_an_animated_attachment_is_refused_before_anything_is_queued(env: Env) -> None:
    data = apng(40)
    assert len(data) < 8 * 1024
    message = await _refused(env, {}, image=data)
    assert message.startswith("image: 'in.png' is an animated PNG of 40 frames; Noodle takes one still image")
    frames = [Image.new("RGB", (64, 64), (n * 20, 0, 0)) for n in range(12)]
    webp = await _refused(env, {}, image=encode(frames[0], "WEBP", save_all=True, append_images=frames[1:]))
    assert "is an animated WebP of 12 frames" in webp


async def test_an_animation_in_the_input_folder_fails_the_workflow_with_no_images(env: Env) -> None:
    path = env.settings.engine.input_dir / "forty-frames.png"
    path.write_bytes(apng(40))
    try:
        final = await load_and_save(env, "forty-frames.png")
    finally:
        path.unlink()
    assert final.kind == "failed" and final.generation is not None and final.generation.images == []
    assert "input 'forty-frames.png' is an animated PNG of 40 frames" in (final.error or "")
    assert (await imagine_with(env, encode(Image.new("RGB", (64, 64)), "PNG"))).kind == "done"  # next job runs


async def test_a_16_bit_png_upload_keeps_its_brightness_in_loadimage(env: Env) -> None:
    done = await imagine_with(env, grey16_png(GREY_16, side=64))
    assert done.kind == "done" and card_size(env).startswith("64×64 · img2img")
    uploaded = done.generation.workflow["12"]["inputs"]["image"]
    assert uploaded.endswith(".png")
    loaded = await load_and_save(env, uploaded)
    assert loaded.kind == "done"
    [png] = loaded.generation.images
    values = np.unique(np.asarray(Image.open(png).convert("RGB")))
    assert values.tolist() == [116]  # 30000 / 65535 * 255 = 116.7, truncated as SaveImage does; clipped was 255


async def test_an_exif_rotated_jpeg_is_reported_and_sampled_upright(env: Env) -> None:
    data = exif_rotated_jpeg(128, 64)  # stored 128 wide, EXIF orientation 6: 64x128 to look at
    done = await imagine_with(env, data, "phone.jpg")
    assert done.kind == "done"
    generation = done.generation
    assert (generation.params["width"], generation.params["height"]) == (64, 128)
    assert card_size(env).startswith("64×128 · img2img")
    assert Image.open(generation.images[0]).size == (64, 128)
    uploaded = generation.workflow["12"]["inputs"]["image"]
    assert uploaded.endswith(".jpg")
    loaded = await load_and_save(env, uploaded)
    assert Image.open(loaded.generation.images[0]).size == (64, 128)


async def test_a_variation_decodes_its_source_like_an_upload(env: Env) -> None:
    first = (await env.run({"prompt": "a teapot", "seed": 3})).generation
    result = Path(first.images[0])
    original = result.read_bytes()
    result.write_bytes(apng(3))  # whatever is on disk by then goes through the same checks
    try:
        with pytest.raises(RequestInvalid, match=rf"image: '#{first.id} image 1' is an animated PNG of 3 frames"):
            await env.studio.generations.variation(first.id, ALICE)
    finally:
        result.write_bytes(original)
    variation = await env.finish(await env.studio.generations.variation(first.id, ALICE))
    assert variation.kind == "done" and card_size(env).startswith("64×64 · img2img")


def _encoded(image: Image.Image, fmt: str = "PNG") -> bytes:
    import io

    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


@pytest.mark.parametrize(("image", "transparent"), [
    (Image.new("RGB", (64, 64), (10, 20, 30)), False),
    (Image.new("RGBA", (64, 64), (10, 20, 30, 255)), False),  # an alpha channel, opaque everywhere: img2img
    (Image.new("LA", (64, 64), (100, 254)), True),  # barely see-through still counts: LoadImage's MASK is not 0
    (Image.new("RGBA", (64, 64), (10, 20, 30, 0)), True),
])
def test_prepare_image_says_whether_any_pixel_is_transparent(image: Image.Image, transparent: bool) -> None:
    from bot.core.requests.imagine import Allowed
    from bot.core.requests.uploads import prepare_image
    from bot.settings import Settings

    prepared = prepare_image(_encoded(image), "a.png", "uploads", Allowed.from_settings(Settings()))
    assert prepared.transparent is transparent and prepared.name.startswith("uploads/")


def test_prepare_image_names_the_option_in_its_refusals() -> None:
    from bot.core.requests.imagine import Allowed
    from bot.core.requests.uploads import prepare_image
    from bot.settings import Settings

    allowed = Allowed.from_settings(Settings())
    with pytest.raises(RequestInvalid, match=r"^control_image: 'hint.png' is 32x32; both sides must be at least 64"):
        prepare_image(_encoded(Image.new("RGB", (32, 32))), "hint.png", "uploads", allowed, "control_image")
    with pytest.raises(RequestInvalid, match=r"^control_image: 'hint.png'"):
        prepare_image(b"not an image at all", "hint.png", "uploads", allowed, "control_image")


def test_the_same_image_saved_by_many_at_once_is_one_file_created_once(tmp_path: Path) -> None:
    """Fifty members pressing U1 under one result save the same content-named source at the same moment: each save
    writes its own temporary file, exactly one creates the image (so only its refusal would remove it), none fails."""
    from concurrent.futures import ThreadPoolExecutor

    from bot.core.requests.imagine import Allowed
    from bot.core.requests.uploads import prepare_image, save_prepared
    from bot.settings import Settings

    prepared = prepare_image(_encoded(Image.new("RGB", (64, 72), (200, 40, 40))), "u1.png", "noodle-uploads",
                             Allowed.from_settings(Settings()))
    with ThreadPoolExecutor(8) as pool:
        created = list(pool.map(lambda _: save_prepared(prepared, tmp_path), range(50)))
    assert created.count(True) == 1
    saved = tmp_path / prepared.name
    assert saved.read_bytes() == prepared.data
    assert sorted(p.name for p in saved.parent.iterdir()) == [saved.name]  # no temporary file left behind
