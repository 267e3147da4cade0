"""Small image nodes: ImageScaleToTotalPixels, ImageBlur, ImageSharpen, ImageBlend, ImageInvert, ImageCrop,
ImageBatch and EmptyImage, with ComfyUI 0.3.64's names, ranges and math (nodes.py, comfy_extras/nodes_images.py,
comfy_extras/nodes_post_processing.py).

IMAGE values stay on the CPU ([B, H, W, C] floats 0..1); the filters run on the job's device and come back.
engine/cost/rules.py follows each node's output size, so the whole graph is held to the limits before it runs.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from pydantic import Field

from engine.errors import LimitExceeded
from engine.nodes.base import MAX_RESOLUTION, Choice, Node, RunContext, Socket, register
from engine.nodes.images import UPSCALE_METHODS, resize_pixels
from engine.nodes.latents import size_problems, upscale_latent
from engine.settings import Limits
from engine.values import ImageBatch as Pixels  # the IMAGE value; ImageBatch below is the node

BLEND_MODES = ("normal", "multiply", "screen", "overlay", "soft_light", "difference")


def total_pixels_size(width: int, height: int, megapixels: float) -> tuple[int, int]:
    """ImageScaleToTotalPixels' new size: both sides scaled by sqrt(total / area), each rounded."""
    scale = math.sqrt(int(megapixels * 1024 * 1024) / (width * height))
    return round(width * scale), round(height * scale)


@register
class ImageScaleToTotalPixels(Node):
    """Resize images to about a number of megapixels, keeping the aspect ratio."""

    CATEGORY: ClassVar[str] = "image/upscaling"
    RETURN_TYPES: ClassVar[tuple[str, ...]] = ("IMAGE",)

    image: Pixels = Socket("IMAGE")
    upscale_method: str = Choice(UPSCALE_METHODS)
    megapixels: float = Field(1.0, ge=0.01, le=16.0, json_schema_extra={"step": 0.01})

    def run(self, ctx: RunContext) -> tuple[Pixels]:
        pixels = self.image.pixels
        height, width = pixels.shape[1:3]
        new_w, new_h = total_pixels_size(width, height, self.megapixels)
        # engine/cost/ holds this size to the limits before the run; an image of unknown size is held here
        problems = size_problems(max(new_w, 1), max(new_h, 1), 1, ctx.limits)
        if new_w < 1 or new_h < 1 or problems:
            why = problems[0][1] if problems else "a side under 1 pixel; use more megapixels"
            raise LimitExceeded(f"scaling the {width}x{height} image to {self.megapixels} megapixels gives "
                                f"{new_w}x{new_h}: {why}")
        return (Pixels(resize_pixels(pixels, new_w, new_h, self.upscale_method, "disabled")),)


def gaussian_kernel(size: int, sigma: float, device: torch.device | None = None) -> torch.Tensor:
    """nodes_post_processing's kernel: exp(-d^2 / 2 sigma^2) over a size x size grid spanning -1..1, summing to 1."""
    axis = torch.linspace(-1, 1, size, device=device)
    x, y = torch.meshgrid(axis, axis, indexing="ij")
    d = torch.sqrt(x * x + y * y)
    g = torch.exp(-(d * d) / (2.0 * sigma * sigma))
    return g / g.sum()


def filter_pixels(pixels: torch.Tensor, kernel: torch.Tensor, radius: int, device: torch.device) -> torch.Tensor:
    """Each channel convolved with `kernel` over the image reflected `radius` pixels past its edges."""
    _, height, width, channels = pixels.shape
    if radius >= height or radius >= width:  # reflect padding needs more pixels than it mirrors
        raise ValueError(f"a radius of {radius} needs an image over {radius} pixels on each side; this one is "
                         f"{width}x{height}: use a radius under {min(height, width)}")
    weight = kernel.to(device, pixels.dtype).repeat(channels, 1, 1).unsqueeze(1)
    image = F.pad(pixels.to(device).movedim(-1, 1), (radius, radius, radius, radius), mode="reflect")
    # a valid convolution over the reflected border: ComfyUI's zero-padded conv cut back by radius is the same
    return F.conv2d(image, weight, groups=channels).movedim(1, -1).cpu()


@register
class ImageBlur(Node):
    """Gaussian blur."""

    CATEGORY: ClassVar[str] = "image/postprocessing"
    RETURN_TYPES: ClassVar[tuple[str, ...]] = ("IMAGE",)

    image: Pixels = Socket("IMAGE")
    blur_radius: int = Field(1, ge=1, le=31, json_schema_extra={"step": 1})
    sigma: float = Field(1.0, ge=0.1, le=10.0, json_schema_extra={"step": 0.1})

    def run(self, ctx: RunContext) -> tuple[Pixels]:
        kernel = gaussian_kernel(self.blur_radius * 2 + 1, self.sigma, ctx.device)
        return (Pixels(filter_pixels(self.image.pixels, kernel, self.blur_radius, ctx.device)),)


@register
class ImageSharpen(Node):
    """Sharpen by subtracting a Gaussian blur, `alpha` strong."""

    CATEGORY: ClassVar[str] = "image/postprocessing"
    RETURN_TYPES: ClassVar[tuple[str, ...]] = ("IMAGE",)

    image: Pixels = Socket("IMAGE")
    sharpen_radius: int = Field(1, ge=1, le=31, json_schema_extra={"step": 1})
    sigma: float = Field(1.0, ge=0.1, le=10.0, json_schema_extra={"step": 0.01})
    alpha: float = Field(1.0, ge=0.0, le=5.0, json_schema_extra={"step": 0.01})

    def run(self, ctx: RunContext) -> tuple[Pixels]:
        size = self.sharpen_radius * 2 + 1
        kernel = (gaussian_kernel(size, self.sigma, ctx.device) * -(self.alpha * 10)).to(self.image.pixels.dtype)
        center = size // 2
        # the centre takes what the ring gives away plus one: a kernel summing to 1, so flat areas stay
        kernel[center, center] = kernel[center, center] - kernel.sum() + 1.0
        sharpened = filter_pixels(self.image.pixels, kernel, self.sharpen_radius, ctx.device)
        return (Pixels(sharpened.clamp(0, 1)),)


def blend_mode(a: torch.Tensor, b: torch.Tensor, mode: str) -> torch.Tensor:
    """ImageBlend's modes on image1 `a` and image2 `b` (soft_light is the W3C formula)."""
    if mode == "normal":
        return b
    if mode == "multiply":
        return a * b
    if mode == "screen":
        return 1 - (1 - a) * (1 - b)
    if mode == "overlay":
        return torch.where(a <= 0.5, 2 * a * b, 1 - 2 * (1 - a) * (1 - b))
    if mode == "soft_light":
        g = torch.where(a <= 0.25, ((16 * a - 12) * a + 4) * a, torch.sqrt(a))
        return torch.where(b <= 0.5, a - (1 - 2 * b) * a * (1 - a), a + (2 * b - 1) * (g - a))
    if mode == "difference":
        return a - b
    raise ValueError(f"blend_mode {mode!r} is not one of {', '.join(BLEND_MODES)}")


@register
class ImageBlend(Node):
    """Blend image2 over image1 with a mode, blend_factor strong."""

    CATEGORY: ClassVar[str] = "image/postprocessing"
    RETURN_TYPES: ClassVar[tuple[str, ...]] = ("IMAGE",)

    image1: Pixels = Socket("IMAGE")
    image2: Pixels = Socket("IMAGE")
    blend_factor: float = Field(0.5, ge=0.0, le=1.0, json_schema_extra={"step": 0.01})
    blend_mode: str = Choice(BLEND_MODES)

    def run(self, ctx: RunContext) -> tuple[Pixels]:
        image1, image2 = self.image1.pixels, self.image2.pixels
        if image2.shape[-1] > image1.shape[-1]:  # node_helpers.image_alpha_fix: image2's alpha goes
            image2 = image2[..., :image1.shape[-1]]
        elif image2.shape[-1] < image1.shape[-1]:
            raise ValueError(f"image1 has {image1.shape[-1]} channels and image2 {image2.shape[-1]}; blend images "
                             "with the same channels")
        if image1.shape != image2.shape:  # resized to image1 (bicubic, centre crop), as ComfyUI's common_upscale
            image2 = upscale_latent(image2.movedim(-1, 1), image1.shape[2], image1.shape[1], "bicubic",
                                    "center").movedim(1, -1)
        if image1.shape[0] != image2.shape[0] and 1 not in (image1.shape[0], image2.shape[0]):
            raise ValueError(f"image1 is a batch of {image1.shape[0]} and image2 of {image2.shape[0]}; blend "
                             "batches of the same size, or one image with a batch")
        blended = blend_mode(image1, image2, self.blend_mode)
        blended = image1 * (1 - self.blend_factor) + blended * self.blend_factor
        return (Pixels(blended.clamp(0, 1)),)


@register
class ImageInvert(Node):
    """1 - image."""

    CATEGORY: ClassVar[str] = "image"
    RETURN_TYPES: ClassVar[tuple[str, ...]] = ("IMAGE",)

    image: Pixels = Socket("IMAGE")

    def run(self, ctx: RunContext) -> tuple[Pixels]:
        return (Pixels(1.0 - self.image.pixels),)


def crop_box(width: int, height: int, x: int, y: int, crop_w: int, crop_h: int) -> tuple[int, int, int, int]:
    """ImageCrop's box (left, top, width, height): the corner kept inside the image, the size cut at its edge."""
    left, top = min(x, width - 1), min(y, height - 1)
    return left, top, min(crop_w, width - left), min(crop_h, height - top)


@register
class ImageCrop(Node):
    """Cut a width x height area at (x, y) out of images."""

    CATEGORY: ClassVar[str] = "image/transform"
    RETURN_TYPES: ClassVar[tuple[str, ...]] = ("IMAGE",)

    image: Pixels = Socket("IMAGE")
    width: int = Field(512, ge=1, le=MAX_RESOLUTION, json_schema_extra={"step": 1})
    height: int = Field(512, ge=1, le=MAX_RESOLUTION, json_schema_extra={"step": 1})
    x: int = Field(0, ge=0, le=MAX_RESOLUTION, json_schema_extra={"step": 1})
    y: int = Field(0, ge=0, le=MAX_RESOLUTION, json_schema_extra={"step": 1})

    def run(self, ctx: RunContext) -> tuple[Pixels]:
        pixels = self.image.pixels
        left, top, width, height = crop_box(pixels.shape[2], pixels.shape[1], self.x, self.y, self.width, self.height)
        return (Pixels(pixels[:, top:top + height, left:left + width, :]),)


@register
class ImageBatch(Node):
    """Join two image batches; image2 is resized (bilinear, centre crop) to image1 when their sizes differ."""

    CATEGORY: ClassVar[str] = "image"
    RETURN_TYPES: ClassVar[tuple[str, ...]] = ("IMAGE",)

    image1: Pixels = Socket("IMAGE")
    image2: Pixels = Socket("IMAGE")

    def run(self, ctx: RunContext) -> tuple[Pixels]:
        image1, image2 = self.image1.pixels, self.image2.pixels
        if image1.shape[-1] != image2.shape[-1]:
            raise ValueError(f"image1 has {image1.shape[-1]} channels and image2 {image2.shape[-1]}; batch images "
                             "with the same channels")
        if image1.shape[1:] != image2.shape[1:]:
            image2 = upscale_latent(image2.movedim(-1, 1), image1.shape[2], image1.shape[1], "bilinear",
                                    "center").movedim(1, -1)
        return (Pixels(torch.cat((image1, image2.to(image1.dtype)), dim=0)),)


@register
class EmptyImage(Node):
    """A batch of images of one colour (an RGB integer, 0xRRGGBB)."""

    CATEGORY: ClassVar[str] = "image"
    RETURN_TYPES: ClassVar[tuple[str, ...]] = ("IMAGE",)

    width: int = Field(512, ge=1, le=MAX_RESOLUTION, json_schema_extra={"step": 1})
    height: int = Field(512, ge=1, le=MAX_RESOLUTION, json_schema_extra={"step": 1})
    batch_size: int = Field(1, ge=1, le=4096)
    color: int = Field(0, ge=0, le=0xFFFFFF, json_schema_extra={"step": 1, "display": "color"})

    @classmethod
    def check_values(cls, values: dict[str, Any], limits: Limits) -> list[tuple[str, str]]:
        return size_problems(values["width"], values["height"], values["batch_size"], limits)

    def run(self, ctx: RunContext) -> tuple[Pixels]:
        # each channel as a Python float, then float32, as ComfyUI's torch.full
        rgb = torch.tensor([((self.color >> shift) & 0xFF) / 0xFF for shift in (16, 8, 0)], dtype=torch.float32)
        return (Pixels(rgb.expand(self.batch_size, self.height, self.width, 3).clone()),)
