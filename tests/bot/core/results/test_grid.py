"""Batches as one grid image: 2 side by side, 3-4 as 2x2, numbered left to right then down (as U1-U4/V1-V4),
mixed sizes in equal cells without stretching; one image gets no grid."""

from __future__ import annotations

import io

import pytest
from PIL import Image

from bot.core.results.grid import BACKGROUND, compose_grid, grid_png, grid_shape, has_grid

COLOURS = [(220, 30, 30), (30, 200, 40), (40, 60, 230), (240, 220, 20)]


def _solid(colour: tuple[int, int, int], size: tuple[int, int] = (64, 64)) -> Image.Image:
    return Image.new("RGB", size, colour)


def _png(image: Image.Image) -> bytes:
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


def _near(pixel: tuple[int, ...], colour: tuple[int, int, int]) -> bool:
    return all(abs(a - b) <= 3 for a, b in zip(pixel[:3], colour, strict=True))


def test_two_images_sit_side_by_side() -> None:
    grid = compose_grid([_solid(COLOURS[0]), _solid(COLOURS[1])])
    assert grid.size == (128, 64)
    assert _near(grid.getpixel((32, 32)), COLOURS[0]) and _near(grid.getpixel((96, 32)), COLOURS[1])


@pytest.mark.parametrize("count", [3, 4])
def test_three_and_four_fill_a_two_by_two_left_to_right_then_down(count: int) -> None:
    grid = compose_grid([_solid(colour) for colour in COLOURS[:count]])
    assert grid.size == (128, 128) and grid_shape(count) == (2, 2)
    centres = [(32, 32), (96, 32), (32, 96), (96, 96)]  # U1 U2 / U3 U4
    for n in range(count):
        assert _near(grid.getpixel(centres[n]), COLOURS[n]), f"image {n + 1} is not at position {n + 1}"
    if count == 3:
        assert _near(grid.getpixel(centres[3]), BACKGROUND)  # the fourth cell stays empty


def test_mixed_sizes_fit_equal_cells_with_their_aspect_kept() -> None:
    wide, tall, small = _solid(COLOURS[0], (128, 64)), _solid(COLOURS[1], (64, 128)), _solid(COLOURS[2], (32, 32))
    grid = compose_grid([wide, tall, small])
    assert grid.size == (256, 256)  # cells of the largest width and height: 128 x 128
    # the wide image fills its cell's width, half its height, centred: background above and below
    assert _near(grid.getpixel((64, 64)), COLOURS[0]) and _near(grid.getpixel((64, 10)), BACKGROUND)
    assert _near(grid.getpixel((0, 40)), COLOURS[0]) and _near(grid.getpixel((127, 90)), COLOURS[0])
    # the tall one: full height, half width, background left and right
    assert _near(grid.getpixel((192, 64)), COLOURS[1]) and _near(grid.getpixel((140, 64)), BACKGROUND)
    # the small square one is scaled to its whole square cell
    assert _near(grid.getpixel((2, 130)), COLOURS[2]) and _near(grid.getpixel((125, 253)), COLOURS[2])


def test_a_grid_of_large_images_stays_within_its_largest_side() -> None:
    images = [_solid(colour, (2048, 1024)) for colour in COLOURS]
    grid = compose_grid(images, max_side=2048)
    assert grid.size == (2048, 1024)  # two columns of 1024 x 512 cells, the 2:1 shape kept
    assert _near(grid.getpixel((1536, 768)), COLOURS[3])


def test_grid_png_reads_encoded_images_and_keeps_their_alpha_off_the_grid() -> None:
    clear = Image.new("RGBA", (64, 64), (0, 0, 0, 0))
    data = grid_png([_png(_solid(COLOURS[0])), _png(clear)])
    with Image.open(io.BytesIO(data)) as grid:
        assert grid.format == "PNG" and grid.size == (128, 64) and grid.mode == "RGB"
        assert _near(grid.getpixel((96, 32)), BACKGROUND)  # transparency shows the background, not black


def test_one_image_or_more_than_four_get_no_grid() -> None:
    assert not has_grid(1) and not has_grid(5) and has_grid(2) and has_grid(4)
    with pytest.raises(ValueError, match="2 to 4 images, not 1"):
        compose_grid([_solid(COLOURS[0])])
