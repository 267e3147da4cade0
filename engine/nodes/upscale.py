"""Upscale-model nodes: UpscaleModelLoader and ImageUpscaleWithModel, with ComfyUI's names, inputs and tiling.

The loader reads an ESRGAN/RRDBNet or compact SRVGG file from `models/upscale_models/` through the model
manager (kept in memory with the checkpoints, in the same budget); the upscale runs it tile by tile as
ComfyUI's does (engine/models/upscale/tiling.py), the tile bounded by [limits] upscale_tile_pixels, and clamps
the result to 0..1. The output size is held to max_side and max_pixels before the job is queued
(engine/cost/ reads the scale from the file's header) and again here, before any tile runs.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

from engine.errors import LimitExceeded, UnsupportedModel
from engine.models.paths import FolderLookup, file_fingerprint
from engine.models.upscale import UpscaleModel, upscale_image
from engine.nodes.base import Choice, Node, RunContext, Socket, register
from engine.values import ImageBatch


@register
class UpscaleModelLoader(Node):
    """Load an upscale model (ESRGAN/RRDBNet or Real-ESRGAN compact) from the upscale_models folder."""

    CATEGORY: ClassVar[str] = "loaders"
    RETURN_TYPES: ClassVar[tuple[str, ...]] = ("UPSCALE_MODEL",)

    model_name: str = Choice("upscale_models")

    @classmethod
    def fingerprint(cls, inputs: dict[str, Any], lookup: FolderLookup) -> str | None:
        # a file replaced under the same name must not be served from the node cache
        return file_fingerprint(lookup.resolve("upscale_models", inputs["model_name"]))

    def run(self, ctx: RunContext) -> tuple[UpscaleModel]:
        model = ctx.models.upscale_model(self.model_name)
        ctx.meta.models.setdefault("upscale_models", {})[self.model_name] = {
            "arch": model.spec.describe(), "scale": model.scale}
        return (model,)


@register
class ImageUpscaleWithModel(Node):
    """Upscale images with an upscale model, tile by tile (ComfyUI's tile 512, overlap 32)."""

    CATEGORY: ClassVar[str] = "image/upscaling"
    RETURN_TYPES: ClassVar[tuple[str, ...]] = ("IMAGE",)

    upscale_model: UpscaleModel = Socket("UPSCALE_MODEL")
    image: ImageBatch = Socket("IMAGE")

    def run(self, ctx: RunContext) -> tuple[ImageBatch]:
        model, pixels = self.upscale_model, self.image.pixels
        spec = model.spec
        _, height, width, channels = pixels.shape
        if channels != spec.in_channels:
            raise UnsupportedModel(f"upscale model {model.name!r} takes {spec.in_channels}-channel images and this "
                                f"IMAGE has {channels} channels; use an RGB upscaler for RGB images")
        out_w, out_h = width * spec.scale, height * spec.scale
        limits = ctx.limits
        if max(out_w, out_h) > limits.max_side or out_w * out_h > limits.max_pixels:
            # engine/cost/ refuses this before the job is queued; a model swapped on disk since is caught here
            raise LimitExceeded(f"upscaling {width}x{height} with {model.name!r} (x{spec.scale}) gives "
                                f"{out_w}x{out_h}, above this server's limits of {limits.max_side} a side and "
                                f"{limits.max_pixels:,} pixels (limits.max_side, limits.max_pixels in config.toml); "
                                "scale the image down first (ImageScaleBy) or use a smaller-scale model")
        module = ctx.models.use_upscaler(model)
        tile = math.isqrt(limits.upscale_tile_pixels)
        upscaled = upscale_image(pixels, module, spec.scale, tile, ctx.device, out_channels=spec.out_channels,
                                 progress=ctx.progress)
        return (ImageBatch(upscaled),)
