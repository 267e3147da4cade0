"""er_sde.py, seeds.py and sa_solver.py against ComfyUI 0.3.64's samplers, rewritten here as references.

comfy/k_diffusion/sampling.py sample_er_sde, sample_seeds_2, sample_seeds_3, sample_sa_solver(_pece) and
comfy/k_diffusion/sa_solver.py for an EPS model (half-log SNR -log sigma, alpha 1), with default_noise_sampler's
seeded generator, at ComfyUI's defaults and at the SamplerER_SDE / SamplerSASolver nodes' options. SA-Solver's
b coefficients are also checked against a quadrature of the Lagrange basis, independent of ComfyUI's recursion.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import scipy.integrate
import torch

from engine import samplers as S
from engine.samplers.kdiffusion import KDIFFUSION
from engine.samplers.kdiffusion.er_sde import er_sde_options
from engine.samplers.kdiffusion.sa_solver_coeffs import stochastic_adams_b
from tests.engine.samplers.sampler_support import MS, gaussian_eps, latents, sampling_cases

SEED = 99


def cases(sampler: str, scheduler: str) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return sampling_cases(sampler, scheduler)


def ours(sampler: str, scheduler: str, sigmas: torch.Tensor, latent: torch.Tensor, noise: torch.Tensor,
         options: dict[str, Any] | None = None) -> torch.Tensor:
    return S.sample(S.build_scheduler(sampler, scheduler, sigmas, SEED, options=options), gaussian_eps, latent,
                    noise)


# --- ComfyUI's algorithms, compactly ---------------------------------------------------------------------------

def denoised_of(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    s = float(sigma)
    return x - gaussian_eps(x / math.sqrt(s * s + 1), torch.tensor(0.0), s) * sigma


def start(sigmas: torch.Tensor, latent: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    full = math.isclose(float(MS.float()[-1]), float(sigmas[0]), rel_tol=1e-5)
    return noise * ((1 + sigmas[0] ** 2) ** 0.5 if full else sigmas[0]) + latent


def default_noise(x: torch.Tensor, seed: int) -> Callable[[Any, Any], torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return lambda a, b: torch.randn(x.size(), dtype=x.dtype, generator=generator)


def comfy_er_sde(sigmas: torch.Tensor, x: torch.Tensor, seed: int, s_noise: float = 1.0,
                 noise_scaler: Callable[[torch.Tensor], torch.Tensor] | None = None,
                 max_stage: int = 3) -> torch.Tensor:
    noise = default_noise(x, seed)
    scaler = noise_scaler or (lambda v: v * ((v**0.3).exp() + 10.0))
    points = torch.arange(0, 200.0, dtype=torch.float32)
    lams = sigmas.log().neg().neg().exp()
    old = old_d = None
    for i in range(len(sigmas) - 1):
        den = denoised_of(x, sigmas[i])
        stage = min(max_stage, i + 1)
        if sigmas[i + 1] == 0:
            x = den
        else:
            ls, lt = lams[i], lams[i + 1]
            alpha_s, alpha_t = sigmas[i] / ls, sigmas[i + 1] / lt
            r = scaler(lt) / scaler(ls)
            x = alpha_t / alpha_s * r * x + alpha_t * (1 - r) * den
            if stage >= 2:
                dt = lt - ls
                step = -dt / 200.0
                pos = lt + points * step
                sc = scaler(pos)
                d = (den - old) / (ls - lams[i - 1])
                x = x + alpha_t * (dt + torch.sum(1 / sc) * step * scaler(lt)) * d
                if stage >= 3:
                    u = (d - old_d) / ((ls - lams[i - 2]) / 2)
                    x = x + alpha_t * (dt**2 / 2 + torch.sum((pos - ls) / sc) * step * scaler(lt)) * u
                old_d = d
            if s_noise > 0:
                x = x + alpha_t * noise(0, 0) * s_noise * (lt**2 - ls**2 * r**2).sqrt().nan_to_num(nan=0.0)
        old = den
    return x


def comfy_seeds(stages: int, sigmas: torch.Tensor, x: torch.Tensor, seed: int, eta: float = 1.0,
                s_noise: float = 1.0, r: float = 0.5, r_1: float = 1 / 3, r_2: float = 2 / 3) -> torch.Tensor:
    noise = default_noise(x, seed)
    inject = eta > 0 and s_noise > 0
    phi1 = torch.expm1
    phi2 = lambda h: (torch.expm1(h) - h) / h  # noqa: E731
    lam, sig = (lambda s: s.log().neg()), (lambda lm: lm.neg().exp())
    r_1 = r if stages == 2 else r_1
    for i in range(len(sigmas) - 1):
        s, s_next = sigmas[i], sigmas[i + 1]
        den = denoised_of(x, s)
        if s_next == 0:
            x = den
            continue
        ls, lt = lam(s), lam(s_next)
        h = lt - ls
        he = h * (eta + 1)
        l1, l2 = torch.lerp(ls, lt, r_1), torch.lerp(ls, lt, r_2)
        s1, s2 = sig(l1), sig(l2)
        a1, a2, at = s1 * l1.exp(), s2 * l2.exp(), s_next * lt.exp()
        x_2 = s1 / s * (-r_1 * h * eta).exp() * x - a1 * phi1(-r_1 * he) * den
        if inject:
            sde = (-2 * r_1 * h * eta).expm1().neg().sqrt() * noise(0, 0)
            x_2 = x_2 + sde * s1 * s_noise
        den_2 = denoised_of(x_2, s1)
        if stages == 2:
            mixed = torch.lerp(den, den_2, 1 / (2 * r))
            x = s_next / s * (-h * eta).exp() * x - at * phi1(-he) * mixed
            last_r = r
        else:
            a32 = r_2 / r_1 * phi2(-r_2 * he)
            a31 = phi1(-r_2 * he) - a32
            x_3 = s2 / s * (-r_2 * h * eta).exp() * x - a2 * (a31 * den + a32 * den_2)
            if inject:
                f = (r_1 - r_2) * h * eta
                sde = sde * f.exp() + f.mul(2).expm1().neg().sqrt() * noise(0, 0)
                x_3 = x_3 + sde * s2 * s_noise
            den_3 = denoised_of(x_3, s2)
            b3 = phi2(-he) / r_2
            x = s_next / s * (-h * eta).exp() * x - at * ((phi1(-he) - b3) * den + b3 * den_3)
            last_r = r_2
        if inject:
            f = (last_r - 1) * h * eta
            sde = sde * f.exp() + f.mul(2).expm1().neg().sqrt() * noise(0, 0)
            x = x + sde * s_next * s_noise
    return x


def comfy_percent_to_sigma(percent: float) -> float:
    """ModelSamplingDiscrete.percent_to_sigma: log-sigma interpolated at timestep (1 - percent) * 999."""
    if percent <= 0.0:
        return 999999999.9
    if percent >= 1.0:
        return 0.0
    log_sigmas = MS.float().log()
    t = torch.tensor((1.0 - percent) * 999.0).clamp(0, 999)
    w = t.frac()
    return float(((1 - w) * log_sigmas[t.floor().long()] + w * log_sigmas[t.ceil().long()]).exp())


def comfy_b(sigma_next, lambdas, lambda_s, lambda_t, tau, simple, corrector):  # noqa: ANN001, ANN201
    """compute_stochastic_adams_b_coeffs."""
    n = lambdas.shape[0]
    c = 1 + tau**2
    h = lambda_t - lambda_s
    alpha_t = sigma_next * lambda_t.exp()
    if simple and n == 2:
        if corrector:
            b_1 = alpha_t * (0.5 * c * h)
            return torch.stack([alpha_t * (-h * c).expm1().neg() - b_1, b_1])
        b_2 = alpha_t * (0.5 * c * h**2) / (lambdas[-2] - lambda_s)
        return torch.stack([b_2, alpha_t * (-h * c).expm1().neg() - b_2])
    p = torch.arange(n, dtype=lambda_s.dtype)
    terms = lambda_t**p - lambda_s**p * (-c * h).exp()
    depth = p[:, None] - p[None, :]
    lf = (p + 1).lgamma()
    coeff = lf[:, None] - lf[None, :] - (depth * math.log(c) if tau > 0 else 0)
    mat = (coeff.exp() * torch.where(depth % 2 == 0, 1.0, -1.0)).tril()
    return alpha_t * torch.linalg.solve(torch.vander(lambdas, n, increasing=True).T, mat @ terms)


def comfy_sa_solver(sigmas: torch.Tensor, x: torch.Tensor, seed: int, s_noise: float = 1.0,
                    predictor_order: int = 3, corrector_order: int = 4, use_pece: bool = False,
                    simple_order_2: bool = False, eta: float = 1.0, sde_start_percent: float = 0.2,
                    sde_end_percent: float = 0.8) -> torch.Tensor:
    noise_of = default_noise(x, seed)
    lams = sigmas.log().neg()
    hi, lo = comfy_percent_to_sigma(sde_start_percent), comfy_percent_to_sigma(sde_end_percent)
    tau_func = lambda s: 0.0 if eta <= 0 else (eta if hi >= s.item() >= lo else 0.0)  # noqa: E731
    top = max(predictor_order, corrector_order)
    x_pred, h, tau, noise, preds = x, 0.0, 0.0, 0.0, []
    to_end = sigmas[-1].item() == 0
    for i in range(len(sigmas) - 1):
        den = denoised_of(x_pred, sigmas[i])
        preds = (preds + [den])[-top:]
        p_used = min(predictor_order, len(preds))
        c_used = 0 if i == 0 or (sigmas[i + 1] == 0 and not use_pece) else min(corrector_order, len(preds))
        if to_end:
            p_used, c_used = min(p_used, len(sigmas) - 2 - i), min(c_used, len(sigmas) - 1 - i)
        if c_used == 0:
            x = x_pred
        else:
            b = comfy_b(sigmas[i], lams[i - c_used + 1:i + 1], lams[i - 1], lams[i], tau, simple_order_2, True)
            res = torch.tensordot(torch.stack(preds[-c_used:], dim=1), b, dims=([1], [0]))
            x = sigmas[i] / sigmas[i - 1] * (-(tau**2) * h).exp() * x + res
            if tau > 0 and s_noise > 0:
                x = x + noise
            if use_pece:
                den = denoised_of(x, sigmas[i])
                preds[-1] = den
        if sigmas[i + 1] == 0:
            x = den
        else:
            tau = tau_func(sigmas[i + 1])
            b = comfy_b(sigmas[i + 1], lams[i - p_used + 1:i + 1], lams[i], lams[i + 1], tau, simple_order_2, False)
            res = torch.tensordot(torch.stack(preds[-p_used:], dim=1), b, dims=([1], [0]))
            h = lams[i + 1] - lams[i]
            x_pred = sigmas[i + 1] / sigmas[i] * (-(tau**2) * h).exp() * x + res
            if tau > 0 and s_noise > 0:
                noise = noise_of(0, 0) * sigmas[i + 1] * (-2 * tau**2 * h).expm1().neg().sqrt() * s_noise
                x_pred = x_pred + noise
    return x


def comfy(sampler: str, sigmas: torch.Tensor, latent: torch.Tensor, noise: torch.Tensor,
          options: dict[str, Any]) -> torch.Tensor:
    """KSAMPLER.sample + sample_<sampler>; the er_sde scaler and the sa_solver tau built as the nodes build them."""
    x = start(sigmas, latent, noise)
    if sampler == "er_sde":
        options = dict(options)
        scaler = options.pop("noise_scaler", None)
        power = None if scaler is None else scaler + 1
        return comfy_er_sde(sigmas, x, SEED, noise_scaler=None if power is None else (lambda v: v**power),
                            **options)
    if sampler.startswith("seeds_"):
        return comfy_seeds(int(sampler[-1]), sigmas, x, SEED, **options)
    return comfy_sa_solver(sigmas, x, SEED, **({"use_pece": True} if sampler == "sa_solver_pece" else {}),
                           **options)


# --- the comparisons -------------------------------------------------------------------------------------------

SOLVERS = ("er_sde", "seeds_2", "seeds_3", "sa_solver", "sa_solver_pece")
OPTIONS: dict[str, list[dict[str, Any]]] = {  # Sampler* node options, and other keyword options
    "er_sde": [er_sde_options("Reverse-time SDE", 3, 0.5, 0.8), er_sde_options("ODE", 3, 1.0, 1.0),
               er_sde_options("ER-SDE", 2, 0.0, 1.0), er_sde_options("ER-SDE", 1, 1.0, 0.5)],
    "seeds_2": [{"eta": 0.5, "s_noise": 0.7, "r": 0.4}, {"eta": 0.0}],
    "seeds_3": [{"eta": 0.5, "s_noise": 0.7, "r_1": 0.25, "r_2": 0.6}, {"eta": 0.0}],
    "sa_solver": [
        {"eta": 0.7, "sde_start_percent": 0.1, "sde_end_percent": 0.9, "s_noise": 0.8, "predictor_order": 2,
         "corrector_order": 2, "use_pece": True, "simple_order_2": True},
        {"predictor_order": 2, "corrector_order": 3, "simple_order_2": True},
        {"predictor_order": 1, "corrector_order": 0},
        {"predictor_order": 5, "corrector_order": 5, "eta": 0.0},
    ],
    "sa_solver_pece": [{"predictor_order": 2, "corrector_order": 1, "s_noise": 0.5}],
}


@pytest.mark.parametrize("sampler", SOLVERS)
@pytest.mark.parametrize("scheduler", ["normal", "karras", "beta", "exponential"])
def test_solver_matches_comfy_at_its_defaults(sampler: str, scheduler: str) -> None:
    _, noise = latents(11)
    for sigmas, latent in cases(sampler, scheduler):
        torch.testing.assert_close(ours(sampler, scheduler, sigmas, latent, noise),
                                   comfy(sampler, sigmas, latent, noise, {}), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("sampler", SOLVERS)
def test_solver_matches_comfy_at_node_options(sampler: str) -> None:
    _, noise = latents(11)
    for options in OPTIONS[sampler]:
        for sigmas, latent in cases(sampler, "karras"):
            torch.testing.assert_close(ours(sampler, "karras", sigmas, latent, noise, options),
                                       comfy(sampler, sigmas, latent, noise, options), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("order", [1, 2, 3, 4, 5])
@pytest.mark.parametrize("tau", [0.0, 0.8])
def test_sa_solver_b_coefficients_integrate_the_lagrange_basis(order: int, tau: float) -> None:
    """b_j = alpha_t (1 + tau^2) * integral over [lambda_s, lambda_t] of exp((1 + tau^2)(l - lambda_t)) l_j(l) dl,
    with l_j the Lagrange basis through the estimates' lambdas: a quadrature, not ComfyUI's recursion."""
    sigmas = S.ksampler_sigmas("karras", 9, 1.0, MS, sampler_name="sa_solver").double()
    lambdas = sigmas[:-1].log().neg()
    i = 6
    points = lambdas[i - order + 1:i + 1]
    got = stochastic_adams_b(sigmas[i + 1], points, lambdas[i], lambdas[i + 1], tau)
    c, lam_t = 1 + tau**2, float(lambdas[i + 1])
    nodes = points.numpy()
    expected = []
    for j in range(order):
        others = np.delete(nodes, j)
        basis = lambda v: np.prod((v - others) / (nodes[j] - others))  # noqa: B023, E731
        integral = scipy.integrate.quad(lambda v: math.exp(c * (v - lam_t)) * basis(v), float(lambdas[i]), lam_t,
                                        epsabs=1e-13, epsrel=1e-11)[0]
        expected.append(float(sigmas[i + 1]) * math.exp(lam_t) * c * integral)
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-7, atol=1e-10)


def test_solvers_are_classified_and_options_checked() -> None:
    for name in SOLVERS:
        assert KDIFFUSION[name].stochastic and not S.is_deterministic(name)
    assert S.is_deterministic("er_sde", er_sde_options("ODE", 3, 1.0, 1.0))
    assert not S.is_deterministic("er_sde", er_sde_options("ER-SDE", 3, 0.0, 1.0))  # its eta does not apply
    assert S.is_deterministic("seeds_3", {"eta": 0.0}) and S.is_deterministic("sa_solver", {"eta": 0.0})
    sigmas = S.ksampler_sigmas("karras", 4, 1.0, MS, sampler_name="sa_solver")
    latent, noise = latents(11)
    with pytest.raises(ValueError, match="predictor_order is a whole number from 1 to 6"):
        ours("sa_solver", "karras", sigmas, latent, noise, {"predictor_order": 0})
    with pytest.raises(ValueError, match="max_stage is 1, 2 or 3"):
        ours("er_sde", "karras", sigmas, latent, noise, {"max_stage": 4})
    with pytest.raises(ValueError, match="solver_type 'SDE'"):
        er_sde_options("SDE", 3, 1.0, 1.0)
    with pytest.raises(ValueError, match="either tau_func or eta"):
        ours("sa_solver", "karras", sigmas, latent, noise, {"tau_func": lambda s: 0.0, "eta": 0.5})
