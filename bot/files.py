"""Image files around a generation: attachments checked and saved for LoadImage, results copied back in
for variations, PNGs removed on delete, the recipe read back for ℹ️ details.

Everything here touches the disk or PIL, so the Studio calls it through `asyncio.to_thread`, never on
the event loop.
"""

from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from bot.errors import RequestInvalid
from bot.request import Allowed
from engine.pngmeta import read_png_texts

__all__ = ["PreparedImage", "prepare_image", "read_parameters", "remove_files", "save_prepared"]


@dataclass(frozen=True)
class PreparedImage:
    """An image that passed the checks: where it will live in the input folder, its size, its bytes."""

    name: str  # relative to the input folder, as LoadImage's `image` input takes it
    width: int
    height: int
    data: bytes


def prepare_image(data: bytes, label: str, folder: str, allowed: Allowed) -> PreparedImage:
    """Decode `data` enough to know it is an image within the limits; name it by its content."""
    if len(data) > allowed.max_attachment_bytes:
        raise RequestInvalid(f"image: {label!r} is {len(data) / 1e6:.1f} MB; the limit is "
                             f"{allowed.max_attachment_bytes / 1e6:.1f} MB: scale it down or save it as JPEG")
    try:
        with Image.open(io.BytesIO(data)) as image:
            width, height = image.size
            if width * height > allowed.max_pixels or max(width, height) > allowed.max_side:
                raise RequestInvalid(
                    f"image: {label!r} is {width}x{height} = {width * height} pixels; this server takes up to "
                    f"{allowed.max_side} pixels a side and {allowed.max_pixels} in all (limits in config.toml): "
                    "scale it down")
            if min(width, height) < allowed.min_side:
                raise RequestInvalid(f"image: {label!r} is {width}x{height}; both sides must be at least "
                                     f"{allowed.min_side} pixels: use a larger image")
            image.verify()  # reads the whole stream: a truncated or corrupt file fails here, not in the worker
    except (UnidentifiedImageError, OSError, SyntaxError, Image.DecompressionBombError) as err:
        raise RequestInvalid(f"image: {label!r} is not an image Noodle can read ({type(err).__name__}); attach a "
                             "PNG, JPEG, WebP or BMP file") from None
    digest = hashlib.sha256(data).hexdigest()[:20]
    return PreparedImage(f"{folder}/{digest}.png" if data[:8] == b"\x89PNG\r\n\x1a\n" else
                         f"{folder}/{digest}{_suffix(data)}", width, height, data)


def _suffix(data: bytes) -> str:
    if data[:3] == b"\xff\xd8\xff":
        return ".jpg"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return ".webp"
    if data[:2] == b"BM":
        return ".bmp"
    return ".png"


def save_prepared(image: PreparedImage, input_dir: Path) -> bool:
    """Write the image into the input folder; True when this call created the file (so a refusal can undo it)."""
    path = input_dir / image.name
    if path.exists():
        return False  # content-addressed: the same bytes are already there
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = path.with_suffix(path.suffix + ".part")
    temp.write_bytes(image.data)
    temp.replace(path)  # atomic: LoadImage never sees half a file
    return True


def remove_files(paths: list[str]) -> int:
    """Delete files that exist; return how many were removed."""
    removed = 0
    for name in paths:
        path = Path(name)
        if path.is_file():
            path.unlink()
            removed += 1
    return removed


def read_parameters(paths: list[str]) -> str | None:
    """The A1111 `parameters` text of the first PNG that still exists."""
    for name in paths:
        path = Path(name)
        if path.is_file():
            return read_png_texts(path).get("parameters")
    return None
