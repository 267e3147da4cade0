"""Cost rules of VAEDecodeTiled and VAEEncodeTiled (engine/nodes/vae_tiled.py): the shapes of VAEDecode and
VAEEncode, and the tiles they will run, worked out from the picture's size and the node's tile_size and overlap.

A tile is one VAE call. Tiny tiles over a big batch were thousands of them (tile_size 64, overlap 24, eight
2048x2048 images: 101,768 encoder calls, about 11 minutes on the tiny test VAE, far more on a real one), held to
max_vae_tiles here. A tile_size and overlap whose tiles never move on, or leave output cells uncovered, are refused
here too, naming both, instead of when the node runs. The VAE's 8 pixels a latent cell is every SD VAE's.

Registered into `RULES` (engine/cost/rules.py) on import; engine/cost/check.py imports both.
"""

from __future__ import annotations

from engine.cost.files import Files
from engine.cost.rules import _decode, _encode, _rule
from engine.cost.shapes import Pictures, Shape, Step
from engine.nodes.vae import decode_tiles, encode_tiles
from engine.tiled_scale import Tile, covered, tile_count

COMPRESSION = 8  # pixels per latent cell a side


@_rule("VAEDecodeTiled")
def _decode_tiled(step: Step, files: Files) -> tuple[Shape, ...]:
    latent = step.pictures("samples")
    if latent is not None:
        tile_size, overlap = step.const("tile_size"), step.const("overlap")
        overlap = tile_size // 4 if tile_size < overlap * 4 else overlap  # the node's own adjustment
        cells = Pictures(latent.kind, latent.batch, latent.width // COMPRESSION, latent.height // COMPRESSION)
        _hold_tiles(step, cells, decode_tiles(tile_size // COMPRESSION), overlap // COMPRESSION, COMPRESSION)
    return _decode(step, files)


@_rule("VAEEncodeTiled")
def _encode_tiled(step: Step, files: Files) -> tuple[Shape, ...]:
    image = step.pictures("pixels")
    if image is not None:  # cropped to the 8-pixel grid first, as the node does
        grid = Pictures(image.kind, image.batch, image.width // 8 * 8, image.height // 8 * 8)
        _hold_tiles(step, grid, encode_tiles(step.const("tile_size")), step.const("overlap"), 1 / COMPRESSION)
    return _encode(step, files)


def _hold_tiles(step: Step, picture: Pictures, tiles: tuple[Tile, ...], overlap: int, scale: float) -> None:
    """Refuse tiles that cannot cover `picture` (its sides in the tiles' units), or more VAE calls than allowed."""
    sides = (picture.height, picture.width)
    how = f"tile_size {step.const('tile_size')}, overlap {step.const('overlap')}"
    fix = "use an overlap under half the tile_size and multiples of 32 for both, as ComfyUI's widgets step them"
    for tile in tiles:
        stuck = any(size > length and length <= overlap for size, length in zip(sides, tile))
        if stuck or not covered(*sides, tile, overlap, scale):
            what = "never move on" if stuck else "leave parts of the output uncovered"
            step.refuse_empty(f"its tiles ({how}) {what} on a picture of {picture.width}x{picture.height}", fix)
            return
    fitting = [tile for tile in tiles if sides[0] <= tile[0] and sides[1] <= tile[1]]
    calls = picture.batch * (min(len(fitting), 1) + sum(tile_count(*sides, tile, overlap) for tile in tiles
                                                        if tile not in fitting))
    if calls > step.limits.max_vae_tiles:
        pictures = f"{picture.batch} picture" + ("s" if picture.batch != 1 else "")
        step.refuse("max_vae_tiles", calls, f"runs the VAE on {calls:,} tiles ({how}, {pictures}, three passes)",
                    "use a larger tile_size", "tile_size")
