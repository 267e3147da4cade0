"""Tiled upscaling as ComfyUI's ImageUpscaleWithModel does it (comfy/utils.py tiled_scale), so memory is bounded.

The image is cut into square tiles of `tile` pixels a side that overlap by `overlap` pixels and blended as the
VAE's tiles are (engine/tiled_scale.py: one pass, ComfyUI's positions, ramps and rounding, so the same pixels).

Memory on the device is one tile's activations ([limits] upscale_tile_pixels in config.toml) plus the model:
a real 4x ESRGAN (23 blocks, 64 features) takes 14.6 KB per tile pixel at fp32, 3.8 GB for ComfyUI's 512x512
tile (measured on the CPU). The whole picture exists on the device only at the input size, and at the output
size on the CPU: the output, the weighted sum and the summed weights, as ComfyUI keeps them (150 MB for a
2048x2048 result).
`upscale_image` starts at the configured tile and halves it on an out-of-memory error down to 128, as
ComfyUI does from 512.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch
from torch import Tensor

from engine.device import is_out_of_memory
from engine.tiled_scale import tile_count, tiled_apply

__all__ = ["MIN_TILE", "OVERLAP", "tile_steps", "tiled_upscale", "upscale_image"]

log = logging.getLogger(__name__)

OVERLAP = 32  # ComfyUI's ImageUpscaleWithModel: tile 512, overlap 32
MIN_TILE = 128  # it halves the tile on out-of-memory and gives up below 128


def tile_steps(width: int, height: int, tile: int, overlap: int = OVERLAP) -> int:
    """Tiles one picture of width x height is cut into (ComfyUI's get_tiled_scale_steps)."""
    return tile_count(height, width, (tile, tile), overlap)


@torch.inference_mode()
def tiled_upscale(images: Tensor, model: Callable[[Tensor], Tensor], scale: int, tile: int,
                  overlap: int = OVERLAP, out_channels: int = 3,
                  progress: Callable[[], None] = lambda: None) -> Tensor:
    """Upscale `images` [B, C, H, W] (on the model's device) tile by tile; the result [B, C', sH, sW] on the CPU.

    `progress` is called after every tile.
    """
    def run(piece: Tensor) -> Tensor:
        return model(piece).float().cpu()

    return torch.cat([tiled_apply(images[index:index + 1], run, (tile, tile), overlap, scale, out_channels, progress)
                      for index in range(len(images))])


def upscale_image(images: Tensor, model: Callable[[Tensor], Tensor], scale: int, tile: int,
                  device: torch.device, out_channels: int = 3,
                  progress: Callable[[int, int], None] = lambda value, total: None) -> Tensor:
    """IMAGE pixels [B, H, W, C] upscaled by `model`, clamped to 0..1; the tile halves on out-of-memory.

    `progress(done, total)` counts tiles over the whole batch.
    """
    chw = images.movedim(-1, 1).to(device, torch.float32)
    while True:
        total = images.shape[0] * tile_steps(images.shape[2], images.shape[1], tile)
        done = 0

        def step() -> None:
            nonlocal done
            done += 1
            progress(done, total)

        try:
            upscaled = tiled_upscale(chw, model, scale, tile, out_channels=out_channels, progress=step)
        except Exception as err:
            if not is_out_of_memory(err) or tile // 2 < MIN_TILE:
                raise
            tile //= 2
            log.warning("upscaling ran out of memory; trying again with %dx%d tiles", tile, tile)
            if device.type == "cuda":
                torch.cuda.empty_cache()
            continue
        return upscaled.movedim(1, -1).clamp(0, 1)
