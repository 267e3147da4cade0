"""RES multistep (arXiv 2308.02157): a second-order exponential multistep in log-sigma, and its variants.

res_multistep, res_multistep_ancestral and their cfg_pp forms are one algorithm in ComfyUI 0.3.64
(comfy/k_diffusion/sampling.py res_multistep), its wrappers fixing eta and cfg_pp: the plain ones step
deterministically (eta 0, no noise); the ancestral ones go down to the ancestral step's sigma and add
default-sampler noise back (eta, s_noise). The first step, and a step down to sigma 0, are Euler steps.

CFG++ (the cfg_pp forms) steps with the unconditional denoised estimate where the plain form uses the guided one,
and moves x by the guidance (denoised - uncond) before each multistep.
"""

from __future__ import annotations

import torch

from engine.samplers.kdiffusion.base import Denoiser, Run, ancestral_step, register, to_d


def _t(sigma: torch.Tensor) -> torch.Tensor:
    """res_multistep's t_fn: -log(sigma), fixed in ComfyUI's code whatever the model's sampling."""
    return sigma.log().neg()


def _phi_1(h: torch.Tensor) -> torch.Tensor:
    return torch.expm1(h) / h


def _phi_2(h: torch.Tensor) -> torch.Tensor:
    return (_phi_1(h) - 1.0) / h


def _res_multistep(model: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, run: Run, *, s_noise: float,
                   eta: float, cfg_pp: bool) -> torch.Tensor:
    noise = run.default_noise(x)
    old_denoised: torch.Tensor | None = None  # the previous step's (uncond, for cfg_pp) denoised estimate
    old_down: torch.Tensor | None = None
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = model(x, sigma)
        # what the step extrapolates from: ComfyUI's post_cfg_function hands cfg_pp the uncond estimate
        base = run.uncond_denoised if cfg_pp else denoised
        if base is None:
            raise RuntimeError("a cfg_pp sampler needs the uncond estimate, and the guidance gave none")
        down, up = ancestral_step(sigma, sigma_next, eta)
        run.report(i, x, denoised)
        if down == 0 or old_denoised is None or old_down is None:
            if cfg_pp:
                x = denoised + to_d(x, sigma, base) * down
            else:
                x = x + to_d(x, sigma, denoised) * (down - sigma)
        else:
            h = _t(down) - _t(sigma)
            c2 = (_t(sigmas[i - 1]) - _t(old_down)) / h
            phi_1, phi_2 = _phi_1(-h), _phi_2(-h)
            b1 = torch.nan_to_num(phi_1 - phi_2 / c2, nan=0.0)
            b2 = torch.nan_to_num(phi_2 / c2, nan=0.0)
            if cfg_pp:
                x = x + (denoised - base)
            x = (-h).exp() * x + h * (b1 * base + b2 * old_denoised)
        if sigma_next > 0 and eta:  # ComfyUI draws here even at eta 0, times sigma_up 0: nothing to add then
            x = x + noise(sigma, sigma_next) * s_noise * up
        old_denoised, old_down = base, down
    return x


@register("res_multistep", stochastic=False, s_noise=1.0)
def res_multistep(model: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, run: Run, *,
                  s_noise: float) -> torch.Tensor:
    return _res_multistep(model, x, sigmas, run, s_noise=s_noise, eta=0.0, cfg_pp=False)


@register("res_multistep_cfg_pp", stochastic=False, wants_uncond=True, s_noise=1.0)
def res_multistep_cfg_pp(model: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, run: Run, *,
                         s_noise: float) -> torch.Tensor:
    return _res_multistep(model, x, sigmas, run, s_noise=s_noise, eta=0.0, cfg_pp=True)


@register("res_multistep_ancestral", stochastic=True, eta=1.0, s_noise=1.0)
def res_multistep_ancestral(model: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, run: Run, *, eta: float,
                            s_noise: float) -> torch.Tensor:
    return _res_multistep(model, x, sigmas, run, s_noise=s_noise, eta=eta, cfg_pp=False)


@register("res_multistep_ancestral_cfg_pp", stochastic=True, wants_uncond=True, eta=1.0, s_noise=1.0)
def res_multistep_ancestral_cfg_pp(model: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, run: Run, *,
                                   eta: float, s_noise: float) -> torch.Tensor:
    return _res_multistep(model, x, sigmas, run, s_noise=s_noise, eta=eta, cfg_pp=True)
