"""crop="center" (LatentUpscale, ImageScale) keeps the same cells as ComfyUI's common_upscale for every size."""

from __future__ import annotations

import pytest
import torch

from engine.nodes.latents import center_crop


def reference_crop(samples: torch.Tensor, width: int, height: int) -> torch.Tensor:
    """ComfyUI 0.3.64's arithmetic: a margin rounded per side, then what lies between the two margins."""
    old_h, old_w = samples.shape[-2], samples.shape[-1]
    old_aspect, new_aspect = old_w / old_h, width / height
    left = round((old_w - old_w * (new_aspect / old_aspect)) / 2) if old_aspect > new_aspect else 0
    top = round((old_h - old_h * (old_aspect / new_aspect)) / 2) if old_aspect < new_aspect else 0
    return samples[..., top:old_h - top, left:old_w - left]


@pytest.mark.parametrize("old", [(64, 96), (12, 16), (96, 64), (7, 13)])
def test_the_crop_is_comfyuis_for_every_target_aspect(old: tuple[int, int]) -> None:
    cells = torch.arange(old[0] * old[1], dtype=torch.float32).reshape(1, 1, *old)
    for width in range(1, 19):
        for height in range(1, 19):
            assert torch.equal(center_crop(cells, width, height, h_axis=2), reference_crop(cells, width, height)), \
                (old, width, height)


def test_the_crop_reads_the_sides_at_h_axis_for_images() -> None:
    image = torch.arange(64 * 96 * 3, dtype=torch.float32).reshape(1, 64, 96, 3)  # B, H, W, C as IMAGE holds it
    cropped = center_crop(image, 17, 13, h_axis=1)
    expected = reference_crop(image.movedim(-1, 1), 17, 13).movedim(1, -1)
    assert torch.equal(cropped, expected)
