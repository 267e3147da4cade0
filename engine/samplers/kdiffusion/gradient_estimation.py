"""Gradient estimation (openreview o2ND9v0CeK): Euler steps corrected by the change in the ODE derivative.

Each step after the first adds (ge_gamma - 1) * (d - d_prev) * dt to the Euler step; the step into sigma 0 ends
on the denoised estimate. The cfg_pp form takes d from the unconditional denoised estimate and steps from the
guided one (x = denoised + d * sigma_next), as comfy/k_diffusion/sampling.py 0.3.64 has it. No noise is drawn.
"""

from __future__ import annotations

import torch

from engine.samplers.kdiffusion.base import Denoiser, Run, register, to_d


def _gradient_estimation(model: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, run: Run, *, ge_gamma: float,
                         cfg_pp: bool) -> torch.Tensor:
    old_d: torch.Tensor | None = None
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = model(x, sigma)
        base = run.uncond_denoised if cfg_pp else denoised  # read right after the call that set it
        if base is None:
            raise RuntimeError("a cfg_pp sampler needs the uncond estimate, and the guidance gave none")
        d = to_d(x, sigma, base)
        run.report(i, x, denoised)
        dt = sigma_next - sigma
        if sigma_next == 0:
            x = denoised
        else:
            x = denoised + d * sigma_next if cfg_pp else x + d * dt
            if old_d is not None:
                x = x + (ge_gamma - 1) * (d - old_d) * dt
        old_d = d
    return x


@register("gradient_estimation", stochastic=False, ge_gamma=2.0)
def gradient_estimation(model: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, run: Run, *,
                        ge_gamma: float) -> torch.Tensor:
    return _gradient_estimation(model, x, sigmas, run, ge_gamma=ge_gamma, cfg_pp=False)


@register("gradient_estimation_cfg_pp", stochastic=False, wants_uncond=True, ge_gamma=2.0)
def gradient_estimation_cfg_pp(model: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, run: Run, *,
                               ge_gamma: float) -> torch.Tensor:
    return _gradient_estimation(model, x, sigmas, run, ge_gamma=ge_gamma, cfg_pp=True)
