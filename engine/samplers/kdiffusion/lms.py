"""lms at any order: the linear multistep method over the last `order` slopes (x - denoised) / sigma.

KSampler's lms (order 4) runs on diffusers' LMSDiscreteScheduler (engine/samplers/names.py SPECS); SamplerLMS
sets another order, 1 to 100, which diffusers' scheduler takes only per step call, so this step runs it instead,
as comfy/k_diffusion/sampling.py 0.3.64 sample_lms: the order grows from 1 with the slopes at hand, each
coefficient is the integral over [sigma_i, sigma_i+1] of a Lagrange basis polynomial through the last sigmas
(scipy's quad at ComfyUI's epsrel 1e-4), and the step into sigma 0 returns the denoised estimate.
"""

from __future__ import annotations

import scipy.integrate
import torch

from engine.samplers.kdiffusion.base import Denoiser, Run, register, to_d

__all__ = ["lms_coefficient"]


def lms_coefficient(order: int, t: list[float], i: int, j: int) -> float:
    """linear_multistep_coeff: the weight of the slope j steps back, for the step from t[i] to t[i + 1]."""
    if order - 1 > i:
        raise ValueError(f"lms order {order} is too high for step {i}: it needs {order} slopes, there are {i + 1}")

    def basis(tau: float) -> float:
        prod = 1.0
        for k in range(order):
            if k != j:
                prod *= (tau - t[i - k]) / (t[i - j] - t[i - k])
        return prod
    return scipy.integrate.quad(basis, t[i], t[i + 1], epsrel=1e-4)[0]


@register("lms", stochastic=False, order=4)
def lms(model: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, run: Run, *, order: int) -> torch.Tensor:
    if order < 1:
        raise ValueError(f"lms order {order} takes no slope at all; use 1 or more")
    t = sigmas.detach().cpu().tolist()
    slopes: list[torch.Tensor] = []
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i])
        slopes = [*slopes, to_d(x, sigmas[i], denoised)][-order:]
        run.report(i, x, denoised)
        if sigmas[i + 1] == 0:
            x = denoised
            continue
        current = min(i + 1, order)
        weights = [lms_coefficient(current, t, i, j) for j in range(current)]
        x = x + sum(weight * slope for weight, slope in zip(weights, reversed(slopes)))
    return x
