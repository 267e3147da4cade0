"""ComfyUI 0.3.64's tiled_scale (comfy/utils.py): a function run over a picture tile by tile, the tiles blended.

A picture is cut into tiles that overlap; each tile goes through the function on its own (one tile on the device
at a time, the sums on the CPU), weighted by a mask that ramps from 1/f to 1 over the f = overlap x scale output
cells at each of its edges (f rounded; a tile no wider than f keeps weight 1 across), and the weighted tiles are
summed and divided by the summed weights. A tile is `tile` cells a side but the last one of a row may be shorter:
starts step by tile - overlap and are never moved back. A picture that fits in one tile goes through whole. As
comfy/sd.py decode_tiled_ / encode_tiled_, `averaged_passes` averages several such passes with different tile
shapes, so no seam sits in the same place twice. The VAE nodes use it (engine/nodes/vae.py when a picture does
not fit in memory whole, engine/nodes/vae_tiled.py always), and the model upscaler one pass of it
(engine/models/upscale/tiling.py).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

__all__ = ["Tile", "TileFunction", "TilingError", "averaged_passes", "covered", "tile_count", "tiled_apply"]

TileFunction = Callable[[torch.Tensor], torch.Tensor]
Tile = tuple[int, int]  # (height, width), in the input's cells


class TilingError(ValueError):
    """Tiles that would leave output cells uncovered: ComfyUI gives NaN there, or fails on a zero step."""


def _starts(size: int, tile: int, overlap: int) -> range | list[int]:
    return range(0, size - overlap, tile - overlap) if size > tile else [0]


def covered(height: int, width: int, tile: Tile, overlap: int, scale: float) -> bool:
    """Whether one pass of tiles covers every output cell, worked out before any tile runs (a grid of tiles covers
    the picture where each side's row of them covers that side). A tile's output is taken as floor(cells x
    scale) a side: exact for the VAE decoder (x 8), the upscalers (x 2, x 4) and the encoder (its three halvings
    floor), and a tile never gives less."""
    return all(_side_covered(size, length, overlap, scale) for size, length in zip((height, width), tile))


def _side_covered(size: int, tile: int, overlap: int, scale: float) -> bool:
    if size <= tile:
        return True
    reached = 0
    for start in _starts(size, tile, overlap):
        if round(start * scale) > reached:
            return False
        reached = max(reached, round(start * scale) + int(min(tile, size - start) * scale))
    return reached >= round(size * scale)


def tile_count(height: int, width: int, tile: Tile, overlap: int) -> int:
    """Tiles one picture of height x width is cut into (ComfyUI's get_tiled_scale_steps)."""
    return len(_starts(height, tile[0], overlap)) * len(_starts(width, tile[1], overlap))


def _ramp(length: int, feather: int) -> torch.Tensor:
    """One side's weights: (t + 1) / feather at the t-th cell from either end, 1 between."""
    weights = torch.ones(length)
    if feather >= length:
        return weights  # ComfyUI feathers only a tile wider than its ramp
    ramp = torch.arange(1, feather + 1, dtype=torch.float32) / feather
    weights[:feather] *= ramp
    weights[length - feather:] *= ramp.flip(0)  # both ramps meet on a tile under twice the feather
    return weights


@torch.inference_mode()
def tiled_apply(item: torch.Tensor, function: TileFunction, tile: Tile, overlap: int, scale: float,
                out_channels: int, progress: Callable[[], None] = lambda: None) -> torch.Tensor:
    """One pass of ComfyUI's tiled_scale over `item` [1, C, H, W] (on whatever device `function` takes): it maps a tile
    [1, C, h, w] to [1, out_channels, h x scale, w x scale] float32 on the CPU. Returns the blended result
    [1, out_channels, round(H x scale), round(W x scale)]; `progress` is called after every tile. Raises
    TilingError where the tiles leave output cells uncovered; `averaged_passes` checks the steps first.
    """
    height, width = item.shape[2], item.shape[3]
    if height <= tile[0] and width <= tile[1]:
        progress()
        return function(item)
    if not covered(height, width, tile, overlap, scale):
        raise TilingError("the tiles leave parts of the output uncovered")
    out_size = (round(height * scale), round(width * scale))
    summed = torch.zeros(1, out_channels, *out_size)
    weights = torch.zeros(1, 1, *out_size)
    feather = round(overlap * scale)
    for top in _starts(height, tile[0], overlap):
        for left in _starts(width, tile[1], overlap):
            rows, cols = min(tile[0], height - top), min(tile[1], width - left)
            piece = function(item[:, :, top:top + rows, left:left + cols])
            mask = _ramp(piece.shape[2], feather)[:, None] * _ramp(piece.shape[3], feather)[None, :]
            y, x = round(top * scale), round(left * scale)
            summed[:, :, y:y + piece.shape[2], x:x + piece.shape[3]] += piece * mask
            weights[:, :, y:y + piece.shape[2], x:x + piece.shape[3]] += mask
            progress()
    if not bool((weights > 0).all()):
        raise TilingError("the tiles leave parts of the output uncovered")
    return summed / weights


@torch.inference_mode()
def averaged_passes(items: torch.Tensor, function: TileFunction, tiles: Sequence[Tile], overlap: int, scale: float,
                    out_channels: int, progress: Callable[[int, int], None] = lambda value, total: None
                    ) -> torch.Tensor:
    """`items` [B, C, H, W] (on the CPU) through `tiled_apply` once per tile shape, summed in `tiles`' order and
    divided by their number, one item at a time; `progress(done, total)` counts tiles over all passes.

    Raises TilingError, before any tile runs, where a tile no bigger than the overlap would have to move on
    (ComfyUI fails there on a zero step, or gives NaN for a negative one), or where a pass's tiles leave output
    cells uncovered (ComfyUI gives NaN there).
    """
    height, width = items.shape[2], items.shape[3]
    for tile in tiles:
        if any(size > length and length <= overlap for size, length in zip((height, width), tile)):
            raise TilingError(f"tiles of {tile[0]}x{tile[1]} (h x w) overlapping by {overlap} never move on")
        if not covered(height, width, tile, overlap, scale):
            raise TilingError(f"tiles of {tile[0]}x{tile[1]} (h x w) overlapping by {overlap} leave parts of the "
                              "output uncovered")
    total = len(items) * sum(tile_count(height, width, tile, overlap) for tile in tiles)
    done = 0

    def step() -> None:
        nonlocal done
        done += 1
        progress(done, total)

    results = []
    for index in range(len(items)):
        item = items[index:index + 1]
        whole: torch.Tensor | None = None
        summed: torch.Tensor | None = None
        for tile in tiles:
            if height <= tile[0] and width <= tile[1]:
                # the picture fits this pass's tile: it goes through whole, once for all such passes
                whole = function(item) if whole is None else whole
                result = whole
                step()
            else:
                result = tiled_apply(item, function, tile, overlap, scale, out_channels, step)
            summed = result if summed is None else summed + result
        assert summed is not None, "averaged_passes needs at least one tile shape"
        results.append(summed / len(tiles))
    return torch.cat(results)
