"""VAEDecodeTiled and VAEEncodeTiled: the VAE run tile by tile, with ComfyUI 0.3.64's tiles, blending and passes.

The tiling itself is engine/tiled_scale.py (comfy/utils.py tiled_scale). As comfy/sd.py decode_tiled_ /
encode_tiled_, three passes are averaged, with tiles (h x w) of 2t x t/2, t/2 x 2t and t x t; a decode clamps to
0..1 after the average. The temporal inputs only matter for video VAEs: Noodle's VAEs are image VAEs, and ComfyUI
ignores them for those.
"""

from __future__ import annotations

from functools import partial
from typing import ClassVar

from pydantic import Field

from engine.nodes.base import Node, RunContext, Socket, register
from engine.tiled_scale import TilingError, averaged_passes
from engine.nodes.vae import (crop_to_grid, decode_latents, decode_tiles, encode_piece, encode_tiles,
                              vae_compression, vae_ready)
from engine.values import ImageBatch, Latent, VaeRef


def _tile_error(node: str, err: TilingError, tile_size: int, overlap: int) -> ValueError:
    return ValueError(f"{node}: {err} (tile_size {tile_size}, overlap {overlap}); use an overlap under half the "
                      "tile_size and multiples of 32 for both, as ComfyUI's widgets step them")


@register
class VAEDecodeTiled(Node):
    """Decode latents into images tile by tile, for pictures too big to decode whole."""

    CATEGORY: ClassVar[str] = "_for_testing"
    RETURN_TYPES: ClassVar[tuple[str, ...]] = ("IMAGE",)

    samples: Latent = Socket("LATENT")
    vae: VaeRef = Socket("VAE")
    tile_size: int = Field(512, ge=64, le=4096, json_schema_extra={"step": 32})
    overlap: int = Field(64, ge=0, le=4096, json_schema_extra={"step": 32})
    temporal_size: int = Field(64, ge=8, le=4096, json_schema_extra={"step": 4},
                               description="Only used for video VAEs: Amount of frames to decode at a time.")
    temporal_overlap: int = Field(8, ge=4, le=4096, json_schema_extra={"step": 4},
                                  description="Only used for video VAEs: Amount of frames to overlap.")

    def run(self, ctx: RunContext) -> tuple[ImageBatch]:
        module = vae_ready(self.vae)
        # ComfyUI's own adjustment: an overlap over a quarter of the tile becomes a quarter
        overlap = self.tile_size // 4 if self.tile_size < self.overlap * 4 else self.overlap
        compression = vae_compression(module)
        tile, cells = self.tile_size // compression, overlap // compression  # in latent cells
        try:
            decoded = averaged_passes(self.samples.samples, partial(decode_latents, module), decode_tiles(tile),
                                      cells, compression, module.config.out_channels, ctx.progress)
        except TilingError as err:  # the adjusted overlap keeps every step positive; kept as a guard
            raise _tile_error("VAEDecodeTiled", err, self.tile_size, self.overlap) from err
        return (ImageBatch(((decoded + 1.0) / 2.0).clamp(0, 1).movedim(1, -1)),)


@register
class VAEEncodeTiled(Node):
    """Encode images into latents tile by tile, for pictures too big to encode whole."""

    CATEGORY: ClassVar[str] = "_for_testing"
    RETURN_TYPES: ClassVar[tuple[str, ...]] = ("LATENT",)

    pixels: ImageBatch = Socket("IMAGE")
    vae: VaeRef = Socket("VAE")
    tile_size: int = Field(512, ge=64, le=4096, json_schema_extra={"step": 64})
    overlap: int = Field(64, ge=0, le=4096, json_schema_extra={"step": 32})
    temporal_size: int = Field(64, ge=8, le=4096, json_schema_extra={"step": 4},
                               description="Only used for video VAEs: Amount of frames to encode at a time.")
    temporal_overlap: int = Field(8, ge=4, le=4096, json_schema_extra={"step": 4},
                                  description="Only used for video VAEs: Amount of frames to overlap.")

    def run(self, ctx: RunContext) -> tuple[Latent]:
        module = vae_ready(self.vae)
        # ComfyUI's encode node adjusts nothing: tile and overlap in pixels, the pixels cropped to the 8-grid
        pixels = crop_to_grid(self.pixels.pixels[..., :3], h_axis=1).movedim(-1, 1)
        compression = vae_compression(module)
        try:
            latents = averaged_passes(pixels, partial(encode_piece, module), encode_tiles(self.tile_size),
                                      self.overlap, 1 / compression, module.config.latent_channels, ctx.progress)
        except TilingError as err:
            raise _tile_error("VAEEncodeTiled", err, self.tile_size, self.overlap) from err
        return (Latent(latents),)
