"""engine/samplers/sigmas.py: ComfyUI's training sigmas, its nine schedules, and the KSampler nodes' cuts."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from engine import samplers as S
from tests.engine.samplers.sampler_support import MS, SIGMA_MAX, SIGMA_MIN


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
