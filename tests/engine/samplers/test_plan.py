"""engine/samplers/plan.py: diffusers schedulers stepping through ComfyUI's sigmas, or refusing the pair."""

from __future__ import annotations

import pytest
import torch

from engine import samplers as S
from tests.engine.samplers.sampler_support import MS


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


@pytest.mark.parametrize("sampler", [name for name in S.SUPPORTED_SAMPLERS if not S.uses_kdiffusion(name)])
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
    assert S.SUPPORTED_SAMPLERS == S.SAMPLER_NAMES  # every ComfyUI sampler, in ComfyUI's order
    # the ones diffusers has no scheduler for run on Noodle's own k-diffusion steps, with any scheduler
    assert S.uses_kdiffusion("dpm_fast") and S.supported_schedulers("dpm_fast", 20) == list(S.SCHEDULER_NAMES)
    assert S.build_scheduler("dpmpp_3m_sde", "karras", S.comfy_sigmas("karras", 4, MS), 0).mechanism == "k-diffusion"
    with pytest.raises(ValueError, match="sampler 'dpm_fast' takes no option 'eta'"):
        S.build_scheduler("dpm_fast", "karras", S.comfy_sigmas("karras", 4, MS), 0, options={"eta": 0.5})
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
