"""Less common graphs: hires fix, two-stage KSamplerAdvanced, SDXL's own encoder, conditioning combine/concat."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from PIL import Image

from engine.errors import NodeExecutionError
from engine.executor import Executor
from tests.engine.test_runs import fresh_run, image_paths, pixels

SD15 = "tiny-sd15.safetensors"


def base(checkpoint: str = SD15, text: str = "a fox") -> dict[str, Any]:
    return {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": checkpoint}},
        "2": {"class_type": "CLIPTextEncode", "inputs": {"text": text, "clip": ["1", 1]}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"text": "blurry", "clip": ["1", 1]}},
        "4": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
    }


def ksampler(latent: list, positive: list | None = None, denoise: float = 1.0, model: list | None = None,
             seed: int = 1) -> dict[str, Any]:
    return {"class_type": "KSampler", "inputs": {
        "model": model or ["1", 0], "seed": seed, "steps": 4, "cfg": 6.0, "sampler_name": "euler",
        "scheduler": "normal", "positive": positive or ["2", 0], "negative": ["3", 0], "latent_image": latent,
        "denoise": denoise}}


def save(graph: dict[str, Any], samples: list, prefix: str) -> dict[str, Any]:
    graph["90"] = {"class_type": "VAEDecode", "inputs": {"samples": samples, "vae": ["1", 2]}}
    graph["99"] = {"class_type": "SaveImage", "inputs": {"images": ["90", 0], "filename_prefix": prefix}}
    return graph


def render(executor: Executor, graph: dict[str, Any]) -> np.ndarray:
    return pixels(image_paths(executor, fresh_run(executor, graph)["outputs"], "99")[0])


def test_hires_fix_upscales_latents_and_images(executor: Executor) -> None:
    graph = base()
    graph["5"] = ksampler(["4", 0])
    graph["6"] = {"class_type": "LatentUpscaleBy", "inputs": {"samples": ["5", 0], "upscale_method": "bislerp",
                                                             "scale_by": 1.5}}
    graph["7"] = ksampler(["6", 0], denoise=0.5)
    graph["8"] = {"class_type": "LatentUpscale", "inputs": {"samples": ["7", 0], "upscale_method": "bilinear",
                                                           "width": 128, "height": 0, "crop": "disabled"}}
    save(graph, ["8", 0], "hires")
    graph["91"] = {"class_type": "ImageScale", "inputs": {"image": ["90", 0], "upscale_method": "lanczos",
                                                         "width": 200, "height": 100, "crop": "center"}}
    graph["92"] = {"class_type": "PreviewImage", "inputs": {"images": ["91", 0]}}
    result = fresh_run(executor, graph)
    [saved] = image_paths(executor, result["outputs"], "99")
    assert Image.open(saved).size == (128, 128)
    [preview] = result["outputs"]["92"]["images"]
    assert preview["type"] == "temp"
    assert Image.open(executor.settings.output_dir / "temp" / preview["filename"]).size == (200, 100)


def test_two_stage_advanced_sampling_equals_one_run(executor: Executor) -> None:
    def advanced(latent: list, start: int, end: int, noise: str, leftover: str) -> dict[str, Any]:
        return {"class_type": "KSamplerAdvanced", "inputs": {
            "model": ["1", 0], "add_noise": noise, "noise_seed": 9, "steps": 6, "cfg": 6.0, "sampler_name": "euler",
            "scheduler": "karras", "positive": ["2", 0], "negative": ["3", 0], "latent_image": latent,
            "start_at_step": start, "end_at_step": end, "return_with_leftover_noise": leftover}}

    whole = base()
    whole["5"] = advanced(["4", 0], 0, 10000, "enable", "disable")
    split = base()
    split["5"] = advanced(["4", 0], 0, 3, "enable", "enable")
    split["6"] = advanced(["5", 0], 3, 10000, "disable", "disable")
    one = render(executor, save(whole, ["5", 0], "whole"))
    two = render(executor, save(split, ["6", 0], "split"))
    assert np.abs(one - two).max() <= 1


def test_sdxl_encoder_with_size_conditioning(executor: Executor) -> None:
    graph = base("tiny-sdxl.safetensors")
    graph["2"] = {"class_type": "CLIPTextEncodeSDXL", "inputs": {
        "clip": ["1", 1], "width": 1024, "height": 1024, "crop_w": 0, "crop_h": 0, "target_width": 1024,
        "target_height": 1024, "text_g": "a fox " * 40, "text_l": "a fox"}}
    graph["5"] = ksampler(["4", 0])
    big = render(executor, save(graph, ["5", 0], "sdxl-size"))
    graph["2"]["inputs"].update(width=64, height=64, target_width=64, target_height=64)
    small = render(executor, save(graph, ["5", 0], "sdxl-size"))
    assert not np.array_equal(big, small), "size conditioning must reach the UNet"


def test_sdxl_encoder_refuses_sd15(executor: Executor) -> None:
    graph = base()
    graph["2"] = {"class_type": "CLIPTextEncodeSDXL", "inputs": {
        "clip": ["1", 1], "width": 1024, "height": 1024, "crop_w": 0, "crop_h": 0, "target_width": 1024,
        "target_height": 1024, "text_g": "a fox", "text_l": "a fox"}}
    graph["5"] = ksampler(["4", 0])
    with pytest.raises(NodeExecutionError, match="needs an SDXL checkpoint"):
        fresh_run(executor, save(graph, ["5", 0], "refused"))


def test_conditioning_combine_and_concat_change_the_result(executor: Executor) -> None:
    graph = base()
    graph["6"] = {"class_type": "CLIPTextEncode", "inputs": {"text": "a snowy forest", "clip": ["1", 1]}}
    graph["5"] = ksampler(["4", 0])
    plain = render(executor, save(graph, ["5", 0], "cond"))
    graph["7"] = {"class_type": "ConditioningCombine", "inputs": {"conditioning_1": ["2", 0], "conditioning_2": ["6", 0]}}
    graph["5"] = ksampler(["4", 0], positive=["7", 0])
    combined = render(executor, save(graph, ["5", 0], "cond"))
    graph["7"] = {"class_type": "ConditioningConcat", "inputs": {"conditioning_to": ["2", 0], "conditioning_from": ["6", 0]}}
    concat = render(executor, save(graph, ["5", 0], "cond"))
    assert not np.array_equal(plain, combined) and not np.array_equal(plain, concat)
    assert not np.array_equal(combined, concat)


def test_clip_skip_and_model_only_lora(executor: Executor) -> None:
    graph = base()
    graph["5"] = ksampler(["4", 0])
    plain = render(executor, save(graph, ["5", 0], "skip"))
    graph["8"] = {"class_type": "CLIPSetLastLayer", "inputs": {"clip": ["1", 1], "stop_at_clip_layer": -2}}
    graph["2"]["inputs"]["clip"] = ["8", 0]
    skipped = render(executor, save(graph, ["5", 0], "skip"))
    assert not np.array_equal(plain, skipped)
    graph["2"]["inputs"]["clip"] = ["1", 1]
    graph["9"] = {"class_type": "LoraLoaderModelOnly", "inputs": {"model": ["1", 0], "lora_name": "tiny-lora-a.safetensors",
                                                                 "strength_model": 1.0}}
    graph["5"] = ksampler(["4", 0], model=["9", 0])
    model_only = render(executor, save(graph, ["5", 0], "skip"))
    assert not np.array_equal(plain, model_only)
