"""heunpp2 (Heun++): an Euler step corrected by the slopes at the next one or two sigmas, weighted by sigma.

As comfy/k_diffusion/sampling.py 0.3.64 sample_heunpp2 has it (from Carzit's sd-webui-samplers-scheduler): three
model calls a step while two more sigmas follow (the slopes at sigma, sigma_next and sigma_next_next, weighted
1 - w2 - w3, w2 = sigma_next / (3 sigma_0), w3 = sigma_next_next / (3 sigma_0)), Heun's two calls on the step before
the last (weights over 2 sigma_0), and plain Euler into the last sigma. Diffusers has no such scheduler.
"""

from __future__ import annotations

import math

import torch

from engine.samplers.kdiffusion.base import Denoiser, Run, register, to_d


@register("heunpp2", stochastic=False, s_churn=0.0, s_tmin=0.0, s_tmax=math.inf, s_noise=1.0)
def heunpp2(model: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, run: Run, *, s_churn: float, s_tmin: float,
            s_tmax: float, s_noise: float) -> torch.Tensor:
    if s_churn != 0:
        # ComfyUI draws the churn noise with torch.randn_like, from the process-wide generator no seed sets: no
        # two runs agree, so Noodle cannot give ComfyUI's picture (no Sampler* node sets s_churn for heunpp2)
        raise ValueError(f"heunpp2 with s_churn {s_churn} adds unseeded noise in ComfyUI, which no seed reproduces; "
                         "Noodle runs heunpp2 with s_churn 0 only")
    end, first = sigmas[-1], sigmas[0]
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = model(x, sigma)
        d = to_d(x, sigma, denoised)
        run.report(i, x, denoised)
        dt = sigma_next - sigma
        if sigma_next == end:  # the last step: Euler
            x = x + d * dt
            continue
        x_2 = x + d * dt
        d_2 = to_d(x_2, sigma_next, model(x_2, sigma_next))
        if sigmas[i + 2] == end:  # the step before the last: Heun, weighted by sigma_next over 2 sigma_0
            w2 = sigma_next / (2 * first)
            x = x + (d * (1 - w2) + d_2 * w2) * dt
            continue
        sigma_after = sigmas[i + 2]
        x_3 = x_2 + d_2 * (sigma_after - sigma_next)
        d_3 = to_d(x_3, sigma_after, model(x_3, sigma_after))
        w2, w3 = sigma_next / (3 * first), sigma_after / (3 * first)
        x = x + ((1 - w2 - w3) * d + w2 * d_2 + w3 * d_3) * dt
    return x
