"""Masked sampling and inpainting graphs on tiny SD1.5: one masked step against ComfyUI's math written out here
(comfy/samplers.py KSamplerX0Inpaint over k-diffusion's euler and dpmpp_2m), the kept area of the latent after
SetLatentNoiseMask and VAEEncodeForInpaint graphs, InpaintModelConditioning on a 4-channel model, and the cache
when only the mask changes."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from engine import samplers
from engine.executor import Executor
from engine.values import Latent

SIDE = 128  # 16x16 latents: room for a hole with kept cells around it
HOLE = (slice(48, 80), slice(48, 80))


# -- one masked step, against the math ---------------------------------------------------------------------


def fake_eps(x: torch.Tensor, timestep: torch.Tensor, sigma: float) -> torch.Tensor:
    """A model whose noise prediction depends on its input, position and sigma, so every term shows."""
    ramp = torch.linspace(-1.0, 1.0, x.shape[-1]).expand_as(x)
    return 0.3 * x + 0.1 * ramp + 0.05 * sigma


def comfy_denoised(x: torch.Tensor, sigma: float, latent: torch.Tensor, noise: torch.Tensor,
                   mask: torch.Tensor) -> torch.Tensor:
    """KSamplerX0Inpaint around an EPS model: the kept area's input is the latent noised to sigma, and its
    denoised estimate the latent itself."""
    x_in = x * mask + (latent + noise * sigma) * (1.0 - mask)
    eps = fake_eps(x_in / math.sqrt(sigma**2 + 1.0), torch.tensor(0), sigma)
    return (x_in - sigma * eps) * mask + latent * (1.0 - mask)


def setup(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    latent = torch.randn(1, 4, 8, 8, generator=generator)
    noise = torch.randn(1, 4, 8, 8, generator=generator)
    small = torch.tensor([[[[0.0, 0.0, 1.0, 1.0], [0.0, 0.5, 1.0, 1.0], [0.0, 0.0, 0.25, 1.0], [0.0, 0.0, 0.0, 0.0]]]])
    # comfy/utils.py reshape_mask: bilinear to the latent's size, over every channel
    mask = F.interpolate(small, size=(8, 8), mode="bilinear").expand(1, 4, 8, 8)
    return latent, noise, small, mask


@pytest.mark.parametrize("sampler_name", ["euler", "ddim", "heun", "dpmpp_2m"])
def test_masked_sampling_follows_ksamplerx0inpaint(sampler_name: str) -> None:
    latent, noise, small, mask = setup()
    sigmas = torch.tensor([2.0, 1.0, 0.0])  # below the model's largest sigma: the start is latent + noise * 2
    plan = samplers.build_scheduler(sampler_name, "normal", sigmas, seed=5)
    got = samplers.sample(plan, fake_eps, latent, noise, denoise_mask=small)

    # ddim is ComfyUI's euler with inpaint_options random: the kept area is noised from seed + 1
    kept_noise = torch.randn(noise.shape, generator=torch.Generator().manual_seed(6)) if sampler_name == "ddim" \
        else noise
    x = latent + noise * 2.0
    if sampler_name == "dpmpp_2m":  # sample_dpmpp_2m: the first step is first order, the step into 0 lands on D
        denoised = comfy_denoised(x, 2.0, latent, kept_noise, mask)
        x = 0.5 * x + 0.5 * denoised  # (sigma_next / sigma) x - expm1(-h) D with h = log 2
        x = comfy_denoised(x, 1.0, latent, kept_noise, mask)
    elif sampler_name == "heun":  # sample_heun: a 2nd call at sigma_next, then Euler into 0
        d = (x - comfy_denoised(x, 2.0, latent, kept_noise, mask)) / 2.0
        x_2 = x - d
        d_2 = (x_2 - comfy_denoised(x_2, 1.0, latent, kept_noise, mask)) / 1.0
        x = x - (d + d_2) / 2
        x = x - (x - comfy_denoised(x, 1.0, latent, kept_noise, mask))
    else:  # sample_euler: x + (x - D) / sigma * (sigma_next - sigma)
        for sigma, sigma_next in ((2.0, 1.0), (1.0, 0.0)):
            x = x + (x - comfy_denoised(x, sigma, latent, kept_noise, mask)) / sigma * (sigma_next - sigma)
    assert torch.allclose(got, x, atol=1e-5), float((got - x).abs().max())
    # where the mask is 0 the run ends on the latent (up to rounding); where it is 1 it moved
    assert torch.allclose(got[mask == 0], latent[mask == 0], atol=1e-5)
    assert float((got - latent)[mask == 1].abs().min()) > 1e-3


def test_no_mask_and_a_full_mask_sample_alike() -> None:
    latent, noise, _, _ = setup(1)
    sigmas = torch.tensor([2.0, 1.0, 0.0])
    plain = samplers.sample(samplers.build_scheduler("euler", "normal", sigmas, 0), fake_eps, latent, noise)
    full = samplers.sample(samplers.build_scheduler("euler", "normal", sigmas, 0), fake_eps, latent, noise,
                           denoise_mask=torch.ones(1, 1, 8, 8))
    assert torch.equal(plain, full)


# -- graphs on tiny SD1.5 ----------------------------------------------------------------------------------


def write_holed_png(executor: Executor, name: str) -> str:
    """A 128x128 RGBA picture with a transparent 32x32 square in the middle (LoadImage's MASK is 1 there), saved
    as `name` in the input folder; the name."""
    rows, cols = np.mgrid[0:SIDE, 0:SIDE]
    rgb = np.stack([cols * 2 % 256, rows * 2 % 256, (rows + cols) % 256], -1).astype(np.uint8)
    alpha = np.full((SIDE, SIDE), 255, np.uint8)
    alpha[HOLE] = 0
    Image.fromarray(np.dstack([rgb, alpha]), "RGBA").save(executor.settings.input_dir / name)
    return name


@pytest.fixture(scope="module")
def holed_png(executor: Executor) -> str:
    return write_holed_png(executor, "holed.png")


def graph(image: str, latent: dict[str, Any], sampler: dict[str, Any] | None = None,
          **extra: dict[str, Any]) -> dict[str, Any]:
    """Loader, prompts and LoadImage ("10"); `latent` as node "11" feeds KSampler "3" -> VAEDecode -> SaveImage."""
    ksampler = {"class_type": "KSampler", "inputs": {
        "model": ["4", 0], "seed": 7, "steps": 4, "cfg": 7.0, "sampler_name": "euler", "scheduler": "normal",
        "positive": ["6", 0], "negative": ["7", 0], "latent_image": ["11", 0], "denoise": 1.0}}
    return {
        "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "tiny-sd15.safetensors"}},
        "6": {"class_type": "CLIPTextEncode", "inputs": {"text": "a red fox", "clip": ["4", 1]}},
        "7": {"class_type": "CLIPTextEncode", "inputs": {"text": "blurry", "clip": ["4", 1]}},
        "10": {"class_type": "LoadImage", "inputs": {"image": image}},
        "11": latent,
        "3": sampler or ksampler,
        "8": {"class_type": "VAEDecode", "inputs": {"samples": ["3", 0], "vae": ["4", 2]}},
        "9": {"class_type": "SaveImage", "inputs": {"images": ["8", 0], "filename_prefix": "inpaint/test"}},
        **extra,
    }


def values_of(executor: Executor, workflow: dict[str, Any]) -> dict[str, tuple[Any, ...]]:
    """Every node's output values after running `workflow`."""
    run = executor.begin(workflow)
    for node_id in run.prompt.order:
        run.compute(node_id)
    run.finish()
    return run.values


def kept_cells(latent: Latent, noise_mask: torch.Tensor) -> torch.Tensor:
    resized = F.interpolate(noise_mask.float(), size=latent.samples.shape[-2:], mode="bilinear")
    return (resized == 0).expand_as(latent.samples)


def saved_pixels(executor: Executor, workflow: dict[str, Any]) -> np.ndarray:
    [image] = executor.run(workflow).outputs["9"]["images"]
    return np.asarray(Image.open(executor.settings.output_dir / image["subfolder"] / image["filename"])).astype(int)


def test_vae_encode_for_inpaint_graph_keeps_the_latent_outside_the_mask(executor: Executor, holed_png: str) -> None:
    inpaint = graph(holed_png, {"class_type": "VAEEncodeForInpaint", "inputs": {
        "pixels": ["10", 0], "vae": ["4", 2], "mask": ["10", 1], "grow_mask_by": 6}})
    values = values_of(executor, inpaint)
    encoded, sampled = values["11"][0], values["3"][0]
    kept = kept_cells(encoded, encoded.noise_mask)
    assert 0 < int((~kept[0, 0]).sum()) < kept[0, 0].numel() // 4  # a hole of 4x4 of the 16x16 cells
    assert torch.equal(sampled.samples[kept], encoded.samples[kept])
    assert float((sampled.samples - encoded.samples)[~kept].abs().mean()) > 0.1

    # The pixels: the hole is drawn anew. Outside it the tiny random VAE decoder does not keep them: its
    # mid-block attention and group norms spread every latent cell over the whole picture (one cell moved by
    # 1 moves pixels at the far corner by about 3 levels), so there it is a paste back that keeps them.
    trip = {key: node for key, node in graph(holed_png, {"class_type": "VAEEncode", "inputs": {
        "pixels": ["10", 0], "vae": ["4", 2]}}).items() if key not in ("3", "6", "7")}
    trip["8"] = {"class_type": "VAEDecode", "inputs": {"samples": ["11", 0], "vae": ["4", 2]}}
    drawn, round_trip = saved_pixels(executor, inpaint), saved_pixels(executor, trip)
    assert np.abs(drawn - round_trip)[HOLE].mean() > 20
    pasted = dict(inpaint, **{
        "12": {"class_type": "ImageCompositeMasked", "inputs": {
            "destination": ["10", 0], "source": ["8", 0], "x": 0, "y": 0, "resize_source": False,
            "mask": ["10", 1]}},
        "9": {"class_type": "SaveImage", "inputs": {"images": ["12", 0], "filename_prefix": "inpaint/pasted"}}})
    pasted_pixels, original = saved_pixels(executor, pasted), np.asarray(Image.open(
        executor.settings.input_dir / holed_png).convert("RGB")).astype(int)
    outside = np.ones((SIDE, SIDE), bool)
    outside[HOLE] = False
    assert np.array_equal(pasted_pixels[outside], original[outside])
    assert np.array_equal(pasted_pixels[HOLE], drawn[HOLE])


def img2img_with_noise_mask(image: str, denoise: float = 0.6) -> dict[str, Any]:
    return graph(image, {"class_type": "SetLatentNoiseMask", "inputs": {"samples": ["12", 0], "mask": ["10", 1]}},
                 sampler={"class_type": "KSampler", "inputs": {
                     "model": ["4", 0], "seed": 9, "steps": 4, "cfg": 7.0, "sampler_name": "dpmpp_2m",
                     "scheduler": "karras", "positive": ["6", 0], "negative": ["7", 0], "latent_image": ["11", 0],
                     "denoise": denoise}},
                 **{"12": {"class_type": "VAEEncode", "inputs": {"pixels": ["10", 0], "vae": ["4", 2]}}})


def test_set_latent_noise_mask_keeps_the_unmasked_latent_exactly(executor: Executor, holed_png: str) -> None:
    values = values_of(executor, img2img_with_noise_mask(holed_png))
    encoded, masked, sampled = values["12"][0], values["11"][0], values["3"][0]
    assert masked.noise_mask.shape == (1, 1, SIDE, SIDE)
    kept = kept_cells(encoded, masked.noise_mask)
    assert torch.equal(sampled.samples[kept], encoded.samples[kept])
    assert float((sampled.samples - encoded.samples)[~kept].abs().mean()) > 0.1
    assert sampled.noise_mask is masked.noise_mask  # passed on, as ComfyUI's latent.copy()


def test_ksampler_advanced_masks_too_and_leftover_noise_stays_in_the_kept_area(executor: Executor,
                                                                                holed_png: str) -> None:
    def advanced(leftover: str) -> dict[str, Any]:
        return {"class_type": "KSamplerAdvanced", "inputs": {
            "model": ["4", 0], "add_noise": "enable", "noise_seed": 3, "steps": 4, "cfg": 7.0,
            "sampler_name": "euler", "scheduler": "normal", "positive": ["6", 0], "negative": ["7", 0],
            "latent_image": ["11", 0], "start_at_step": 1, "end_at_step": 3, "return_with_leftover_noise": leftover}}

    workflow = img2img_with_noise_mask(holed_png)
    done = values_of(executor, dict(workflow, **{"3": advanced("disable")}))
    encoded, kept = done["12"][0], kept_cells(done["12"][0], done["11"][0].noise_mask)
    assert torch.equal(done["3"][0].samples[kept], encoded.samples[kept])
    # stopped at step 3 of 4 with its noise left: the kept area is the latent noised to that sigma (euler from
    # below the largest sigma keeps x = L + N * sigma there), in the model's scaled space
    left = values_of(executor, dict(workflow, **{"3": advanced("enable")}))["3"][0]
    sigma = float(samplers.advanced_sigmas("normal", 4, 1, 3, False, samplers.model_sigmas(),
                                           sampler_name="euler")[-1])
    scale = 0.18215
    from engine.nodes.sampling import prepare_noise
    noise = prepare_noise(encoded.samples, 3)
    expected = (encoded.samples * scale + noise * sigma) / scale
    assert sigma > 0 and torch.allclose(left.samples[kept], expected[kept], atol=1e-4)


def test_inpaint_model_conditioning_on_a_4_channel_model_is_a_masked_img2img(executor: Executor,
                                                                             holed_png: str) -> None:
    conditioned = graph(holed_png, {"class_type": "InpaintModelConditioning", "inputs": {
        "positive": ["6", 0], "negative": ["7", 0], "vae": ["4", 2], "pixels": ["10", 0], "mask": ["10", 1],
        "noise_mask": True}}, sampler={"class_type": "KSampler", "inputs": {
            "model": ["4", 0], "seed": 9, "steps": 4, "cfg": 7.0, "sampler_name": "dpmpp_2m", "scheduler": "karras",
            "positive": ["11", 0], "negative": ["11", 1], "latent_image": ["11", 2], "denoise": 0.6}})
    values = values_of(executor, conditioned)
    positive, negative, latent = values["11"]
    for cond in (positive, negative):
        [item] = cond.items
        assert item.extras["concat_latent_image"].shape == (1, 4, 16, 16)
        assert item.extras["concat_mask"].shape == (1, 1, SIDE, SIDE)
    assert latent.noise_mask is positive.items[0].extras["concat_mask"]
    # the concat parts are for inpainting UNets: here the sampler gives what VAEEncode + SetLatentNoiseMask gives
    plain = values_of(executor, img2img_with_noise_mask(holed_png))
    assert torch.equal(latent.samples, plain["12"][0].samples)
    assert torch.equal(values["3"][0].samples, plain["3"][0].samples)
    off = dict(conditioned, **{"11": {**conditioned["11"], "inputs": {**conditioned["11"]["inputs"],
                                                                      "noise_mask": False}}})
    assert values_of(executor, off)["11"][2].noise_mask is None


# -- the cache ---------------------------------------------------------------------------------------------


def test_changing_only_the_mask_reruns_only_what_depends_on_it(executor: Executor, holed_png: str) -> None:
    Image.new("L", (SIDE, SIDE), 0).save(executor.settings.input_dir / "mask.png")

    def workflow(expand: int) -> dict[str, Any]:
        return graph(holed_png, {"class_type": "VAEEncodeForInpaint", "inputs": {
            "pixels": ["10", 0], "vae": ["4", 2], "mask": ["14", 0], "grow_mask_by": 6}}, **{
            "13": {"class_type": "LoadImageMask", "inputs": {"image": "mask.png", "channel": "red"}},
            "14": {"class_type": "GrowMask", "inputs": {"mask": ["13", 0], "expand": expand,
                                                        "tapered_corners": True}}})

    executor.cache.clear()
    first = executor.run(workflow(4))
    assert first.meta["cached"] == []
    grown = executor.run(workflow(8))
    assert sorted(grown.meta["cached"]) == ["10", "13", "4", "6", "7"]
    assert set(grown.meta["timings"]) == {"14", "11", "3", "8", "9", "total"}
    # a new mask file under the same name: its loader runs again (the file's hash), the picture's does not
    square = Image.new("L", (SIDE, SIDE), 0)
    square.paste(255, (40, 40, 88, 88))
    square.save(executor.settings.input_dir / "mask.png")
    redrawn = executor.run(workflow(8))
    assert sorted(redrawn.meta["cached"]) == ["10", "4", "6", "7"]
    assert redrawn.outputs["9"] != grown.outputs["9"]
