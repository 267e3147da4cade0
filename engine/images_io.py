"""Decoding an image a member supplied: an /imagine attachment, a result copied back for a variation, or any
file LoadImage reads from the input folder. One function, `decode_still`, serves every path, so what the
bot accepted at upload is exactly what the graph later gets.

The rules, in the order they are checked (each refusal names what was wrong and what to do):
1. the file's size in bytes, before anything is read;
2. the format, from the file's signature and never its name: PNG, JPEG and WebP only. Pillow knows ~40
   formats (PSD, TIFF, BMP, ICO, ...), each a parser a stranger's bytes would reach;
3. one frame: an animated PNG or WebP is refused (why: see `_decode`);
4. the width and height in the header against the pixel limits, before a pixel is decoded;
5. then the one frame is decoded, turned upright by its EXIF orientation, and converted to 0..1 floats
   with 16-bit values scaled rather than clipped.
"""

from __future__ import annotations

import io
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from engine.errors import LimitExceeded, NoodleError

__all__ = ["ALLOWED_FORMATS", "IMAGE_SUFFIXES", "StillImage", "UnusableImage", "decode_still", "suffix_for",
           "to_floats"]

# Pillow's names; an MPO is a camera JPEG holding extra pictures (a preview, a depth map) after the main one
ALLOWED_FORMATS = ("PNG", "JPEG", "WEBP")
ALLOWED_TEXT = "PNG, JPEG or WebP"
_SHOWN = {"PNG": "PNG", "JPEG": "JPEG", "MPO": "JPEG", "WEBP": "WebP"}
_SUFFIXES = {"PNG": ".png", "JPEG": ".jpg", "MPO": ".jpg", "WEBP": ".webp"}
# the file names those formats go by: what the input folder lists and an attachment may be called
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
# Pillow keeps 16-bit grey as I;16 (PNG) and its widenings I and F with the same numbers: 0..65535
_WIDE_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")
# what a damaged file raises from Pillow's decoders and EXIF reader
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, struct.error)

# Pillow's own bomb guard only warns up to 2x this and raises beyond; the config limits refuse far earlier,
# from the header, so this only bounds what Image.open itself may allocate for a lying header.
Image.MAX_IMAGE_PIXELS = 16384 * 16384


class UnusableImage(NoodleError):
    """A file that is not one still PNG, JPEG or WebP image that decodes."""


@dataclass(frozen=True, eq=False)
class StillImage:
    """One decoded frame, upright: what LoadImage hands the graph and what an upload's card reports."""

    format: str  # Pillow's name: "PNG", "JPEG", "MPO" (a camera JPEG) or "WEBP"
    rgb: np.ndarray  # [H, W, 3] float32 in 0..1
    alpha: np.ndarray | None  # [H, W] float32 in 0..1 (1 is opaque); None when the file has no transparency

    @property
    def width(self) -> int:
        return int(self.rgb.shape[1])

    @property
    def height(self) -> int:
        return int(self.rgb.shape[0])


def suffix_for(image_format: str) -> str:
    """The file suffix an accepted format is stored under in the input folder."""
    return _SUFFIXES[image_format]


def decode_still(source: bytes | Path, what: str, *, max_bytes: int, max_side: int, max_pixels: int) -> StillImage:
    """Check and decode one still image; `what` starts every refusal ("image: 'cat.png'", "input 'x.png'")."""
    size = len(source) if isinstance(source, bytes) else _file_size(source, what)
    if size > max_bytes:
        raise LimitExceeded(f"{what} is {size / 1e6:.1f} MB; the limit is {max_bytes / 1e6:.1f} MB "
                            "(limits.max_input_image_bytes in config.toml): scale it down or save it as JPEG")
    stream = io.BytesIO(source) if isinstance(source, bytes) else source.open("rb")
    with stream:
        prefix = stream.read(16)
        stream.seek(0)
        try:
            opened = Image.open(stream, formats=ALLOWED_FORMATS)
        except UnidentifiedImageError:
            raise _not_allowed(what, prefix) from None
        except Image.DecompressionBombError:
            raise LimitExceeded(f"{what} claims more than {2 * Image.MAX_IMAGE_PIXELS} pixels; this server takes "
                                f"up to {max_side} pixels a side and {max_pixels} in all (limits.max_side and "
                                "limits.max_pixels in config.toml): scale it down") from None
        except _DECODE_ERRORS as err:
            raise _damaged(what, _format_of(prefix) or ALLOWED_TEXT, err) from None
        with opened:
            return _decode(opened, what, max_side, max_pixels)


def _decode(opened: Image.Image, what: str, max_side: int, max_pixels: int) -> StillImage:
    image_format = opened.format or "PNG"
    frames = getattr(opened, "n_frames", 1)
    # One frame, always, and the same rule here and in LoadImage. ComfyUI's LoadImage makes one batch item per
    # frame: a 6 KB APNG of 40 frames became 40 images in one job, and 200 frames of 1024x1024 cost 5 GB
    # before sampling. Taking the first frame quietly would give back something other than what the member
    # sees playing, so an animation is refused with what to do. The frame count comes from the header (APNG's
    # acTL chunk, WebP's container) and only frame 0 is ever decoded. An MPO's extra pictures are not frames of
    # an animation but a camera's preview or depth map: its first picture is the photo.
    if frames > 1 and image_format != "MPO":
        raise UnusableImage(f"{what} is an animated {_SHOWN[image_format]} of {frames} frames; Noodle takes one "
                            "still image: export the frame you want as PNG or JPEG and use that")
    # EXIF orientation only swaps the sides, so the header's size bounds the decoded one: check before decoding
    width, height = opened.size
    if width * height > max_pixels or max(width, height) > max_side:
        raise LimitExceeded(f"{what} is {width}x{height} = {width * height} pixels; this server takes up to "
                            f"{max_side} pixels a side and {max_pixels} in all (limits.max_side and "
                            "limits.max_pixels in config.toml): scale it down")
    try:
        opened.load()
        upright = ImageOps.exif_transpose(opened)  # before the size is read: the card shows what is sampled
        rgb, alpha = to_floats(upright)
    except _DECODE_ERRORS as err:
        raise _damaged(what, image_format, err) from None
    return StillImage(image_format, rgb, alpha)


def to_floats(image: Image.Image) -> tuple[np.ndarray, np.ndarray | None]:
    """A decoded image's RGB [H, W, 3] and alpha [H, W] (None: opaque) as 0..1 float32, whatever its mode."""
    if image.mode in _WIDE_MODES:
        # convert("RGB") clips these to 0..255, so a 30000/65535 grey came out white; scale instead
        values = np.asarray(image, dtype=np.float32)
        grey = np.clip(values / 65535.0, 0.0, 1.0)
        key = image.info.get("transparency")  # a PNG tRNS chunk: the one grey value that is transparent
        alpha = (values != key).astype(np.float32) if isinstance(key, int | float) else None
        return np.repeat(grey[..., None], 3, axis=2), alpha
    if "A" in image.getbands() or "transparency" in image.info:
        # LA, PA, RGBA, and P/L/RGB with a tRNS chunk: Pillow applies the palette or colour key to alpha
        rgba = np.asarray(image.convert("RGBA"), dtype=np.float32) / 255.0
        return np.ascontiguousarray(rgba[..., :3]), np.ascontiguousarray(rgba[..., 3])
    # L, 1, P, RGB, YCbCr, and CMYK JPEGs (Pillow undoes Adobe's inverted CMYK while decoding)
    return np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0, None


def _file_size(path: Path, what: str) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        raise UnusableImage(f"{what} is no longer in the input folder; upload it again") from None


def _format_of(prefix: bytes) -> str | None:
    """The format whose signature `prefix` carries, asking each Pillow plugin's signature check only: no
    plugin but PNG's, JPEG's and WebP's ever parses a member's file."""
    Image.init()
    for name in Image.ID:
        accept = Image.OPEN[name][1]
        if accept is not None and accept(prefix) is True:
            return name
    return None


def _not_allowed(what: str, prefix: bytes) -> UnusableImage:
    found = _format_of(prefix)
    if found is None:
        return UnusableImage(f"{what} is not an image Noodle can read (its first bytes match no known image "
                             f"format); attach a {ALLOWED_TEXT} file")
    if found in _SHOWN:
        return _damaged(what, found, "its header does not parse")
    return UnusableImage(f"{what} is a {found} file; Noodle decodes only {ALLOWED_TEXT} images: save it as PNG "
                         "or JPEG and try again")


def _damaged(what: str, image_format: str, reason: object) -> UnusableImage:
    shown = _SHOWN.get(image_format, image_format)
    return UnusableImage(f"{what} is not an image Noodle can read: it starts like a {shown} file but {reason}; "
                         "it may be damaged or cut short: save it again as PNG or JPEG")
