"""DPM-Solver++ SDE samplers: exponential-integrator steps in half-log-SNR with Brownian-tree step noise.

dpmpp_sde (single-step, a model call at the point r of each step), dpmpp_2m_sde and dpmpp_2m_sde_heun
(2nd-order multistep, midpoint or heun correction), dpmpp_3m_sde (3rd-order multistep), as
comfy/k_diffusion/sampling.py 0.3.64 has them. Their noise is a torchsde Brownian tree over the run's sigmas
(the smallest positive one to the largest), seeded with the job seed, so a step's noise depends only on the
sigmas it spans: built on the CPU for the plain names, on the model's device for each `_gpu` twin, over the
same range, as ComfyUI's wrappers build it. Diffusers runs dpmpp_sde and dpmpp_2m_sde at ComfyUI's defaults
(names.py SPECS); these steps run them with a Sampler* node's options, and run the rest at any options.
"""

from __future__ import annotations

import functools

import torch

from engine.samplers.kdiffusion.base import Denoiser, NoiseSampler, Run, SamplerFn, ancestral_step, register

SOLVER_TYPES = ("midpoint", "heun")  # sample_dpmpp_2m_sde's solver_type


def _register_pair(name: str, fn: SamplerFn, **defaults: object) -> None:
    """Register `name` (Brownian tree on the CPU) and `name`_gpu (on the model's device): one step, two trees."""
    for suffix, cpu in (("", True), ("_gpu", False)):
        register(name + suffix, stochastic=True, **defaults)(functools.partial(fn, cpu=cpu))


def _tree(run: Run, x: torch.Tensor, sigmas: torch.Tensor, cpu: bool) -> NoiseSampler:
    """BrownianTreeNoiseSampler over [min positive sigma, max sigma], which needs a positive sigma to span."""
    if not bool((sigmas > 0).any()):
        raise ValueError(f"the DPM-Solver++ SDE samplers need a sigma above 0 to draw their noise between; "
                         f"got sigmas {sigmas.tolist()}")
    return run.brownian(x, sigmas, cpu=cpu)


def _first_order(x: torch.Tensor, denoised: torch.Tensor, lambda_s: torch.Tensor, lambda_to: torch.Tensor,
                 alpha_s: torch.Tensor, alpha_to: torch.Tensor,
                 eta: float) -> tuple[torch.Tensor, torch.Tensor | float]:
    """One DPM-Solver++(1) step from lambda_s toward lambda_to, stopping at the ancestral step's sigma_down;
    returns x there and the sigma_up of the noise the caller adds (dpmpp_sde's two sub-steps)."""
    down, up = ancestral_step(lambda_s.neg().exp(), lambda_to.neg().exp(), eta)
    h = down.log().neg() - lambda_s
    return (alpha_to / alpha_s) * (-h).exp() * x - alpha_to * (-h).expm1() * denoised, up


def dpmpp_sde(model: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, run: Run, *, cpu: bool, eta: float,
              s_noise: float, r: float) -> torch.Tensor:
    """DPM-Solver++ (stochastic): a noised sub-step to lambda_s + r*h, then the full step from both estimates."""
    if not r > 0:
        raise ValueError(f"dpmpp_sde's r must be above 0 (its step weighs the two estimates by 1/(2r)); got {r}")
    noise = _tree(run, x, sigmas, cpu)
    noisy = eta > 0 and s_noise > 0
    fac = 1 / (2 * r)
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = model(x, sigma)
        run.report(i, x, denoised)
        if sigma_next == 0:
            x = denoised  # the step into 0 lands on the denoised estimate
            continue
        lambda_s, lambda_t = run.lambda_of(sigma), run.lambda_of(sigma_next)
        h = lambda_t - lambda_s
        lambda_mid = lambda_s + r * h
        sigma_mid = run.sigma_of(lambda_mid)
        # alpha = sigma * e^lambda: 1 for the VE models Noodle runs, kept so the steps follow lambda_of/sigma_of
        alpha_s, alpha_mid, alpha_t = sigma * lambda_s.exp(), sigma_mid * lambda_mid.exp(), sigma_next * lambda_t.exp()
        x_mid, up = _first_order(x, denoised, lambda_s, lambda_mid, alpha_s, alpha_mid, eta)
        if noisy:
            x_mid = x_mid + alpha_mid * noise(sigma, sigma_mid) * s_noise * up
        denoised_mid = model(x_mid, sigma_mid)
        x, up = _first_order(x, (1 - fac) * denoised + fac * denoised_mid, lambda_s, lambda_t, alpha_s, alpha_t, eta)
        if noisy:
            x = x + alpha_t * noise(sigma, sigma_next) * s_noise * up
    return x


def _sde_base(x: torch.Tensor, denoised: torch.Tensor, sigma: torch.Tensor, sigma_next: torch.Tensor,
              h: torch.Tensor, h_eta: torch.Tensor, alpha_t: torch.Tensor, eta: float) -> torch.Tensor:
    """The multistep SDE samplers' first-order part: x decayed by e^(-h*eta), plus the denoised estimate."""
    return sigma_next / sigma * (-h * eta).exp() * x + alpha_t * (-h_eta).expm1().neg() * denoised


def _sde_noise(noise: NoiseSampler, sigma: torch.Tensor, sigma_next: torch.Tensor, h: torch.Tensor, eta: float,
               s_noise: float) -> torch.Tensor:
    """The multistep SDE samplers' step noise: sigma_next * sqrt(1 - e^(-2*h*eta)) of a unit Brownian increment."""
    return noise(sigma, sigma_next) * sigma_next * (-2 * h * eta).expm1().neg().sqrt() * s_noise


def dpmpp_2m_sde(model: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, run: Run, *, cpu: bool, eta: float,
                 s_noise: float, solver_type: str) -> torch.Tensor:
    """DPM-Solver++(2M) SDE: the last step's estimate corrects this one's, by the midpoint or the heun rule."""
    if solver_type not in SOLVER_TYPES:
        raise ValueError(f"solver_type {solver_type!r} is not one of ComfyUI's: {', '.join(SOLVER_TYPES)}")
    noise = _tree(run, x, sigmas, cpu)
    old_denoised, h, h_last = None, None, None
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = model(x, sigma)
        run.report(i, x, denoised)
        if sigma_next == 0:
            x = denoised
        else:
            lambda_s, lambda_t = run.lambda_of(sigma), run.lambda_of(sigma_next)
            h = lambda_t - lambda_s
            h_eta = h * (eta + 1)
            alpha_t = sigma_next * lambda_t.exp()
            x = _sde_base(x, denoised, sigma, sigma_next, h, h_eta, alpha_t, eta)
            if old_denoised is not None:
                r = h_last / h
                if solver_type == "heun":
                    x = x + alpha_t * ((-h_eta).expm1().neg() / (-h_eta) + 1) * (1 / r) * (denoised - old_denoised)
                else:
                    x = x + 0.5 * alpha_t * (-h_eta).expm1().neg() * (1 / r) * (denoised - old_denoised)
            if eta > 0 and s_noise > 0:
                x = x + _sde_noise(noise, sigma, sigma_next, h, eta, s_noise)
        old_denoised, h_last = denoised, h  # h stays the last step's across the step into 0, as ComfyUI's does
    return x


def dpmpp_3m_sde(model: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, run: Run, *, cpu: bool, eta: float,
                 s_noise: float) -> torch.Tensor:
    """DPM-Solver++(3M) SDE: the last two steps' estimates give 1st and 2nd differences (2M on the 2nd step)."""
    noise = _tree(run, x, sigmas, cpu)
    denoised_1, denoised_2 = None, None
    h, h_1, h_2 = None, None, None
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = model(x, sigma)
        run.report(i, x, denoised)
        if sigma_next == 0:
            x = denoised
        else:
            lambda_s, lambda_t = run.lambda_of(sigma), run.lambda_of(sigma_next)
            h = lambda_t - lambda_s
            h_eta = h * (eta + 1)
            alpha_t = sigma_next * lambda_t.exp()
            x = _sde_base(x, denoised, sigma, sigma_next, h, h_eta, alpha_t, eta)
            if h_1 is not None:
                phi_2 = h_eta.neg().expm1() / h_eta + 1
                r0 = h_1 / h
                d1_0 = (denoised - denoised_1) / r0
                if h_2 is not None:
                    r1 = h_2 / h
                    d1_1 = (denoised_1 - denoised_2) / r1
                    d1 = d1_0 + (d1_0 - d1_1) * r0 / (r0 + r1)
                    d2 = (d1_0 - d1_1) / (r0 + r1)
                    phi_3 = phi_2 / h_eta - 0.5
                    x = x + (alpha_t * phi_2) * d1 - (alpha_t * phi_3) * d2
                else:
                    x = x + (alpha_t * phi_2) * d1_0
            if eta > 0 and s_noise > 0:
                x = x + _sde_noise(noise, sigma, sigma_next, h, eta, s_noise)
        denoised_1, denoised_2 = denoised, denoised_1
        h_1, h_2 = h, h_1
    return x


_register_pair("dpmpp_sde", dpmpp_sde, eta=1.0, s_noise=1.0, r=0.5)
_register_pair("dpmpp_2m_sde", dpmpp_2m_sde, eta=1.0, s_noise=1.0, solver_type="midpoint")
_register_pair("dpmpp_2m_sde_heun", dpmpp_2m_sde, eta=1.0, s_noise=1.0, solver_type="heun")
_register_pair("dpmpp_3m_sde", dpmpp_3m_sde, eta=1.0, s_noise=1.0)
