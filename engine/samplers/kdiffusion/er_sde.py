"""ER-SDE-Solver-3 (arXiv 2309.06169): the extended reverse-time SDE solver, ComfyUI's er_sde.

As comfy/k_diffusion/sampling.py 0.3.64 sample_er_sde has it for the discrete (VE) models Noodle runs: a first-order
step scaled by the noise scaler's ratio, up to two more stages from the last steps' denoised estimates (the
integrals over the scaler taken at 200 points), and fresh noise from the seeded default generator.

ComfyUI's noise_scaler is a function; Noodle's option holds what picks it, so a SAMPLER value stays plain data:

    noise_scaler=None     ComfyUI's default ER-SDE scaler, x * (exp(x ** 0.3) + 10)
    noise_scaler=eta      the reverse-time SDE scaler x ** (eta + 1) (a number; eta 0 is the ODE's x)
    noise_scaler=fn       a callable, used as it is (Python callers)

SamplerER_SDE(solver_type, max_stage, eta, s_noise) maps onto these options as its get_sampler does (see
`er_sde_options`): "ODE", and "Reverse-time SDE" at eta 0, set eta and s_noise to 0; "ER-SDE" keeps the default
scaler (its eta does not apply), the other two take noise_scaler=eta. s_noise 0 is then what makes the run
deterministic, which is what KDiffSampler.is_stochastic reads.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from engine.samplers.kdiffusion.base import Denoiser, Run, register

__all__ = ["SOLVER_TYPES", "er_sde", "er_sde_options"]

SOLVER_TYPES: tuple[str, ...] = ("ER-SDE", "Reverse-time SDE", "ODE")  # SamplerER_SDE's choices, in its order
_INTEGRATION_POINTS = 200.0

NoiseScaler = Callable[[torch.Tensor], torch.Tensor]


def er_sde_options(solver_type: str, max_stage: int, eta: float, s_noise: float) -> dict[str, Any]:
    """The er_sde options SamplerER_SDE's inputs give, as its get_sampler computes them."""
    if solver_type not in SOLVER_TYPES:
        raise ValueError(f"unknown ER-SDE solver_type {solver_type!r}; SamplerER_SDE's are {', '.join(SOLVER_TYPES)}")
    if solver_type == "ODE" or (solver_type == "Reverse-time SDE" and eta == 0):
        eta, s_noise = 0.0, 0.0
    return {"s_noise": s_noise, "max_stage": max_stage, "noise_scaler": None if solver_type == "ER-SDE" else eta}


def _default_scaler(x: torch.Tensor) -> torch.Tensor:
    return x * ((x**0.3).exp() + 10.0)


def _scaler(noise_scaler: float | NoiseScaler | None) -> NoiseScaler:
    """The noise scaler function an er_sde option stands for (see the module docstring)."""
    if noise_scaler is None:
        return _default_scaler
    if callable(noise_scaler):
        return noise_scaler
    if isinstance(noise_scaler, bool) or not isinstance(noise_scaler, (int, float)):
        raise ValueError(f"er_sde's noise_scaler is None (ComfyUI's ER-SDE scaler) or the reverse-time SDE's eta "
                         f"(a number >= 0), got {noise_scaler!r}")
    power = float(noise_scaler) + 1.0
    return lambda x: x**power


@register("er_sde", stochastic=True, s_noise=1.0, noise_scaler=None, max_stage=3)
def er_sde(model: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, run: Run, *, s_noise: float,
           noise_scaler: float | NoiseScaler | None, max_stage: int) -> torch.Tensor:
    """ER-SDE-Solver, up to `max_stage` (1 to 3) stages; lambda here is sigma / alpha (sigma for a VE model)."""
    if isinstance(max_stage, bool) or not isinstance(max_stage, int) or not 1 <= max_stage <= 3:
        raise ValueError(f"er_sde's max_stage is 1, 2 or 3 (SamplerER_SDE's range), got {max_stage!r}")
    scale = _scaler(noise_scaler)
    noise = run.default_noise(x)
    points = torch.arange(0, _INTEGRATION_POINTS, dtype=torch.float32, device=x.device)
    lambdas = run.lambda_of(sigmas).neg().exp()  # er_lambda = sigma / alpha, from the half-log SNR as ComfyUI has it
    old_denoised = old_d = None
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = model(x, sigma)
        run.report(i, x, denoised)
        stages = min(max_stage, i + 1)
        if sigma_next == 0:
            x = denoised
        else:
            lambda_s, lambda_t = lambdas[i], lambdas[i + 1]
            alpha_s, alpha_t = sigma / lambda_s, sigma_next / lambda_t
            r = scale(lambda_t) / scale(lambda_s)
            x = (alpha_t / alpha_s) * r * x + alpha_t * (1 - r) * denoised  # stage 1: Euler
            if stages >= 2:
                dt = lambda_t - lambda_s
                step = -dt / _INTEGRATION_POINTS
                at = lambda_t + points * step
                scaled = scale(at)
                d = (denoised - old_denoised) / (lambda_s - lambdas[i - 1])
                x = x + alpha_t * (dt + torch.sum(1 / scaled) * step * scale(lambda_t)) * d
                if stages >= 3:
                    s_u = torch.sum((at - lambda_s) / scaled) * step
                    u = (d - old_d) / ((lambda_s - lambdas[i - 2]) / 2)
                    x = x + alpha_t * (dt**2 / 2 + s_u * scale(lambda_t)) * u
                old_d = d
            if s_noise > 0:
                spread = (lambda_t**2 - lambda_s**2 * r**2).sqrt().nan_to_num(nan=0.0)
                x = x + alpha_t * noise(sigma, sigma_next) * s_noise * spread
        old_denoised = denoised
    return x
