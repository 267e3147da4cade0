"""The small latent nodes (engine/nodes/latent_ops.py) against ComfyUI 0.3.64's math written out here on small
tensors (nodes.py, comfy_extras/nodes_latent.py), the .latent file format both ways, and a graph of the new image
and latent nodes on tiny SD1.5."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save_file

from engine.errors import LimitExceeded, ModelNotFound, UnsafeModelFile
from engine.nodes import catalog
from engine.settings import Limits
from engine.values import Latent
from tests.engine.conftest import txt2img


def context(root: Path | None = None, limits: Limits | None = None) -> Any:
    root = root or Path(".")
    return SimpleNamespace(output_dir=root / "output", input_dir=root / "input", prompt={"1": {"class_type": "x"}},
                           limits=limits or Limits(), device=torch.device("cpu"), check_cancelled=lambda: None)


def run(class_type: str, ctx: Any = None, **inputs: Any) -> Any:
    out = catalog()[class_type].model_validate(inputs).run(ctx or context())
    return out[0] if isinstance(out, tuple) else out


def latent(batch: int = 1, h: int = 4, w: int = 5, seed: int = 0, **extra: Any) -> Latent:
    return Latent(torch.randn(batch, 4, h, w, generator=torch.Generator().manual_seed(seed)), **extra)


def test_rotate_and_flip_are_comfyuis() -> None:
    x = latent(2, 3, 5)
    for turns, name in enumerate(("none", "90 degrees", "180 degrees", "270 degrees")):
        got = run("LatentRotate", samples=x, rotation=name).samples
        assert torch.equal(got, torch.rot90(x.samples, k=turns, dims=[3, 2]))
    assert run("LatentRotate", samples=x, rotation="90 degrees").samples.shape == (2, 4, 5, 3)
    # a clockwise quarter turn: the top-left cell goes to the top-right
    turned = run("LatentRotate", samples=x, rotation="90 degrees").samples
    assert torch.equal(turned[:, :, 0, -1], x.samples[:, :, 0, 0])
    assert torch.equal(run("LatentFlip", samples=x, flip_method="x-axis: vertically").samples, x.samples.flip(2))
    assert torch.equal(run("LatentFlip", samples=x, flip_method="y-axis: horizontally").samples, x.samples.flip(3))


def test_add_subtract_multiply_and_blend() -> None:
    a, b = latent(2, seed=1), latent(1, seed=2)
    assert torch.equal(run("LatentAdd", samples1=a, samples2=b).samples, a.samples + b.samples.repeat(2, 1, 1, 1))
    assert torch.equal(run("LatentSubtract", samples1=a, samples2=b).samples, a.samples - b.samples.repeat(2, 1, 1, 1))
    assert torch.equal(run("LatentMultiply", samples=a, multiplier=-1.5).samples, a.samples * -1.5)
    # note the order: ComfyUI's LatentBlend weighs samples1 by blend_factor
    blended = run("LatentBlend", samples1=a, samples2=b, blend_factor=0.25).samples
    assert torch.equal(blended, a.samples * 0.25 + b.samples * (1 - 0.25))


def test_add_and_blend_resize_the_second_latent_as_comfyui() -> None:
    a, b = latent(1, 4, 4, seed=1), latent(1, 8, 8, seed=2)
    added = run("LatentAdd", samples1=a, samples2=b).samples
    assert torch.allclose(added, a.samples + F.interpolate(b.samples, size=(4, 4), mode="bilinear"), atol=1e-6)
    blended = run("LatentBlend", samples1=a, samples2=b, blend_factor=0.5).samples
    assert torch.allclose(blended, a.samples * 0.5 + F.interpolate(b.samples, size=(4, 4), mode="bicubic") * 0.5,
                          atol=1e-6)


def test_latent_from_batch_keeps_each_latents_batch_index_and_mask() -> None:
    masks = torch.arange(3, dtype=torch.float32).view(3, 1, 1, 1).expand(3, 1, 4, 5).clone()
    x = latent(5, noise_mask=masks)
    got = run("LatentFromBatch", samples=x, batch_index=2, length=2)
    assert torch.equal(got.samples, x.samples[2:4]) and got.batch_index == (2, 3)
    # the 3 masks are repeated to the batch of 5 first: items 2 and 3 get masks 2 and 0
    assert torch.equal(got.noise_mask[:, 0, 0, 0], torch.tensor([2.0, 0.0]))
    # past the end: the last latent, as ComfyUI clamps; an existing batch_index is sliced, not renumbered
    tail = run("LatentFromBatch", samples=Latent(x.samples, (10, 11, 12, 13, 14)), batch_index=40, length=8)
    assert torch.equal(tail.samples, x.samples[4:]) and tail.batch_index == (14,)


def test_latent_crop_keeps_comfyuis_corner() -> None:
    x = latent(1, 16, 12)
    got = run("LatentCrop", samples=x, width=64, height=80, x=16, y=24).samples
    assert torch.equal(got, x.samples[:, :, 3:13, 2:10])
    # a corner past the end is moved back to 8 cells before the far side
    assert torch.equal(run("LatentCrop", samples=x, width=512, height=512, x=800, y=800).samples,
                       x.samples[:, :, 8:, 4:])


def comfy_latent_composite(to: torch.Tensor, source: torch.Tensor, x: int, y: int, feather: int) -> torch.Tensor:
    """nodes.py LatentComposite.composite, as written there."""
    x, y, feather = x // 8, y // 8, feather // 8
    s = to.clone()
    if feather == 0:
        s[:, :, y:y + source.shape[2], x:x + source.shape[3]] = source[:, :, :to.shape[2] - y, :to.shape[3] - x]
        return s
    source = source[:, :, :to.shape[2] - y, :to.shape[3] - x]
    mask = torch.ones_like(source)
    for t in range(feather):
        if y != 0:
            mask[:, :, t:1 + t, :] *= ((1.0 / feather) * (t + 1))
        if y + source.shape[2] < to.shape[2]:
            mask[:, :, mask.shape[2] - 1 - t: mask.shape[2] - t, :] *= ((1.0 / feather) * (t + 1))
        if x != 0:
            mask[:, :, :, t:1 + t] *= ((1.0 / feather) * (t + 1))
        if x + source.shape[3] < to.shape[3]:
            mask[:, :, :, mask.shape[3] - 1 - t: mask.shape[3] - t] *= ((1.0 / feather) * (t + 1))
    rev_mask = torch.ones_like(mask) - mask
    region = s[:, :, y:y + source.shape[2], x:x + source.shape[3]]
    s[:, :, y:y + source.shape[2], x:x + source.shape[3]] = source * mask + region * rev_mask
    return s


@pytest.mark.parametrize(("x", "y", "feather"), [(0, 0, 0), (16, 8, 0), (8, 16, 16), (0, 0, 24), (40, 40, 16), (8, 8, 64), (16, 0, 40)])
def test_latent_composite_is_comfyuis(x: int, y: int, feather: int) -> None:
    to, source = latent(1, 8, 8, seed=1), latent(1, 5, 4, seed=2)
    got = run("LatentComposite", samples_to=to, samples_from=source, x=x, y=y, feather=feather).samples
    assert torch.allclose(got, comfy_latent_composite(to.samples, source.samples, x, y, feather), atol=1e-6)


def test_save_then_load_latent_is_bit_identical_in_comfyuis_format(tmp_path: Path) -> None:
    ctx = context(tmp_path)
    (tmp_path / "input").mkdir()
    x = latent(2, 3, 5, seed=7)
    output = run("SaveLatent", ctx, samples=x, filename_prefix="latents/fox")
    [item] = output.ui["latents"]
    assert item == {"filename": "fox_00001_.latent", "subfolder": "latents", "type": "output"}
    path = tmp_path / "output" / "latents" / item["filename"]
    with safe_open(str(path), framework="pt") as file:  # what ComfyUI's LoadLatent reads
        assert set(file.keys()) == {"latent_tensor", "latent_format_version_0"}
        assert file.get_tensor("latent_format_version_0").numel() == 0
        assert json.loads(file.metadata()["prompt"]) == ctx.prompt
    assert run("SaveLatent", ctx, samples=x, filename_prefix="latents/fox").ui["latents"][0]["filename"] == \
        "fox_00002_.latent"
    shutil.copy(path, tmp_path / "input" / "fox.latent")
    loaded = run("LoadLatent", ctx, latent="fox.latent")
    assert loaded.samples.dtype == torch.float32 and torch.equal(loaded.samples, x.samples)


def test_load_latent_reads_comfyuis_old_format_and_refuses_what_is_not_safetensors(tmp_path: Path) -> None:
    ctx = context(tmp_path)
    (tmp_path / "input").mkdir()
    old = torch.ones(1, 4, 2, 2)
    save_file({"latent_tensor": old}, tmp_path / "input" / "old.latent")  # before the version marker: scaled
    assert torch.allclose(run("LoadLatent", ctx, latent="old.latent").samples, old / 0.18215)
    (tmp_path / "input" / "pickle.latent").write_bytes(b"\x80\x02}q\x00." + bytes(64))
    with pytest.raises(UnsafeModelFile, match="not a ComfyUI .latent file"):
        run("LoadLatent", ctx, latent="pickle.latent")
    with pytest.raises(UnsafeModelFile, match="not a .latent file"):
        run("LoadLatent", ctx, latent="fox.pt")
    with pytest.raises(UnsafeModelFile, match="'..'"):
        run("LoadLatent", ctx, latent="../output/x.latent")
    with pytest.raises(ModelNotFound):
        run("LoadLatent", ctx, latent="missing.latent")


def test_new_image_and_latent_nodes_validate_and_run_on_tiny_sd15(executor: Any) -> None:
    workflow = txt2img()
    workflow["5"]["inputs"]["batch_size"] = 2
    workflow.update({
        "20": {"class_type": "LatentFromBatch", "inputs": {"samples": ["3", 0], "batch_index": 1, "length": 1}},
        "21": {"class_type": "LatentRotate", "inputs": {"samples": ["20", 0], "rotation": "90 degrees"}},
        "22": {"class_type": "LatentFlip", "inputs": {"samples": ["21", 0], "flip_method": "y-axis: horizontally"}},
        "23": {"class_type": "LatentComposite", "inputs": {"samples_to": ["3", 0], "samples_from": ["22", 0],
                                                           "x": 16, "y": 0, "feather": 8}},
        "24": {"class_type": "LatentBlend", "inputs": {"samples1": ["23", 0], "samples2": ["3", 0],
                                                       "blend_factor": 0.5}},
        "25": {"class_type": "LatentMultiply", "inputs": {"samples": ["24", 0], "multiplier": 1.0}},
        "26": {"class_type": "LatentCrop", "inputs": {"samples": ["25", 0], "width": 64, "height": 64, "x": 0,
                                                      "y": 0}},
        "27": {"class_type": "SaveLatent", "inputs": {"samples": ["26", 0], "filename_prefix": "latents/ops"}},
        "28": {"class_type": "VAEDecode", "inputs": {"samples": ["26", 0], "vae": ["4", 2]}},
        "29": {"class_type": "EmptyImage", "inputs": {"width": 32, "height": 32, "batch_size": 1,
                                                      "color": 0x3366CC}},
        "30": {"class_type": "ImageBlend", "inputs": {"image1": ["28", 0], "image2": ["29", 0], "blend_factor": 0.2,
                                                      "blend_mode": "overlay"}},
        "31": {"class_type": "ImageBlur", "inputs": {"image": ["30", 0], "blur_radius": 2, "sigma": 1.0}},
        "32": {"class_type": "ImageSharpen", "inputs": {"image": ["31", 0], "sharpen_radius": 1, "sigma": 1.0,
                                                        "alpha": 1.0}},
        "33": {"class_type": "ImageCrop", "inputs": {"image": ["32", 0], "width": 48, "height": 40, "x": 8,
                                                     "y": 8}},
        "34": {"class_type": "ImageBatch", "inputs": {"image1": ["33", 0], "image2": ["29", 0]}},
        "35": {"class_type": "ImageInvert", "inputs": {"image": ["34", 0]}},
        "36": {"class_type": "ImageScaleToTotalPixels", "inputs": {"image": ["35", 0], "upscale_method": "area",
                                                                   "megapixels": 0.01}},
    })
    workflow["9"]["inputs"]["images"] = ["36", 0]
    executor.validate(workflow)
    result = executor.run(workflow)
    saved = [item["filename"] for item in result.outputs["9"]["images"]]
    [latent_file] = result.outputs["27"]["latents"]
    assert len(saved) == 3  # the 2 decoded images, blended, blurred, sharpened and cropped, then the EmptyImage
    sizes = {Image.open(executor.settings.output_dir / item["subfolder"] / item["filename"]).size
             for item in result.outputs["9"]["images"]}
    assert sizes == {(112, 93)}  # the 48x40 crop scaled to 0.01 megapixels, each side rounded
    path = executor.settings.output_dir / latent_file["subfolder"] / latent_file["filename"]
    with safe_open(str(path), framework="pt") as file:
        assert file.get_tensor("latent_tensor").shape == (2, 4, 8, 8)
    # and back in through the input folder, into the sampler's VAE
    shutil.copy(path, executor.settings.input_dir / "ops-roundtrip.latent")
    again = {"1": {"class_type": "LoadLatent", "inputs": {"latent": "ops-roundtrip.latent"}},
             "4": workflow["4"],
             "2": {"class_type": "VAEDecode", "inputs": {"samples": ["1", 0], "vae": ["4", 2]}},
             "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": "ops/again"}}}
    assert len(executor.run(again).outputs["3"]["images"]) == 2


def test_a_loaded_latent_is_held_to_the_limits_from_its_header(executor: Any) -> None:
    from engine.cost import LIMIT_EXCEEDED, validate_within_limits
    from engine.errors import WorkflowInvalid

    save_file({"latent_tensor": torch.zeros(12, 4, 2, 3), "latent_format_version_0": torch.tensor([])},
              executor.settings.input_dir / "ops-twelve.latent")
    workflow = {"1": {"class_type": "LoadLatent", "inputs": {"latent": "ops-twelve.latent"}},
                "2": {"class_type": "LatentRotate", "inputs": {"samples": ["1", 0], "rotation": "90 degrees"}},
                "3": {"class_type": "SaveLatent", "inputs": {"samples": ["2", 0], "filename_prefix": "ops/twelve"}}}
    with pytest.raises(WorkflowInvalid) as caught:
        validate_within_limits(workflow, catalog(), executor.models, Limits(max_batch=8))
    assert caught.value.body["error"]["type"] == LIMIT_EXCEEDED
    [error] = caught.value.body["node_errors"]["1"]["errors"]
    assert error["extra_info"]["limit"] == "max_batch" and error["extra_info"]["received_value"] == 12
    with pytest.raises(LimitExceeded, match="limits.max_batch"):  # and the node itself, for a file changed since
        run("LoadLatent", SimpleNamespace(input_dir=executor.settings.input_dir, limits=Limits(max_batch=8)),
            latent="ops-twelve.latent")


def test_load_latent_lists_the_input_folders_latents_and_refuses_a_missing_one_at_validation(executor: Any) -> None:
    """As ComfyUI's COMBO of the input folder's .latent files: a missing name was found only when the job ran, and a
    Ray worker was never sent the file (its input was no input-folder choice)."""
    from engine.cluster.files import input_files
    from engine.errors import WorkflowInvalid
    from engine.object_info import object_info

    save_file({"latent_tensor": torch.zeros(1, 4, 2, 2), "latent_format_version_0": torch.tensor([])},
              executor.settings.input_dir / "ops-listed.latent")
    listed = executor.models.choices("input_latents")
    assert "ops-listed.latent" in listed and not [name for name in listed if name.endswith(".png")]
    assert "ops-listed.latent" not in executor.models.choices("input")  # LoadImage's list stays images
    info = object_info(catalog(), executor.models.choices)["LoadLatent"]["input"]["required"]["latent"]
    assert info[0] == listed and "image_upload" not in info[1]
    workflow = {"1": {"class_type": "LoadLatent", "inputs": {"latent": "ops-missing.latent"}},
                "2": {"class_type": "SaveLatent", "inputs": {"samples": ["1", 0], "filename_prefix": "ops/m"}}}
    with pytest.raises(WorkflowInvalid) as caught:
        executor.validate(workflow)
    [error] = caught.value.body["node_errors"]["1"]["errors"]
    assert error["type"] == "value_not_in_list" and error["extra_info"]["input_name"] == "latent"
    workflow["1"]["inputs"]["latent"] = "ops-listed.latent"
    executor.validate(workflow)
    assert input_files(workflow, catalog()) == ["ops-listed.latent"]
