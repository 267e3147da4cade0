"""DifferentialDiffusion: ComfyUI 0.3.64's denoise_mask_function, per model call, on both sampling paths."""

from __future__ import annotations

import copy
import math
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from engine import samplers
from engine.executor import Executor
from engine.nodes.differential_diffusion import DifferentialMask
from engine.samplers.loop import resize_noise_mask
from engine.samplers.model_sampling import DEFAULT_SAMPLING, ContinuousEDM, ModelSampling
from tests.engine.conftest import txt2img
from tests.engine.nodes.test_model_sampling_edm import ComfyEDM
from tests.engine.samplers.sampler_support import gaussian_eps, latents


class ComfyDiscrete:
    """ModelSamplingDiscrete's sigma_min and timestep (an int64 table index), compactly."""

    def __init__(self) -> None:
        self.sigmas = samplers.model_sigmas().float()
        self.log_sigmas = self.sigmas.log()
        self.sigma_min = self.sigmas[0]

    def timestep(self, sigma: torch.Tensor) -> torch.Tensor:
        dists = sigma.log() - self.log_sigmas[:, None]
        return dists.abs().argmin(dim=0).view(sigma.shape)


def comfy_forward(sigma: torch.Tensor, denoise_mask: torch.Tensor, model_sampling: Any, step_sigmas: torch.Tensor,
                  strength: float) -> torch.Tensor:
    """DifferentialDiffusion.forward, compactly (extra_options' model.inner_model.model_sampling and sigmas)."""
    sigma_to = model_sampling.sigma_min
    if step_sigmas[-1] > sigma_to:
        sigma_to = step_sigmas[-1]
    sigma_from = step_sigmas[0]
    ts_from, ts_to = model_sampling.timestep(sigma_from), model_sampling.timestep(sigma_to)
    current_ts = model_sampling.timestep(sigma[0])
    threshold = (current_ts - ts_to) / (ts_from - ts_to)
    binary_mask = (denoise_mask >= threshold).to(denoise_mask.dtype)
    if strength and strength < 1:
        return strength * binary_mask + (1 - strength) * denoise_mask
    return binary_mask


def gradient_mask() -> torch.Tensor:
    return torch.linspace(0, 1, 64).view(1, 1, 8, 8)


@pytest.mark.parametrize("strength", [1.0, 0.5, 0.0])
@pytest.mark.parametrize(("ours", "theirs"), [(DEFAULT_SAMPLING, ComfyDiscrete()),
                                              (ContinuousEDM("edm", sigma_low=0.01, sigma_high=80.0),
                                               ComfyEDM("edm", 0.01, 80.0))])
def test_the_mask_at_each_call_is_comfys(strength: float, ours: ModelSampling, theirs: Any) -> None:
    mask = gradient_mask()
    for denoise in (1.0, 0.6):  # a cut schedule: its own first sigma is the top
        sigmas = samplers.ksampler_sigmas("karras", 10, denoise, ours, sampler_name="euler")
        for sigma in [*sigmas[:-1].tolist(), 0.7]:
            expected = comfy_forward(torch.tensor([sigma]), mask, theirs, sigmas, strength)
            assert torch.equal(DifferentialMask(strength)(sigma, mask, sigmas, ours), expected)


def test_the_first_call_keeps_only_mask_one_and_the_last_denoises_everything() -> None:
    mask, sigmas = gradient_mask(), samplers.ksampler_sigmas("normal", 8, 1.0, DEFAULT_SAMPLING, sampler_name="euler")
    first = DifferentialMask()(float(sigmas[0]), mask, sigmas, DEFAULT_SAMPLING)
    last = DifferentialMask()(float(sigmas[-2]), mask, sigmas, DEFAULT_SAMPLING)
    assert torch.equal(first, (mask >= 1).float()) and torch.equal(last, torch.ones_like(mask))


def reference_euler(latent: torch.Tensor, noise: torch.Tensor, mask: torch.Tensor, sigmas: torch.Tensor,
                    strength: float) -> torch.Tensor:
    """k-diffusion sample_euler through KSamplerX0Inpaint with DifferentialDiffusion's denoise_mask_function."""
    comfy = ComfyDiscrete()
    whole = resize_noise_mask(mask, latent.shape)
    x = noise * math.sqrt(1 + float(sigmas[0]) ** 2) + latent  # a full denoise: max_denoise
    for i in range(len(sigmas) - 1):
        s = float(sigmas[i])
        m = comfy_forward(torch.tensor([s]), whole, comfy, sigmas, strength)
        x_in = x * m + (latent + noise * s) * (1 - m)
        denoised = x_in - s * gaussian_eps(x_in / math.sqrt(s * s + 1), torch.tensor(0.0), s)
        denoised = denoised * m + latent * (1 - m)
        x = x + (x - denoised) / s * (sigmas[i + 1] - s)
    return x


@pytest.mark.parametrize("strength", [1.0, 0.4])
@pytest.mark.parametrize("options", [None, {"eta": 0.0}])  # diffusers' euler; Noodle's own euler_ancestral at eta 0
def test_masked_sampling_follows_the_mask_function_on_both_paths(strength: float, options: dict | None) -> None:
    latent, noise = latents()
    mask = gradient_mask()
    sampler = "euler" if options is None else "euler_ancestral"
    sigmas = samplers.ksampler_sigmas("normal", 6, 1.0, DEFAULT_SAMPLING, sampler_name=sampler)
    plan = samplers.build_scheduler(sampler, "normal", sigmas, 0, DEFAULT_SAMPLING, options)
    assert (plan.kdiff is not None) == (options is not None)
    function = DifferentialMask(strength)
    out = samplers.sample(plan, gaussian_eps, latent, noise, denoise_mask=mask,
                          denoise_mask_function=lambda s, m, run: function(s, m, run, DEFAULT_SAMPLING))
    expected = reference_euler(latent, noise, mask, sigmas, strength)
    assert torch.allclose(out, expected, atol=1e-4), float((out - expected).abs().max())


def with_differential(workflow: dict[str, Any], strength: float | None) -> dict[str, Any]:
    changed = copy.deepcopy(workflow)
    changed["30"] = {"class_type": "SolidMask", "inputs": {"value": 0.5, "width": 64, "height": 64}}
    changed["31"] = {"class_type": "SetLatentNoiseMask", "inputs": {"samples": ["5", 0], "mask": ["30", 0]}}
    changed["3"]["inputs"]["latent_image"] = ["31", 0]
    if strength is not None:
        changed["32"] = {"class_type": "DifferentialDiffusion", "inputs": {"model": ["4", 0], "strength": strength}}
        changed["3"]["inputs"]["model"] = ["32", 0]
    return changed


def pixels(executor: Executor, workflow: dict[str, Any]) -> np.ndarray:
    [image] = executor.run(workflow).outputs["9"]["images"]
    return np.asarray(Image.open(executor.settings.output_dir / image["subfolder"] / image["filename"])).astype(int)


def test_a_differential_diffusion_workflow_runs_and_changes_the_masked_picture(executor: Executor) -> None:
    plain = txt2img(seed=1503)
    masked = pixels(executor, with_differential(plain, None))
    differential = pixels(executor, with_differential(plain, 1.0))
    assert np.abs(differential - masked).max() > 0
    # without a noise mask the patch has nothing to act on: the plain picture
    bare = copy.deepcopy(plain)
    bare["32"] = {"class_type": "DifferentialDiffusion", "inputs": {"model": ["4", 0], "strength": 1.0}}
    bare["3"]["inputs"]["model"] = ["32", 0]
    assert np.array_equal(pixels(executor, bare), pixels(executor, plain))


def test_strength_is_optional_as_in_comfyui(executor: Executor) -> None:
    # exports made before ComfyUI added `strength` leave it out: it defaults to 1, ComfyUI's default
    old = with_differential(txt2img(seed=1504), 1.0)
    del old["32"]["inputs"]["strength"]
    assert np.array_equal(pixels(executor, old), pixels(executor, with_differential(txt2img(seed=1504), 1.0)))
