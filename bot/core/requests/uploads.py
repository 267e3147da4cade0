"""Images coming in: attachments (and results taken back for variations) decoded and checked as LoadImage will
read them, then saved in the input folder under a name made of their content; local files read with a bound.

Everything here touches the disk or PIL, so the services call it through `asyncio.to_thread`, never on
the event loop.
"""

from __future__ import annotations

import hashlib
import os
import secrets
from dataclasses import dataclass
from pathlib import Path

from bot.core.errors import RequestInvalid
from bot.core.requests.imagine import Allowed
from engine.disk import check_free_space
from engine.errors import LimitExceeded
from engine.images_io import UnusableImage, decode_still, suffix_for

__all__ = ["PreparedImage", "local_path", "prepare_image", "read_capped", "save_prepared"]


@dataclass(frozen=True)
class PreparedImage:
    """An image that passed the checks: where it will live in the input folder, its size, its bytes."""

    name: str  # relative to the input folder, as LoadImage's `image` input takes it
    width: int  # upright (EXIF orientation applied), as LoadImage will produce it
    height: int
    data: bytes
    # some pixel is not fully opaque: LoadImage's MASK (1 - alpha) has something to inpaint. An RGBA file whose
    # alpha is 255 everywhere (many editors save one) is plain img2img.
    transparent: bool = False


def prepare_image(data: bytes, label: str, folder: str, allowed: Allowed, option: str = "image") -> PreparedImage:
    """Decode `data` as LoadImage will (engine/images_io.py) and check it; name it by its content.

    Decoding it all here, not only the header, means a damaged file, an animation or a foreign format is
    refused to the member's face, and the size on the card is the upright size LoadImage samples from.
    `option` names the option it came in (image, control_image) in refusals.
    """
    if len(data) > allowed.max_attachment_bytes:
        raise RequestInvalid(f"{option}: {label!r} is {len(data) / 1e6:.1f} MB; the limit is "
                             f"{allowed.max_attachment_bytes / 1e6:.1f} MB: scale it down or save it as JPEG")
    try:
        still = decode_still(data, f"{option}: {label!r}", max_bytes=allowed.max_attachment_bytes,
                             max_side=allowed.max_side, max_pixels=allowed.max_pixels)
    except (UnusableImage, LimitExceeded) as err:
        raise RequestInvalid(str(err)) from None
    width, height = still.width, still.height
    if min(width, height) < allowed.min_side:
        raise RequestInvalid(f"{option}: {label!r} is {width}x{height}; both sides must be at least "
                             f"{allowed.min_side} pixels: use a larger image")
    # the original bytes, not a re-encoding: LoadImage decodes them with the same function, EXIF and all
    digest = hashlib.sha256(data).hexdigest()[:20]
    transparent = still.alpha is not None and float(still.alpha.min()) < 1.0
    return PreparedImage(f"{folder}/{digest}{suffix_for(still.format)}", width, height, data, transparent)


def local_path(path_text: str, option: str, wanted: str) -> Path:
    """The local file a `noodle chat` option names (`~` expanded); one with a NUL character, which no file system
    takes (Path.stat() raises ValueError for it, not OSError), is refused naming `option` and what is `wanted`."""
    text = path_text.strip()
    if "\x00" in text:
        raise RequestInvalid(f"{option}: {text!r} holds a NUL character, which no file name can; give the path of "
                             f"{wanted}")
    return Path(text).expanduser()


def read_capped(path: Path, limit: int) -> bytes:
    """A local file's bytes (`noodle chat`'s image: and /workflow PATH), never more than `limit` + 1 of them.

    The size is not taken from stat(): a device or a FIFO (/dev/zero) says 0 and never ends, so the read
    itself is bounded; the caller refuses `len(data) > limit` with its own message. OSError passes through.
    """
    if not path.is_file():
        raise IsADirectoryError(21, "not a regular file") if path.is_dir() else OSError(22, "not a regular file")
    with path.open("rb") as opened:
        return opened.read(limit + 1)


def save_prepared(image: PreparedImage, input_dir: Path, keep_free_mb: int = 0) -> bool:
    """Write the image into the input folder; True when this call created the file (so a refusal can undo it)."""
    path = input_dir / image.name
    if path.exists():
        path.touch()  # content-addressed: the same bytes are there; retention counts from their last use
        return False
    check_free_space(input_dir, keep_free_mb, len(image.data))  # DiskFull: refused before a byte is written
    path.parent.mkdir(parents=True, exist_ok=True)
    # a name of its own per call: two members upscaling the same image at once write the same content-named file
    temp = path.with_name(f"{path.name}.{secrets.token_hex(4)}.part")
    temp.write_bytes(image.data)
    try:
        os.link(temp, path)  # atomic, and exclusive: LoadImage never sees half a file, one call creates it
    except FileExistsError:
        return False  # the other call made the same bytes first: theirs to undo
    except OSError:  # a filesystem without hard links: an atomic replace (the same bytes either way)
        created = not path.exists()
        temp.replace(path)
        return created
    finally:
        temp.unlink(missing_ok=True)
    return True
