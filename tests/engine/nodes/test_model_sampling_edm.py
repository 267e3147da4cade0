"""ModelSamplingContinuousEDM: ComfyUI 0.3.64's continuous sigma range, timesteps, schedules and denoising."""

from __future__ import annotations

import copy
import math
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from engine import samplers
from engine.errors import WorkflowInvalid
from engine.executor import Executor
from engine.nodes.guidance import guided_eps
from engine.samplers.model_sampling import EDM_PREDICTIONS, ContinuousEDM, percent_to_sigma
from engine.values import CondItem, Conditioning
from tests.engine.conftest import txt2img
from tests.engine.nodes.test_model_sampling import ConstantUNet


class ComfyEDM:
    """comfy/model_sampling.py ModelSamplingContinuousEDM with EPS / V_PREDICTION / EDM, compactly."""

    def __init__(self, prediction: str, sigma_min: float = 0.002, sigma_max: float = 120.0) -> None:
        self.prediction = prediction
        self.sigma_data = 0.5 if prediction == "edm" else 1.0
        self.sigmas = torch.linspace(math.log(sigma_min), math.log(sigma_max), 1000).exp()
        self.sigma_min, self.sigma_max = self.sigmas[0], self.sigmas[-1]

    def timestep(self, sigma: torch.Tensor) -> torch.Tensor:
        return 0.25 * sigma.log()

    def sigma(self, timestep: torch.Tensor) -> torch.Tensor:
        return (timestep / 0.25).exp()

    def percent_to_sigma(self, percent: float) -> float:
        if percent <= 0.0:
            return 999999999.9
        if percent >= 1.0:
            return 0.0
        log_sigma_min = math.log(self.sigma_min)
        return math.exp((math.log(self.sigma_max) - log_sigma_min) * (1.0 - percent) + log_sigma_min)

    def calculate_input(self, sigma: float, x: torch.Tensor) -> torch.Tensor:
        return x / (sigma**2 + self.sigma_data**2) ** 0.5

    def calculate_denoised(self, sigma: float, out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        sd = self.sigma_data
        if self.prediction == "eps":
            return x - out * sigma
        sign = 1.0 if self.prediction == "edm" else -1.0
        return x * sd**2 / (sigma**2 + sd**2) + sign * out * sigma * sd / (sigma**2 + sd**2) ** 0.5


def comfy_normal(s: ComfyEDM, steps: int, sgm: bool = False) -> torch.Tensor:
    """comfy/samplers.py normal_scheduler."""
    start, end = s.timestep(s.sigma_max), s.timestep(s.sigma_min)
    append_zero = True
    if sgm:
        timesteps = torch.linspace(start, end, steps + 1)[:-1]
    else:
        if math.isclose(float(s.sigma(end)), 0, abs_tol=0.00001):
            steps += 1
            append_zero = False
        timesteps = torch.linspace(start, end, steps)
    sigs = [float(s.sigma(ts)) for ts in timesteps]
    return torch.FloatTensor(sigs + ([0.0] if append_zero else []))


def comfy_simple(s: ComfyEDM, steps: int) -> torch.Tensor:
    ss = len(s.sigmas) / steps
    return torch.FloatTensor([float(s.sigmas[-(1 + int(x * ss))]) for x in range(steps)] + [0.0])


def comfy_karras(s: ComfyEDM, n: int) -> torch.Tensor:
    ramp = torch.linspace(0, 1, n)
    min_inv, max_inv = float(s.sigma_min) ** (1 / 7), float(s.sigma_max) ** (1 / 7)
    return torch.cat([(max_inv + ramp * (min_inv - max_inv)) ** 7, torch.zeros(1)])


def test_the_table_and_its_ends_are_comfys_buffer() -> None:
    ours, theirs = ContinuousEDM(), ComfyEDM("v_prediction")
    assert torch.equal(ours.table, theirs.sigmas)
    assert ours.sigma_min == float(theirs.sigma_min) and ours.sigma_max == float(theirs.sigma_max)
    sigma = torch.tensor([0.01, 1.0, 50.0])
    assert torch.equal(ours.timestep(sigma), theirs.timestep(sigma))  # 0.25 * log(sigma), negative below 1
    for percent in (0.0, 0.1, 0.5, 0.93, 1.0):
        assert percent_to_sigma(percent, ours) == pytest.approx(theirs.percent_to_sigma(percent), rel=1e-12)


@pytest.mark.parametrize("steps", [1, 4, 20])
def test_schedules_read_the_continuous_model_as_comfys_do(steps: int) -> None:
    ours, theirs = ContinuousEDM("edm", sigma_low=0.01, sigma_high=80.0), ComfyEDM("edm", 0.01, 80.0)
    assert torch.allclose(samplers.comfy_sigmas("normal", steps, ours), comfy_normal(theirs, steps), rtol=1e-6)
    assert torch.allclose(samplers.comfy_sigmas("sgm_uniform", steps, ours), comfy_normal(theirs, steps, sgm=True),
                          rtol=1e-6)
    assert torch.equal(samplers.comfy_sigmas("simple", steps, ours), comfy_simple(theirs, steps))
    assert torch.allclose(samplers.comfy_sigmas("karras", steps, ours), comfy_karras(theirs, steps), rtol=1e-6)
    assert float(samplers.comfy_sigmas("exponential", steps, ours)[0]) == pytest.approx(80.0, rel=1e-5)


def one_call(sampling: ContinuousEDM, x: torch.Tensor, output: torch.Tensor, sigma: float) -> tuple[torch.Tensor, ...]:
    cond = Conditioning((CondItem(torch.zeros(1, 77, 8)),))
    unet = ConstantUNet(output)
    eps = guided_eps(unet, cond, cond, cfg=1.0, sdxl=False, pixel_size=(64, 64), sampling=sampling)
    denoised = x - sigma * eps(x / math.sqrt(sigma**2 + 1), sampling.timestep(sigma), sigma)
    return denoised, unet.seen[0][0], unet.seen[0][1]


@pytest.mark.parametrize("prediction", ["v_prediction", "edm", "eps"])
def test_denoised_and_unet_input_are_comfys_per_prediction_type(prediction: str) -> None:
    gen = torch.Generator().manual_seed(4)
    x, out = torch.randn(1, 4, 8, 8, generator=gen) * 5, torch.randn(1, 4, 8, 8, generator=gen)
    ours, theirs = ContinuousEDM(prediction), ComfyEDM(prediction)
    for sigma in (80.0, 3.0, 0.5, 0.01):
        denoised, seen, timestep = one_call(ours, x, out, sigma)
        assert torch.allclose(denoised, theirs.calculate_denoised(sigma, out, x), atol=1e-4, rtol=1e-5)
        assert torch.allclose(seen, theirs.calculate_input(sigma, x), atol=1e-5, rtol=1e-5)
        assert float(timestep) == pytest.approx(0.25 * math.log(sigma), abs=1e-6)


def test_euler_on_edm_runs_as_k_diffusion_with_comfys_denoiser() -> None:
    sampling, comfy = ContinuousEDM("edm", sigma_low=0.002, sigma_high=80.0), ComfyEDM("edm", 0.002, 80.0)
    sigmas = samplers.ksampler_sigmas("karras", 8, 1.0, sampling, sampler_name="euler")
    noise = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    weight = torch.linspace(-0.5, 0.5, 4).view(1, 4, 1, 1)
    seen: list[float] = []

    def eps_fn(scaled: torch.Tensor, timestep: torch.Tensor, sigma: float) -> torch.Tensor:
        seen.append(float(timestep))
        return sampling.to_eps(torch.tanh(sampling.model_input(scaled, sigma)) * weight, scaled, sigma)

    plan = samplers.build_scheduler("euler", "karras", sigmas, 0, sampling)
    out = samplers.sample(plan, eps_fn, torch.zeros(1, 4, 8, 8), noise)
    x = noise * math.sqrt(1 + float(sigmas[0]) ** 2)  # EPS.noise_scaling: sigma_max is the model's 80
    for i in range(len(sigmas) - 1):
        s = float(sigmas[i])
        d = (x - comfy.calculate_denoised(s, torch.tanh(comfy.calculate_input(s, x)) * weight, x)) / s
        x = x + d * (sigmas[i + 1] - sigmas[i])
    assert torch.allclose(out, x, atol=1e-5), float((out - x).abs().max())  # measured 5e-7
    assert seen == pytest.approx([0.25 * math.log(float(s)) for s in sigmas[:-1]], abs=1e-5)


def with_edm(workflow: dict[str, Any], **inputs: Any) -> dict[str, Any]:
    changed = copy.deepcopy(workflow)
    changed["20"] = {"class_type": "ModelSamplingContinuousEDM",
                     "inputs": {"model": ["4", 0], "sampling": "v_prediction", "sigma_max": 120.0,
                                "sigma_min": 0.002, **inputs}}
    changed["3"]["inputs"]["model"] = ["20", 0]
    return changed


def pixels(executor: Executor, workflow: dict[str, Any]) -> np.ndarray:
    [image] = executor.run(workflow).outputs["9"]["images"]
    return np.asarray(Image.open(executor.settings.output_dir / image["subfolder"] / image["filename"])).astype(int)


@pytest.mark.parametrize(("sampling", "sampler", "scheduler"),
                         [("v_prediction", "euler", "normal"), ("edm", "dpmpp_2m", "karras"),
                          ("eps", "dpmpp_2s_ancestral", "exponential")])
def test_an_edm_workflow_runs_on_the_tiny_model(executor: Executor, sampling: str, sampler: str,
                                                scheduler: str) -> None:
    plain = txt2img(seed=1502, sampler_name=sampler, scheduler=scheduler)
    result = executor.run(with_edm(plain, sampling=sampling, sigma_max=80.0))
    assert "continuous EDM" in str(result.meta)
    assert np.abs(pixels(executor, with_edm(plain, sampling=sampling, sigma_max=80.0))
                  - pixels(executor, plain)).max() > 0


@pytest.mark.parametrize("refused", ["cosmos_rflow", "edm_playground_v2.5"])
def test_a_sampling_noodle_cannot_run_is_refused_by_name(executor: Executor, refused: str) -> None:
    assert refused in EDM_PREDICTIONS  # ComfyUI's list, refused here with the reason
    with pytest.raises(WorkflowInvalid, match=f"{refused}.*not supported") as err:
        executor.validate(with_edm(txt2img(), sampling=refused))
    assert "v_prediction, edm, eps" in str(err.value.body)


def test_an_empty_sigma_range_is_refused(executor: Executor) -> None:
    with pytest.raises(WorkflowInvalid, match="0 < sigma_min < sigma_max"):
        executor.validate(with_edm(txt2img(), sigma_min=0.0))
    with pytest.raises(WorkflowInvalid, match="0 < sigma_min < sigma_max"):
        executor.validate(with_edm(txt2img(), sigma_min=5.0, sigma_max=5.0))


def test_the_choice_list_and_defaults_are_comfys() -> None:
    from engine.nodes import catalog

    specs = {s.name: s for s in catalog()["ModelSamplingContinuousEDM"].input_specs()}
    assert list(specs["sampling"].choices) == ["v_prediction", "edm", "edm_playground_v2.5", "eps", "cosmos_rflow"]
    assert (specs["sigma_max"].default, specs["sigma_min"].default) == (120.0, 0.002)
    assert (specs["sigma_max"].min, specs["sigma_max"].max) == (0.0, 1000.0)


def test_every_sampler_runs_on_the_continuous_sigmas_or_is_refused_by_name() -> None:
    from tests.engine.samplers.sampler_support import gaussian_eps, latents

    sampling = ContinuousEDM("v_prediction", sigma_low=0.002, sigma_high=120.0)
    latent, noise = latents(shape=(1, 4, 8, 8))
    for sampler in samplers.SUPPORTED_SAMPLERS:
        for scheduler in ("normal", "karras", "simple"):
            sigmas = samplers.ksampler_sigmas(scheduler, 6, 1.0, sampling, sampler_name=sampler)
            try:
                plan = samplers.build_scheduler(sampler, scheduler, sigmas, 0, sampling)
            except samplers.UnfaithfulSampler as err:
                assert sampler in str(err) and scheduler in str(err)
                continue
            assert plan.sigma_max == sampling.sigma_max  # the initial noise scale follows the model's 120
            out = samplers.sample(plan, gaussian_eps, latent, noise)
            assert torch.isfinite(out).all(), (sampler, scheduler)
