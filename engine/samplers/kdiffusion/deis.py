"""DEIS (diffusion exponential integrator sampler, "tAB" form): multistep in the VP time of EDM's schedule.

ComfyUI 0.3.64's sample_deis (after zju-pi/diff-sampler's port of qsh-zh/deis) maps each sigma to the time t of
a VP schedule fitted to EDM's range (sigma 0.002..80, epsilon_s 1e-3), and weighs the last derivatives
(x - denoised) / sigma with the integral, over [t_i, t_i+1], of the exponential integrator's integrand times each
derivative's Lagrange basis polynomial in t. ComfyUI integrates by a 10000-point sum over a linspace, in float32;
Noodle sums the same points the same way, so the weights agree to float rounding. The first step and a step
into sigma 0 are Euler steps. No noise is drawn.
"""

from __future__ import annotations

from collections import deque

import torch

from engine.samplers.kdiffusion.base import Denoiser, Run, register, to_d

# edm2t's defaults: the EDM range the VP schedule is fitted to, and the quadrature's point count
_EDM_SIGMA_MIN, _EDM_SIGMA_MAX, _EPSILON_S = 0.002, 80.0, 1e-3
_POINTS = 10_000


def vp_times(sigmas: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """edm2t: each sigma's VP time t (solving sigma^2 + 1 = exp(beta_d t^2 / 2 + beta_min t)), and the
    schedule's beta(0), beta(1); in float32 as ComfyUI computes them."""
    log_min = torch.tensor(_EDM_SIGMA_MIN).square().add(1).log()
    log_max = torch.tensor(_EDM_SIGMA_MAX).square().add(1).log()
    beta_d = 2 * (log_min / _EPSILON_S - log_max) / (_EPSILON_S - 1)
    beta_min = log_max - 0.5 * beta_d
    sigmas = sigmas.detach().float().cpu()
    times = ((beta_min**2 + 2 * beta_d * (sigmas**2 + 1).log()).sqrt() - beta_min) / beta_d
    return times, beta_min, beta_d + beta_min


def _integrand(taus: torch.Tensor, beta_0: torch.Tensor, beta_1: torch.Tensor) -> torch.Tensor:
    """-(1/2) d(log alpha)/dt / sqrt(alpha (1 - alpha)), with log alpha(t) = -(beta_1 - beta_0) t^2 / 2 - beta_0 t
    (ComfyUI takes the derivative by autograd; it is -(beta_0 + (beta_1 - beta_0) t))."""
    alpha = torch.exp(-0.5 * taus**2 * (beta_1 - beta_0) - taus * beta_0)
    d_log_alpha = -(taus * (beta_1 - beta_0) + beta_0)
    return -0.5 * d_log_alpha / torch.sqrt(alpha * (1 - alpha))


def step_weights(times: torch.Tensor, beta_0: torch.Tensor, beta_1: torch.Tensor, i: int,
                 order: int) -> list[torch.Tensor]:
    """The weights of [d_i, d_i-1, ...] for the step from times[i] to times[i + 1] (get_deis_coeff_list, tab)."""
    t_cur, t_next = times[i], times[i + 1]
    taus = torch.linspace(float(t_cur), float(t_next), _POINTS)
    dtau = (t_next - t_cur) / _POINTS
    nodes = [times[i - k] for k in range(order)]
    integrand = _integrand(taus, beta_0, beta_1)
    weights = []
    for j in range(order):
        basis = torch.ones(())
        for k in range(order):
            if k != j:
                basis = basis * ((taus - nodes[k]) / (nodes[j] - nodes[k]))
        weights.append(torch.sum(integrand * basis) * dtau)
    return weights


@register("deis", stochastic=False, max_order=3, deis_mode="tab")
def deis(model: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, run: Run, *, max_order: int,
         deis_mode: str) -> torch.Tensor:
    if deis_mode != "tab":
        # rhoab's coefficient list has one entry too many once i reaches max_order: ComfyUI fails to unpack it
        raise ValueError(f"deis_mode {deis_mode!r} is not run by Noodle: ComfyUI 0.3.64's 'rhoab' fails past "
                         f"{max_order} steps; use 'tab' (ComfyUI's default)")
    if not 1 <= max_order <= 4:
        raise ValueError(f"max_order {max_order!r} is out of range; deis takes 1 to 4 (ComfyUI's default is 3)")
    times, beta_0, beta_1 = vp_times(sigmas)
    history: deque[torch.Tensor] = deque(maxlen=max(max_order - 1, 1))  # newest last
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = model(x, sigma)
        run.report(i, x, denoised)
        d = to_d(x, sigma, denoised)
        order = 1 if sigma_next <= 0 else min(max_order, i + 1)
        if order == 1:
            x_next = x + (sigma_next - sigma) * d
        else:
            w = step_weights(times, beta_0, beta_1, i, order)  # CPU scalars: no copy to the device per step
            x_next = x + w[0] * d
            for k in range(1, order):
                x_next = x_next + w[k] * history[-k]
        history.append(d)
        x = x_next
    return x

