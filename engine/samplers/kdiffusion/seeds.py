"""SEEDS (arXiv 2305.14267): stochastic explicit exponential derivative-free solvers, ComfyUI's seeds_2 and seeds_3.

As comfy/k_diffusion/sampling.py 0.3.64 has them (VP data prediction) for the discrete (VE) models Noodle runs:
each step makes 2 or 3 model calls at intermediate half-log-SNR points (fractions r of the step), and with eta > 0
adds noise at every stage, carried from one stage to the next so the stages share one Brownian path. The noise
comes from the seeded default generator. eta 0 or s_noise 0 draw nothing (the ODE solver).
"""

from __future__ import annotations

import torch

from engine.samplers.kdiffusion.base import Denoiser, Run, register


def _phi_1(h: torch.Tensor) -> torch.Tensor:
    """h * phi_1(h) of the exponential integrators: expm1(h)."""
    return torch.expm1(h)


def _phi_2(h: torch.Tensor) -> torch.Tensor:
    """h * phi_2(h): (expm1(h) - h) / h."""
    return (torch.expm1(h) - h) / h


def _carry(noise: torch.Tensor, fraction: torch.Tensor, fresh: torch.Tensor) -> torch.Tensor:
    """The last stage's noise decayed over `fraction` (= (r_from - r_to) * h * eta, <= 0) plus the fresh part."""
    return noise * fraction.exp() + fraction.mul(2).expm1().neg().sqrt() * fresh


@register("seeds_2", stochastic=True, eta=1.0, s_noise=1.0, r=0.5)
def seeds_2(model: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, run: Run, *, eta: float, s_noise: float,
            r: float) -> torch.Tensor:
    """SEEDS-2: one intermediate call at fraction r of the step; the final estimate mixes both calls 1/(2r)."""
    noise = run.default_noise(x)
    inject = eta > 0 and s_noise > 0
    mix = 1 / (2 * r)
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = model(x, sigma)
        run.report(i, x, denoised)
        if sigma_next == 0:
            x = denoised
            continue
        lambda_s, lambda_t = run.lambda_of(sigma), run.lambda_of(sigma_next)
        h = lambda_t - lambda_s
        h_eta = h * (eta + 1)
        lambda_1 = torch.lerp(lambda_s, lambda_t, r)
        sigma_1 = run.sigma_of(lambda_1)
        alpha_1, alpha_t = sigma_1 * lambda_1.exp(), sigma_next * lambda_t.exp()

        x_2 = sigma_1 / sigma * (-r * h * eta).exp() * x - alpha_1 * _phi_1(-r * h_eta) * denoised
        if inject:
            sde = (-2 * r * h * eta).expm1().neg().sqrt() * noise(sigma, sigma_1)
            x_2 = x_2 + sde * sigma_1 * s_noise
        denoised_2 = model(x_2, sigma_1)

        denoised_d = torch.lerp(denoised, denoised_2, mix)
        x = sigma_next / sigma * (-h * eta).exp() * x - alpha_t * _phi_1(-h_eta) * denoised_d
        if inject:
            sde = _carry(sde, (r - 1) * h * eta, noise(sigma_1, sigma_next))
            x = x + sde * sigma_next * s_noise
    return x


@register("seeds_3", stochastic=True, eta=1.0, s_noise=1.0, r_1=1.0 / 3, r_2=2.0 / 3)
def seeds_3(model: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, run: Run, *, eta: float, s_noise: float,
            r_1: float, r_2: float) -> torch.Tensor:
    """SEEDS-3: intermediate calls at fractions r_1 and r_2 of the step, combined with phi_1/phi_2 weights."""
    noise = run.default_noise(x)
    inject = eta > 0 and s_noise > 0
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = model(x, sigma)
        run.report(i, x, denoised)
        if sigma_next == 0:
            x = denoised
            continue
        lambda_s, lambda_t = run.lambda_of(sigma), run.lambda_of(sigma_next)
        h = lambda_t - lambda_s
        h_eta = h * (eta + 1)
        lambda_1, lambda_2 = torch.lerp(lambda_s, lambda_t, r_1), torch.lerp(lambda_s, lambda_t, r_2)
        sigma_1, sigma_2 = run.sigma_of(lambda_1), run.sigma_of(lambda_2)
        alpha_1, alpha_2 = sigma_1 * lambda_1.exp(), sigma_2 * lambda_2.exp()
        alpha_t = sigma_next * lambda_t.exp()

        x_2 = sigma_1 / sigma * (-r_1 * h * eta).exp() * x - alpha_1 * _phi_1(-r_1 * h_eta) * denoised
        if inject:
            sde = (-2 * r_1 * h * eta).expm1().neg().sqrt() * noise(sigma, sigma_1)
            x_2 = x_2 + sde * sigma_1 * s_noise
        denoised_2 = model(x_2, sigma_1)

        a3_2 = r_2 / r_1 * _phi_2(-r_2 * h_eta)
        a3_1 = _phi_1(-r_2 * h_eta) - a3_2
        x_3 = sigma_2 / sigma * (-r_2 * h * eta).exp() * x - alpha_2 * (a3_1 * denoised + a3_2 * denoised_2)
        if inject:
            sde = _carry(sde, (r_1 - r_2) * h * eta, noise(sigma_1, sigma_2))
            x_3 = x_3 + sde * sigma_2 * s_noise
        denoised_3 = model(x_3, sigma_2)

        b3 = _phi_2(-h_eta) / r_2
        b1 = _phi_1(-h_eta) - b3
        x = sigma_next / sigma * (-h * eta).exp() * x - alpha_t * (b1 * denoised + b3 * denoised_3)
        if inject:
            sde = _carry(sde, (r_2 - 1) * h * eta, noise(sigma_2, sigma_next))
            x = x + sde * sigma_next * s_noise
    return x
