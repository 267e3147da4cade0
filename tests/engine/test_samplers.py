"""engine/samplers.py: ComfyUI's sigma schedules, their diffusers plans, and the sampling loop.

The comparison with ComfyUI's own samplers is in test_samplers_reference.py.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from engine import samplers as S

# torchsde rounds a Brownian tree's ends to its tolerance and warns when a query at the exact end falls outside;
# ComfyUI's dpmpp SDE samplers get the same clamped values and warnings.
pytestmark = pytest.mark.filterwarnings("ignore:Should have t:UserWarning")

MS = S.model_sigmas()
SIGMA_MIN, SIGMA_MAX = 0.0292, 14.6146
DATA_MEAN, DATA_STD = 0.3, 0.5
STOCHASTIC = ("euler_ancestral", "dpm_2_ancestral", "dpmpp_sde", "dpmpp_2m_sde")


def gaussian_eps(x_in: torch.Tensor, timestep: torch.Tensor, sigma: float) -> torch.Tensor:
    """The exact eps for data ~ N(DATA_MEAN, DATA_STD^2) per element: nonlinear in sigma, so solvers differ."""
    x = x_in * math.sqrt(sigma**2 + 1)
    x0 = (DATA_STD**2 * x + sigma**2 * DATA_MEAN) / (DATA_STD**2 + sigma**2)
    return (x - x0) / sigma


def point_eps(x0: torch.Tensor) -> Callable[[torch.Tensor, torch.Tensor, float], torch.Tensor]:
    """The exact eps when all data is the single point x0."""
    return lambda x_in, timestep, sigma: (x_in * math.sqrt(sigma**2 + 1) - x0) / sigma


def latents(seed: int = 7, shape: tuple[int, ...] = (2, 4, 8, 8)) -> tuple[torch.Tensor, torch.Tensor]:
    """An image-like latent and initial noise for a batch of two."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g) * 0.5, torch.randn(shape, generator=g)


def run(sampler: str, scheduler: str, sigmas: torch.Tensor, latent: torch.Tensor, noise: torch.Tensor,
        seed: int = 42, eps: S.EpsFn = gaussian_eps,
        callback: Callable[[int, int, torch.Tensor], None] | None = None) -> torch.Tensor:
    return S.sample(S.build_scheduler(sampler, scheduler, sigmas, seed), eps, latent, noise, callback=callback)


# --- ComfyUI's sigmas ---------------------------------------------------------------------------------------

def test_model_sigmas_are_sd_training_sigmas() -> None:
    assert MS.shape == (1000,) and MS.dtype == torch.float64
    assert float(MS[0]) == pytest.approx(SIGMA_MIN, abs=1e-4) and float(MS[-1]) == pytest.approx(SIGMA_MAX, abs=1e-4)


@pytest.mark.parametrize("scheduler,expected", [
    # COMFY_FACTS
    ("normal", [14.6146, 2.9183, 0.9324, 0.0292, 0.0]),
    ("karras", [14.6146, 3.1686, 0.4469, 0.0292, 0.0]),
    # computed by ComfyUI 0.3.64's own scheduler functions (comfy/samplers.py), which these match bit for bit
    ("simple", [14.6146, 4.0817, 1.6129, 0.6932, 0.0]),
    ("sgm_uniform", [14.6146, 4.0861, 1.6156, 0.6951, 0.0]),
    ("exponential", [14.6146, 1.8400, 0.2317, 0.0292, 0.0]),
    ("ddim_uniform", [4.1167, 1.6237, 0.6984, 0.0413, 0.0]),
    ("beta", [14.6146, 5.6866, 1.6183, 0.5154, 0.0]),
    ("linear_quadratic", [14.6146, 14.4320, 14.2493, 10.5956, 0.0]),
    ("kl_optimal", [14.6146, 1.5971, 0.5729, 0.0292, 0.0]),
])
def test_comfy_sigmas_at_four_steps(scheduler: str, expected: list[float]) -> None:
    sigmas = S.comfy_sigmas(scheduler, 4, MS)
    assert sigmas.dtype == torch.float32
    assert sigmas.tolist() == pytest.approx(expected, abs=1e-4)


def test_timestep_for_sigma_is_the_nearest_training_step_in_log_sigma() -> None:
    assert S.timestep_for_sigma(MS.float(), MS).tolist() == list(range(1000))
    between = math.sqrt(float(MS[10]) * float(MS[11])) * 0.999  # just below the log midpoint
    assert float(S.timestep_for_sigma(between, MS)) == 10.0
    assert float(S.timestep_for_sigma(100.0, MS)) == 999.0


def expected_length(scheduler: str, steps: int) -> int | None:
    if scheduler == "ddim_uniform":
        return len(range(1, 1000, max(1000 // steps, 1))) + 1
    return None if scheduler == "beta" else steps + 1


@settings(max_examples=300, deadline=None)
@given(steps=st.integers(1, 60), scheduler=st.sampled_from(S.SCHEDULER_NAMES))
def test_comfy_sigmas_shape(steps: int, scheduler: str) -> None:
    if scheduler == "kl_optimal" and steps == 1:
        with pytest.raises(ValueError, match="kl_optimal needs at least 2 steps"):
            S.comfy_sigmas(scheduler, steps, MS)
        return
    sigmas = S.comfy_sigmas(scheduler, steps, MS)
    length = expected_length(scheduler, steps)
    assert len(sigmas) == length if length is not None else 2 <= len(sigmas) <= steps + 1  # beta drops repeats
    assert bool((sigmas[1:] <= sigmas[:-1]).all()), sigmas
    assert float(sigmas[-1]) == 0.0 and bool((sigmas[:-1] > 0).all())
    if scheduler != "ddim_uniform":  # ddim_uniform starts at training index 1 + k * (1000 // steps)
        assert float(sigmas[0]) == pytest.approx(SIGMA_MAX, rel=1e-5)


def test_unknown_scheduler_and_bad_steps_are_refused() -> None:
    with pytest.raises(ValueError, match="unknown scheduler 'warp'.*karras"):
        S.comfy_sigmas("warp", 4, MS)
    with pytest.raises(ValueError, match="at least 1"):
        S.comfy_sigmas("normal", 0, MS)


def test_ksampler_denoise_takes_the_tail_of_a_longer_schedule() -> None:
    normal = lambda steps: S.comfy_sigmas("normal", steps, MS)  # noqa: E731
    ks = lambda steps, denoise, sampler="euler": S.ksampler_sigmas(  # noqa: E731
        "normal", steps, denoise, MS, sampler_name=sampler)
    assert torch.equal(ks(4, 1.0), normal(4))
    assert torch.equal(ks(4, 0.99995), normal(4))  # above 0.9999 counts as a full denoise
    assert torch.equal(ks(4, 0.5), normal(8)[-5:])  # int(4 / 0.5) = 8
    assert torch.equal(ks(20, 0.3), normal(66)[-21:])  # int(66.67) = 66
    assert torch.equal(ks(10, 0.75), normal(13)[-11:])
    # literal values as ComfyUI 0.3.64's own KSampler.set_steps computes them
    assert ks(4, 0.5).tolist() == pytest.approx([1.2768, 0.7913, 0.4397, 0.0292, 0.0], abs=1e-4)
    assert S.ksampler_sigmas("karras", 4, 1.0, MS, sampler_name="dpm_2").tolist() == pytest.approx(
        [14.6146, 4.7965, 1.2741, 0.2479, 0.0], abs=1e-4)
    assert len(ks(4, 0.0)) == 0 and len(ks(4, -1.0)) == 0
    # dpm_2 and uni_pc compute one step more and drop the penultimate sigma (DISCARD_PENULTIMATE)
    five = normal(5)
    assert torch.equal(ks(4, 1.0, "dpm_2"), torch.cat([five[:-2], five[-1:]]))
    assert torch.equal(ks(4, 0.5, "uni_pc"), torch.cat([normal(9)[:-2], normal(9)[-1:]])[-5:])


def test_advanced_start_and_end_steps() -> None:
    full = S.comfy_sigmas("karras", 10, MS)
    adv = lambda start, end, force, sampler="euler": S.advanced_sigmas(  # noqa: E731
        "karras", 10, start, end, force, MS, sampler_name=sampler)
    assert torch.equal(adv(0, 10000, True), full)
    assert torch.equal(adv(0, 5, False), full[:6])  # leftover noise: ends above 0
    assert adv(0, 5, True).tolist() == full[:5].tolist() + [0.0]
    assert torch.equal(adv(5, 10000, True), full[5:])
    assert torch.equal(adv(3, 7, False), full[3:8])
    assert adv(3, 7, False).tolist() == pytest.approx([3.1686, 1.7494, 0.9141, 0.4469, 0.2014], abs=1e-4)
    assert adv(3, 7, True).tolist() == full[3:7].tolist() + [0.0]
    assert len(adv(9, 10000, True)) == 2
    for start, end in ((10, 10000), (12, 10000), (0, 0), (5, 5), (6, 5)):
        assert len(adv(start, end, True)) == 0  # ComfyUI returns the latent unchanged
    five = S.comfy_sigmas("karras", 11, MS)
    assert torch.equal(adv(0, 10000, True, "dpm_2"), torch.cat([five[:-2], five[-1:]]))


# --- plans --------------------------------------------------------------------------------------------------

def comfy_target(sampler: str, sigmas: torch.Tensor) -> torch.Tensor:
    target = sigmas.clone()
    if sampler.startswith("uni_pc") and target[-1] == 0:
        target[-1] = 0.001  # ComfyUI's UniPC stops at 0.001
    return target


def sigma_cases(sampler: str, scheduler: str) -> list[torch.Tensor]:
    cases = []
    for steps in (1, 2, 7, 20):
        try:
            cases.append(S.ksampler_sigmas(scheduler, steps, 1.0, MS, sampler_name=sampler))
        except ValueError:
            assert scheduler == "kl_optimal" and steps == 1
    cases.append(S.ksampler_sigmas(scheduler, 10, 0.6, MS, sampler_name=sampler))
    cases.append(S.advanced_sigmas(scheduler, 12, 0, 6, False, MS, sampler_name=sampler))
    cases.append(S.advanced_sigmas(scheduler, 12, 4, 9, True, MS, sampler_name=sampler))
    return cases


@pytest.mark.parametrize("sampler", S.SUPPORTED_SAMPLERS)
def test_every_pair_steps_through_comfys_sigmas_or_is_refused(sampler: str) -> None:
    for scheduler in S.SCHEDULER_NAMES:
        for sigmas in sigma_cases(sampler, scheduler):
            try:
                plan = S.build_scheduler(sampler, scheduler, sigmas, seed=1)
            except S.UnfaithfulSampler as err:
                message = str(err)
                assert repr(sampler) in message and repr(scheduler) in message and "schedulers that work" in message
                assert sampler.startswith("uni_pc") and len(sigmas) == 2  # the only refusal: UniPC at one step
                continue
            torch.testing.assert_close(plan.effective_sigmas, comfy_target(sampler, sigmas), rtol=1e-4, atol=1e-8)
            n = len(sigmas) - 1
            two_calls = sampler in ("heun", "dpm_2", "dpm_2_ancestral", "dpmpp_sde")
            assert len(plan.calls) == (2 * n - int(sigmas[-1] == 0) if two_calls else n)
            # the UNet gets ComfyUI's timestep for each call's sigma; each step starts at its sigma
            starts = [sigma for _, sigma in plan.calls[:: 2 if two_calls else 1]][:n]
            assert starts == pytest.approx(sigmas[:-1].tolist(), rel=1e-6)
            for timestep, sigma in plan.calls:
                assert timestep == int(S.timestep_for_sigma(sigma, MS))


def test_uni_pc_single_step_is_refused_with_the_reason() -> None:
    # ComfyUI's UniPC uses order min(3, steps - 1): at one step it hands back its input undenoised
    refusal = "'uni_pc' with scheduler 'karras'.*single step.*work with 'uni_pc' at 1 steps: none"
    with pytest.raises(S.UnfaithfulSampler, match=refusal):
        S.check_pair("uni_pc", "karras", 1)
    assert S.supported_schedulers("uni_pc", 1) == []
    assert S.supported_schedulers("uni_pc", 2) == list(S.SCHEDULER_NAMES)


def test_supported_schedulers_and_check_pair() -> None:
    for sampler in S.SUPPORTED_SAMPLERS:
        assert S.supported_schedulers(sampler, 20) == list(S.SCHEDULER_NAMES)
    assert S.supported_schedulers("euler", 1) == [s for s in S.SCHEDULER_NAMES if s != "kl_optimal"]
    S.check_pair("dpmpp_2m", "normal", 20)
    S.check_pair("heun", "beta", 30, denoise=0.4)
    refusal = "'kl_optimal'.*NaN.*schedulers that work with 'euler' at 1 steps: simple, sgm_uniform"
    with pytest.raises(S.UnfaithfulSampler, match=refusal):
        S.check_pair("euler", "kl_optimal", 1)


def test_unsupported_and_unknown_names() -> None:
    assert S.SAMPLER_NAMES[:3] == ("euler", "euler_cfg_pp", "euler_ancestral") and len(S.SAMPLER_NAMES) == 42
    assert S.SAMPLER_NAMES[-3:] == ("ddim", "uni_pc", "uni_pc_bh2")
    assert set(S.SUPPORTED_SAMPLERS) >= {"euler", "euler_ancestral", "heun", "dpm_2", "dpm_2_ancestral", "lms",
                                         "dpmpp_2m", "dpmpp_2m_sde", "dpmpp_sde", "ddim", "uni_pc"}
    assert S.SUPPORTED_SAMPLERS == tuple(n for n in S.SAMPLER_NAMES if n in S.SUPPORTED_SAMPLERS)  # ComfyUI order
    with pytest.raises(S.UnfaithfulSampler, match="'dpm_fast' has no faithful.*use one of: euler, euler_ancestral"):
        S.check_pair("dpm_fast", "normal", 20)
    with pytest.raises(S.UnfaithfulSampler, match="dpmpp_3m_sde"):
        S.build_scheduler("dpmpp_3m_sde", "karras", S.comfy_sigmas("karras", 4, MS), 0)
    with pytest.raises(ValueError, match="unknown sampler 'eulr'") as info:
        S.check_pair("eulr", "normal", 20)
    assert not isinstance(info.value, S.UnfaithfulSampler)
    with pytest.raises(ValueError, match="unknown scheduler 'karas'"):
        S.build_scheduler("euler", "karas", S.comfy_sigmas("karras", 4, MS), 0)


def test_plan_uses_comfy_config_and_seeded_generators() -> None:
    sigmas = S.comfy_sigmas("karras", 8, MS)
    plan = S.build_scheduler("dpmpp_2m", "karras", sigmas, 5)
    config = plan.scheduler.config
    assert (config.beta_schedule, config.beta_start, config.beta_end) == ("scaled_linear", 0.00085, 0.012)
    assert (config.timestep_spacing, config.prediction_type) == ("linspace", "epsilon")
    assert (config.algorithm_type, config.solver_order, config.final_sigmas_type) == ("dpmsolver++", 2, "zero")
    assert plan.generator is None and plan.steps == 8
    # ancestral step noise comes from a CPU generator seeded with the job seed: its first draw is the
    # initial noise (comfy/sample.py prepare_noise draws with torch.manual_seed(seed))
    ancestral = S.build_scheduler("euler_ancestral", "karras", sigmas, 1234)
    shape = (2, 4, 8, 8)
    assert torch.equal(torch.randn(shape, generator=ancestral.generator),
                       torch.randn(shape, generator=torch.manual_seed(1234)))


# --- sampling -----------------------------------------------------------------------------------------------

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
    torch.testing.assert_close(out, x0 + 0.001 * noise if unipc else x0, atol=2e-4 if unipc else 1e-4, rtol=0)


@pytest.mark.parametrize("sampler", S.SUPPORTED_SAMPLERS)
def test_callback_counts_comfy_steps_and_can_interrupt(sampler: str) -> None:
    latent, noise = latents()
    sigmas = S.ksampler_sigmas("karras", 6, 1.0, MS, sampler_name=sampler)
    seen: list[tuple[int, int]] = []
    run(sampler, "karras", sigmas, torch.zeros_like(latent), noise, callback=lambda i, n, x: seen.append((i, n)))
    assert seen == [(i, 6) for i in range(6)]

    class Interrupted(Exception):
        pass

    def stop(i: int, n: int, x: torch.Tensor) -> None:
        if i == 2:
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
