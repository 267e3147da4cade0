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
# grow/shrink steps between checks of the cancel flag: a 2048 px mask takes about 10 ms a step on a CPU
_CANCEL_EVERY = 32


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
    footprint, its corners left out when `tapered_corners`; `check` runs now and then (the cancel flag).

    As scipy.ndimage's "reflect" edges (what ComfyUI uses), a neighbour outside the mask is the edge pixel
    itself. After H + W steps every pixel holds the whole mask's max (min), so further steps change nothing
    and are not taken.
    """
    grown = as_batch(mask).float()
    pick = torch.maximum if expand > 0 else torch.minimum
    height, width = grown.shape[-2:]
    for step in range(min(abs(expand), height + width)):
        if step % _CANCEL_EVERY == 0:
            check()
        padded = F.pad(grown[:, None], (1, 1, 1, 1), mode="replicate")[:, 0]
        shifted = [padded[:, 1:-1, 1:-1], padded[:, :-2, 1:-1], padded[:, 2:, 1:-1],
                   padded[:, 1:-1, :-2], padded[:, 1:-1, 2:]]
        if not tapered_corners:
            shifted += [padded[:, :-2, :-2], padded[:, :-2, 2:], padded[:, 2:, :-2], padded[:, 2:, 2:]]
        out = shifted[0]
        for other in shifted[1:]:
            out = pick(out, other)
        grown = out
    return grown


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
