"""A1111's fields for images made by custom sampling (engine/recipe.py): SamplerCustom and SamplerCustomAdvanced read
through their SAMPLER, SIGMAS, NOISE and GUIDER nodes."""

from __future__ import annotations

from typing import Any

from engine.recipe import describe

BASE: dict[str, Any] = {
    "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "sub/tiny-sd15.safetensors"}},
    "10": {"class_type": "LoraLoader", "inputs": {"model": ["4", 0], "clip": ["4", 1], "lora_name": "a.safetensors",
                                                  "strength_model": 0.7}},
    "6": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["10", 1], "text": "a fox"}},
    "7": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["10", 1], "text": "blurry"}},
    "8": {"class_type": "VAEDecode", "inputs": {"samples": ["3", 0], "vae": ["4", 2]}},
    "9": {"class_type": "SaveImage", "inputs": {"images": ["8", 0], "filename_prefix": "x"}},
}


def test_sampler_custom_is_read_through_its_sampler_and_scheduler_nodes() -> None:
    prompt = {**BASE,
              "20": {"class_type": "BasicScheduler", "inputs": {"model": ["10", 0], "scheduler": "karras", "steps": 12,
                                                                "denoise": 0.6}},
              "21": {"class_type": "KSamplerSelect", "inputs": {"sampler_name": "dpmpp_2m"}},
              "3": {"class_type": "SamplerCustom", "inputs": {
                  "model": ["10", 0], "add_noise": True, "noise_seed": 77, "cfg": 6.5, "positive": ["6", 0],
                  "negative": ["7", 0], "sampler": ["21", 0], "sigmas": ["20", 0], "latent_image": ["5", 0]}}}
    recipe = describe(prompt, "9", None)
    assert recipe is not None and (recipe["prompt"], recipe["negative"]) == ("a fox", "blurry")
    fields = recipe["fields"]
    assert (fields["Steps"], fields["Sampler"], fields["Schedule type"], fields["CFG scale"], fields["Seed"]) == \
        (12, "DPM++ 2M", "Karras", 6.5, 77)
    assert fields["Denoising strength"] == 0.6 and fields["Model"] == "tiny-sd15"
    assert fields["Lora"] == "a.safetensors: 0.7"


def test_sampler_custom_advanced_is_read_through_its_noise_guider_and_split_schedule() -> None:
    prompt = {**BASE,
              "20": {"class_type": "AlignYourStepsScheduler", "inputs": {"model_type": "SD1", "steps": 10,
                                                                         "denoise": 1.0}},
              "22": {"class_type": "SplitSigmas", "inputs": {"sigmas": ["20", 0], "step": 4}},
              "21": {"class_type": "SamplerEulerAncestral", "inputs": {"eta": 1.0, "s_noise": 1.0}},
              "23": {"class_type": "RandomNoise", "inputs": {"noise_seed": 5}},
              "24": {"class_type": "CFGGuider", "inputs": {"model": ["10", 0], "positive": ["6", 0],
                                                           "negative": ["7", 0], "cfg": 4.0}},
              "3": {"class_type": "SamplerCustomAdvanced", "inputs": {
                  "noise": ["23", 0], "guider": ["24", 0], "sampler": ["21", 0], "sigmas": ["22", 1],
                  "latent_image": ["5", 0]}}}
    recipe = describe(prompt, "9", None)
    assert recipe is not None and (recipe["prompt"], recipe["negative"]) == ("a fox", "blurry")
    fields = recipe["fields"]
    assert (fields["Steps"], fields["Sampler"], fields["Schedule type"], fields["CFG scale"], fields["Seed"]) == \
        (10, "Euler a", "Align Your Steps", 4.0, 5)
    assert fields["Denoising strength"] is None and fields["Lora"] == "a.safetensors: 0.7"

    prompt["24"] = {"class_type": "BasicGuider", "inputs": {"model": ["4", 0], "conditioning": ["6", 0]}}
    prompt["23"] = {"class_type": "DisableNoise", "inputs": {}}
    prompt["20"] = {"class_type": "LaplaceScheduler", "inputs": {"steps": 9}}
    recipe = describe(prompt, "9", None)
    assert recipe is not None and (recipe["prompt"], recipe["negative"]) == ("a fox", "")
    fields = recipe["fields"]
    assert (fields["CFG scale"], fields["Seed"], fields["Schedule type"], fields["Lora"]) == (1.0, None, "Laplace",
                                                                                               None)
