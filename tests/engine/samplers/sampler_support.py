"""Helpers for the sampler tests: SD's training sigmas, analytic noise predictions, latents, one sampling run."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from engine import samplers as S

MS = S.model_sigmas()
SIGMA_MIN, SIGMA_MAX = 0.0292, 14.6146
DATA_MEAN, DATA_STD = 0.3, 0.5
STOCHASTIC = ("euler_ancestral", "dpm_2_ancestral", "dpmpp_sde", "dpmpp_2m_sde")


def gaussian_eps(x_in: torch.Tensor, timestep: torch.Tensor, sigma: float) -> torch.Tensor:
    """The exact eps for data ~ N(DATA_MEAN, DATA_STD^2) per element: nonlinear in sigma, so solvers differ."""
    x = x_in * math.sqrt(sigma**2 + 1)
    x0 = (DATA_STD**2 * x + sigma**2 * DATA_MEAN) / (DATA_STD**2 + sigma**2)
    return (x - x0) / sigma


def point_eps(x0: torch.Tensor) -> Callable[[torch.Tensor, torch.Tensor, float], torch.Tensor]:
    """The exact eps when all data is the single point x0."""
    return lambda x_in, timestep, sigma: (x_in * math.sqrt(sigma**2 + 1) - x0) / sigma


def gaussian_eps_with_uncond(uncond_mean: float = -0.4) -> S.EpsFn:
    """gaussian_eps as the guided prediction, carrying `with_uncond` (the guided and the uncond eps, as the cfg_pp
    samplers ask for them) whose uncond is the exact eps for data ~ N(uncond_mean, DATA_STD^2): a sampler using
    the wrong one of the two shows."""
    def uncond(x_in: torch.Tensor, sigma: float) -> torch.Tensor:
        x = x_in * math.sqrt(sigma**2 + 1)
        return (x - (DATA_STD**2 * x + sigma**2 * uncond_mean) / (DATA_STD**2 + sigma**2)) / sigma

    def eps(x_in: torch.Tensor, timestep: torch.Tensor, sigma: float) -> torch.Tensor:
        return gaussian_eps(x_in, timestep, sigma)

    eps.with_uncond = lambda x_in, timestep, sigma: (gaussian_eps(x_in, timestep, sigma),  # type: ignore[attr-defined]
                                                     uncond(x_in, sigma))
    return eps


def latents(seed: int = 7, shape: tuple[int, ...] = (2, 4, 8, 8)) -> tuple[torch.Tensor, torch.Tensor]:
    """An image-like latent and initial noise for a batch of two."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g) * 0.5, torch.randn(shape, generator=g)


def run(sampler: str, scheduler: str, sigmas: torch.Tensor, latent: torch.Tensor, noise: torch.Tensor,
        seed: int = 42, eps: S.EpsFn = gaussian_eps,
        callback: Callable[[int, int, torch.Tensor], None] | None = None) -> torch.Tensor:
    return S.sample(S.build_scheduler(sampler, scheduler, sigmas, seed), eps, latent, noise, callback=callback)


def sampling_cases(sampler: str, scheduler: str) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(sigmas, start latent) of the four ways a sampler runs: txt2img, img2img at denoise 0.6, and
    KSamplerAdvanced's two halves (the first ends above 0, the second starts from a noisy latent)."""
    image, _ = latents(11)
    return [
        (S.ksampler_sigmas(scheduler, 7, 1.0, MS, sampler_name=sampler), torch.zeros_like(image)),
        (S.ksampler_sigmas(scheduler, 8, 0.6, MS, sampler_name=sampler), image),
        (S.advanced_sigmas(scheduler, 10, 0, 5, False, MS, sampler_name=sampler), torch.zeros_like(image)),
        (S.advanced_sigmas(scheduler, 10, 5, 10000, True, MS, sampler_name=sampler), image * 3),
    ]
