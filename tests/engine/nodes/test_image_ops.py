"""The small image nodes (engine/nodes/image_ops.py) against ComfyUI 0.3.64's math written out here on small
tensors (nodes.py, comfy_extras/nodes_images.py, nodes_post_processing.py), and their sizes in the cost check."""

from __future__ import annotations

import math
from types import SimpleNamespace
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from engine.cost import LIMIT_EXCEEDED, validate_within_limits
from engine.errors import LimitExceeded, WorkflowInvalid
from engine.nodes import catalog
from engine.settings import Limits
from engine.values import ImageBatch

CPU = torch.device("cpu")


def run(class_type: str, limits: Limits | None = None, **inputs: Any) -> Any:
    ctx = SimpleNamespace(device=CPU, limits=limits or Limits(), check_cancelled=lambda: None)
    (out,) = catalog()[class_type].model_validate(inputs).run(ctx)  # type: ignore[arg-type]
    return out.pixels


def pixels(batch: int = 1, height: int = 5, width: int = 6, channels: int = 3, seed: int = 0) -> ImageBatch:
    return ImageBatch(torch.rand(batch, height, width, channels, generator=torch.Generator().manual_seed(seed)))


def comfy_gaussian(size: int, sigma: float) -> torch.Tensor:
    """nodes_post_processing.gaussian_kernel, as written there."""
    x, y = torch.meshgrid(torch.linspace(-1, 1, size), torch.linspace(-1, 1, size), indexing="ij")
    d = torch.sqrt(x * x + y * y)
    g = torch.exp(-(d * d) / (2.0 * sigma * sigma))
    return g / g.sum()


def comfy_filter(image: torch.Tensor, kernel: torch.Tensor, radius: int) -> torch.Tensor:
    """ComfyUI's Blur/Sharpen convolution: reflect pad, zero-padded conv, the border cut off again."""
    channels = image.shape[-1]
    kernel = kernel.repeat(channels, 1, 1).unsqueeze(1)
    padded = F.pad(image.permute(0, 3, 1, 2), (radius, radius, radius, radius), "reflect")
    out = F.conv2d(padded, kernel, padding=kernel.shape[-1] // 2, groups=channels)[:, :, radius:-radius, radius:-radius]
    return out.permute(0, 2, 3, 1)


def test_image_blur_is_comfyuis_gaussian() -> None:
    image = pixels(2, 7, 9)
    got = run("ImageBlur", image=image, blur_radius=2, sigma=0.7)
    assert torch.allclose(got, comfy_filter(image.pixels, comfy_gaussian(5, 0.7), 2), atol=1e-6)
    # the kernel itself: 3x3, sigma 1, corners at distance sqrt(2)
    kernel = comfy_gaussian(3, 1.0)
    weights = torch.tensor([[math.exp(-1.0), math.exp(-0.5), math.exp(-1.0)],
                            [math.exp(-0.5), 1.0, math.exp(-0.5)],
                            [math.exp(-1.0), math.exp(-0.5), math.exp(-1.0)]])
    assert torch.allclose(kernel, weights / weights.sum(), atol=1e-7)


def test_a_flat_image_stays_flat_under_blur_and_sharpen() -> None:
    flat = ImageBatch(torch.full((1, 6, 6, 3), 0.25))
    assert torch.allclose(run("ImageBlur", image=flat, blur_radius=3, sigma=2.0), flat.pixels, atol=1e-6)
    assert torch.allclose(run("ImageSharpen", image=flat, sharpen_radius=2, sigma=1.0, alpha=2.0), flat.pixels,
                          atol=1e-5)


def test_image_sharpen_is_comfyuis_kernel() -> None:
    image = pixels(1, 6, 8, seed=3)
    got = run("ImageSharpen", image=image, sharpen_radius=1, sigma=1.0, alpha=0.5)
    kernel = comfy_gaussian(3, 1.0) * -(0.5 * 10)
    kernel[1, 1] = kernel[1, 1] - kernel.sum() + 1.0
    assert torch.allclose(got, comfy_filter(image.pixels, kernel, 1).clamp(0, 1), atol=1e-6)
    assert got.min() >= 0 and got.max() <= 1


def test_a_radius_past_the_image_is_refused_with_the_largest_allowed() -> None:
    with pytest.raises(ValueError, match="use a radius under 4"):
        run("ImageBlur", image=pixels(1, 4, 6), blur_radius=5, sigma=1.0)


@pytest.mark.parametrize("mode", ["normal", "multiply", "screen", "overlay", "soft_light", "difference"])
def test_image_blend_modes_are_comfyuis(mode: str) -> None:
    a, b = pixels(seed=1).pixels, pixels(seed=2).pixels
    modes = {
        "normal": b, "multiply": a * b, "screen": 1 - (1 - a) * (1 - b),
        "overlay": torch.where(a <= 0.5, 2 * a * b, 1 - 2 * (1 - a) * (1 - b)),
        "soft_light": torch.where(b <= 0.5, a - (1 - 2 * b) * a * (1 - a),
                                  a + (2 * b - 1) * (torch.where(a <= 0.25, ((16 * a - 12) * a + 4) * a,
                                                                 torch.sqrt(a)) - a)),
        "difference": a - b,
    }
    got = run("ImageBlend", image1=ImageBatch(a), image2=ImageBatch(b), blend_factor=0.3, blend_mode=mode)
    assert torch.equal(got, torch.clamp(a * (1 - 0.3) + modes[mode] * 0.3, 0, 1))


def test_image_blend_resizes_image2_and_drops_its_alpha() -> None:
    a = pixels(1, 4, 4)
    b = pixels(1, 8, 8, channels=4, seed=5)
    got = run("ImageBlend", image1=a, image2=b, blend_factor=1.0, blend_mode="normal")
    resized = F.interpolate(b.pixels[..., :3].movedim(-1, 1), size=(4, 4), mode="bicubic").movedim(1, -1)
    assert torch.allclose(got, resized.clamp(0, 1), atol=1e-6)


def test_invert_crop_and_empty_image() -> None:
    image = pixels(2, 5, 6)
    assert torch.equal(run("ImageInvert", image=image), 1.0 - image.pixels)
    # ComfyUI keeps the corner inside the image and cuts the size at its edge
    assert torch.equal(run("ImageCrop", image=image, width=4, height=2, x=3, y=1), image.pixels[:, 1:3, 3:6])
    assert torch.equal(run("ImageCrop", image=image, width=9, height=9, x=50, y=50), image.pixels[:, 4:, 5:])
    empty = run("EmptyImage", width=3, height=2, batch_size=2, color=0x10FF80)
    assert empty.shape == (2, 2, 3, 3) and empty.dtype == torch.float32
    assert torch.equal(empty[0, 0, 0], torch.tensor([0x10 / 0xFF, 1.0, 0x80 / 0xFF], dtype=torch.float32))


def test_image_batch_resizes_image2_to_image1() -> None:
    a, b = pixels(2, 4, 6), pixels(1, 8, 8, seed=4)
    got = run("ImageBatch", image1=a, image2=b)
    assert got.shape == (3, 4, 6, 3) and torch.equal(got[:2], a.pixels)
    # bilinear after a centre crop of the 8x8 to 6:4 (rows 1..6 kept), as comfy.utils.common_upscale
    expected = F.interpolate(b.pixels[:, 1:7].movedim(-1, 1), size=(4, 6), mode="bilinear").movedim(1, -1)
    assert torch.allclose(got[2:], expected, atol=1e-6)


def test_scale_to_total_pixels_rounds_each_side_as_comfyui() -> None:
    image = pixels(1, 30, 40)
    got = run("ImageScaleToTotalPixels", image=image, upscale_method="bilinear", megapixels=0.01)
    scale = math.sqrt(int(0.01 * 1024 * 1024) / (40 * 30))
    assert got.shape == (1, round(30 * scale), round(40 * scale), 3) == (1, 89, 118, 3)
    with pytest.raises(LimitExceeded, match="limits.max_side"):
        run("ImageScaleToTotalPixels", Limits(max_side=100), image=image, upscale_method="area", megapixels=0.01)


def test_image_node_sizes_are_followed_and_held_to_the_limits(executor: Any) -> None:
    def refused(workflow: dict[str, Any], limits: Limits) -> dict[str, Any]:
        with pytest.raises(WorkflowInvalid) as caught:
            validate_within_limits(workflow, catalog(), executor.models, limits)
        return caught.value.body

    wide = {"1": {"class_type": "EmptyImage", "inputs": {"width": 4096, "height": 64, "batch_size": 1, "color": 0}},
            "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "ops/wide"}}}
    with pytest.raises(WorkflowInvalid) as caught:
        executor.validate(wide)  # EmptyImage's own check: refused before any cost is followed
    [error] = caught.value.body["node_errors"]["1"]["errors"]
    assert error["extra_info"]["input_name"] == "width" and "limits.max_side" in error["details"]

    # each image fits, the joined batch does not; the scaled-up image is over max_side only after the node
    batches = {
        "1": {"class_type": "EmptyImage", "inputs": {"width": 64, "height": 48, "batch_size": 5, "color": 0}},
        "2": {"class_type": "ImageBatch", "inputs": {"image1": ["1", 0], "image2": ["1", 0]}},
        "3": {"class_type": "ImageScaleToTotalPixels", "inputs": {"image": ["1", 0], "upscale_method": "area",
                                                                  "megapixels": 4.0}},
        "4": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": "ops/batch"}},
        "5": {"class_type": "SaveImage", "inputs": {"images": ["3", 0], "filename_prefix": "ops/total"}},
    }
    body = refused(batches, Limits(max_batch=8, max_side=2048))
    assert body["error"]["type"] == LIMIT_EXCEEDED
    limits = {node: [e["extra_info"]["limit"] for e in found["errors"]] for node, found in body["node_errors"].items()}
    assert limits["2"] == ["max_batch"]  # 5 + 5 images
    assert "max_side" in limits["3"]  # 64x48 to 4 MiB of pixels: 2365x1774
