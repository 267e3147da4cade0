"""ipndm, ipndm_v, deis, res_multistep (and its ancestral and cfg_pp forms), gradient_estimation, lcm and ddpm
against ComfyUI 0.3.64's algorithms, rewritten here compactly from comfy/k_diffusion/sampling.py and deis.py.

On the analytic model (exact eps), through `S.sample(S.build_scheduler(...))`: txt2img, img2img at denoise 0.6
and KSamplerAdvanced's two halves, five schedulers. The cfg_pp forms get an eps function whose uncond estimate
differs from the guided one, so a step that takes the wrong one of the two shows.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from engine import samplers as S
from engine.samplers.kdiffusion import KDIFFUSION
from tests.engine.samplers.sampler_support import MS, gaussian_eps, gaussian_eps_with_uncond, latents, sampling_cases

NAMES = ("ipndm", "ipndm_v", "deis", "res_multistep", "res_multistep_cfg_pp", "res_multistep_ancestral",
         "res_multistep_ancestral_cfg_pp", "gradient_estimation", "gradient_estimation_cfg_pp", "lcm", "ddpm")
SCHEDULERS = ("normal", "karras", "beta", "exponential", "sgm_uniform")
SEED = 99


def cases(sampler: str, scheduler: str) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return sampling_cases(sampler, scheduler)


# --- ComfyUI's algorithms, compactly ---------------------------------------------------------------------------

def deis_coefficients(sigmas: torch.Tensor, max_order: int) -> list[list[torch.Tensor]]:
    """get_deis_coeff_list(..., 'tab'): edm2t's VP times, the integrand by autograd, a 10000-point sum."""
    s_min, s_max, eps_s = torch.tensor(0.002), torch.tensor(80.0), 1e-3
    beta_d = 2 * (np.log(s_min**2 + 1) / eps_s - np.log(s_max**2 + 1)) / (eps_s - 1)
    beta_min = np.log(s_max**2 + 1) - 0.5 * beta_d
    t = ((beta_min**2 + 2 * beta_d * (sigmas**2 + 1).log()).sqrt() - beta_min) / beta_d
    b0, b1 = beta_min, beta_d + beta_min
    out: list[list[torch.Tensor]] = []
    for i in range(len(t) - 1):
        order = min(i + 1, max_order)
        if order == 1:
            out.append([])
            continue
        taus = torch.linspace(float(t[i]), float(t[i + 1]), 10000).requires_grad_(True)
        with torch.enable_grad():
            alpha = torch.exp(-0.5 * taus**2 * (b1 - b0) - taus * b0)
            alpha.log().sum().backward()
        integrand = (-0.5 * taus.grad / torch.sqrt(alpha * (1 - alpha))).detach()
        prev = t[[i - k for k in range(order)]]
        row = []
        for j in range(order):
            poly = 1
            for k in range(order):
                if k != j:
                    poly = poly * ((taus.detach() - prev[k]) / (prev[j] - prev[k]))
            row.append(torch.sum(integrand * poly) * (t[i + 1] - t[i]) / 10000)
        out.append(row)
    return out


def ipndm_v_step(d: torch.Tensor, buf: list[torch.Tensor], sigmas: torch.Tensor, i: int, order: int) -> torch.Tensor:
    """sample_ipndm_v's slope for order 2..4 (x_next = x + (t_next - t_cur) * slope)."""
    t = sigmas
    hn, h1 = t[i + 1] - t[i], t[i] - t[i - 1]
    if order == 2:
        return (2 + hn / h1) / 2 * d - (hn / h1) / 2 * buf[-1]
    h2 = t[i - 1] - t[i - 2]
    temp1 = (1 - hn / (3 * (hn + h1)) * (hn * (hn + h1)) / (h1 * (h1 + h2))) / 2
    if order == 3:
        return (((2 + hn / h1) / 2 + temp1) * d + (-(hn / h1) / 2 - (1 + h1 / h2) * temp1) * buf[-1]
                + temp1 * h1 / h2 * buf[-2])
    h3 = t[i - 2] - t[i - 3]
    q = h1 * (h1 + h2) / (h2 * (h2 + h3))
    temp2 = (((1 - hn / (3 * (hn + h1))) / 2 + (1 - hn / (2 * (hn + h1))) * hn / (6 * (hn + h1 + h2)))
             * (hn * (hn + h1) * (hn + h1 + h2)) / (h1 * (h1 + h2) * (h1 + h2 + h3)))
    return (((2 + hn / h1) / 2 + temp1 + temp2) * d
            + (-(hn / h1) / 2 - (1 + h1 / h2) * temp1 - (1 + h1 / h2 + q) * temp2) * buf[-1]
            + (temp1 * h1 / h2 + (h1 / h2 + q * (1 + h2 / h3)) * temp2) * buf[-2] - temp2 * q * h1 / h2 * buf[-3])


def comfy_multistep(sampler: str, sigmas: torch.Tensor, latent: torch.Tensor, noise: torch.Tensor, seed: int,
                    uncond_mean: float | None = None) -> torch.Tensor:
    """KSAMPLER.sample + sample_<name> from ComfyUI 0.3.64 for an EPS model at the samplers' defaults."""
    eps_fn = gaussian_eps if uncond_mean is None else gaussian_eps_with_uncond(uncond_mean).with_uncond

    def model(x: torch.Tensor, sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(denoised, uncond_denoised); without a separate uncond the guided estimate stands for both."""
        s = float(sigma)
        out = eps_fn(x / math.sqrt(s * s + 1), torch.tensor(0.0), s)
        guided, uncond = out if isinstance(out, tuple) else (out, out)
        return x - guided * sigma, x - uncond * sigma

    full = math.isclose(float(MS.float()[-1]), float(sigmas[0]), rel_tol=1e-5)
    x = noise * ((1 + sigmas[0] ** 2) ** 0.5 if full else sigmas[0]) + latent
    gen = torch.Generator().manual_seed(seed)
    draw = lambda: torch.randn(x.shape, generator=gen)  # noqa: E731  (default_noise_sampler)
    cfg_pp = sampler.endswith("_cfg_pp")
    eta = 1.0 if "ancestral" in sampler else 0.0
    coeffs = deis_coefficients(sigmas, 3) if sampler == "deis" else None
    buf: list[torch.Tensor] = []
    old_denoised = old_down = old_d = None
    for i in range(len(sigmas) - 1):
        s, s_next = sigmas[i], sigmas[i + 1]
        denoised, uncond = model(x, s)
        d = (x - denoised) / s
        if sampler in ("ipndm", "ipndm_v", "deis"):
            max_order = 3 if sampler == "deis" else 4
            order = min(max_order, i + 1)
            if sampler == "deis":
                order = 1 if s_next <= 0 else order
                x_next = x + (s_next - s) * d if order == 1 else x + sum(
                    c * v for c, v in zip(coeffs[i], [d] + buf[::-1]))
            elif s_next == 0:
                x_next = denoised
            elif order == 1:
                x_next = x + (s_next - s) * d
            elif sampler == "ipndm":
                ab, over = {2: ([3, -1], 2), 3: ([23, -16, 5], 12), 4: ([55, -59, 37, -9], 24)}[order]
                x_next = x + (s_next - s) * sum(c * v for c, v in zip(ab, [d] + buf[::-1])) / over
            else:
                x_next = x + (s_next - s) * ipndm_v_step(d, buf, sigmas, i, order)
            buf = (buf + [d])[-(max_order - 1):]
            x = x_next
        elif sampler.startswith("res_multistep"):
            if eta:
                up = torch.minimum(s_next, eta * (s_next**2 * (s**2 - s_next**2) / s**2) ** 0.5)
                down = (s_next**2 - up**2) ** 0.5
            else:
                down, up = s_next, 0.0
            if down == 0 or old_denoised is None:
                x = denoised + (x - uncond) / s * down if cfg_pp else x + d * (down - s)
            else:
                t_fn = lambda v: v.log().neg()  # noqa: E731
                h = t_fn(down) - t_fn(s)
                c2 = (t_fn(sigmas[i - 1]) - t_fn(old_down)) / h
                phi1 = torch.expm1(-h) / -h
                phi2 = (phi1 - 1.0) / -h
                b1, b2 = torch.nan_to_num(phi1 - phi2 / c2, nan=0.0), torch.nan_to_num(phi2 / c2, nan=0.0)
                if cfg_pp:
                    x = x + (denoised - uncond)
                x = torch.exp(-h) * x + h * (b1 * (uncond if cfg_pp else denoised) + b2 * old_denoised)
            if s_next > 0:
                x = x + draw() * 1.0 * up
            old_denoised, old_down = (uncond if cfg_pp else denoised), down
        elif sampler.startswith("gradient_estimation"):
            d = (x - uncond) / s if cfg_pp else d
            dt = s_next - s
            if s_next == 0:
                x = denoised
            else:
                x = denoised + d * s_next if cfg_pp else x + d * dt
                if i >= 1:
                    x = x + (2.0 - 1) * (d - old_d) * dt
            old_d = d
        elif sampler == "lcm":
            x = denoised
            if s_next > 0:
                x = x + draw() * s_next
        elif sampler == "ddpm":
            ac, ac_prev = 1 / (s * s + 1), 1 / (s_next * s_next + 1)
            alpha = ac / ac_prev
            mu = (1 / alpha).sqrt() * (x / torch.sqrt(1 + s**2) - (1 - alpha) * d / (1 - ac).sqrt())
            if s_next > 0:
                mu = mu + ((1 - alpha) * (1 - ac_prev) / (1 - ac)).sqrt() * draw()
            x = mu * torch.sqrt(1 + s_next**2) if s_next != 0 else mu
    return x


def ours(sampler: str, scheduler: str, sigmas: torch.Tensor, latent: torch.Tensor, noise: torch.Tensor,
         uncond_mean: float | None = None) -> torch.Tensor:
    eps = gaussian_eps if uncond_mean is None else gaussian_eps_with_uncond(uncond_mean)
    return S.sample(S.build_scheduler(sampler, scheduler, sigmas, SEED), eps, latent, noise)


# --- the tests -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("sampler", NAMES)
@pytest.mark.parametrize("scheduler", SCHEDULERS)
def test_multistep_samplers_match_comfy(sampler: str, scheduler: str) -> None:
    uncond_mean = -0.4 if sampler.endswith("_cfg_pp") else None
    _, noise = latents(11)
    for sigmas, latent in cases(sampler, scheduler):
        got = ours(sampler, scheduler, sigmas, latent, noise, uncond_mean)
        want = comfy_multistep(sampler, sigmas, latent, noise, SEED, uncond_mean)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("sampler", [name for name in NAMES if name.endswith("_cfg_pp")])
def test_cfg_pp_steps_with_the_uncond_estimate(sampler: str) -> None:
    """A distinct uncond moves the result (ours and the reference alike); with uncond equal to the guided
    prediction, the cfg_pp form is its plain sibling's algorithm."""
    plain = sampler.removesuffix("_cfg_pp")
    _, noise = latents(11)
    sigmas, latent = cases(sampler, "karras")[0]
    with_uncond = ours(sampler, "karras", sigmas, latent, noise, -0.4)
    assert (with_uncond - ours(sampler, "karras", sigmas, latent, noise)).abs().max() > 1e-2
    assert (comfy_multistep(sampler, sigmas, latent, noise, SEED, -0.4)
            - comfy_multistep(sampler, sigmas, latent, noise, SEED)).abs().max() > 1e-2
    torch.testing.assert_close(ours(sampler, "karras", sigmas, latent, noise),
                               ours(plain, "karras", sigmas, latent, noise), rtol=1e-4, atol=1e-4)
    assert KDIFFUSION[sampler].wants_uncond and not KDIFFUSION[plain].wants_uncond


def test_registry_holds_comfys_defaults_and_which_draw_noise() -> None:
    defaults = {name: dict(KDIFFUSION[name].defaults) for name in NAMES}
    assert defaults["ipndm"] == defaults["ipndm_v"] == {"max_order": 4}
    assert defaults["deis"] == {"max_order": 3, "deis_mode": "tab"}
    assert defaults["res_multistep"] == defaults["res_multistep_cfg_pp"] == {"s_noise": 1.0}
    assert defaults["res_multistep_ancestral"] == defaults["res_multistep_ancestral_cfg_pp"] == {"eta": 1.0,
                                                                                                 "s_noise": 1.0}
    assert defaults["gradient_estimation"] == defaults["gradient_estimation_cfg_pp"] == {"ge_gamma": 2.0}
    assert defaults["lcm"] == defaults["ddpm"] == {}
    noisy = {"res_multistep_ancestral", "res_multistep_ancestral_cfg_pp", "lcm", "ddpm"}
    assert {name for name in NAMES if not S.is_deterministic(name)} == noisy
    assert S.is_deterministic("res_multistep_ancestral", {"eta": 0.0})
    sigmas, latent = cases("ddpm", "karras")[0]
    _, noise = latents(11)
    for name in NAMES:
        a, b = (S.sample(S.build_scheduler(name, "karras", sigmas, seed), gaussian_eps, latent, noise)
                for seed in (1, 2))
        assert torch.equal(a, b) == (name not in noisy), name


def test_out_of_range_options_are_refused_by_name() -> None:
    sigmas = S.ksampler_sigmas("karras", 5, 1.0, MS, sampler_name="euler")
    latent, noise = latents(3)
    for name, options, message in [("ipndm", {"max_order": 5}, "max_order 5 is out of range"),
                                   ("deis", {"max_order": 0}, "max_order 0 is out of range"),
                                   ("deis", {"deis_mode": "rhoab"}, "use 'tab'")]:
        plan = S.build_scheduler(name, "karras", sigmas, 1, options=options)
        with pytest.raises(ValueError, match=message):
            S.sample(plan, gaussian_eps, latent, noise)
    with pytest.raises(ValueError, match="takes no option 'eta'"):
        S.build_scheduler("res_multistep", "karras", sigmas, 1, options={"eta": 0.5})


@pytest.mark.parametrize("sampler", NAMES)
def test_each_step_is_reported_with_its_denoised_estimate(sampler: str) -> None:
    sigmas = S.ksampler_sigmas("karras", 5, 1.0, MS, sampler_name="euler")
    latent, noise = latents(3)
    steps: list[tuple[int, int]] = []
    previews: list[int] = []
    out = S.sample(S.build_scheduler(sampler, "karras", sigmas, 5), gaussian_eps_with_uncond(), latent, noise,
                   callback=lambda i, n, x: steps.append((i, n)), preview=lambda i, denoised: previews.append(i))
    assert steps == [(i, 5) for i in range(5)] and previews == list(range(5))
    assert bool(torch.isfinite(out).all())
