"""SA-Solver (arXiv 2309.05019): the stochastic Adams predictor-corrector, ComfyUI's sa_solver and sa_solver_pece.

As comfy/k_diffusion/sampling.py 0.3.64 sample_sa_solver has it for the discrete (VE) models Noodle runs: each step
corrects the last predicted state with the new denoised estimate (up to `corrector_order` of them), then predicts
the next (up to `predictor_order`); the orders drop near the end of a list ending at 0. Stochasticity tau is eta
inside an sde window of sigmas and 0 outside, and the noise comes from the seeded default generator.
sa_solver_coeffs.py computes the b_i.

ComfyUI's tau_func is a function; Noodle's options hold what builds it, so a SAMPLER value stays plain data:
`eta`, `sde_start_percent`, `sde_end_percent` give get_tau_interval_func(percent_to_sigma(start),
percent_to_sigma(end), eta) on the run's model sampling; with ComfyUI's tau_func None that is eta 1 over 0.2..0.8,
the defaults. SamplerSASolver's inputs map one to one (eta, sde_start_percent, sde_end_percent, s_noise,
predictor_order, corrector_order, use_pece, simple_order_2 under the name sa_solver); a Python caller may pass
its own `tau_func(sigma) -> float` instead, with those three left at their defaults.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from engine.samplers.kdiffusion.base import Denoiser, Run, register
from engine.samplers.kdiffusion.sa_solver_coeffs import stochastic_adams_b
from engine.samplers.model_sampling import percent_to_sigma

__all__ = ["sa_solver", "sa_solver_pece", "tau_interval"]

TauFn = Callable[[torch.Tensor], float]
_TAU_DEFAULTS: dict[str, float] = {"eta": 1.0, "sde_start_percent": 0.2, "sde_end_percent": 0.8}
_OPTIONS: dict[str, Any] = {"tau_func": None, "s_noise": 1.0, "predictor_order": 3, "corrector_order": 4}


def tau_interval(start_sigma: float, end_sigma: float, eta: float = 1.0) -> TauFn:
    """get_tau_interval_func: tau is eta for sigmas in [end_sigma, start_sigma], else 0; always 0 at eta <= 0."""
    def tau(sigma: torch.Tensor) -> float:
        if eta <= 0:
            return 0.0
        return eta if start_sigma >= float(sigma) >= end_sigma else 0.0
    return tau


def _tau_fn(run: Run, tau_func: TauFn | None, eta: float, sde_start_percent: float,
            sde_end_percent: float) -> TauFn:
    if tau_func is None:
        return tau_interval(percent_to_sigma(sde_start_percent, run.sampling),
                            percent_to_sigma(sde_end_percent, run.sampling), eta)
    given = {"eta": eta, "sde_start_percent": sde_start_percent, "sde_end_percent": sde_end_percent}
    if given != _TAU_DEFAULTS:
        raise ValueError(f"sa_solver takes either tau_func or eta/sde_start_percent/sde_end_percent, not both; "
                         f"got tau_func and {given}")
    return tau_func


def _check_orders(predictor_order: int, corrector_order: int) -> None:
    for name, value, low in (("predictor_order", predictor_order, 1), ("corrector_order", corrector_order, 0)):
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= 6:
            raise ValueError(f"sa_solver's {name} is a whole number from {low} to 6 (SamplerSASolver's range), "
                             f"got {value!r}")


def _combine(estimates: list[torch.Tensor], b: torch.Tensor) -> torch.Tensor:
    """sum_k b_k * estimate_k over the last len(b) estimates, oldest first (ComfyUI's tensordot)."""
    stacked = torch.stack(estimates[len(estimates) - len(b):], dim=1)
    return torch.tensordot(stacked, b.to(stacked.dtype), dims=([1], [0]))


@register("sa_solver", stochastic=True, **_OPTIONS, use_pece=False, simple_order_2=False, **_TAU_DEFAULTS)
def sa_solver(model: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, run: Run, *, tau_func: TauFn | None,
              s_noise: float, predictor_order: int, corrector_order: int, use_pece: bool, simple_order_2: bool,
              eta: float, sde_start_percent: float, sde_end_percent: float) -> torch.Tensor:
    """SA-Solver; `use_pece` evaluates the corrected state again (PECE), one more model call a step."""
    _check_orders(predictor_order, corrector_order)
    if len(sigmas) <= 1:
        return x
    tau_of = _tau_fn(run, tau_func, eta, sde_start_percent, sde_end_percent)
    noise_of = run.default_noise(x)
    lambdas = run.lambda_of(sigmas)
    keep = max(predictor_order, corrector_order)
    lower_to_end = float(sigmas[-1]) == 0  # lower orders near the end, for stability
    x_pred, h, tau, noise = x, torch.zeros(()), 0.0, torch.zeros(())
    estimates: list[torch.Tensor] = []
    last = len(sigmas) - 1
    for i in range(last):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = model(x_pred, sigma)
        run.report(i, x_pred, denoised)
        estimates = (estimates + [denoised])[-keep:]
        p_order = min(predictor_order, len(estimates))
        c_order = 0 if i == 0 or (sigma_next == 0 and not use_pece) else min(corrector_order, len(estimates))
        if lower_to_end:
            p_order, c_order = min(p_order, last - 1 - i), min(c_order, last - i)

        if c_order == 0:  # corrector: with no order, the predicted state stands
            x = x_pred
        else:
            b = stochastic_adams_b(sigma, lambdas[i - c_order + 1:i + 1], lambdas[i - 1], lambdas[i], tau,
                                   simple_order_2=simple_order_2, corrector=True)
            x = sigma / sigmas[i - 1] * (-(tau**2) * h).exp() * x + _combine(estimates, b)
            if tau > 0 and s_noise > 0:
                x = x + noise  # the previous predictor step's noise
            if use_pece:
                denoised = model(x, sigma)
                estimates[-1] = denoised

        if sigma_next == 0:  # predictor: the last step lands on the denoised estimate
            x = denoised
            continue
        tau = tau_of(sigma_next)
        b = stochastic_adams_b(sigma_next, lambdas[i - p_order + 1:i + 1], lambdas[i], lambdas[i + 1], tau,
                               simple_order_2=simple_order_2)
        h = lambdas[i + 1] - lambdas[i]
        x_pred = sigma_next / sigma * (-(tau**2) * h).exp() * x + _combine(estimates, b)
        if tau > 0 and s_noise > 0:
            noise = noise_of(sigma, sigma_next) * sigma_next * (-2 * tau**2 * h).expm1().neg().sqrt() * s_noise
            x_pred = x_pred + noise
    return x


@register("sa_solver_pece", stochastic=True, **_OPTIONS, simple_order_2=False, **_TAU_DEFAULTS)
def sa_solver_pece(model: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, run: Run, **options: Any) -> torch.Tensor:
    """SA-Solver in PECE mode (predict, evaluate, correct, evaluate): sa_solver with use_pece on."""
    return sa_solver(model, x, sigmas, run, use_pece=True, **options)
