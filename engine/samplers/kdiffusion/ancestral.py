"""Ancestral samplers: each step goes down below the next sigma and adds fresh noise back up to it.

euler_ancestral (diffusers runs it at ComfyUI's defaults; here with SamplerEulerAncestral's eta and s_noise),
dpm_2_ancestral (diffusers' KDPM2Ancestral on the CPU; here off it, where the noise must be drawn on the model's
device) and dpmpp_2s_ancestral (DPM-Solver++(2S), which diffusers lacks), as comfy/k_diffusion/sampling.py 0.3.64
has them for the discrete (VE) models Noodle runs.
"""

from __future__ import annotations

import torch

from engine.samplers.kdiffusion.base import Denoiser, Run, ancestral_step, register, to_d


@register("euler_ancestral", stochastic=True, eta=1.0, s_noise=1.0)
def euler_ancestral(model: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, run: Run, *, eta: float,
                    s_noise: float) -> torch.Tensor:
    noise = run.default_noise(x)
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = model(x, sigma)
        down, up = ancestral_step(sigma, sigma_next, eta)
        run.report(i, x, denoised)
        if down == 0:
            x = denoised
        else:
            x = x + to_d(x, sigma, denoised) * (down - sigma) + noise(sigma, sigma_next) * s_noise * up
    return x


@register("dpm_2_ancestral", stochastic=True, eta=1.0, s_noise=1.0)
def dpm_2_ancestral(model: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, run: Run, *, eta: float,
                    s_noise: float) -> torch.Tensor:
    """DPM-Solver-2 to the ancestral step's sigma_down through a midpoint in log sigma, then noise back up."""
    noise = run.default_noise(x)
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = model(x, sigma)
        down, up = ancestral_step(sigma, sigma_next, eta)
        run.report(i, x, denoised)
        d = to_d(x, sigma, denoised)
        if down == 0:
            x = x + d * (down - sigma)
        else:
            mid = sigma.log().lerp(down.log(), 0.5).exp()
            x_2 = x + d * (mid - sigma)
            x = x + to_d(x_2, mid, model(x_2, mid)) * (down - sigma)
            x = x + noise(sigma, sigma_next) * s_noise * up
    return x


@register("dpmpp_2s_ancestral", stochastic=True, eta=1.0, s_noise=1.0)
def dpmpp_2s_ancestral(model: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, run: Run, *, eta: float,
                       s_noise: float) -> torch.Tensor:
    """DPM-Solver++(2S): a midpoint call in log-sigma between sigma and the ancestral step's sigma_down."""
    noise = run.default_noise(x)
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = model(x, sigma)
        down, up = ancestral_step(sigma, sigma_next, eta)
        run.report(i, x, denoised)
        if down == 0:
            x = x + to_d(x, sigma, denoised) * (down - sigma)
        else:
            t, t_next = run.lambda_of(sigma), run.lambda_of(down)
            h = t_next - t
            s = t + 0.5 * h
            x_2 = (run.sigma_of(s) / sigma) * x - (-h * 0.5).expm1() * denoised
            x = (run.sigma_of(t_next) / sigma) * x - (-h).expm1() * model(x_2, run.sigma_of(s))
        if sigma_next > 0:
            x = x + noise(sigma, sigma_next) * s_noise * up
    return x
