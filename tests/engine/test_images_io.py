"""LoadImage and engine/images_io.py on real files made with Pillow: which formats decode, one frame only,
16-bit brightness, EXIF orientation, transparency, and limits checked from the header before decoding."""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from engine.errors import LimitExceeded, NodeExecutionError
from engine.executor import Executor
from engine.images_io import UnusableImage, decode_still, to_floats

LIMITS = {"max_bytes": 20 * 1024 * 1024, "max_side": 2048, "max_pixels": 2048 * 2048}
GREY_16 = 30000  # of 65535: 117.3 of 255 when scaled, 255 when clipped as convert("RGB") did


def encode(image: Image.Image, fmt: str, **options: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def png_by_hand(width: int, height: int, depth: int, color_type: int, rows: bytes | None,
                extra: bytes = b"") -> bytes:
    """A PNG written chunk by chunk: Pillow cannot write 16-bit RGB, nor a header that lies about its data."""
    header = chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, depth, color_type, 0, 0, 0))
    data = chunk(b"IDAT", zlib.compress(rows) if rows is not None else b"not deflate")
    return b"\x89PNG\r\n\x1a\n" + header + extra + data + chunk(b"IEND", b"")


def png16(channels: int, color_type: int, value: int, side: int = 64) -> bytes:
    row = b"\0" + struct.pack(f">{side * channels}H", *([value] * side * channels))
    return png_by_hand(side, side, 16, color_type, row * side)


def grey16_png(value: int = GREY_16, side: int = 64) -> bytes:
    """A 16-bit greyscale PNG made with Pillow's own I;16 mode."""
    return encode(Image.frombytes("I;16", (side, side), np.full((side, side), value, "<u2").tobytes()), "PNG")


def apng(frames: int, side: int = 64) -> bytes:
    images = [Image.new("RGB", (side, side), (n * 6, 90, 200)) for n in range(frames)]
    return encode(images[0], "PNG", save_all=True, append_images=images[1:])


def exif_rotated_jpeg(width: int, height: int, orientation: int = 6) -> bytes:
    """Left half red, right half blue, stored `width`x`height` with an EXIF orientation tag."""
    image = Image.new("RGB", (width, height), (230, 20, 20))
    image.paste((20, 20, 230), (width // 2, 0, width, height))
    exif = Image.Exif()
    exif[0x0112] = orientation
    return encode(image, "JPEG", exif=exif, quality=95)


def load_and_save(executor: Executor, name: str, data: bytes) -> Path:
    """LoadImage -> SaveImage on the real executor; the PNG it wrote."""
    (executor.settings.input_dir / name).write_bytes(data)
    executor.cache.clear()
    result = executor.run({
        "1": {"class_type": "LoadImage", "inputs": {"image": name}},
        "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": f"load/{name}"}},
    })
    [image] = result.to_dict()["outputs"]["2"]["images"]
    return executor.settings.output_dir / image["subfolder"] / image["filename"]


def refused(executor: Executor, name: str, data: bytes) -> str:
    before = sorted(executor.settings.output_dir.rglob("*"))
    with pytest.raises(NodeExecutionError) as caught:
        load_and_save(executor, name, data)
    assert caught.value.node_id == "1" and caught.value.class_type == "LoadImage"
    assert sorted(executor.settings.output_dir.rglob("*")) == before  # nothing written
    return str(caught.value)


@pytest.mark.parametrize("fmt", ["BMP", "GIF", "TIFF"])
def test_other_formats_are_refused_by_their_bytes_whatever_the_name(executor: Executor, fmt: str) -> None:
    data = encode(Image.new("RGB", (64, 64), (10, 200, 30)), fmt)
    message = refused(executor, f"disguised-{fmt.lower()}.png", data)
    assert f"input 'disguised-{fmt.lower()}.png' is a {fmt} file; Noodle decodes only PNG, JPEG or WebP" in message


def test_a_psd_and_unknown_bytes_say_what_they_are() -> None:
    psd = b"8BPS\x00\x01" + bytes(26)
    with pytest.raises(UnusableImage, match="'x' is a PSD file; Noodle decodes only PNG, JPEG or WebP"):
        decode_still(psd, "'x'", **LIMITS)
    with pytest.raises(UnusableImage, match="is not an image Noodle can read .its first bytes match no known"):
        decode_still(b"plain text, not pixels", "'x'", **LIMITS)
    cut = encode(Image.new("RGB", (64, 64), (1, 2, 3)), "PNG")[:70]
    with pytest.raises(UnusableImage, match="starts like a PNG file but image file is truncated"):
        decode_still(cut, "'x'", **LIMITS)


@pytest.mark.parametrize("fmt,shown", [("PNG", "PNG"), ("WEBP", "WebP")])
def test_an_animation_is_refused_not_made_into_a_batch(executor: Executor, fmt: str, shown: str) -> None:
    images = [Image.new("RGB", (64, 64), (n * 6, 90, 200)) for n in range(40)]
    data = encode(images[0], fmt, save_all=True, append_images=images[1:])
    assert len(data) < 8 * 1024  # a few KB that ComfyUI's LoadImage turns into a batch of 40
    message = refused(executor, f"anim.{fmt.lower()}", data)
    assert f"is an animated {shown} of 40 frames; Noodle takes one still image: export the frame" in message


def test_frames_and_size_are_read_from_the_header_before_any_pixel_is_decoded() -> None:
    # no valid pixel data at all: decoding would fail as damaged, so these refusals came from the header alone
    # the 200 frames of 1024x1024 (5 GB decoded): acTL counts them, fcTL makes the first one frame 0
    actl = chunk(b"acTL", struct.pack(">II", 200, 0))
    fctl = chunk(b"fcTL", struct.pack(">IIIIIHHBB", 0, 1024, 1024, 0, 0, 1, 10, 0, 0))
    animated = png_by_hand(1024, 1024, 8, 2, None, extra=actl + fctl)
    with pytest.raises(UnusableImage, match="is an animated PNG of 200 frames"):
        decode_still(animated, "'x'", **LIMITS)
    huge = png_by_hand(8192, 8192, 8, 2, None)
    with pytest.raises(LimitExceeded, match=r"is 8192x8192 = 67108864 pixels; this server takes up to 2048 pixels "
                                            r"a side and 4194304 in all \(limits.max_side and limits.max_pixels"):
        decode_still(huge, "'x'", **LIMITS)
    with pytest.raises(LimitExceeded, match=r"'x' is 2.0 MB; the limit is 1.0 MB .limits.max_input_image_bytes"):
        decode_still(huge + bytes(2_000_000), "'x'", **{**LIMITS, "max_bytes": 1_000_000})
    with pytest.raises(UnusableImage, match="starts like a PNG file but"):
        decode_still(png_by_hand(64, 64, 8, 2, None), "'x'", **LIMITS)  # the same bytes, within limits


def test_a_16_bit_grey_png_keeps_its_brightness(executor: Executor) -> None:
    data = grey16_png()
    assert Image.open(io.BytesIO(data)).mode == "I;16"
    assert np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))[0, 0, 0] == 255  # what clipping gave
    saved = np.asarray(Image.open(load_and_save(executor, "grey16.png", data)).convert("RGB"))
    # 30000 / 65535 * 255 = 116.7; SaveImage truncates as ComfyUI does
    assert set(np.unique(saved)) == {116}


@pytest.mark.parametrize("channels,color_type,mode", [(3, 2, "RGB"), (4, 6, "RGBA"), (2, 4, "RGBA")])
def test_16_bit_colour_pngs_keep_their_brightness(executor: Executor, channels: int, color_type: int,
                                                  mode: str) -> None:
    data = png16(channels, color_type, GREY_16)
    assert Image.open(io.BytesIO(data)).mode == mode  # Pillow keeps the high byte of each sample: 30000 >> 8
    saved = np.asarray(Image.open(load_and_save(executor, f"colour16-{color_type}.png", data)).convert("RGB"))
    assert set(np.unique(saved)) == {117}


@pytest.mark.parametrize("mode", ["I;16", "I", "F"])
def test_wide_modes_scale_from_the_16_bit_range(mode: str) -> None:
    image = Image.frombytes("I;16", (4, 4), np.full((4, 4), GREY_16, "<u2").tobytes())
    rgb, alpha = to_floats(image if mode == "I;16" else image.convert(mode))
    assert rgb.shape == (4, 4, 3) and alpha is None
    assert np.allclose(rgb, GREY_16 / 65535)


def test_transparency_and_colour_modes_convert() -> None:
    la = decode_still(encode(Image.new("LA", (64, 64), (100, 51)), "PNG"), "'la'", **LIMITS)
    assert np.allclose(la.rgb, 100 / 255) and la.alpha is not None and np.allclose(la.alpha, 51 / 255)
    palette = Image.new("P", (64, 64), 1)
    palette.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    palette.putpixel((0, 0), 0)
    keyed = decode_still(encode(palette, "PNG", transparency=0), "'p'", **LIMITS)
    assert keyed.alpha is not None and keyed.alpha[0, 0] == 0.0 and keyed.alpha[5, 5] == 1.0
    assert np.allclose(keyed.rgb[5, 5], (1.0, 0.0, 0.0))
    rgb_key = decode_still(encode(Image.new("RGB", (64, 64), (1, 2, 3)), "PNG", transparency=(1, 2, 3)), "'k'",
                           **LIMITS)
    assert rgb_key.alpha is not None and rgb_key.alpha.max() == 0.0
    cmyk = decode_still(encode(Image.new("RGB", (64, 64), (200, 80, 20)).convert("CMYK"), "JPEG", quality=95),
                        "'cmyk'", **LIMITS)
    assert cmyk.format == "JPEG" and cmyk.alpha is None
    assert np.abs(cmyk.rgb[32, 32] * 255 - (200, 80, 20)).max() < 4
    opaque = decode_still(encode(Image.new("RGB", (64, 64), (9, 9, 9)), "WEBP", lossless=True), "'w'", **LIMITS)
    assert opaque.format == "WEBP" and opaque.alpha is None and np.allclose(opaque.rgb, 9 / 255)


def test_exif_orientation_is_applied_before_the_size_is_read(executor: Executor) -> None:
    data = exif_rotated_jpeg(100, 60)
    assert Image.open(io.BytesIO(data)).size == (100, 60)  # as stored
    still = decode_still(data, "'x'", **LIMITS)
    assert (still.width, still.height) == (60, 100)
    saved = Image.open(load_and_save(executor, "rotated.jpg", data)).convert("RGB")
    assert saved.size == (60, 100)
    # orientation 6 is "turn 90 degrees clockwise to view": the stored left half (red) ends on top
    top, bottom = saved.getpixel((30, 10)), saved.getpixel((30, 90))
    assert top[0] > 200 > top[2] and bottom[2] > 200 > bottom[0]


def test_a_camera_mpo_is_its_first_picture(executor: Executor) -> None:
    photo = Image.new("RGB", (96, 64), (40, 160, 90))
    data = encode(photo, "MPO", save_all=True, append_images=[Image.new("RGB", (32, 24))], quality=95)
    assert Image.open(io.BytesIO(data), formats=["JPEG"]).format == "MPO"
    saved = Image.open(load_and_save(executor, "camera.jpg", data)).convert("RGB")
    assert saved.size == (96, 64) and np.abs(np.asarray(saved)[32, 48] - (40, 160, 90)).max() < 4
