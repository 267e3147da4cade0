"""The CFG++ samplers: each step renoises along the unconditional prediction instead of the guided one.

euler_cfg_pp, euler_ancestral_cfg_pp, dpmpp_2s_ancestral_cfg_pp and dpmpp_2m_cfg_pp, as comfy/k_diffusion/sampling.py
0.3.64 has them for the discrete (VE) models Noodle runs. CFG++ (arXiv 2406.08070) steps to the guided denoised
estimate but takes the noise direction from the unconditional one, so each function reads `run.uncond_denoised`
right after each model call: ComfyUI's post_cfg_function hands them args["uncond_denoised"] the same way, with
disable_cfg1_optimization (registered with wants_uncond, so cfg 1 still runs the uncond pass).
"""

from __future__ import annotations

import torch

from engine.samplers.kdiffusion.base import Denoiser, Run, ancestral_step, register, to_d


def _uncond(run: Run) -> torch.Tensor:
    """The unconditional denoised estimate of the model call just made."""
    if run.uncond_denoised is None:
        raise RuntimeError("a cfg_pp sampler needs the unconditional estimate of each model call; this run's "
                           "model did not set run.uncond_denoised (register the sampler with wants_uncond=True)")
    return run.uncond_denoised


@register("euler_ancestral_cfg_pp", stochastic=True, wants_uncond=True, eta=1.0, s_noise=1.0)
def euler_ancestral_cfg_pp(model: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, run: Run, *, eta: float,
                           s_noise: float) -> torch.Tensor:
    """Ancestral Euler (CFG++): down to the guided estimate, back along the uncond direction, then fresh noise.

    alpha = sigma * exp(lambda(sigma)) is 1 for a VE model up to rounding; it is kept as ComfyUI computes it.
    """
    noise = run.default_noise(x)
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = model(x, sigma)
        uncond = _uncond(run)
        run.report(i, x, denoised)
        if sigma_next == 0:
            x = denoised
            continue
        alpha_s = sigma * run.lambda_of(sigma).exp()
        alpha_t = sigma_next * run.lambda_of(sigma_next).exp()
        d = to_d(x, sigma, alpha_s * uncond)
        down, up = ancestral_step(sigma / alpha_s, sigma_next / alpha_t, eta)
        x = alpha_t * denoised + (alpha_t * down) * d
        if eta > 0 and s_noise > 0:
            x = x + alpha_t * noise(sigma, sigma_next) * s_noise * up
    return x


@register("euler_cfg_pp", stochastic=False, wants_uncond=True)
def euler_cfg_pp(model: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, run: Run) -> torch.Tensor:
    """Euler (CFG++): sample_euler_cfg_pp is the ancestral one at eta 0 and s_noise 0, so no noise is drawn."""
    return euler_ancestral_cfg_pp(model, x, sigmas, run, eta=0.0, s_noise=0.0)


@register("dpmpp_2s_ancestral_cfg_pp", stochastic=True, wants_uncond=True, eta=1.0, s_noise=1.0)
def dpmpp_2s_ancestral_cfg_pp(model: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, run: Run, *, eta: float,
                              s_noise: float) -> torch.Tensor:
    """DPM-Solver++(2S) ancestral (CFG++), the midpoint at r = 1/2 in log-sigma.

    x + (denoised - uncond) moves x onto the uncond direction. As in ComfyUI, the full step reads the uncond
    estimate of the midpoint call (the latest one), not the first call's.
    """
    noise = run.default_noise(x)
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = model(x, sigma)
        down, up = ancestral_step(sigma, sigma_next, eta)
        run.report(i, x, denoised)
        if down == 0:
            x = denoised + to_d(x, sigma, _uncond(run)) * down
        else:
            t, t_next = run.lambda_of(sigma), run.lambda_of(down)
            h = t_next - t
            s = t + 0.5 * h
            sigma_t = run.sigma_of(t)
            x_2 = (run.sigma_of(s) / sigma_t) * (x + (denoised - _uncond(run))) - (-h * 0.5).expm1() * denoised
            denoised_2 = model(x_2, run.sigma_of(s))
            x = (run.sigma_of(t_next) / sigma_t) * (x + (denoised - _uncond(run))) - (-h).expm1() * denoised_2
        if sigma_next > 0:
            x = x + noise(sigma, sigma_next) * s_noise * up
    return x


@register("dpmpp_2m_cfg_pp", stochastic=False, wants_uncond=True)
def dpmpp_2m_cfg_pp(model: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, run: Run) -> torch.Tensor:
    """DPM-Solver++(2M) (CFG++): the multistep correction is taken between this guided estimate and the last
    step's uncond one; the step into sigma 0 (h infinite) lands on the guided estimate."""
    old_uncond: torch.Tensor | None = None
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = model(x, sigma)
        uncond = _uncond(run)
        run.report(i, x, denoised)
        t, t_next = run.lambda_of(sigma), run.lambda_of(sigma_next)
        h = t_next - t
        if old_uncond is None or sigma_next == 0:
            mix = -torch.exp(-h) * uncond
        else:
            r = (t - run.lambda_of(sigmas[i - 1])) / h
            mix = -torch.exp(-h) * uncond - torch.expm1(-h) * (1 / (2 * r)) * (denoised - old_uncond)
        x = denoised + mix + torch.exp(-h) * x
        old_uncond = uncond
    return x
