"""Latent nodes: EmptyLatentImage, LatentUpscale, LatentUpscaleBy, RepeatLatentBatch, SetLatentNoiseMask and
LatentCompositeMasked, with ComfyUI's names and ranges.

A LATENT's noise mask travels with it through these nodes, as ComfyUI's `samples.copy()` keeps it: an upscale
keeps the mask as it was (the sampler resizes it to the latent), a repeat repeats a per-item mask.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, ClassVar, Protocol

import torch
import torch.nn.functional as F
from pydantic import Field

from engine.errors import LimitExceeded
from engine.nodes.base import MAX_RESOLUTION, Choice, Node, RunContext, Socket, register
from engine.settings import Limits
from engine.values import Latent, Mask

LATENT_METHODS = ("nearest-exact", "bilinear", "area", "bicubic", "bislerp")
LATENT_CHANNELS = 4  # SD1.x and SDXL; the VAE scales sides by 8


class SizeLimits(Protocol):
    """What a size is checked against: the engine's [limits], or the bot's `Allowed` (the tighter of both)."""

    @property
    def max_side(self) -> int: ...
    @property
    def max_pixels(self) -> int: ...
    @property
    def max_batch(self) -> int: ...


def side_problem(name: str, side: int, max_side: int, *, min_side: int | None = None, grid: bool = False) -> str | None:
    """Why a width or height cannot be made, or None.

    A node floors its sides to the 8-pixel latent grid, as ComfyUI does; /imagine refuses such a side
    instead (`grid`), and a side under [bot] min_side (`min_side`), so a person gets the size asked for.
    """
    if side > max_side:
        return (f"{name} {side} is above this server's limit of {max_side}; use {max_side} or less, or ask the "
                "owner to raise limits.max_side in config.toml")
    if min_side is not None and side < min_side:
        return (f"{name} {side} is below this server's minimum of {min_side} (bot.min_side in config.toml); use "
                f"{min_side} or more")
    if grid and side % 8:
        low = side - side % 8
        return f"{name} {side} is not a multiple of 8 (SD latents are 1/8 of the image); use {low} or {low + 8}"
    return None


def size_problems(width: int, height: int, batch: int, limits: SizeLimits, *, min_side: int | None = None,
                  grid: bool = False) -> list[tuple[str, str]]:
    """The config limits on an image size and batch, as (input name, message) pairs; see `side_problem`."""
    problems = [(name, problem) for name, side in (("width", width), ("height", height))
                if (problem := side_problem(name, side, limits.max_side, min_side=min_side, grid=grid))]
    if width * height > limits.max_pixels:
        problems.append(("width", f"{width}x{height} = {width * height} pixels is above this server's limit of "
                                  f"{limits.max_pixels} (limits.max_pixels in config.toml); ask for a smaller size"))
    if batch > limits.max_batch:
        problems.append(("batch_size", f"batch_size {batch} is above this server's limit of {limits.max_batch} "
                                       "(limits.max_batch in config.toml)"))
    return problems


@register
class EmptyLatentImage(Node):
    """A batch of empty latents: the start of text-to-image."""

    CATEGORY: ClassVar[str] = "latent"
    RETURN_TYPES: ClassVar[tuple[str, ...]] = ("LATENT",)

    width: int = Field(512, ge=16, le=MAX_RESOLUTION, json_schema_extra={"step": 8})
    height: int = Field(512, ge=16, le=MAX_RESOLUTION, json_schema_extra={"step": 8})
    batch_size: int = Field(1, ge=1, le=4096)

    @classmethod
    def check_values(cls, values: dict[str, Any], limits: Limits) -> list[tuple[str, str]]:
        return size_problems(values["width"], values["height"], values["batch_size"], limits)

    def run(self, ctx: RunContext) -> tuple[Latent]:
        # sides are floored to a multiple of 8, as ComfyUI does (width // 8)
        shape = (self.batch_size, LATENT_CHANNELS, self.height // 8, self.width // 8)
        return (Latent(torch.zeros(shape)),)


def center_crop(x: torch.Tensor, width: int, height: int, h_axis: int) -> torch.Tensor:
    """The middle of `x` at the aspect ratio width:height (ComfyUI's crop="center"); sides at h_axis, h_axis+1.

    ComfyUI's common_upscale rounds the margin cut from each side, then keeps what is left between them:
    the same arithmetic here, so a crop is the same cells as ComfyUI's for every size.
    """
    old_h, old_w = x.shape[h_axis], x.shape[h_axis + 1]
    old_aspect, new_aspect = old_w / old_h, width / height
    if old_aspect > new_aspect:
        margin = round((old_w - old_w * (new_aspect / old_aspect)) / 2)
        return x.narrow(h_axis + 1, margin, old_w - margin * 2)
    if old_aspect < new_aspect:
        margin = round((old_h - old_h * (old_aspect / new_aspect)) / 2)
        return x.narrow(h_axis, margin, old_h - margin * 2)
    return x


def upscale_latent(samples: torch.Tensor, width: int, height: int, method: str, crop: str) -> torch.Tensor:
    """Resize latents to (height, width) in latent cells; `center` crops to the new aspect first."""
    if crop == "center":
        samples = center_crop(samples, width, height, h_axis=2)
    if method == "bislerp":
        return _bislerp(samples, width, height)
    kwargs = {"align_corners": False} if method in ("bilinear", "bicubic") else {}
    return F.interpolate(samples, size=(height, width), mode=method, **kwargs)


def _bislerp(samples: torch.Tensor, width: int, height: int) -> torch.Tensor:
    """ComfyUI's bislerp: bilinear positions, but channels blended by spherical interpolation."""
    def slerp(a: torch.Tensor, b: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        a_norm, b_norm = a.norm(dim=1, keepdim=True), b.norm(dim=1, keepdim=True)
        a_unit = a / a_norm.clamp_min(1e-8)
        b_unit = b / b_norm.clamp_min(1e-8)
        dot = (a_unit * b_unit).sum(1, keepdim=True).clamp(-1 + 1e-6, 1 - 1e-6)
        omega = torch.acos(dot)
        so = torch.sin(omega)
        unit = (torch.sin((1 - t) * omega) / so) * a_unit + (torch.sin(t * omega) / so) * b_unit
        blended = unit * (a_norm * (1 - t) + b_norm * t)
        linear = a * (1 - t) + b * t
        return torch.where(dot > 1 - 1e-5, linear, blended)

    def along(x: torch.Tensor, size: int, dim: int) -> torch.Tensor:
        old = x.shape[dim]
        pos = (torch.arange(size, dtype=torch.float32) + 0.5) * old / size - 0.5
        pos = pos.clamp(0, old - 1)
        low = pos.floor().long()
        high = (low + 1).clamp(max=old - 1)
        t = (pos - low).view(*[-1 if d == dim else 1 for d in range(x.dim())])
        return slerp(x.index_select(dim, low), x.index_select(dim, high), t)

    return along(along(samples.float(), width, 3), height, 2).to(samples.dtype)


@register
class LatentUpscale(Node):
    """Resize latents to a pixel width and height (0 keeps the aspect ratio)."""

    CATEGORY: ClassVar[str] = "latent"
    RETURN_TYPES: ClassVar[tuple[str, ...]] = ("LATENT",)

    samples: Latent = Socket("LATENT")
    upscale_method: str = Choice(LATENT_METHODS)
    width: int = Field(512, ge=0, le=MAX_RESOLUTION, json_schema_extra={"step": 8})
    height: int = Field(512, ge=0, le=MAX_RESOLUTION, json_schema_extra={"step": 8})
    crop: str = Choice(("disabled", "center"))

    @classmethod
    def check_values(cls, values: dict[str, Any], limits: Limits) -> list[tuple[str, str]]:
        return size_problems(values["width"], values["height"], 1, limits)

    def run(self, ctx: RunContext) -> tuple[Latent]:
        _, _, h, w = self.samples.samples.shape
        width, height = self.width // 8, self.height // 8
        if width == 0 and height == 0:
            return (self.samples,)
        width = width or max(1, round(w * height / h))
        height = height or max(1, round(h * width / w))
        resized = upscale_latent(self.samples.samples, width, height, self.upscale_method, self.crop)
        return (dataclasses.replace(self.samples, samples=resized),)


@register
class LatentUpscaleBy(Node):
    """Resize latents by a factor."""

    CATEGORY: ClassVar[str] = "latent"
    RETURN_TYPES: ClassVar[tuple[str, ...]] = ("LATENT",)

    samples: Latent = Socket("LATENT")
    upscale_method: str = Choice(LATENT_METHODS)
    scale_by: float = Field(1.5, ge=0.01, le=8.0, json_schema_extra={"step": 0.01})

    def run(self, ctx: RunContext) -> tuple[Latent]:
        _, _, h, w = self.samples.samples.shape
        width, height = round(w * self.scale_by), round(h * self.scale_by)
        side_limit = ctx.limits.max_side // 8
        if max(width, height) > side_limit:
            raise LimitExceeded(f"scaling by {self.scale_by} gives {width * 8}x{height * 8}, above this server's "
                                f"limit of {ctx.limits.max_side} per side (limits.max_side in config.toml)")
        resized = upscale_latent(self.samples.samples, width, height, self.upscale_method, "disabled")
        return (dataclasses.replace(self.samples, samples=resized),)


@register
class RepeatLatentBatch(Node):
    """Repeat a latent batch (img2img of one picture, several times with different noise)."""

    CATEGORY: ClassVar[str] = "latent/batch"
    RETURN_TYPES: ClassVar[tuple[str, ...]] = ("LATENT",)

    samples: Latent = Socket("LATENT")
    amount: int = Field(1, ge=1, le=64)

    def run(self, ctx: RunContext) -> tuple[Latent]:
        samples = self.samples.samples.repeat(self.amount, 1, 1, 1)
        index = self.samples.batch_index
        if index is not None:  # keep each copy's noise distinct, as ComfyUI offsets the indices
            offset = max(index) - min(index) + 1
            index = tuple(index) + tuple(x + i * offset for i in range(1, self.amount) for x in index)
        mask = self.samples.noise_mask
        if mask is not None and mask.shape[0] > 1:  # one mask for all stays one; per-item masks repeat with them
            mask = mask.repeat(self.amount, *([1] * (mask.dim() - 1)))
        return (Latent(samples, index, mask),)


def repeat_to_batch(x: torch.Tensor, batch: int) -> torch.Tensor:
    """comfy.utils.repeat_to_batch_size: the first `batch` items of `x` repeated as often as needed."""
    if x.shape[0] < batch:
        x = x.repeat(math.ceil(batch / x.shape[0]), *([1] * (x.dim() - 1)))
    return x[:batch]


def composite(destination: torch.Tensor, source: torch.Tensor, x: int, y: int, mask: torch.Tensor | None,
              multiplier: int, resize_source: bool) -> torch.Tensor:
    """`source` laid over a copy of `destination` (both [B, C, H, W]) with its corner at pixel (x, y), blended by
    `mask`; ComfyUI's comfy_extras/nodes_mask.py composite. Latents count x and y in pixels (multiplier 8).

    The source is repeated to the destination's batch and cut where it leaves the destination; the mask is
    resized (bilinear) to the source and cut with it; no mask lays the source over whole.
    """
    destination = destination.clone()
    source = source.to(destination.device, destination.dtype)
    if resize_source:
        source = F.interpolate(source, size=destination.shape[-2:], mode="bilinear")
    source = repeat_to_batch(source, destination.shape[0])
    x = max(-source.shape[-1] * multiplier, min(x, destination.shape[-1] * multiplier))
    y = max(-source.shape[-2] * multiplier, min(y, destination.shape[-2] * multiplier))
    left, top = x // multiplier, y // multiplier
    right, bottom = left + source.shape[-1], top + source.shape[-2]
    if mask is None:
        weight = torch.ones_like(source)
    else:
        weight = mask.to(destination.device, destination.dtype).reshape(-1, 1, mask.shape[-2], mask.shape[-1])
        weight = repeat_to_batch(F.interpolate(weight, size=source.shape[-2:], mode="bilinear"), source.shape[0])
    visible_width = destination.shape[-1] - left + min(0, x)
    visible_height = destination.shape[-2] - top + min(0, y)
    weight = weight[:, :, :visible_height, :visible_width]
    blended = (weight * source[..., :visible_height, :visible_width]
               + (1.0 - weight) * destination[..., top:bottom, left:right])
    destination[..., top:bottom, left:right] = blended
    return destination


@register
class SetLatentNoiseMask(Node):
    """Give a latent a noise mask: samplers then change it only where the mask is 1."""

    CATEGORY: ClassVar[str] = "latent/inpaint"
    RETURN_TYPES: ClassVar[tuple[str, ...]] = ("LATENT",)

    samples: Latent = Socket("LATENT")
    mask: Mask = Socket("MASK")

    def run(self, ctx: RunContext) -> tuple[Latent]:
        values = self.mask.values
        mask = values.reshape(-1, 1, values.shape[-2], values.shape[-1])
        return (dataclasses.replace(self.samples, noise_mask=mask),)


@register
class LatentCompositeMasked(Node):
    """Paste one latent onto another at a pixel offset, through an optional mask."""

    CATEGORY: ClassVar[str] = "latent"
    RETURN_TYPES: ClassVar[tuple[str, ...]] = ("LATENT",)

    destination: Latent = Socket("LATENT")
    source: Latent = Socket("LATENT")
    x: int = Field(0, ge=0, le=MAX_RESOLUTION, json_schema_extra={"step": 8})
    y: int = Field(0, ge=0, le=MAX_RESOLUTION, json_schema_extra={"step": 8})
    resize_source: bool = False
    mask: Mask | None = Socket("MASK", optional=True)

    def run(self, ctx: RunContext) -> tuple[Latent]:
        if self.destination.samples.shape[1] != self.source.samples.shape[1]:
            raise ValueError(f"the source latent has {self.source.samples.shape[1]} channels and the destination "
                             f"{self.destination.samples.shape[1]}: composite latents of the same model family")
        mask = None if self.mask is None else self.mask.values
        out = composite(self.destination.samples, self.source.samples, self.x, self.y, mask, 8, self.resize_source)
        # the destination's batch index and noise mask stay, as ComfyUI copies the destination's dict
        return (dataclasses.replace(self.destination, samples=out),)
