"""The mask nodes and the mask-taking image and latent nodes against small tensors worked out by hand with
ComfyUI 0.3.64's math (nodes.py, comfy_extras/nodes_mask.py), and LoadImage / LoadImageMask on real PNGs."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import scipy.ndimage
import torch
from PIL import Image

from engine.errors import LimitExceeded
from engine.nodes import catalog
from engine.nodes.masks import grow_mask
from engine.nodes.vae import masked_pixels
from engine.settings import Limits
from engine.values import ImageBatch, Latent, Mask


def context(input_dir: Path | None = None, limits: Limits | None = None) -> Any:
    """What these nodes read of a RunContext: the input folder, the limits and the cancel flag."""
    return SimpleNamespace(models=SimpleNamespace(resolve=lambda folder, name: Path(input_dir or ".", name)),
                           limits=limits or Limits(), check_cancelled=lambda: None)


def run(class_type: str, ctx: Any = None, **inputs: Any) -> tuple[Any, ...]:
    return catalog()[class_type].model_construct(**inputs).run(ctx or context())


def mask(rows: list[list[float]]) -> Mask:
    return Mask(torch.tensor([rows], dtype=torch.float32))


def grid(rows: list[list[float]]) -> torch.Tensor:
    return torch.tensor([rows], dtype=torch.float32)


# -- LoadImage's MASK and LoadImageMask ---------------------------------------------------------------------


@pytest.fixture
def rgba_png(tmp_path: Path) -> Path:
    """A 3x2 RGBA PNG: alpha 0, 51, 255 on the first row and 255, 102, 0 on the second."""
    rgba = np.zeros((2, 3, 4), np.uint8)
    rgba[..., 0], rgba[..., 1], rgba[..., 2] = 10, 200, 255
    rgba[..., 3] = [[0, 51, 255], [255, 102, 0]]
    Image.fromarray(rgba, "RGBA").save(tmp_path / "alpha.png")
    return tmp_path / "alpha.png"


def test_load_image_gives_one_minus_alpha_as_its_mask(rgba_png: Path) -> None:
    image, got = run("LoadImage", context(rgba_png.parent), image=rgba_png.name)
    assert image.pixels.shape == (1, 2, 3, 3)  # the IMAGE has no alpha, as ComfyUI's
    expected = 1.0 - torch.tensor([[[0, 51, 255], [255, 102, 0]]], dtype=torch.float32) / 255.0
    assert got.values.shape == (1, 2, 3) and torch.allclose(got.values, expected, atol=1e-7)


def test_an_opaque_image_gives_comfyuis_empty_64_by_64_mask(tmp_path: Path) -> None:
    Image.new("RGB", (5, 7), (1, 2, 3)).save(tmp_path / "opaque.png")
    _, got = run("LoadImage", context(tmp_path), image="opaque.png")
    assert torch.equal(got.values, torch.zeros(1, 64, 64))


def test_load_image_mask_reads_each_channel(rgba_png: Path) -> None:
    ctx = context(rgba_png.parent)
    (alpha,) = run("LoadImageMask", ctx, image=rgba_png.name, channel="alpha")
    (red,) = run("LoadImageMask", ctx, image=rgba_png.name, channel="red")
    (green,) = run("LoadImageMask", ctx, image=rgba_png.name, channel="green")
    (blue,) = run("LoadImageMask", ctx, image=rgba_png.name, channel="blue")
    assert torch.allclose(alpha.values, 1.0 - torch.tensor([[[0, 51, 255], [255, 102, 0]]]) / 255.0, atol=1e-7)
    assert torch.allclose(red.values, torch.full((1, 2, 3), 10 / 255.0))
    assert torch.allclose(green.values, torch.full((1, 2, 3), 200 / 255.0))
    assert torch.equal(blue.values, torch.ones(1, 2, 3))


def test_load_image_mask_alpha_of_an_opaque_image_is_empty_at_its_own_size(tmp_path: Path) -> None:
    Image.new("RGB", (5, 7), (1, 2, 3)).save(tmp_path / "opaque.png")
    (got,) = run("LoadImageMask", context(tmp_path), image="opaque.png", channel="alpha")
    assert torch.equal(got.values, torch.zeros(1, 7, 5))  # ComfyUI converts to RGBA first


def test_load_image_mask_decodes_through_the_upload_checks(tmp_path: Path) -> None:
    Image.new("RGB", (100, 10)).save(tmp_path / "wide.png")
    with pytest.raises(LimitExceeded, match="100x10"):
        run("LoadImageMask", context(tmp_path, Limits(max_side=64)), image="wide.png", channel="red")


# -- conversions ------------------------------------------------------------------------------------------


def test_image_to_mask_and_back() -> None:
    pixels = torch.tensor([[[[0.1, 0.2, 0.3], [0.4, 0.5, 0.6]]]])  # [1, 1, 2, 3]
    (green,) = run("ImageToMask", image=ImageBatch(pixels), channel="green")
    assert torch.equal(green.values, torch.tensor([[[0.2, 0.5]]]))
    (image,) = run("MaskToImage", mask=green)
    assert torch.equal(image.pixels, torch.tensor([[[[0.2, 0.2, 0.2], [0.5, 0.5, 0.5]]]]))


def test_image_to_mask_alpha_of_an_image_without_one_says_where_alpha_is() -> None:
    with pytest.raises(ValueError, match="3 channels and no alpha channel; for transparency use LoadImage's MASK"):
        run("ImageToMask", image=ImageBatch(torch.zeros(1, 2, 2, 3)), channel="alpha")


def test_invert_and_solid_masks() -> None:
    (inverted,) = run("InvertMask", mask=mask([[0.0, 0.25], [1.0, 0.5]]))
    assert torch.equal(inverted.values, grid([[1.0, 0.75], [0.0, 0.5]]))
    (solid,) = run("SolidMask", value=0.3, width=3, height=2)
    assert torch.equal(solid.values, torch.full((1, 2, 3), 0.3))


def test_solid_mask_size_is_held_to_the_limits() -> None:
    problems = catalog()["SolidMask"].check_values({"value": 1.0, "width": 4096, "height": 8}, Limits())
    assert problems and problems[0][0] == "width" and "above this server's limit of 2048" in problems[0][1]


# -- GrowMask ---------------------------------------------------------------------------------------------

DOT = [[0, 0, 0, 0, 0], [0, 0, 0, 0, 0], [0, 0, 1, 0, 0], [0, 0, 0, 0, 0], [0, 0, 0, 0, 0]]


def test_grow_mask_tapered_grows_a_diamond_untapered_a_square() -> None:
    (cross,) = run("GrowMask", mask=mask(DOT), expand=1, tapered_corners=True)
    assert torch.equal(cross.values, grid([[0, 0, 0, 0, 0], [0, 0, 1, 0, 0], [0, 1, 1, 1, 0], [0, 0, 1, 0, 0],
                                           [0, 0, 0, 0, 0]]))
    (diamond,) = run("GrowMask", mask=mask(DOT), expand=2, tapered_corners=True)
    assert torch.equal(diamond.values, grid([[0, 0, 1, 0, 0], [0, 1, 1, 1, 0], [1, 1, 1, 1, 1], [0, 1, 1, 1, 0],
                                             [0, 0, 1, 0, 0]]))
    (square,) = run("GrowMask", mask=mask(DOT), expand=1, tapered_corners=False)
    assert torch.equal(square.values, grid([[0, 0, 0, 0, 0], [0, 1, 1, 1, 0], [0, 1, 1, 1, 0], [0, 1, 1, 1, 0],
                                            [0, 0, 0, 0, 0]]))


def test_grow_mask_negative_shrinks_and_grey_values_take_the_max_at_the_edges() -> None:
    block = [[0, 0, 0, 0, 0], [0, 1, 1, 1, 0], [0, 1, 1, 1, 0], [0, 1, 1, 1, 0], [0, 0, 0, 0, 0]]
    for tapered in (True, False):
        (shrunk,) = run("GrowMask", mask=mask(block), expand=-1, tapered_corners=tapered)
        assert torch.equal(shrunk.values, grid(DOT))
    # an edge pixel's missing neighbours are itself (scipy's "reflect" edges)
    (grey,) = run("GrowMask", mask=mask([[0.2, 0.7], [0.5, 0.1]]), expand=1, tapered_corners=True)
    assert torch.equal(grey.values, grid([[0.7, 0.7], [0.5, 0.7]]))
    (grey_square,) = run("GrowMask", mask=mask([[0.2, 0.7], [0.5, 0.1]]), expand=1, tapered_corners=False)
    assert torch.equal(grey_square.values, torch.full((1, 2, 2), 0.7))
    (eroded,) = run("GrowMask", mask=mask([[0.2, 0.7], [0.5, 0.1]]), expand=-1, tapered_corners=True)
    assert torch.equal(eroded.values, grid([[0.2, 0.1], [0.1, 0.1]]))


@pytest.mark.parametrize("shape", [(2, 9, 13), (1, 1, 1), (1, 1, 7), (1, 16, 3), (3, 20, 20)])
def test_grow_mask_is_scipys_grey_dilation_and_erosion_as_comfyui_runs_them(shape: tuple[int, int, int]) -> None:
    # computed whole rather than step by step: bit for bit ComfyUI's steps, at every radius and shape
    values = torch.rand(*shape, generator=torch.Generator().manual_seed(0)).round(decimals=1)  # ties too
    for expand in (-40, -3, -1, 1, 2, 5, 7, 8, 9, 40):
        for tapered in (True, False):
            corner = 0 if tapered else 1
            footprint = np.array([[corner, 1, corner], [1, 1, 1], [corner, 1, corner]])
            expected = []
            for item in values.numpy():
                for _ in range(abs(expand)):
                    step = scipy.ndimage.grey_dilation if expand > 0 else scipy.ndimage.grey_erosion
                    item = step(item, footprint=footprint)
                expected.append(torch.from_numpy(item))
            assert torch.equal(grow_mask(values, expand, tapered), torch.stack(expected)), (expand, tapered)


def test_grow_mask_by_the_most_allowed_stops_once_nothing_changes() -> None:
    (grown,) = run("GrowMask", mask=mask([[0.0, 0.3, 0.0], [0.0, 0.0, 0.9]]), expand=16384, tapered_corners=True)
    assert torch.equal(grown.values, torch.full((1, 2, 3), 0.9))


# -- MaskComposite ----------------------------------------------------------------------------------------

DESTINATION = [[0.2, 0.4, 0.6, 0.8], [1.0, 0.5, 0.0, 0.3], [0.9, 0.1, 0.7, 0.6]]
SOURCE = [[0.5, 1.0], [0.25, 0.6]]


def composite_at(operation: str, x: int = 2, y: int = 1) -> torch.Tensor:
    (out,) = run("MaskComposite", destination=mask(DESTINATION), source=mask(SOURCE), x=x, y=y, operation=operation)
    return out.values[0]


@pytest.mark.parametrize(("operation", "patch"), [
    ("multiply", [[0.0, 0.3], [0.175, 0.36]]),
    ("add", [[0.5, 1.0], [0.95, 1.0]]),  # 1.3 and 1.2 clamped to 1
    ("subtract", [[0.0, 0.0], [0.45, 0.0]]),  # -0.5 and -0.7 clamped to 0
    # rounded first, half to even: the source's 0.5 is 0, the destination's 0.7 and 0.6 are 1
    ("and", [[0.0, 0.0], [0.0, 1.0]]),
    ("or", [[0.0, 1.0], [1.0, 1.0]]),
    ("xor", [[0.0, 1.0], [1.0, 0.0]]),
])
def test_mask_composite_combines_where_the_source_lands(operation: str, patch: list[list[float]]) -> None:
    expected = torch.tensor(DESTINATION)
    expected[1:3, 2:4] = torch.tensor(patch)
    assert torch.allclose(composite_at(operation), expected, atol=1e-6)


def test_mask_composite_cuts_a_source_that_leaves_the_destination() -> None:
    expected = torch.tensor(DESTINATION)
    expected[2, 3] = 0.6 * 0.5  # only the source's top-left corner lands, on the bottom-right pixel
    assert torch.allclose(composite_at("multiply", x=3, y=2), expected, atol=1e-7)
    assert torch.equal(composite_at("add", x=4, y=0), torch.tensor(DESTINATION))  # nothing lands


# -- ImageCompositeMasked, LatentCompositeMasked, SetLatentNoiseMask ---------------------------------------


def test_image_composite_masked_blends_through_the_mask_at_the_offset() -> None:
    destination = ImageBatch(torch.zeros(1, 4, 4, 3))
    source = ImageBatch(torch.ones(1, 2, 2, 3))
    (plain,) = run("ImageCompositeMasked", destination=destination, source=source, x=1, y=2, resize_source=False)
    expected = torch.zeros(4, 4)
    expected[2:4, 1:3] = 1.0
    assert torch.equal(plain.pixels[0, ..., 0], expected) and torch.equal(plain.pixels[..., 2], plain.pixels[..., 0])
    (masked,) = run("ImageCompositeMasked", destination=destination, source=source, x=3, y=0, resize_source=False,
                    mask=mask([[1.0, 0.0], [0.5, 0.0]]))
    expected = torch.zeros(4, 4)
    expected[0:2, 3] = torch.tensor([1.0, 0.5])  # the source's first column lands on the last one
    assert torch.equal(masked.pixels[0, ..., 1], expected)
    assert torch.equal(destination.pixels, torch.zeros(1, 4, 4, 3))  # the input is left as it was


def test_image_composite_masked_resizes_the_source_to_the_destination() -> None:
    (out,) = run("ImageCompositeMasked", destination=ImageBatch(torch.zeros(1, 4, 4, 3)),
                 source=ImageBatch(torch.full((1, 2, 2, 3), 0.25)), x=0, y=0, resize_source=True)
    assert torch.equal(out.pixels, torch.full((1, 4, 4, 3), 0.25))


def test_latent_composite_masked_counts_offsets_in_pixels_and_keeps_the_destination_mask() -> None:
    noise_mask = torch.ones(1, 1, 8, 8)
    destination = Latent(torch.zeros(1, 4, 3, 3), noise_mask=noise_mask)
    source = Latent(torch.full((1, 4, 2, 2), 2.0))
    (out,) = run("LatentCompositeMasked", destination=destination, source=source, x=8, y=16, resize_source=False,
                 mask=mask([[0.5, 1.0], [0.0, 0.0]]))
    expected = torch.zeros(3, 3)
    expected[2, 1:3] = torch.tensor([1.0, 2.0])  # x 8 px is latent column 1, y 16 px row 2; one row fits
    assert all(torch.equal(channel, expected) for channel in out.samples[0])
    assert out.noise_mask is noise_mask


def test_set_latent_noise_mask_adds_the_mask_and_nothing_else() -> None:
    samples = torch.randn(2, 4, 3, 3, generator=torch.Generator().manual_seed(0))
    (out,) = run("SetLatentNoiseMask", samples=Latent(samples, (3, 5)), mask=Mask(torch.ones(2, 24, 24)))
    assert out.samples is samples and out.batch_index == (3, 5)
    assert out.noise_mask.shape == (2, 1, 24, 24)


def test_latent_nodes_carry_the_noise_mask() -> None:
    noise_mask = torch.rand(2, 1, 16, 16, generator=torch.Generator().manual_seed(1))
    latent = Latent(torch.zeros(2, 4, 2, 2), noise_mask=noise_mask)
    (scaled,) = run("LatentUpscaleBy", samples=latent, upscale_method="nearest-exact", scale_by=2.0)
    assert scaled.samples.shape == (2, 4, 4, 4) and scaled.noise_mask is noise_mask
    (repeated,) = run("RepeatLatentBatch", samples=latent, amount=3)
    assert torch.equal(repeated.noise_mask, noise_mask.repeat(3, 1, 1, 1))
    one = Latent(torch.zeros(1, 4, 2, 2), noise_mask=noise_mask[:1])
    (kept,) = run("RepeatLatentBatch", samples=one, amount=3)
    assert kept.noise_mask is one.noise_mask  # one mask for the whole batch stays one


# -- ImagePadForOutpaint ----------------------------------------------------------------------------------


def test_pad_for_outpaint_pads_grey_and_feathers_the_mask_into_the_image() -> None:
    pixels = torch.rand(1, 5, 5, 3, generator=torch.Generator().manual_seed(2))
    image, got = run("ImagePadForOutpaint", image=ImageBatch(pixels), left=2, top=0, right=0, bottom=1, feathering=2)
    assert image.pixels.shape == (1, 6, 7, 3)
    assert torch.equal(image.pixels[:, :5, 2:], pixels)
    assert torch.equal(image.pixels[:, :, :2], torch.full((1, 6, 2, 3), 0.5))
    assert torch.equal(image.pixels[:, 5], torch.full((1, 7, 3), 0.5))
    # inside the old image: ((2 - d) / 2)^2 with d the distance to the left edge or to the bottom (5 - row)
    inside = [[1.0, 0.25, 0, 0, 0]] * 3 + [[1.0, 0.25, 0, 0, 0], [1.0, 0.25, 0.25, 0.25, 0.25]]
    expected = torch.ones(6, 7)
    expected[:5, 2:] = torch.tensor(inside)
    assert torch.equal(got.values, expected[None])


def test_pad_for_outpaint_feathers_only_an_image_over_twice_the_feathering() -> None:
    _, got = run("ImagePadForOutpaint", image=ImageBatch(torch.zeros(1, 4, 4, 3)), left=0, top=8, right=0,
                 bottom=0, feathering=2)
    expected = torch.zeros(12, 4)
    expected[:8] = 1.0
    assert torch.equal(got.values, expected[None])


def test_pad_for_outpaint_is_held_to_the_limits() -> None:
    with pytest.raises(LimitExceeded, match="padding the 4x4 image gives 2052x4: width 2052 is above"):
        run("ImagePadForOutpaint", image=ImageBatch(torch.zeros(1, 4, 4, 3)), left=2048, top=0, right=0, bottom=0,
            feathering=0)


# -- what the inpaint encoders do to the pixels and the mask -----------------------------------------------


def test_inpaint_encoders_grey_the_masked_pixels_on_the_8_pixel_grid() -> None:
    pixels = torch.rand(1, 18, 20, 3, generator=torch.Generator().manual_seed(3))
    hole = torch.zeros(1, 18, 20)
    hole[0, 5:9, 6:12] = 1.0
    hole[0, 10, 10] = 0.4  # rounds to 0: stays
    greyed, cropped = masked_pixels(pixels, hole)
    # cropped to 16x16 around the middle: 1 row and 2 columns off the top and left
    assert greyed.shape == (1, 16, 16, 3) and cropped.shape == (1, 1, 16, 16)
    assert torch.equal(cropped[0, 0], hole[0, 1:17, 2:18])
    expected = pixels[:, 1:17, 2:18].clone()
    expected[:, 4:8, 4:10] = 0.5
    assert torch.allclose(greyed, expected, atol=1e-7)


def test_vae_encode_for_inpaint_grows_the_noise_mask_by_a_box(tiny_models: Path) -> None:
    from engine.models.single_file import load_vae
    from engine.values import VaeRef

    vae = VaeRef(load_vae(tiny_models / "vae" / "tiny-vae.safetensors", "cpu", torch.float32), "tiny-vae")
    pixels = ImageBatch(torch.rand(1, 16, 16, 3, generator=torch.Generator().manual_seed(4)))
    dot = torch.zeros(1, 16, 16)
    dot[0, 8, 8] = 1.0
    (odd,) = run("VAEEncodeForInpaint", pixels=pixels, vae=vae, mask=Mask(dot), grow_mask_by=3)
    expected = torch.zeros(16, 16)
    expected[7:10, 7:10] = 1.0
    assert odd.noise_mask.shape == (1, 1, 16, 16) and torch.equal(odd.noise_mask[0, 0], expected)
    (even,) = run("VAEEncodeForInpaint", pixels=pixels, vae=vae, mask=Mask(dot), grow_mask_by=6)
    expected = torch.zeros(16, 16)
    expected[6:12, 6:12] = 1.0  # an even box reaches 2 pixels before and 3 after
    assert torch.equal(even.noise_mask[0, 0], expected)
    (none,) = run("VAEEncodeForInpaint", pixels=pixels, vae=vae, mask=Mask(dot), grow_mask_by=0)
    assert torch.equal(none.noise_mask[0, 0], dot[0])
    (plain,) = run("VAEEncode", pixels=ImageBatch(masked_pixels(pixels.pixels, dot)[0]), vae=vae)
    assert torch.equal(odd.samples, plain.samples)  # the greyed image, encoded as VAEEncode would


# -- validation and a run of all of them --------------------------------------------------------------------


def test_every_mask_node_validates_and_runs_in_one_graph(executor: Any) -> None:
    Image.new("RGBA", (48, 40), (200, 30, 90, 128)).save(executor.settings.input_dir / "masks-all.png")
    workflow = {
        "1": {"class_type": "LoadImage", "inputs": {"image": "masks-all.png"}},
        "2": {"class_type": "ImagePadForOutpaint", "inputs": {"image": ["1", 0], "left": 16, "top": 0, "right": 0,
                                                              "bottom": 24, "feathering": 4}},
        "3": {"class_type": "SolidMask", "inputs": {"value": 0.5, "width": 32, "height": 32}},
        "4": {"class_type": "MaskComposite", "inputs": {"destination": ["2", 1], "source": ["3", 0], "x": 8, "y": 8,
                                                        "operation": "add"}},
        "5": {"class_type": "InvertMask", "inputs": {"mask": ["4", 0]}},
        "6": {"class_type": "GrowMask", "inputs": {"mask": ["5", 0], "expand": -2, "tapered_corners": False}},
        "7": {"class_type": "ImageToMask", "inputs": {"image": ["2", 0], "channel": "red"}},
        "8": {"class_type": "MaskComposite", "inputs": {"destination": ["6", 0], "source": ["7", 0], "x": 0, "y": 0,
                                                        "operation": "xor"}},
        "9": {"class_type": "MaskToImage", "inputs": {"mask": ["8", 0]}},
        "10": {"class_type": "ImageCompositeMasked", "inputs": {"destination": ["2", 0], "source": ["9", 0], "x": 0,
                                                                "y": 0, "resize_source": False, "mask": ["1", 1]}},
        "11": {"class_type": "LoadImageMask", "inputs": {"image": "masks-all.png", "channel": "alpha"}},
        "12": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "13": {"class_type": "LatentCompositeMasked", "inputs": {"destination": ["12", 0], "source": ["12", 0],
                                                                 "x": 8, "y": 0, "resize_source": True,
                                                                 "mask": ["11", 0]}},
        "14": {"class_type": "SetLatentNoiseMask", "inputs": {"samples": ["13", 0], "mask": ["8", 0]}},
        "15": {"class_type": "VAELoader", "inputs": {"vae_name": "tiny-vae.safetensors"}},
        "16": {"class_type": "VAEDecode", "inputs": {"samples": ["14", 0], "vae": ["15", 0]}},
        "17": {"class_type": "SaveImage", "inputs": {"images": ["10", 0], "filename_prefix": "masks/all"}},
        "18": {"class_type": "SaveImage", "inputs": {"images": ["16", 0], "filename_prefix": "masks/latent"}},
    }
    outputs = executor.run(workflow).outputs
    sizes = {node: Image.open(executor.settings.output_dir / item["subfolder"] / item["filename"]).size
             for node in ("17", "18") for item in outputs[node]["images"]}
    assert sizes == {"17": (64, 64), "18": (64, 64)}


def test_mask_nodes_are_validated_with_comfyuis_error_types(executor: Any) -> None:
    from engine.errors import WorkflowInvalid

    def errors_of(workflow: dict[str, Any]) -> dict[str, list[str]]:
        with pytest.raises(WorkflowInvalid) as caught:
            executor.validate(workflow)
        return {node: [error["type"] for error in found["errors"]]
                for node, found in caught.value.body["node_errors"].items()}

    workflow = {
        "1": {"class_type": "SolidMask", "inputs": {"value": 1.5, "width": 8, "height": 8}},
        "2": {"class_type": "MaskComposite", "inputs": {"destination": ["1", 0], "source": ["1", 0], "x": 0,
                                                        "y": 0, "operation": "nand"}},
        "3": {"class_type": "MaskToImage", "inputs": {"mask": ["2", 0]}},
        "4": {"class_type": "SaveImage", "inputs": {"images": ["3", 0], "filename_prefix": "masks/bad"}},
    }
    assert errors_of(workflow) == {"1": ["value_bigger_than_max"], "2": ["value_not_in_list"]}
    workflow["4"]["inputs"]["images"] = ["2", 0]  # a MASK where an IMAGE goes
    assert errors_of(workflow) == {"4": ["return_type_mismatch"]}
