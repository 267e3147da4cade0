"""Mask nodes: LoadImageMask, ImageToMask, MaskToImage, InvertMask, GrowMask, MaskComposite and SolidMask, with
the names, defaults, ranges and math of ComfyUI 0.3.64 (nodes.py and comfy_extras/nodes_mask.py).

A MASK is [B, H, W] floats 0..1 (engine/values.py); 1 marks the area to change. Masks feed the inpainting nodes
(engine/nodes/vae.py VAEEncodeForInpaint, latents.py SetLatentNoiseMask) and the composites.
"""

from __future__ import annotations

import hashlib
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from pydantic import Field

from engine.images_io import decode_still
from engine.models.paths import FolderLookup
from engine.nodes.base import MAX_RESOLUTION, Choice, Node, RunContext, Socket, register
from engine.nodes.latents import size_problems
from engine.settings import Limits
from engine.values import ImageBatch, Mask

IMAGE_CHANNELS = ("red", "green", "blue", "alpha")
MASK_OPERATIONS = ("multiply", "add", "subtract", "and", "or", "xor")
# a tapered GrowMask up to this many steps takes them one by one (five maxima of the mask each); a larger one is
# computed on the turned grid (four times the pixels, about 2 x log2(2 x radius) maxima): measured on eight
# 2048x2048 masks here, 16 steps one by one 3.2 s against 7.2 s turned, 64 steps 12.0 s against 7.4 s
_STEPPED_RADIUS = 32


def as_batch(mask: torch.Tensor) -> torch.Tensor:
    """A mask of any leading shape as [B, H, W], as ComfyUI's nodes reshape theirs."""
    return mask.reshape(-1, mask.shape[-2], mask.shape[-1])


@register
class LoadImageMask(Node):
    """Load one channel of an image in the input folder as a MASK (alpha: 1 where transparent)."""

    CATEGORY: ClassVar[str] = "mask"
    RETURN_TYPES: ClassVar[tuple[str, ...]] = ("MASK",)

    image: str = Choice("input")
    channel: str = Choice(("alpha", "red", "green", "blue"))

    @classmethod
    def fingerprint(cls, inputs: dict[str, Any], lookup: FolderLookup) -> str | None:
        # ComfyUI's IS_CHANGED hashes the file: a new file under the same name runs again
        return hashlib.sha256(lookup.resolve("input", inputs["image"]).read_bytes()).hexdigest()

    def run(self, ctx: RunContext) -> tuple[Mask]:
        # the checks and decoding of LoadImage and of an /imagine upload (engine/images_io.py)
        limits = ctx.limits
        still = decode_still(ctx.models.resolve("input", self.image), f"input {self.image!r}",
                             max_bytes=limits.max_input_image_bytes, max_side=limits.max_side,
                             max_pixels=limits.max_pixels)
        if self.channel == "alpha":
            # ComfyUI converts to RGBA first, so an opaque image gives an empty mask of its own size
            alpha = torch.ones(still.height, still.width) if still.alpha is None else torch.from_numpy(still.alpha)
            values = 1.0 - alpha
        else:
            values = torch.from_numpy(still.rgb[..., IMAGE_CHANNELS.index(self.channel)].copy())
        return (Mask(values[None].float()),)


@register
class ImageToMask(Node):
    """One channel of an image as a MASK."""

    CATEGORY: ClassVar[str] = "mask"
    RETURN_TYPES: ClassVar[tuple[str, ...]] = ("MASK",)

    image: ImageBatch = Socket("IMAGE")
    channel: str = Choice(IMAGE_CHANNELS)

    def run(self, ctx: RunContext) -> tuple[Mask]:
        pixels, index = self.image.pixels, IMAGE_CHANNELS.index(self.channel)
        if index >= pixels.shape[-1]:
            # ComfyUI fails here with an IndexError: IMAGE values carry no alpha
            raise ValueError(f"the image has {pixels.shape[-1]} channels and no {self.channel} channel; for "
                             "transparency use LoadImage's MASK output or LoadImageMask with channel alpha")
        return (Mask(pixels[..., index].clone()),)


@register
class MaskToImage(Node):
    """A MASK as a grey IMAGE (the mask in all three channels)."""

    CATEGORY: ClassVar[str] = "mask"
    RETURN_TYPES: ClassVar[tuple[str, ...]] = ("IMAGE",)

    mask: Mask = Socket("MASK")

    def run(self, ctx: RunContext) -> tuple[ImageBatch]:
        return (ImageBatch(as_batch(self.mask.values)[..., None].repeat(1, 1, 1, 3)),)


@register
class InvertMask(Node):
    """1 - mask."""

    CATEGORY: ClassVar[str] = "mask"
    RETURN_TYPES: ClassVar[tuple[str, ...]] = ("MASK",)

    mask: Mask = Socket("MASK")

    def run(self, ctx: RunContext) -> tuple[Mask]:
        return (Mask(1.0 - self.mask.values),)


def grow_mask(mask: torch.Tensor, expand: int, tapered_corners: bool,
              check: Any = lambda: None) -> torch.Tensor:
    """ComfyUI's GrowMask: `expand` steps of grey dilation (erosion when negative) of [B, H, W] with a 3x3
    footprint, its corners left out when `tapered_corners`; `check` runs between the passes (the cancel flag).

    ComfyUI takes the steps one by one (scipy.ndimage's grey_dilation per step), `expand` passes over the mask:
    about 22 minutes for 16,384 steps of eight 2048x2048 masks here. The result is computed whole instead, bit
    for bit the same, since a max (min) is exact whatever the order. As scipy's "reflect" edges make a neighbour
    outside the mask the edge pixel itself, a step is the max over the footprint cut to the mask, and k steps are
    the max over every pixel k steps away inside the mask: the square of radius k (|dy|, |dx| <= k) for the full
    footprint, the diamond |dy| + |dx| <= k for the tapered one, cut to the mask either way (a rectangle holds every
    shortest path between its pixels). A square is two sliding maxima, rows then columns; a diamond is a square in
    the coordinates u = y + x, v = y - x, so the mask is laid on that grid (four times the pixels) for the same
    two passes; up to _STEPPED_RADIUS steps, taking them one by one is quicker. A sliding max of width w takes
    about log2(w) whole-tensor steps (`_sliding`). Past H + W steps every pixel holds the whole mask's max (min):
    more change nothing.
    """
    grown = as_batch(mask).float()
    height, width = grown.shape[-2:]
    radius = min(abs(expand), height + width)
    pick = torch.maximum if expand > 0 else torch.minimum
    empty = float("-inf") if expand > 0 else float("inf")  # where no pixel is: never picked
    if not tapered_corners:
        return _square(grown, radius, pick, empty, check)
    if radius <= _STEPPED_RADIUS:
        for _ in range(radius):
            check()
            grown = _cross_step(grown, pick)
        return grown
    rows, cols = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
    u, v = rows + cols, rows - cols + (width - 1)  # every (u, v) of one pixel, on an (H + W - 1)^2 grid
    side = height + width - 1
    out = torch.empty_like(grown)
    for index, item in enumerate(grown):  # one at a time: the turned grid holds four times a mask's pixels
        turned = item.new_full((1, side, side), empty)
        turned[0, u, v] = item
        turned = _square(turned, radius, pick, empty, check)
        out[index] = turned[0, u, v]
    return out


def _cross_step(grown: torch.Tensor, pick: Any) -> torch.Tensor:
    """One step of the tapered footprint: each pixel and its four neighbours, the edge pixel standing in for a
    neighbour outside."""
    padded = F.pad(grown[:, None], (1, 1, 1, 1), mode="replicate")[:, 0]
    out = padded[:, 1:-1, 1:-1]
    for other in (padded[:, :-2, 1:-1], padded[:, 2:, 1:-1], padded[:, 1:-1, :-2], padded[:, 1:-1, 2:]):
        out = pick(out, other)
    return out


def _square(values: torch.Tensor, radius: int, pick: Any, empty: float, check: Any) -> torch.Tensor:
    """The max (`pick`) over the square of `radius` around every pixel of [B, H, W], cut to the tensor."""
    return _sliding(_sliding(values, radius, -2, pick, empty, check), radius, -1, pick, empty, check)


def _sliding(values: torch.Tensor, radius: int, dim: int, pick: Any, empty: float, check: Any) -> torch.Tensor:
    """The max (`pick`) over [i - radius, i + radius] along `dim` at every i, the window cut to the tensor: the
    window of 2 x radius + 1 is two overlapping windows of the largest power of two in it (a max may count a
    pixel twice), each built by doubling."""
    width = 2 * radius + 1
    length = values.shape[dim]
    shape = list(values.shape)
    shape[dim] = radius
    padded = torch.cat([values.new_full(shape, empty), values, values.new_full(shape, empty)], dim)
    span, windows = 1, padded  # windows[i]: the max over padded[i : i + span]
    while span * 2 <= width:
        check()
        kept = windows.shape[dim] - span
        windows = pick(windows.narrow(dim, 0, kept), windows.narrow(dim, span, kept))
        span *= 2
    # padded[i : i + width] is windows[i] and windows[i + width - span]; i runs over the tensor's length
    return pick(windows.narrow(dim, 0, length), windows.narrow(dim, width - span, length))


@register
class GrowMask(Node):
    """Grow a mask by some pixels (shrink it with a negative expand)."""

    CATEGORY: ClassVar[str] = "mask"
    RETURN_TYPES: ClassVar[tuple[str, ...]] = ("MASK",)

    mask: Mask = Socket("MASK")
    expand: int = Field(0, ge=-MAX_RESOLUTION, le=MAX_RESOLUTION, json_schema_extra={"step": 1})
    tapered_corners: bool = True

    def run(self, ctx: RunContext) -> tuple[Mask]:
        return (Mask(grow_mask(self.mask.values, self.expand, self.tapered_corners, ctx.check_cancelled)),)


def combine_masks(destination: torch.Tensor, source: torch.Tensor, x: int, y: int, operation: str) -> torch.Tensor:
    """ComfyUI's MaskComposite: `source` combined into `destination` with its corner at (x, y), where they overlap;
    and/or/xor round both to 0 or 1 first; the result is clamped to 0..1."""
    output = as_batch(destination).clone()
    source = as_batch(source).to(output.dtype)
    right, bottom = min(x + source.shape[-1], output.shape[-1]), min(y + source.shape[-2], output.shape[-2])
    if right <= x or bottom <= y:
        # ComfyUI fails on an offset past the destination's edge; nothing overlaps, so nothing changes
        return output.clamp(0.0, 1.0)
    here = output[:, y:bottom, x:right]
    there = source[:, :bottom - y, :right - x]
    if there.shape[0] not in (1, here.shape[0]):
        raise ValueError(f"the destination holds {here.shape[0]} mask(s) and the source {there.shape[0]}; give a "
                         "source of one mask, or as many as the destination")
    if operation == "multiply":
        merged = here * there
    elif operation == "add":
        merged = here + there
    elif operation == "subtract":
        merged = here - there
    else:
        logic = {"and": torch.logical_and, "or": torch.logical_or, "xor": torch.logical_xor}[operation]
        merged = logic(here.round().bool(), there.round().bool()).to(output.dtype)
    output[:, y:bottom, x:right] = merged
    return output.clamp(0.0, 1.0)


@register
class MaskComposite(Node):
    """Combine one mask into another at an offset: multiply, add, subtract, and, or, xor."""

    CATEGORY: ClassVar[str] = "mask"
    RETURN_TYPES: ClassVar[tuple[str, ...]] = ("MASK",)

    destination: Mask = Socket("MASK")
    source: Mask = Socket("MASK")
    x: int = Field(0, ge=0, le=MAX_RESOLUTION, json_schema_extra={"step": 1})
    y: int = Field(0, ge=0, le=MAX_RESOLUTION, json_schema_extra={"step": 1})
    operation: str = Choice(MASK_OPERATIONS)

    def run(self, ctx: RunContext) -> tuple[Mask]:
        return (Mask(combine_masks(self.destination.values, self.source.values, self.x, self.y, self.operation)),)


@register
class SolidMask(Node):
    """A mask of one value everywhere."""

    CATEGORY: ClassVar[str] = "mask"
    RETURN_TYPES: ClassVar[tuple[str, ...]] = ("MASK",)

    value: float = Field(1.0, ge=0.0, le=1.0, json_schema_extra={"step": 0.01})
    width: int = Field(512, ge=1, le=MAX_RESOLUTION, json_schema_extra={"step": 1})
    height: int = Field(512, ge=1, le=MAX_RESOLUTION, json_schema_extra={"step": 1})

    @classmethod
    def check_values(cls, values: dict[str, Any], limits: Limits) -> list[tuple[str, str]]:
        return size_problems(values["width"], values["height"], 1, limits)

    def run(self, ctx: RunContext) -> tuple[Mask]:
        return (Mask(torch.full((1, self.height, self.width), self.value, dtype=torch.float32)),)
