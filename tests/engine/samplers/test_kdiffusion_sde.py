"""engine/samplers/kdiffusion/sde.py against ComfyUI 0.3.64's DPM-Solver++ SDE samplers, rewritten here.

comfy/k_diffusion/sampling.py sample_dpmpp_sde, sample_dpmpp_2m_sde (and _heun), sample_dpmpp_3m_sde, with
BrownianTreeNoiseSampler's torchsde tree and sign handling, on the analytic model: at ComfyUI's defaults and at
a Sampler* node's options. Also: diffusers' dpmpp_sde / dpmpp_2m_sde against these steps (two independent
implementations), each `_gpu` twin against its CPU sibling, and which options make the samplers deterministic.
"""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
import torchsde

from engine import samplers as S
from engine.samplers.kdiffusion import KDIFFUSION, Run
from engine.samplers.kdiffusion.base import NoiseSampler
from engine.samplers.model_sampling import DEFAULT_SAMPLING
from engine.samplers.plan import _kdiff_plan
from tests.engine.samplers.sampler_support import MS, gaussian_eps, latents, sampling_cases

pytestmark = pytest.mark.filterwarnings("ignore:Should have t:UserWarning")

SDE = ("dpmpp_sde", "dpmpp_2m_sde", "dpmpp_2m_sde_heun", "dpmpp_3m_sde")
NAMES = tuple(name + suffix for name in SDE for suffix in ("", "_gpu"))
# a Sampler* node's options other than ComfyUI's defaults
OTHER_OPTIONS: dict[str, dict[str, Any]] = {
    "dpmpp_sde": {"eta": 0.5, "s_noise": 0.7, "r": 0.3},
    "dpmpp_2m_sde": {"eta": 0.5, "s_noise": 0.7, "solver_type": "heun"},
    "dpmpp_2m_sde_heun": {"eta": 0.5, "s_noise": 0.7, "solver_type": "midpoint"},
    "dpmpp_3m_sde": {"eta": 0.5, "s_noise": 0.7},
}


def cases(sampler: str, scheduler: str) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return sampling_cases(sampler, scheduler)


def ours(sampler: str, scheduler: str, sigmas: torch.Tensor, latent: torch.Tensor, noise: torch.Tensor,
         options: dict[str, Any] | None = None, seed: int = 99) -> torch.Tensor:
    """Noodle's own SDE steps through the loop, at any options: the plan build_scheduler makes for options other
    than ComfyUI's defaults (and always for the names diffusers lacks), made here at the defaults too."""
    plan = _kdiff_plan(sampler, scheduler, sigmas, seed, DEFAULT_SAMPLING, options)
    return S.sample(plan, gaussian_eps, latent, noise)


# --- ComfyUI's algorithms, compactly ---------------------------------------------------------------------------

def comfy_brownian(x: torch.Tensor, sigmas: torch.Tensor, seed: int) -> NoiseSampler:
    """BrownianTreeNoiseSampler(x, min positive sigma, max sigma, seed): BatchedBrownianTree's sort and sign."""
    tree = torchsde.BrownianTree(sigmas[sigmas > 0].min(), torch.zeros_like(x), sigmas.max(), entropy=seed)

    def draw(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        w = tree(a, b) if a < b else -tree(b, a)
        return w / (b - a).abs().sqrt()
    return draw


def ancestral(sigma_from: torch.Tensor, sigma_to: torch.Tensor, eta: float) -> tuple[torch.Tensor, Any]:
    if not eta:
        return sigma_to, 0.0
    up = min(sigma_to, eta * (sigma_to**2 * (sigma_from**2 - sigma_to**2) / sigma_from**2) ** 0.5)
    return (sigma_to**2 - up**2) ** 0.5, up


def comfy_sde(sampler: str, sigmas: torch.Tensor, latent: torch.Tensor, noise: torch.Tensor, seed: int, *,
              eta: float = 1.0, s_noise: float = 1.0, r: float = 0.5, solver_type: str = "") -> torch.Tensor:
    """KSAMPLER.sample + sample_<sampler> for an EPS model (half-log-SNR lambda = -log sigma, alpha = 1)."""
    def denoised(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        s = float(sigma)
        return x - gaussian_eps(x / math.sqrt(s * s + 1), torch.tensor(0.0), s) * sigma

    solver_type = solver_type or ("heun" if sampler == "dpmpp_2m_sde_heun" else "midpoint")
    sigmas = sigmas.float()
    full = math.isclose(float(MS.float()[-1]), float(sigmas[0]), rel_tol=1e-5)
    x = noise * ((1 + sigmas[0] ** 2) ** 0.5 if full else sigmas[0]) + latent
    brownian = comfy_brownian(x, sigmas, seed)
    noisy = eta > 0 and s_noise > 0
    d_1 = d_2 = h = h_1 = h_2 = None
    for i in range(len(sigmas) - 1):
        s, s_next = sigmas[i], sigmas[i + 1]
        d = denoised(x, s)
        lam_s, lam_t = -s.log(), -s_next.log()
        if s_next == 0:
            x = d
        elif sampler == "dpmpp_sde":
            h = lam_t - lam_s
            lam_1 = lam_s + r * h
            s_1 = (-lam_1).exp()
            a_s, a_1, a_t = s * lam_s.exp(), s_1 * lam_1.exp(), s_next * lam_t.exp()
            down, up = ancestral((-lam_s).exp(), (-lam_1).exp(), eta)
            h_ = -down.log() - lam_s
            x_2 = (a_1 / a_s) * (-h_).exp() * x - a_1 * (-h_).expm1() * d
            if noisy:
                x_2 = x_2 + a_1 * brownian(s, s_1) * s_noise * up
            d_2 = denoised(x_2, s_1)
            down, up = ancestral((-lam_s).exp(), (-lam_t).exp(), eta)
            h_ = -down.log() - lam_s
            fac = 1 / (2 * r)
            x = (a_t / a_s) * (-h_).exp() * x - a_t * (-h_).expm1() * ((1 - fac) * d + fac * d_2)
            if noisy:
                x = x + a_t * brownian(s, s_next) * s_noise * up
        else:  # the multistep SDE samplers
            h = lam_t - lam_s
            h_eta = h * (eta + 1)
            a_t = s_next * lam_t.exp()
            x = s_next / s * (-h * eta).exp() * x - a_t * (-h_eta).expm1() * d
            phi_2 = (-h_eta).expm1() / h_eta + 1
            if sampler == "dpmpp_3m_sde" and h_2 is not None:
                r0, r1 = h_1 / h, h_2 / h
                d1_0, d1_1 = (d - d_1) / r0, (d_1 - d_2) / r1
                d1 = d1_0 + (d1_0 - d1_1) * r0 / (r0 + r1)
                x = x + a_t * phi_2 * d1 - a_t * (phi_2 / h_eta - 0.5) * (d1_0 - d1_1) / (r0 + r1)
            elif h_1 is not None and solver_type == "midpoint" and sampler != "dpmpp_3m_sde":
                x = x - 0.5 * a_t * (-h_eta).expm1() * (h / h_1) * (d - d_1)
            elif h_1 is not None:  # heun, and 3M's second step (2M): the same phi_2 correction
                x = x + a_t * phi_2 * (h / h_1) * (d - d_1)
            if noisy:
                x = x + brownian(s, s_next) * s_next * (-(-2 * h * eta).expm1()).sqrt() * s_noise
        d_1, d_2 = d, d_1
        h_1, h_2 = h, h_1
    return x


# --- the tests -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("sampler", SDE)
@pytest.mark.parametrize("scheduler", ["normal", "karras", "beta"])
@pytest.mark.parametrize("which", ["default", "other", "eta 0"])
def test_sde_samplers_match_comfy(sampler: str, scheduler: str, which: str) -> None:
    options = {"default": {}, "other": OTHER_OPTIONS[sampler], "eta 0": {"eta": 0.0}}[which]
    _, noise = latents(11)
    for sigmas, latent in cases(sampler, scheduler):
        got = ours(sampler, scheduler, sigmas, latent, noise, options)
        want = comfy_sde(sampler, sigmas, latent, noise, 99, **options)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("sampler", ["dpmpp_sde", "dpmpp_2m_sde"])
@pytest.mark.parametrize("scheduler", ["normal", "karras", "beta", "exponential"])
def test_default_options_agree_with_the_diffusers_path(sampler: str, scheduler: str) -> None:
    _, noise = latents(11)
    for sigmas, latent in cases(sampler, scheduler):
        plan = S.build_scheduler(sampler, scheduler, sigmas, 99)
        assert plan.kdiff is None  # ComfyUI's defaults run on diffusers
        on_diffusers = S.sample(plan, gaussian_eps, latent, noise)
        torch.testing.assert_close(ours(sampler, scheduler, sigmas, latent, noise), on_diffusers, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("sampler", SDE)
def test_gpu_twin_equals_its_cpu_sibling_and_asks_for_the_device_tree(sampler: str,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    asked: list[bool] = []
    brownian = Run.brownian

    def spy(self: Run, x: torch.Tensor, sigmas: torch.Tensor, *, cpu: bool = True) -> NoiseSampler:
        asked.append(cpu)
        return brownian(self, x, sigmas, cpu=cpu)

    monkeypatch.setattr(Run, "brownian", spy)
    _, noise = latents(11)
    for options in ({}, OTHER_OPTIONS[sampler]):
        for sigmas, latent in cases(sampler, "karras"):
            cpu = ours(sampler, "karras", sigmas, latent, noise, options)
            gpu = ours(sampler + "_gpu", "karras", sigmas, latent, noise, options)
            assert torch.equal(cpu, gpu)  # on a CPU-only machine the model's device is the CPU
    assert asked == [True, False] * 8


def test_options_route_to_noodles_steps_and_defaults_stay_on_diffusers() -> None:
    sigmas = S.ksampler_sigmas("karras", 6, 1.0, MS, sampler_name="dpmpp_2m_sde")
    for name in NAMES:
        base = name.removesuffix("_gpu")
        other = S.build_scheduler(name, "karras", sigmas, 1, options=OTHER_OPTIONS[base])
        assert other.mechanism == "k-diffusion" and other.kdiff is KDIFFUSION[name]
        assert dict(other.options) == {**KDIFFUSION[name].defaults, **OTHER_OPTIONS[base]}
        default = S.build_scheduler(name, "karras", sigmas, 1, options=dict(KDIFFUSION[name].defaults))
        assert (default.kdiff is None) == (name in ("dpmpp_sde", "dpmpp_2m_sde"))
    assert dict(KDIFFUSION["dpmpp_sde_gpu"].defaults) == {"eta": 1.0, "s_noise": 1.0, "r": 0.5}
    assert KDIFFUSION["dpmpp_2m_sde_heun_gpu"].defaults["solver_type"] == "heun"
    assert KDIFFUSION["dpmpp_2m_sde"].defaults["solver_type"] == "midpoint"


def test_eta_or_s_noise_zero_makes_them_deterministic() -> None:
    for name in NAMES:
        assert not S.is_deterministic(name)
        assert S.is_deterministic(name, {"eta": 0.0}) and S.is_deterministic(name, {"s_noise": 0.0})
        assert not S.is_deterministic(name, {"eta": 0.5})
    sigmas = S.ksampler_sigmas("karras", 6, 1.0, MS, sampler_name="dpmpp_2m_sde")
    latent, noise = latents(3)
    seeds = [ours("dpmpp_2m_sde", "karras", sigmas, latent, noise, {"eta": 0.0}, seed) for seed in (1, 2)]
    assert torch.equal(*seeds)
    noisy = [ours("dpmpp_2m_sde", "karras", sigmas, latent, noise, {"eta": 0.5}, seed) for seed in (1, 2)]
    assert not torch.allclose(*noisy)


def test_bad_solver_type_and_zero_r_are_refused_by_name() -> None:
    sigmas = S.ksampler_sigmas("karras", 4, 1.0, MS, sampler_name="dpmpp_2m_sde")
    latent, noise = latents(3)
    for name in ("dpmpp_2m_sde", "dpmpp_2m_sde_heun_gpu"):
        with pytest.raises(ValueError, match="solver_type 'bh2' is not one of ComfyUI's: midpoint, heun"):
            ours(name, "karras", sigmas, latent, noise, {"solver_type": "bh2"})
    with pytest.raises(ValueError, match="r must be above 0"):
        ours("dpmpp_sde", "karras", sigmas, latent, noise, {"r": 0.0})
    with pytest.raises(ValueError, match="takes no option 'r'"):
        S.build_scheduler("dpmpp_3m_sde", "karras", sigmas, 1, options={"r": 0.3})


@pytest.mark.parametrize("sampler", NAMES)
def test_each_step_is_reported_with_its_denoised_estimate(sampler: str) -> None:
    sigmas = S.ksampler_sigmas("karras", 5, 1.0, MS, sampler_name=sampler)
    latent, noise = latents(3)
    plan = _kdiff_plan(sampler, "karras", sigmas, 5, DEFAULT_SAMPLING, OTHER_OPTIONS[sampler.removesuffix("_gpu")])
    steps: list[tuple[int, int]] = []
    previews: list[int] = []
    out = S.sample(plan, gaussian_eps, latent, noise, callback=lambda i, n, x: steps.append((i, n)),
                   preview=lambda i, denoised: previews.append(i))
    assert steps == [(i, 5) for i in range(5)] and previews == list(range(5))
    assert bool(torch.isfinite(out).all())
