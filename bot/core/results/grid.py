"""A batch shown as one picture: 2 images side by side, 3 or 4 as a 2x2 grid, as Midjourney shows a batch.

Positions are numbered left to right, then down, in the order of `Generation.images`, so U1-U4 and V1-V4 under
a result (bot/core/actions.py `buttons_for`) name the image at that place. Every cell has the size of the largest
image; an image of another size (a /workflow may write any) is scaled to fit its cell with its aspect kept and
centred on a dark background, never stretched. The grid is for showing only: the PNGs with their recipes stay
untouched beside it or on ℹ️. Pillow work: call it from a thread, never on the event loop.
"""

from __future__ import annotations

import io
from collections.abc import Sequence

from PIL import Image

__all__ = ["GRID_MAX_SIDE", "MAX_GRID", "compose_grid", "grid_png", "grid_shape", "has_grid"]

MAX_GRID = 4  # as bot/core/actions.py: U1-U4 / V1-V4
GRID_MAX_SIDE = 2048  # four 1024 px SDXL images at full size; larger ones are scaled into their cells
BACKGROUND = (32, 34, 37)  # close to Discord's dark theme: letterboxed cells do not flash white


def has_grid(count: int) -> bool:
    """Whether `count` images are shown as a grid (2 to 4; a single image is shown as itself)."""
    return 2 <= count <= MAX_GRID


def grid_shape(count: int) -> tuple[int, int]:
    """(columns, rows) of the grid for `count` images: 2 side by side, 3 and 4 as 2x2."""
    if not has_grid(count):
        raise ValueError(f"a grid holds 2 to {MAX_GRID} images, not {count}")
    return (2, 1) if count == 2 else (2, 2)


def compose_grid(images: Sequence[Image.Image], *, max_side: int = GRID_MAX_SIDE) -> Image.Image:
    """The images as one RGB grid no side of which is over `max_side`; image n sits at column (n-1) % 2,
    row (n-1) // 2."""
    columns, rows = grid_shape(len(images))
    cell_w = max(image.width for image in images)
    cell_h = max(image.height for image in images)
    scale = min(1.0, max_side / (columns * cell_w), max_side / (rows * cell_h))
    cell_w, cell_h = max(1, round(cell_w * scale)), max(1, round(cell_h * scale))
    grid = Image.new("RGB", (columns * cell_w, rows * cell_h), BACKGROUND)
    for n, image in enumerate(images):
        fit = min(cell_w / image.width, cell_h / image.height)
        size = (max(1, round(image.width * fit)), max(1, round(image.height * fit)))
        shown = image if size == image.size else image.resize(size, Image.Resampling.LANCZOS)
        left = (n % columns) * cell_w + (cell_w - size[0]) // 2
        top = (n // columns) * cell_h + (cell_h - size[1]) // 2
        if shown.mode in ("RGBA", "LA") or (shown.mode == "P" and "transparency" in shown.info):
            rgba = shown.convert("RGBA")
            grid.paste(rgba.convert("RGB"), (left, top), rgba)
        else:
            grid.paste(shown.convert("RGB"), (left, top))
    return grid


def grid_png(pngs: Sequence[bytes], *, max_side: int = GRID_MAX_SIDE) -> bytes:
    """The grid of encoded images (PNG bytes as SaveImage wrote them), as PNG bytes."""
    images = []
    for data in pngs:
        with Image.open(io.BytesIO(data)) as image:
            image.load()
            images.append(image.copy())
    out = io.BytesIO()
    compose_grid(images, max_side=max_side).save(out, format="PNG", compress_level=6)
    return out.getvalue()
