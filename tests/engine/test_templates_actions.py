"""Templates for the actions under a result: the upscale ("hires fix") and outpaint graphs, their sizes within the
limits, and one of each run through the real engine on the tiny models."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from PIL import Image

from engine.executor import Executor
from engine.templates import WorkflowParams, build_workflow, outpaint_plan, upscale_plan

BASE: dict[str, Any] = {"checkpoint": "tiny-sd15.safetensors", "prompt": "a red fox", "seed": 7, "steps": 2,
                        "cfg": 5.0, "init_image": "source.png"}


def _source(executor: Executor, name: str = "source.png", side: int = 64) -> None:
    gradient = np.linspace(0, 255, side * side * 3).reshape(side, side, 3).astype(np.uint8)
    Image.fromarray(gradient, "RGB").save(executor.settings.input_dir / name)


def _png(executor: Executor, graph: dict[str, Any]) -> Image.Image:
    [image] = executor.run(graph).outputs["9"]["images"]
    return Image.open(executor.settings.output_dir / image["subfolder"] / image["filename"])


def test_a_model_upscale_is_load_upscale_resize_encode_sample_decode_save() -> None:
    graph = build_workflow(WorkflowParams(**BASE, width=128, height=128, denoise=0.35, upscale_by=2.0,
                                          upscale_model="tiny-esrgan-x4.safetensors"))
    assert graph["31"] == {"class_type": "UpscaleModelLoader", "inputs": {"model_name": "tiny-esrgan-x4.safetensors"}}
    assert graph["32"]["inputs"] == {"upscale_model": ["31", 0], "image": ["12", 0]}
    # a 4x model on a 2x request: ImageScale lands on the exact size
    assert graph["33"]["class_type"] == "ImageScale"
    assert (graph["33"]["inputs"]["image"], graph["33"]["inputs"]["width"], graph["33"]["inputs"]["height"]) == \
        (["32", 0], 128, 128)
    assert graph["13"]["inputs"]["pixels"] == ["33", 0]
    sampler = graph["3"]["inputs"]
    assert (sampler["latent_image"], sampler["denoise"], sampler["seed"], sampler["model"]) == \
        (["13", 0], 0.35, 7, ["4", 0])
    assert "30" not in graph and "34" not in graph and "5" not in graph


def test_a_latent_upscale_resizes_the_encoded_image_as_comfyuis_hires_fix_example() -> None:
    graph = build_workflow(WorkflowParams(**BASE, width=128, height=96, denoise=0.55, upscale_by=2.0))
    assert graph["34"] == {"class_type": "LatentUpscale", "inputs": {
        "samples": ["13", 0], "upscale_method": "nearest-exact", "width": 128, "height": 96, "crop": "disabled"}}
    assert graph["13"]["inputs"]["pixels"] == ["12", 0]
    assert graph["3"]["inputs"]["latent_image"] == ["34", 0] and graph["3"]["inputs"]["denoise"] == 0.55
    assert not {"31", "32", "33"} & set(graph)


def test_upscale_sizes_are_held_to_the_limits_and_the_model_input_shrinks_first() -> None:
    plan = upscale_plan(64, 64, 2.0, model_scale=2, max_side=2048, max_pixels=10**7)
    assert (plan.width, plan.height, plan.prescale, plan.factor) == (128, 128, None, 2.0)
    # the side limit holds the output; a 4x model's raw 1024 would pass 200 too: its input shrinks to 50
    held = upscale_plan(256, 128, 2.0, model_scale=4, max_side=400, max_pixels=10**7)
    assert (held.width, held.height) == (400, 200) and held.prescale == (100, 50)
    assert max(held.prescale) * 4 <= 400
    # the pixel limit too, sides kept multiples of 8
    pixels = upscale_plan(512, 512, 2.0, model_scale=None, max_side=4096, max_pixels=640 * 640)
    assert (pixels.width, pixels.height, pixels.prescale) == (640, 640, None) and pixels.factor == 1.25
    graph = build_workflow(WorkflowParams(**BASE, width=400, height=200, upscale_by=held.factor,
                                          upscale_model="tiny-esrgan-x4.safetensors", prescale=held.prescale))
    assert graph["30"]["inputs"]["width"] == 100 and graph["32"]["inputs"]["image"] == ["30", 0]


@pytest.mark.parametrize(("factor", "direction", "pads", "canvas"), [
    (2.0, None, (32, 32, 32, 32), (128, 128)),
    (1.5, None, (16, 16, 16, 16), (96, 96)),
    (None, "left", (32, 0, 0, 0), (96, 64)),
    (None, "down", (0, 0, 0, 32), (64, 96)),
])
def test_zoom_grows_every_side_and_pan_adds_half_a_side(factor: float | None, direction: Any,
                                                         pads: tuple[int, ...], canvas: tuple[int, int]) -> None:
    plan = outpaint_plan(64, 64, factor=factor, direction=direction, max_side=2048, max_pixels=10**7)
    assert (plan.pads, (plan.width, plan.height), plan.prescale) == (pads, canvas, None)


def test_an_outpaint_past_the_limits_scales_the_image_down_first() -> None:
    plan = outpaint_plan(64, 64, factor=2.0, max_side=100, max_pixels=10**7)
    assert plan.prescale == (48, 48) and plan.pads == (24, 24, 24, 24) and (plan.width, plan.height) == (96, 96)
    assert all(side % 8 == 0 for side in (*plan.pads, plan.width, plan.height))
    with pytest.raises(ValueError, match="zoom factor or a pan direction"):
        outpaint_plan(64, 64, max_side=100, max_pixels=10**7)


def test_an_outpaint_on_an_inpainting_checkpoint_loads_it_and_encodes_for_inpainting() -> None:
    graph = build_workflow(WorkflowParams(**BASE, width=128, height=128, outpaint=(32, 32, 32, 32),
                                          inpaint_checkpoint="tiny-sd15-inpainting.safetensors"))
    assert "4" not in graph
    assert graph["36"]["inputs"] == {"ckpt_name": "tiny-sd15-inpainting.safetensors"}
    assert graph["35"] == {"class_type": "ImagePadForOutpaint", "inputs": {
        "image": ["12", 0], "left": 32, "top": 32, "right": 32, "bottom": 32, "feathering": 40}}
    assert graph["37"] == {"class_type": "VAEEncodeForInpaint", "inputs": {
        "pixels": ["35", 0], "vae": ["36", 2], "mask": ["35", 1], "grow_mask_by": 8}}
    assert graph["3"]["inputs"]["latent_image"] == ["37", 0] and graph["3"]["inputs"]["model"] == ["36", 0]


def test_an_outpaint_without_one_is_masked_sampling_on_the_same_model() -> None:
    graph = build_workflow(WorkflowParams(**BASE, width=96, height=64, outpaint=(32, 0, 0, 0), prescale=(64, 64)))
    assert graph["30"]["class_type"] == "ImageScale" and graph["35"]["inputs"]["image"] == ["30", 0]
    assert graph["13"]["inputs"]["pixels"] == ["35", 0]
    assert graph["15"] == {"class_type": "SetLatentNoiseMask", "inputs": {"samples": ["13", 0], "mask": ["35", 1]}}
    assert graph["3"]["inputs"]["latent_image"] == ["15", 0] and graph["3"]["inputs"]["model"] == ["4", 0]


def test_an_upscale_and_an_outpaint_run_and_write_the_planned_size(executor: Executor) -> None:
    _source(executor)
    upscaled = _png(executor, build_workflow(WorkflowParams(
        **BASE, width=128, height=128, denoise=0.35, upscale_by=2.0, upscale_model="tiny-compact-x2.safetensors")))
    assert upscaled.size == (128, 128)
    panned = _png(executor, build_workflow(WorkflowParams(
        **BASE, width=96, height=64, outpaint=(32, 0, 0, 0), inpaint_checkpoint="tiny-sd15-inpainting.safetensors")))
    assert panned.size == (96, 64)
    # the recipe is in the PNG, as for every other graph
    assert "ImagePadForOutpaint" in panned.info["prompt"]
