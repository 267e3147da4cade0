"""engine/samplers/kdiffusion/cfg_pp.py against ComfyUI 0.3.64's CFG++ samplers, rewritten here as references.

comfy/k_diffusion/sampling.py sample_euler_cfg_pp, sample_euler_ancestral_cfg_pp, sample_dpmpp_2s_ancestral_cfg_pp
and sample_dpmpp_2m_cfg_pp for an EPS model, their uncond estimate from the post_cfg_function. The eps function
carries `with_uncond`, whose uncond differs from the guided prediction, so a step reading the wrong one fails.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import pytest
import torch

from engine import samplers as S
from engine.samplers.kdiffusion import KDIFFUSION
from tests.engine.samplers.sampler_support import MS, gaussian_eps, gaussian_eps_with_uncond, latents, sampling_cases

CFG_PP = ("euler_cfg_pp", "euler_ancestral_cfg_pp", "dpmpp_2s_ancestral_cfg_pp", "dpmpp_2m_cfg_pp")
SEED = 99


def cases(sampler: str, scheduler: str) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return sampling_cases(sampler, scheduler)


def ours(sampler: str, scheduler: str, sigmas: torch.Tensor, latent: torch.Tensor, noise: torch.Tensor,
         eps: S.EpsFn, options: dict[str, Any] | None = None) -> torch.Tensor:
    return S.sample(S.build_scheduler(sampler, scheduler, sigmas, SEED, options=options), eps, latent, noise)


# --- ComfyUI's algorithms, compactly ---------------------------------------------------------------------------

Model = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def comfy_model(eps: S.EpsFn) -> Model:
    """CFGGuider's denoised estimate and the post_cfg_function's args["uncond_denoised"], for an EPS model."""
    def model(x: torch.Tensor, sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        s = float(sigma)
        guided, uncond = eps.with_uncond(x / math.sqrt(s * s + 1), torch.tensor(0.0), s)
        return x - guided * sigma, x - uncond * sigma
    return model


def get_ancestral_step(sigma_from: torch.Tensor, sigma_to: torch.Tensor, eta: float) -> tuple[Any, Any]:
    if not eta:
        return sigma_to, 0.0
    up = min(sigma_to, eta * (sigma_to**2 * (sigma_from**2 - sigma_to**2) / sigma_from**2) ** 0.5)
    return (sigma_to**2 - up**2) ** 0.5, up


def comfy_cfg_pp(sampler: str, model: Model, sigmas: torch.Tensor, latent: torch.Tensor, noise: torch.Tensor,
                 seed: int, eta: float = 1.0, s_noise: float = 1.0) -> torch.Tensor:
    """KSAMPLER.sample + sample_<sampler>: lambda = -log(sigma) (sigma_to_half_log_snr of a discrete model)."""
    full = math.isclose(float(MS.float()[-1]), float(sigmas[0]), rel_tol=1e-5)
    x = noise * ((1 + sigmas[0] ** 2) ** 0.5 if full else sigmas[0]) + latent
    generator = torch.Generator().manual_seed(seed)  # default_noise_sampler(x, seed)
    draw = lambda: torch.randn(x.size(), dtype=x.dtype, generator=generator)  # noqa: E731
    lam = lambda s: s.log().neg()  # noqa: E731
    if sampler == "euler_cfg_pp":
        sampler, eta, s_noise = "euler_ancestral_cfg_pp", 0.0, 0.0
    old_uncond = None
    for i in range(len(sigmas) - 1):
        s, s_next = sigmas[i], sigmas[i + 1]
        denoised, uncond = model(x, s)
        if sampler == "euler_ancestral_cfg_pp":
            if s_next == 0:
                x = denoised
                continue
            alpha_s, alpha_t = s * lam(s).exp(), s_next * lam(s_next).exp()
            d = (x - alpha_s * uncond) / s
            down, up = get_ancestral_step(s / alpha_s, s_next / alpha_t, eta)
            x = alpha_t * denoised + alpha_t * down * d
            if eta > 0 and s_noise > 0:
                x = x + alpha_t * draw() * s_noise * up
        elif sampler == "dpmpp_2s_ancestral_cfg_pp":
            down, up = get_ancestral_step(s, s_next, eta)
            if down == 0:
                x = denoised + (x - uncond) / s * down
            else:
                t, t_next = lam(s), lam(down)
                h = t_next - t
                mid = (-(t + h / 2)).exp()
                x_2 = (mid / (-t).exp()) * (x + (denoised - uncond)) - (-h / 2).expm1() * denoised
                denoised_2, uncond = model(x_2, mid)  # the midpoint call's uncond replaces the first's
                x = ((-t_next).exp() / (-t).exp()) * (x + (denoised - uncond)) - (-h).expm1() * denoised_2
            if s_next > 0:
                x = x + draw() * s_noise * up
        elif sampler == "dpmpp_2m_cfg_pp":
            t, t_next = lam(s), lam(s_next)
            h = t_next - t
            if old_uncond is None or s_next == 0:
                mix = -torch.exp(-h) * uncond
            else:
                r = (t - lam(sigmas[i - 1])) / h
                mix = -torch.exp(-h) * uncond - torch.expm1(-h) * (1 / (2 * r)) * (denoised - old_uncond)
            x = denoised + mix + torch.exp(-h) * x
            old_uncond = uncond
    return x


# --- the comparisons -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("sampler", CFG_PP)
@pytest.mark.parametrize("scheduler", ["normal", "karras", "beta", "exponential"])
def test_cfg_pp_matches_comfy(sampler: str, scheduler: str) -> None:
    _, noise = latents(11)
    eps = gaussian_eps_with_uncond()
    for sigmas, latent in cases(sampler, scheduler):
        theirs = comfy_cfg_pp(sampler, comfy_model(eps), sigmas, latent, noise, SEED)
        torch.testing.assert_close(ours(sampler, scheduler, sigmas, latent, noise, eps), theirs,
                                   rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("sampler", ["euler_ancestral_cfg_pp", "dpmpp_2s_ancestral_cfg_pp"])
def test_cfg_pp_ancestral_options_match_comfy(sampler: str) -> None:
    _, noise = latents(11)
    eps = gaussian_eps_with_uncond()
    for options in ({"eta": 0.5, "s_noise": 0.7}, {"eta": 0.0, "s_noise": 1.0}, {"eta": 1.0, "s_noise": 0.0}):
        for sigmas, latent in cases(sampler, "karras"):
            theirs = comfy_cfg_pp(sampler, comfy_model(eps), sigmas, latent, noise, SEED, **options)
            torch.testing.assert_close(ours(sampler, "karras", sigmas, latent, noise, eps, options), theirs,
                                       rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("sampler", CFG_PP)
def test_cfg_pp_steps_along_the_uncond_estimate(sampler: str) -> None:
    """The same guided prediction with another uncond gives another result: the steps read the uncond."""
    _, noise = latents(11)
    sigmas = S.ksampler_sigmas("karras", 7, 1.0, MS, sampler_name=sampler)
    latent = torch.zeros_like(noise)
    with_uncond = ours(sampler, "karras", sigmas, latent, noise, gaussian_eps_with_uncond())
    guided_only = ours(sampler, "karras", sigmas, latent, noise, gaussian_eps)  # uncond = the guided eps
    assert float((with_uncond - guided_only).abs().max()) > 1e-2


def test_cfg_pp_samplers_want_the_uncond_and_are_classified() -> None:
    assert all(KDIFFUSION[name].wants_uncond for name in CFG_PP)
    assert S.is_deterministic("euler_cfg_pp") and S.is_deterministic("dpmpp_2m_cfg_pp")
    assert not S.is_deterministic("euler_ancestral_cfg_pp")
    assert S.is_deterministic("euler_ancestral_cfg_pp", {"eta": 0.0})
    assert S.is_deterministic("dpmpp_2s_ancestral_cfg_pp", {"s_noise": 0.0})
