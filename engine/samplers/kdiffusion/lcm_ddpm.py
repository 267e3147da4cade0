"""One-step-at-a-time stochastic samplers: lcm (denoise, then re-noise) and ddpm (the DDPM posterior step).

lcm jumps to each call's denoised estimate and noises it afresh to the next sigma with the model sampling's
noise_scaling (an EPS model's x + noise * sigma: every discrete SD sampling Noodle runs is one). ddpm is
ComfyUI's generic_step_sampler over DDPMSampler_step: the step runs on x / sqrt(sigma^2 + 1) with the noise
prediction (x - denoised) / sigma, drawing the posterior noise unless it steps to 0. Both draw from the default
noise sampler, as comfy/k_diffusion/sampling.py 0.3.64 has them.
"""

from __future__ import annotations

import torch

from engine.samplers.kdiffusion.base import Denoiser, NoiseSampler, Run, register, to_d


@register("lcm", stochastic=True)
def lcm(model: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, run: Run) -> torch.Tensor:
    noise = run.default_noise(x)
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = model(x, sigma)
        run.report(i, x, denoised)
        x = denoised
        if sigma_next > 0:
            x = noise(sigma, sigma_next) * sigma_next + x  # EPS.noise_scaling(sigma_next, noise, x)
    return x


def ddpm_step(x_vp: torch.Tensor, sigma: torch.Tensor, sigma_next: torch.Tensor, eps: torch.Tensor,
              noise: NoiseSampler) -> torch.Tensor:
    """DDPMSampler_step: the posterior mean from alpha_cumprod at sigma to sigma_next (on the VP scale), plus
    its noise when sigma_next is above 0."""
    alpha_cumprod = 1 / (sigma * sigma + 1)
    alpha_cumprod_next = 1 / (sigma_next * sigma_next + 1)
    alpha = alpha_cumprod / alpha_cumprod_next
    mu = (1.0 / alpha).sqrt() * (x_vp - (1 - alpha) * eps / (1 - alpha_cumprod).sqrt())
    if sigma_next > 0:
        std = ((1 - alpha) * (1.0 - alpha_cumprod_next) / (1.0 - alpha_cumprod)).sqrt()
        mu = mu + std * noise(sigma, sigma_next)
    return mu


@register("ddpm", stochastic=True)
def ddpm(model: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, run: Run) -> torch.Tensor:
    noise = run.default_noise(x)
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = model(x, sigma)
        run.report(i, x, denoised)
        x = ddpm_step(x / torch.sqrt(1.0 + sigma**2.0), sigma, sigma_next, to_d(x, sigma, denoised), noise)
        if sigma_next != 0:
            x = x * torch.sqrt(1.0 + sigma_next**2.0)
    return x
