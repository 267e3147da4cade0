"""SA-Solver's coefficients (arXiv 2309.05019, eqs. 15 and 18): the stochastic Adams b_i for one step.

As comfy/k_diffusion/sa_solver.py 0.3.64 computes them in data prediction mode: the step from lambda_s to lambda_t
(half-log SNR) integrates the Lagrange polynomial through the last denoised estimates against
exp((1 + tau^2) * lambda); the integrals of exp((1 + tau^2) * x) * x^p come from integration by parts, and the
Lagrange weights from a Vandermonde solve. sa_solver.py, the sampler, applies them.
"""

from __future__ import annotations

import math

import torch

__all__ = ["stochastic_adams_b"]


def _exponential_integrals(s: torch.Tensor, t: torch.Tensor, order: int, tau: float) -> torch.Tensor:
    """(1 + tau^2) * integral over [s, t] of exp((1 + tau^2) * x) * x^p dx for p < order, exp((1 + tau^2) * t)
    factored out. By parts, I_p = x^p e^(c x) / c |_s^t - (p / c) * I_(p-1) with c = 1 + tau^2; unrolled, I_p is
    a lower-triangular sum of the boundary terms with weights (-1)^(p-q) * p! / q! / c^(p-q)."""
    c = 1 + tau**2
    p = torch.arange(order, dtype=s.dtype, device=s.device)
    boundary = t**p - s**p * (-c * (t - s)).exp()
    depth = p.unsqueeze(1) - p.unsqueeze(0)
    log_factorial = (p + 1).lgamma()
    log_weight = log_factorial.unsqueeze(1) - log_factorial.unsqueeze(0)
    if tau > 0:
        log_weight = log_weight - depth * math.log(c)
    sign = torch.where(depth % 2 == 0, 1.0, -1.0)
    return (log_weight.exp() * sign).tril() @ boundary


def _simple_order_2(sigma_next: torch.Tensor, lambdas: torch.Tensor, lambda_s: torch.Tensor,
                    lambda_t: torch.Tensor, tau: float, corrector: bool) -> torch.Tensor:
    """The paper's simplified order-2 coefficients (its Appendix D), oldest estimate first."""
    c = 1 + tau**2
    h = lambda_t - lambda_s
    alpha_t = sigma_next * lambda_t.exp()
    whole = alpha_t * (-h * c).expm1().neg()
    if corrector:  # one-step corrector
        b_new = alpha_t * (0.5 * c * h)
        return torch.stack([whole - b_new, b_new])
    b_old = alpha_t * (0.5 * c * h**2) / (lambdas[-2] - lambda_s)  # two-step predictor
    return torch.stack([b_old, whole - b_old])


def stochastic_adams_b(sigma_next: torch.Tensor, lambdas: torch.Tensor, lambda_s: torch.Tensor,
                       lambda_t: torch.Tensor, tau: float, *, simple_order_2: bool = False,
                       corrector: bool = False) -> torch.Tensor:
    """compute_stochastic_adams_b_coeffs: one b_i per point of `lambdas` (the estimates' half-log SNRs, oldest
    first; their count is the order), for the step from lambda_s to lambda_t ending at sigma_next."""
    order = lambdas.shape[0]
    if simple_order_2 and order == 2:
        return _simple_order_2(sigma_next, lambdas, lambda_s, lambda_t, tau, corrector)
    integrals = _exponential_integrals(lambda_s, lambda_t, order, tau)
    weights = torch.linalg.solve(torch.vander(lambdas, order, increasing=True).T, integrals)
    # sigma_t * exp(-tau^2 * lambda_t) * exp((1 + tau^2) * lambda_t), the factor taken out above, is alpha_t
    return sigma_next * lambda_t.exp() * weights
