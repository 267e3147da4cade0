"""engine/samplers/loop.py: the sampling loop: start noise, model input, steps, callbacks, seeded step noise.

The comparison with ComfyUI's own samplers is in test_against_comfyui.py.
"""

from __future__ import annotations

import math

import pytest
import torch

from engine import samplers as S
from tests.engine.samplers.sampler_support import MS, SIGMA_MAX, STOCHASTIC, gaussian_eps, latents, point_eps, run

# torchsde rounds a Brownian tree's ends to its tolerance and warns when a query at the exact end falls outside;
# ComfyUI's dpmpp SDE samplers get the same clamped values and warnings.
pytestmark = pytest.mark.filterwarnings("ignore:Should have t:UserWarning")


def test_noise_scaling_and_model_input() -> None:
    noise, latent = torch.ones(1, 4, 2, 2), torch.full((1, 4, 2, 2), 0.5)
    assert float(S.noise_scaling(SIGMA_MAX, noise, latent, max_denoise=True)[0, 0, 0, 0]) == pytest.approx(
        math.sqrt(1 + SIGMA_MAX**2) + 0.5, rel=1e-6)
    assert float(S.noise_scaling(2.0, noise, latent, max_denoise=False)[0, 0, 0, 0]) == pytest.approx(2.5)
    assert float(S.scale_model_input(torch.tensor(5.0), 2.0)) == pytest.approx(5 / math.sqrt(5))


@pytest.mark.parametrize("sampler", S.SUPPORTED_SAMPLERS)
@pytest.mark.parametrize("scheduler", ["normal", "karras", "exponential"])
def test_every_sampler_converges_to_a_single_data_point(sampler: str, scheduler: str) -> None:
    x0, noise = latents()
    sigmas = S.ksampler_sigmas(scheduler, 10, 1.0, MS, sampler_name=sampler)
    out = run(sampler, scheduler, sigmas, torch.zeros_like(x0), noise, eps=point_eps(x0))
    # ComfyUI's UniPC stops at sigma 0.001: the exact solution there is x0 + 0.001 * noise (float32 VP round
    # trips cost it a little more than the rest)
    unipc = sampler.startswith("uni_pc")
    if sampler in ("dpm_fast", "dpm_adaptive"):
        # ComfyUI's DPM-Solver wrappers stop at the last sigma above 0: the exact ODE solution for a single data
        # point there is x0 + (x_start - x0) * sigma_end / sigma_start
        start, end = float(sigmas[0]), float(sigmas[-2])
        x_start = noise * math.sqrt(1 + start**2)
        torch.testing.assert_close(out, x0 + (x_start - x0) * end / start, atol=1e-4, rtol=0)
        return
    torch.testing.assert_close(out, x0 + 0.001 * noise if unipc else x0, atol=2e-4 if unipc else 1e-4, rtol=0)


@pytest.mark.parametrize("sampler", S.SUPPORTED_SAMPLERS)
def test_callback_counts_comfy_steps_and_can_interrupt(sampler: str) -> None:
    latent, noise = latents()
    sigmas = S.ksampler_sigmas("karras", 6, 1.0, MS, sampler_name=sampler)
    seen: list[tuple[int, int]] = []
    run(sampler, "karras", sigmas, torch.zeros_like(latent), noise, callback=lambda i, n, x: seen.append((i, n)))
    if sampler in ("dpm_fast", "dpm_adaptive"):
        # DPM-Solver takes steps of its own (orders 3, 2, 1; adaptive sizes): progress is its share of the way,
        # in the sigma list's steps, never going back and ending on the last
        indices = [i for i, _ in seen]
        assert indices == sorted(indices) and indices[-1] == 5 and {n for _, n in seen} == {6}
    else:
        assert seen == [(i, 6) for i in range(6)]

    class Interrupted(Exception):
        pass

    def stop(i: int, n: int, x: torch.Tensor) -> None:
        if i >= 2:  # dpm_adaptive's progress may jump past a step index
            raise Interrupted

    with pytest.raises(Interrupted):
        run(sampler, "karras", sigmas, torch.zeros_like(latent), noise, callback=stop)


@pytest.mark.parametrize("sampler", STOCHASTIC)
def test_stochastic_samplers_are_deterministic_per_seed(sampler: str) -> None:
    latent, noise = latents()
    sigmas = S.ksampler_sigmas("karras", 6, 1.0, MS, sampler_name=sampler)
    first, again = (run(sampler, "karras", sigmas, torch.zeros_like(latent), noise, seed=3) for _ in range(2))
    other = run(sampler, "karras", sigmas, torch.zeros_like(latent), noise, seed=4)
    assert torch.equal(first, again)
    assert (first - other).abs().max() > 1e-2


def test_plan_runs_once_and_empty_sigmas_return_the_latent() -> None:
    latent, noise = latents()
    plan = S.build_scheduler("euler", "normal", S.comfy_sigmas("normal", 3, MS), 0)
    S.sample(plan, gaussian_eps, torch.zeros_like(latent), noise)
    with pytest.raises(ValueError, match="already run"):
        S.sample(plan, gaussian_eps, torch.zeros_like(latent), noise)
    empty = S.build_scheduler("heun", "normal", S.ksampler_sigmas("normal", 4, 0.0, MS, sampler_name="heun"), 0)
    assert empty.steps == 0 and empty.calls == ()
    assert S.sample(empty, gaussian_eps, latent, noise) is latent


@pytest.mark.parametrize("sampler", ["euler", "heun", "dpmpp_2m", "ipndm", "dpmpp_3m_sde"])
def test_preview_is_comfys_x0_with_a_fractional_noise_mask(sampler: str) -> None:
    # KSamplerX0Inpaint hands the callback denoised * mask + original * (1 - mask), once: with a single data point
    # the model's estimate is x0 everywhere, so each step's preview must be exactly that blend on either path
    x0, noise = latents(4)
    original = torch.full_like(x0, -0.7)
    mask = torch.linspace(0, 1, 64).reshape(1, 1, 8, 8).expand(2, 1, 8, 8)
    sigmas = S.ksampler_sigmas("karras", 5, 1.0, MS, sampler_name=sampler)
    seen: list[torch.Tensor] = []
    S.sample(S.build_scheduler(sampler, "karras", sigmas, 3), point_eps(x0), original, noise, denoise_mask=mask,
             preview=lambda step, denoised: seen.append(denoised))
    assert len(seen) == 5
    m = mask.expand_as(x0)
    for denoised in seen:
        torch.testing.assert_close(denoised, x0 * m + original * (1 - m), atol=1e-4, rtol=0)
