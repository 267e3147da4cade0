"""`sample()` against ComfyUI 0.3.64's samplers, rewritten compactly here as references.

comfy/k_diffusion/sampling.py and comfy/extra_samplers/uni_pc.py (EPS models, default eta and s_noise):
on an analytic model any slip in sigmas, model-call sigmas, noise draws or step math shows up as a number.
"""

from __future__ import annotations

import math

import pytest
import scipy.integrate
import torch
import torchsde

from engine import samplers as S
from tests.engine.samplers.sampler_support import MS, gaussian_eps, latents, run

pytestmark = pytest.mark.filterwarnings("ignore:Should have t:UserWarning")

# --- against ComfyUI's k-diffusion samplers -----------------------------------------------------------------

def ancestral_step(sigma: torch.Tensor, sigma_next: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    up = torch.minimum(sigma_next, (sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2) ** 0.5)
    return (sigma_next**2 - up**2) ** 0.5, up


def lms_coefficient(order: int, t: list[float], i: int, j: int) -> float:
    def basis(tau: float) -> float:
        prod = 1.0
        for k in range(order):
            if k != j:
                prod *= (tau - t[i - k]) / (t[i - j] - t[i - k])
        return prod
    return scipy.integrate.quad(basis, t[i], t[i + 1], epsrel=1e-4)[0]


def comfy_reference(sampler: str, sigmas: torch.Tensor, latent: torch.Tensor, noise: torch.Tensor,
                    seed: int) -> torch.Tensor:
    """KSAMPLER.sample + sample_<name> from ComfyUI 0.3.64 for an EPS model, rewritten compactly."""
    def denoised(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        s = float(sigma)
        return x - gaussian_eps(x / math.sqrt(s * s + 1), torch.tensor(0.0), s) * sigma

    full = math.isclose(float(MS.float()[-1]), float(sigmas[0]), rel_tol=1e-5)
    x = noise * ((1 + sigmas[0] ** 2) ** 0.5 if full else sigmas[0]) + latent
    generator = torch.Generator().manual_seed(seed)
    positive = sigmas[sigmas > 0]
    tree = torchsde.BrownianTree(positive.min(), torch.zeros_like(x), positive.max(), entropy=seed)
    brownian = lambda a, b: -tree(b, a) / (a - b).sqrt()  # noqa: E731  (BatchedBrownianTree's sign for a > b)
    old, h_last, ds = None, None, []
    for i in range(len(sigmas) - 1):
        s, s_next = sigmas[i], sigmas[i + 1]
        d_x = denoised(x, s)
        d = (x - d_x) / s
        if sampler in ("euler", "ddim"):
            x = x + d * (s_next - s)
        elif sampler == "euler_ancestral":
            down, up = ancestral_step(s, s_next)
            x = d_x if down == 0 else x + d * (down - s) + torch.randn(x.shape, generator=generator) * up
        elif sampler == "heun" and s_next == 0 or sampler == "dpm_2" and s_next == 0:
            x = x + d * (s_next - s)
        elif sampler == "heun":
            x2 = x + d * (s_next - s)
            x = x + (d + (x2 - denoised(x2, s_next)) / s_next) / 2 * (s_next - s)
        elif sampler in ("dpm_2", "dpm_2_ancestral"):
            down, up = ancestral_step(s, s_next) if sampler == "dpm_2_ancestral" else (s_next, 0.0)
            if down == 0:
                x = x + d * (down - s)
                continue
            mid = s.log().lerp(down.log(), 0.5).exp()
            x2 = x + d * (mid - s)
            x = x + (x2 - denoised(x2, mid)) / mid * (down - s)
            if sampler == "dpm_2_ancestral":
                x = x + torch.randn(x.shape, generator=generator) * up
        elif sampler == "dpmpp_2s_ancestral":
            down, up = ancestral_step(s, s_next)
            if down == 0:
                x = x + d * (down - s)
            else:
                t, t_next = -s.log(), -down.log()
                h = t_next - t
                mid = (-(t + h / 2)).exp()
                x_2 = (mid / s) * x - (-h / 2).expm1() * d_x
                x = (down / s) * x - (-h).expm1() * denoised(x_2, mid)
            if s_next > 0:
                x = x + torch.randn(x.shape, generator=generator) * up
        elif sampler == "lms":
            ds = (ds + [d])[-4:]
            if s_next == 0:
                x = d_x
            else:
                t = sigmas.tolist()
                order = min(i + 1, 4)
                x = x + sum(lms_coefficient(order, t, i, j) * dj for j, dj in enumerate(reversed(ds)))
        elif sampler == "dpmpp_2m":
            h = s.log() - s_next.log()
            if old is None or s_next == 0:
                x = (s_next / s) * x - (-h).expm1() * d_x
            else:
                r = h_last / h
                x = (s_next / s) * x - (-h).expm1() * ((1 + 1 / (2 * r)) * d_x - (1 / (2 * r)) * old)
            old, h_last = d_x, h
        elif sampler == "dpmpp_2m_sde":
            if s_next == 0:
                x = d_x
            else:
                h = s.log() - s_next.log()
                x = s_next / s * (-h).exp() * x + (-2 * h).expm1().neg() * d_x
                if old is not None:
                    x = x + 0.5 * (-2 * h).expm1().neg() * (h / h_last) * (d_x - old)
                x = x + brownian(s, s_next) * s_next * (-2 * h).expm1().neg().sqrt()
                h_last = h
            old = d_x
        elif sampler == "dpmpp_sde":
            if s_next == 0:
                x = d_x
                continue
            mid = (-(-s.log() + (s.log() - s_next.log()) * 0.5)).exp()
            down, up = ancestral_step(s, mid)
            h_ = s.log() - down.log()
            x2 = (-h_).exp() * x - (-h_).expm1() * d_x + brownian(s, mid) * up
            down, up = ancestral_step(s, s_next)
            h_ = s.log() - down.log()
            x = (-h_).exp() * x - (-h_).expm1() * denoised(x2, mid) + brownian(s, s_next) * up
    return x


# the samplers comfy_reference rewrites; the other k-diffusion families have their own test_kdiffusion_*.py
REFERENCED = ("euler", "ddim", "euler_ancestral", "heun", "dpm_2", "dpm_2_ancestral", "dpmpp_2s_ancestral", "lms",
              "dpmpp_2m", "dpmpp_2m_sde", "dpmpp_sde")


@pytest.mark.parametrize("sampler", REFERENCED)
@pytest.mark.parametrize("scheduler", ["normal", "karras", "beta"])
def test_sample_matches_comfy_k_diffusion(sampler: str, scheduler: str) -> None:
    image, noise = latents(11)
    cases = [  # (sigmas, start latent): txt2img, img2img, and KSamplerAdvanced's two halves
        (S.ksampler_sigmas(scheduler, 7, 1.0, MS, sampler_name=sampler), torch.zeros_like(image)),
        (S.ksampler_sigmas(scheduler, 8, 0.6, MS, sampler_name=sampler), image),
        (S.advanced_sigmas(scheduler, 10, 0, 5, False, MS, sampler_name=sampler), torch.zeros_like(image)),
        (S.advanced_sigmas(scheduler, 10, 5, 10000, True, MS, sampler_name=sampler), image * 3),
    ]
    for sigmas, latent in cases:
        ours = run(sampler, scheduler, sigmas, latent, noise, seed=99)
        theirs = comfy_reference(sampler, sigmas, latent, noise, seed=99)
        torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)


def comfy_unipc_reference(variant: str, sigmas: torch.Tensor, latent: torch.Tensor,
                          noise: torch.Tensor) -> torch.Tensor:
    """sample_unipc from ComfyUI 0.3.64 (comfy/extra_samplers/uni_pc.py: multistep, data prediction), compactly."""
    ts = sigmas.clone()
    if ts[-1] == 0:
        ts[-1] = 0.001  # ComfyUI's UniPC never steps into sigma 0
    alpha = lambda s: 1 / (s**2 + 1) ** 0.5  # noqa: E731
    lam = lambda s: -s.log()  # noqa: E731  (log alpha - log(sigma * alpha))

    def model_x0(x: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        x_ve, sf = x / alpha(s), float(s)
        return x_ve - gaussian_eps(x_ve / math.sqrt(sf * sf + 1), torch.tensor(0.0), sf) * s

    def update(x, models, times, t, order, corrector):  # multistep_uni_pc_bh_update, predict_x0
        h = lam(t) - lam(times[-1])
        rks = [float((lam(times[-(i + 1)]) - lam(times[-1])) / h) for i in range(1, order)]
        d1s = [(models[-(i + 1)] - models[-1]) / rk for i, rk in enumerate(rks, start=1)]
        rks_t = torch.tensor(rks + [1.0])
        hh = -h
        h_phi_1 = hh.expm1()
        h_phi_k, factorial, b_h = h_phi_1 / hh - 1, 1, (hh if variant == "bh1" else hh.expm1())
        rows, b = [], []
        for i in range(1, order + 1):
            rows.append(rks_t ** (i - 1))
            b.append(float(h_phi_k * factorial / b_h))
            factorial *= i + 1
            h_phi_k = h_phi_k / hh - 1 / factorial
        big_r, b_t = torch.stack(rows), torch.tensor(b)
        x_t_ = (t * alpha(t)) / (times[-1] * alpha(times[-1])) * x - alpha(t) * h_phi_1 * models[-1]
        pred = 0
        if d1s:
            rhos_p = torch.tensor([0.5]) if order == 2 else torch.linalg.solve(big_r[:-1, :-1], b_t[:-1])
            pred = sum(r * d for r, d in zip(rhos_p, d1s))
        x_t = x_t_ - alpha(t) * b_h * pred
        if not corrector:
            return x_t, None
        rhos_c = torch.tensor([0.5]) if order == 1 else torch.linalg.solve(big_r, b_t)
        model_t = model_x0(x_t, t)
        corr = sum(r * d for r, d in zip(rhos_c[:-1], d1s)) if d1s else 0
        return x_t_ - alpha(t) * b_h * (corr + rhos_c[-1] * (model_t - models[-1])), model_t

    full = math.isclose(float(MS.float()[-1]), float(ts[0]), rel_tol=1e-5)
    x = (noise * ((1 + ts[0] ** 2) ** 0.5 if full else ts[0]) + latent) * alpha(ts[0])
    steps, order = len(ts) - 1, min(3, len(ts) - 2)
    models, times = [model_x0(x, ts[0])], [ts[0]]
    for index in range(1, steps):
        if index < order:  # warm-up at growing order
            x, model = update(x, models, times, ts[index], index, True)
            models.append(model)
            times.append(ts[index])
            continue
        for step in range(index, index + 1 + (index == steps - 1)):  # the last index also takes the final step
            x, model = update(x, models, times, ts[step], min(order, steps + 1 - step), step != steps)
            models, times = models[1:] + [model], times[1:] + [ts[step]]
    return x / alpha(ts[-1])


@pytest.mark.parametrize("sampler", ["uni_pc", "uni_pc_bh2"])
@pytest.mark.parametrize("scheduler", ["normal", "karras", "beta"])
def test_sample_matches_comfy_unipc(sampler: str, scheduler: str) -> None:
    image, noise = latents(11)
    cases = [
        (S.ksampler_sigmas(scheduler, 2, 1.0, MS, sampler_name=sampler), torch.zeros_like(image)),
        (S.ksampler_sigmas(scheduler, 3, 1.0, MS, sampler_name=sampler), torch.zeros_like(image)),
        (S.ksampler_sigmas(scheduler, 9, 1.0, MS, sampler_name=sampler), torch.zeros_like(image)),
        (S.ksampler_sigmas(scheduler, 8, 0.6, MS, sampler_name=sampler), image),
        (S.advanced_sigmas(scheduler, 10, 0, 5, False, MS, sampler_name=sampler), torch.zeros_like(image)),
    ]
    for sigmas, latent in cases:
        ours = run(sampler, scheduler, sigmas, latent, noise)
        theirs = comfy_unipc_reference("bh1" if sampler == "uni_pc" else "bh2", sigmas, latent, noise)
        torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=2e-4)


@pytest.mark.parametrize("sampler", ["euler_ancestral", "dpm_2_ancestral"])
@pytest.mark.parametrize("scheduler", ["normal", "karras"])
def test_ancestral_samplers_off_the_cpu_run_on_noodles_steps_with_comfys_math(sampler: str, scheduler: str) -> None:
    # on a GPU ComfyUI draws their step noise from a generator on the device, which diffusers cannot: those plans
    # run on Noodle's own steps (checked here on the CPU, where the same steps draw the same numbers)
    sigmas = S.ksampler_sigmas(scheduler, 7, 1.0, MS, sampler_name=sampler)
    assert S.build_scheduler(sampler, scheduler, sigmas, 99, device=torch.device("cuda")).mechanism == "k-diffusion"
    assert S.build_scheduler(sampler, scheduler, sigmas, 99, device=torch.device("cpu")).mechanism != "k-diffusion"
    from engine.samplers.plan import _kdiff_plan

    image, noise = latents(11)
    for sigmas, latent in [(sigmas, torch.zeros_like(image)),
                           (S.ksampler_sigmas(scheduler, 8, 0.6, MS, sampler_name=sampler), image)]:
        plan = _kdiff_plan(sampler, scheduler, sigmas, 99, S.DEFAULT_SAMPLING, None)
        ours = S.sample(plan, gaussian_eps, latent, noise)
        torch.testing.assert_close(ours, comfy_reference(sampler, sigmas, latent, noise, seed=99), rtol=1e-4, atol=1e-4)
