"""Tiled upscaling as ComfyUI's ImageUpscaleWithModel does it (comfy/utils.py tiled_scale), so memory is bounded.

The image is cut into tiles of `tile` pixels a side that overlap by `overlap` pixels; each tile is upscaled
on its own, weighted by a mask that ramps linearly from 1/f to 1 over the f = overlap x scale output pixels at
each of its edges, and the weighted tiles are summed and divided by the summed weights. A picture that fits in
one tile is upscaled whole. The same positions, ramps and rounding as ComfyUI give the same pixels.

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
import math
from collections.abc import Callable

import torch
from torch import Tensor

from engine.device import is_out_of_memory

__all__ = ["MIN_TILE", "OVERLAP", "tile_steps", "tiled_upscale", "upscale_image"]

log = logging.getLogger(__name__)

OVERLAP = 32  # ComfyUI's ImageUpscaleWithModel: tile 512, overlap 32
MIN_TILE = 128  # it halves the tile on out-of-memory and gives up below 128


def _starts(size: int, tile: int, overlap: int) -> list[int]:
    return list(range(0, size - overlap, tile - overlap)) if size > tile else [0]


def tile_steps(width: int, height: int, tile: int, overlap: int = OVERLAP) -> int:
    """Tiles one picture of width x height is cut into (ComfyUI's get_tiled_scale_steps)."""
    rows = 1 if height <= tile else math.ceil((height - overlap) / (tile - overlap))
    cols = 1 if width <= tile else math.ceil((width - overlap) / (tile - overlap))
    return rows * cols


def _feather(piece: Tensor, ramp: int) -> Tensor:
    """Weights for one upscaled tile: 1 inside, (t + 1) / ramp at the t-th pixel from each edge."""
    mask = torch.ones_like(piece)
    for dim in (2, 3):
        if ramp >= mask.shape[dim]:
            continue  # a tile narrower than its own ramps keeps weight 1 along this side, as ComfyUI's
        for t in range(ramp):
            weight = (t + 1) / ramp
            mask.narrow(dim, t, 1).mul_(weight)
            mask.narrow(dim, mask.shape[dim] - 1 - t, 1).mul_(weight)
    return mask


@torch.inference_mode()
def tiled_upscale(images: Tensor, model: Callable[[Tensor], Tensor], scale: int, tile: int,
                  overlap: int = OVERLAP, out_channels: int = 3,
                  progress: Callable[[], None] = lambda: None) -> Tensor:
    """Upscale `images` [B, C, H, W] (on the model's device) tile by tile; the result [B, C', sH, sW] on the CPU.

    `progress` is called after every tile.
    """
    batch, _, height, width = images.shape
    output = torch.empty(batch, out_channels, height * scale, width * scale)
    ramp = round(overlap * scale)
    for index in range(batch):
        item = images[index:index + 1]
        if height <= tile and width <= tile:
            output[index:index + 1] = model(item).float().cpu()
            progress()
            continue
        summed = torch.zeros(1, out_channels, height * scale, width * scale)
        weights = torch.zeros_like(summed)
        for y in _starts(height, tile, overlap):
            for x in _starts(width, tile, overlap):
                top, left = max(0, min(height - overlap, y)), max(0, min(width - overlap, x))
                rows, cols = min(tile, height - top), min(tile, width - left)
                piece = model(item[..., top:top + rows, left:left + cols]).float().cpu()
                mask = _feather(piece, ramp)
                region = (..., slice(top * scale, top * scale + piece.shape[2]),
                          slice(left * scale, left * scale + piece.shape[3]))
                summed[region] += piece * mask
                weights[region] += mask
                progress()
        output[index:index + 1] = summed / weights
    return output


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
