"""Custom sampling (engine/nodes/custom_sampling.py): each scheduler's sigmas against ComfyUI 0.3.64's formula,
BasicScheduler against KSampler's schedule, SamplerCustom's pictures against the KSampler runs they stand for,
and the cost check counting a SIGMAS list's steps."""

from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from engine import samplers
from engine.cost import LIMIT_EXCEEDED, validate_within_limits
from engine.errors import NodeExecutionError, WorkflowInvalid
from engine.executor import Executor
from engine.nodes import catalog
from engine.object_info import node_info
from engine.nodes.custom_sampling import basic_sigmas
from engine.samplers import DEFAULT_SAMPLING, SCHEDULER_NAMES, ModelSampling, ksampler_sigmas, model_sigmas
from engine.settings import Limits
from engine.values import Sampler, Sigmas
from tests.engine.conftest import txt2img


def run(class_type: str, **inputs: Any) -> Any:
    return catalog()[class_type].model_validate(inputs).run(None)  # type: ignore[arg-type]


def test_karras_exponential_and_polyexponential_are_comfyuis_formulas() -> None:
    n, hi, lo = 7, 14.614642, 0.0291675
    ramp = torch.linspace(0, 1, n)
    karras = (hi ** (1 / 3.5) + ramp * (lo ** (1 / 3.5) - hi ** (1 / 3.5))) ** 3.5
    [got] = run("KarrasScheduler", steps=n, rho=3.5)
    assert torch.equal(got.values, torch.cat([karras, torch.zeros(1)]))
    [got] = run("ExponentialScheduler", steps=n, sigma_max=10.0, sigma_min=0.5)
    assert torch.equal(got.values, torch.cat([torch.linspace(math.log(10.0), math.log(0.5), n).exp(), torch.zeros(1)]))
    poly = torch.exp(torch.linspace(1, 0, n) ** 2.0 * (math.log(hi) - math.log(lo)) + math.log(lo))
    [got] = run("PolyexponentialScheduler", steps=n, rho=2.0)
    assert torch.equal(got.values, torch.cat([poly, torch.zeros(1)]))
    assert got.values.dtype == torch.float32 and got.values.ndim == 1


def test_defaults_and_ranges_are_comfyuis() -> None:
    info = node_info("KarrasScheduler", catalog()["KarrasScheduler"], lambda folder: [])["input"]["required"]
    assert info["sigma_max"][1]["default"] == 14.614642 and info["sigma_min"][1]["default"] == 0.0291675
    assert info["rho"][1]["default"] == 7.0 and info["rho"][1]["max"] == 100.0 and info["sigma_max"][1]["max"] == 5000
    turbo = node_info("SDTurboScheduler", catalog()["SDTurboScheduler"], lambda folder: [])["input"]["required"]
    assert turbo["steps"][1] == {**turbo["steps"][1], "default": 1, "min": 1, "max": 10}
    custom = node_info("SamplerCustom", catalog()["SamplerCustom"], lambda folder: [])
    assert list(custom["input"]["required"]) == ["model", "add_noise", "noise_seed", "cfg", "positive", "negative",
                                                 "sampler", "sigmas", "latent_image"]
    assert custom["output"] == ["LATENT", "LATENT"] and custom["output_name"] == ["output", "denoised_output"]
    assert custom["input"]["required"]["add_noise"][0] == "BOOLEAN"
    select = node_info("KSamplerSelect", catalog()["KSamplerSelect"], lambda folder: [])["input"]["required"]["sampler_name"][0]
    assert select == list(samplers.SAMPLER_NAMES)  # every ComfyUI sampler, in ComfyUI's order


def test_zero_where_the_math_cannot_take_it_is_refused_by_name() -> None:
    assert catalog()["KarrasScheduler"].check_values({"steps": 4, "rho": 0.0}, Limits())[0][0] == "rho"
    problems = catalog()["ExponentialScheduler"].check_values({"steps": 4, "sigma_min": 0.0}, Limits())
    assert [name for name, _ in problems] == ["sigma_min"]


@pytest.mark.parametrize("scheduler", SCHEDULER_NAMES)
def test_basic_scheduler_is_ksamplers_schedule(scheduler: str) -> None:
    for steps in (2, 4, 20):
        for denoise in (1.0, 0.6, 0.25):
            want = ksampler_sigmas(scheduler, steps, denoise, DEFAULT_SAMPLING, sampler_name="euler")
            assert torch.equal(basic_sigmas(scheduler, steps, denoise, DEFAULT_SAMPLING), want)
    assert len(basic_sigmas(scheduler, 4, 0.0, DEFAULT_SAMPLING)) == 0
    zsnr = ModelSampling(zsnr=True)
    assert torch.equal(basic_sigmas(scheduler, 5, 1.0, zsnr),
                       ksampler_sigmas(scheduler, 5, 1.0, zsnr, sampler_name="euler"))


def test_sd_turbo_takes_every_hundredth_training_sigma() -> None:
    from engine.nodes.custom_sampling import sd_turbo_sigmas
    table = model_sigmas()
    want = torch.tensor([float(table.log().float()[t].exp()) for t in (999, 899, 799)] + [0.0])
    assert torch.equal(sd_turbo_sigmas(3, 1.0, DEFAULT_SAMPLING), want)
    # denoise 0.5 starts at 10 - int(5) = 5: timesteps 499, 399
    assert torch.allclose(sd_turbo_sigmas(2, 0.5, DEFAULT_SAMPLING)[:2], table[[499, 399]].float(), rtol=1e-6)
    assert len(sd_turbo_sigmas(10, 0.3, DEFAULT_SAMPLING)) == 4  # only 3 timesteps are left
    from engine.samplers.model_sampling import ContinuousEDM
    with pytest.raises(ValueError, match="continuous EDM range.*use BasicScheduler"):
        sd_turbo_sigmas(1, 1.0, ContinuousEDM())  # ComfyUI's sigma(999) there is infinite


def test_split_and_flip_sigmas_are_comfyuis() -> None:
    sigmas = Sigmas(torch.tensor([5.0, 3.0, 1.0, 0.0]))
    high, low = run("SplitSigmas", sigmas=sigmas, step=1)
    assert high.values.tolist() == [5.0, 3.0] and low.values.tolist() == [3.0, 1.0, 0.0]
    high, low = run("SplitSigmas", sigmas=sigmas, step=9)
    assert high.values.tolist() == [5.0, 3.0, 1.0, 0.0] and low.values.tolist() == []
    [flipped] = run("FlipSigmas", sigmas=sigmas)
    assert flipped.values.tolist() == pytest.approx([0.0001, 1.0, 3.0, 5.0])
    assert sigmas.values.tolist() == [5.0, 3.0, 1.0, 0.0]  # the input value is unchanged
    assert run("KSamplerSelect", sampler_name="heun") == (Sampler("heun"),)


def custom(workflow: dict[str, Any], sampler: str = "euler") -> dict[str, Any]:
    """Put BasicScheduler + KSamplerSelect + SamplerCustom in place of the KSampler "3" (same inputs)."""
    flow = copy.deepcopy(workflow)
    k = flow["3"]["inputs"]
    flow["20"] = {"class_type": "BasicScheduler", "inputs": {"model": k["model"], "scheduler": k["scheduler"],
                                                             "steps": k["steps"], "denoise": k["denoise"]}}
    flow["21"] = {"class_type": "KSamplerSelect", "inputs": {"sampler_name": sampler}}
    flow["3"] = {"class_type": "SamplerCustom", "inputs": {
        "model": k["model"], "add_noise": True, "noise_seed": k["seed"], "cfg": k["cfg"], "positive": k["positive"],
        "negative": k["negative"], "sampler": ["21", 0], "sigmas": ["20", 0], "latent_image": k["latent_image"]}}
    return flow


def pixels_of(executor: Executor, workflow: dict[str, Any], node: str = "9") -> np.ndarray:
    executor.cache.clear()
    outputs = executor.run(workflow).to_dict()["outputs"]
    [image] = outputs[node]["images"]
    path: Path = executor.settings.output_dir / image["subfolder"] / image["filename"]
    return np.asarray(Image.open(path).convert("RGB"), dtype=np.int16)


def test_sampler_custom_gives_ksamplers_pixels(executor: Executor) -> None:
    base = txt2img(seed=11)
    want = pixels_of(executor, base)
    assert np.array_equal(pixels_of(executor, custom(base)), want)
    other_seed = custom(base)
    other_seed["3"]["inputs"]["noise_seed"] = 12
    assert not np.array_equal(pixels_of(executor, other_seed), want)
    karras = copy.deepcopy(base)
    karras["3"]["inputs"].update(scheduler="karras", sampler_name="dpmpp_2m", denoise=1.0)
    assert np.array_equal(pixels_of(executor, custom(karras, "dpmpp_2m")), pixels_of(executor, karras))


def test_denoised_output_of_a_run_ending_at_zero_is_the_output(executor: Executor) -> None:
    flow = custom(txt2img(seed=3))
    flow["30"] = {"class_type": "VAEDecode", "inputs": {"samples": ["3", 1], "vae": ["4", 2]}}
    flow["31"] = {"class_type": "SaveImage", "inputs": {"images": ["30", 0], "filename_prefix": "denoised"}}
    out = pixels_of(executor, flow)
    executor.cache.clear()
    outputs = executor.run(flow).to_dict()["outputs"]
    [image] = outputs["31"]["images"]
    denoised = np.asarray(Image.open(executor.settings.output_dir / image["subfolder"] / image["filename"])
                          .convert("RGB"), dtype=np.int16)
    # euler's step into sigma 0 lands on the last call's denoised estimate, up to float rounding
    assert np.abs(denoised - out).max() <= 1


def test_split_sigmas_in_two_sampler_customs_give_the_two_stage_ksampler_advanced(executor: Executor) -> None:
    base = txt2img(seed=5)
    k = base["3"]["inputs"]
    advanced = copy.deepcopy(base)
    common = {key: k[key] for key in ("model", "cfg", "sampler_name", "scheduler", "positive", "negative", "steps")}
    advanced["3"] = {"class_type": "KSamplerAdvanced", "inputs": {
        **common, "add_noise": "enable", "noise_seed": 5, "latent_image": k["latent_image"], "start_at_step": 0,
        "end_at_step": 2, "return_with_leftover_noise": "enable"}}
    advanced["3b"] = {"class_type": "KSamplerAdvanced", "inputs": {
        **common, "add_noise": "disable", "noise_seed": 5, "latent_image": ["3", 0], "start_at_step": 2,
        "end_at_step": 10_000, "return_with_leftover_noise": "disable"}}
    advanced["8"]["inputs"]["samples"] = ["3b", 0]
    split = custom(base)
    split["22"] = {"class_type": "SplitSigmas", "inputs": {"sigmas": ["20", 0], "step": 2}}
    split["3"]["inputs"]["sigmas"] = ["22", 0]
    split["3b"] = {"class_type": "SamplerCustom", "inputs": {
        **split["3"]["inputs"], "add_noise": False, "sigmas": ["22", 1], "latent_image": ["3", 0]}}
    split["8"]["inputs"]["samples"] = ["3b", 0]
    assert np.array_equal(pixels_of(executor, split), pixels_of(executor, advanced))


def test_a_sampler_that_cannot_follow_the_sigmas_is_refused_by_name(executor: Executor) -> None:
    flow = karras_workflow(1, "uni_pc")
    with pytest.raises(NodeExecutionError, match="sampler 'uni_pc' cannot step through these 2 sigmas as ComfyUI "
                                                 r"does on diffusers \(ComfyUI's UniPC does not denoise in a single "
                                                 r"step\); pick another sampler in KSamplerSelect"):
        executor.run(flow)
    assert pixels_of(executor, karras_workflow(1, "euler")).shape == (64, 64, 3)


def karras_workflow(steps: int, sampler: str = "euler") -> dict[str, Any]:
    flow = custom(txt2img(), sampler)
    flow["20"] = {"class_type": "KarrasScheduler", "inputs": {"steps": steps, "sigma_max": 14.614642,
                                                              "sigma_min": 0.0291675, "rho": 7.0}}
    return flow


def refused(executor: Executor, workflow: dict[str, Any], limits: Limits) -> dict[str, Any]:
    with pytest.raises(WorkflowInvalid) as caught:
        validate_within_limits(workflow, catalog(), executor.models, limits)
    assert caught.value.body["error"]["type"] == LIMIT_EXCEEDED
    return caught.value.body["node_errors"]


def test_cost_counts_a_sigmas_lists_steps(executor: Executor) -> None:
    validate_within_limits(karras_workflow(150), catalog(), executor.models, Limits())
    [error] = refused(executor, karras_workflow(151), Limits())["3"]["errors"]
    assert error["extra_info"]["limit"] == "max_steps" and error["extra_info"]["received_value"] == 151
    roomy = Limits(max_steps=5_000)
    [error] = refused(executor, karras_workflow(1_200), roomy)["3"]["errors"]
    assert error["extra_info"]["limit"] == "max_job_steps"
    assert error["details"].startswith("brings the job's sampler steps to 1,200 (1,200 here)")
    # a SamplerCustom on SplitSigmas' high half runs that half's steps only: 600, within the job's 1,000
    split = karras_workflow(1_200)
    split["22"] = {"class_type": "SplitSigmas", "inputs": {"sigmas": ["20", 0], "step": 600}}
    split["3"]["inputs"]["sigmas"] = ["22", 0]
    validate_within_limits(split, catalog(), executor.models, roomy)


def advanced(workflow: dict[str, Any], guider: dict[str, Any], noise: dict[str, Any]) -> dict[str, Any]:
    """SamplerCustomAdvanced with its own noise and guider nodes in place of the SamplerCustom "3"."""
    flow = custom(workflow)
    latent = flow["3"]["inputs"]["latent_image"]
    flow["23"], flow["24"] = noise, guider
    flow["3"] = {"class_type": "SamplerCustomAdvanced", "inputs": {
        "noise": ["23", 0], "guider": ["24", 0], "sampler": ["21", 0], "sigmas": ["20", 0], "latent_image": latent}}
    return flow


def test_sampler_custom_advanced_with_cfg_and_basic_guiders_gives_ksamplers_pixels(executor: Executor) -> None:
    base = txt2img(seed=9)
    k = base["3"]["inputs"]
    cfg_guider = {"class_type": "CFGGuider", "inputs": {"model": k["model"], "positive": k["positive"],
                                                        "negative": k["negative"], "cfg": k["cfg"]}}
    noise = {"class_type": "RandomNoise", "inputs": {"noise_seed": 9}}
    assert np.array_equal(pixels_of(executor, advanced(base, cfg_guider, noise)), pixels_of(executor, base))
    cfg_one = copy.deepcopy(base)
    cfg_one["3"]["inputs"]["cfg"] = 1.0
    basic = {"class_type": "BasicGuider", "inputs": {"model": k["model"], "conditioning": k["positive"]}}
    assert np.array_equal(pixels_of(executor, advanced(base, basic, noise)), pixels_of(executor, cfg_one))
    # DisableNoise: the empty latent is denoised as it is, as KSamplerAdvanced's add_noise "disable"
    quiet = copy.deepcopy(base)
    quiet["3"] = {"class_type": "KSamplerAdvanced", "inputs": {
        **{key: k[key] for key in ("model", "cfg", "sampler_name", "scheduler", "positive", "negative", "steps",
                                   "latent_image")},
        "add_noise": "disable", "noise_seed": 0, "start_at_step": 0, "end_at_step": 10_000,
        "return_with_leftover_noise": "disable"}}
    disabled = advanced(base, cfg_guider, {"class_type": "DisableNoise", "inputs": {}})
    assert np.array_equal(pixels_of(executor, disabled), pixels_of(executor, quiet))


def test_cost_holds_a_guiders_conds_to_the_context_limit(executor: Executor) -> None:
    base = txt2img(prompt="fox " * 100, negative="snow " * 160)  # 2 and 3 chunks: 154 and 231 tokens
    k = base["3"]["inputs"]
    guider = {"class_type": "CFGGuider", "inputs": {"model": k["model"], "positive": k["positive"],
                                                    "negative": k["negative"], "cfg": 7.0}}
    flow = advanced(base, guider, {"class_type": "RandomNoise", "inputs": {"noise_seed": 1}})
    tight = Limits(max_conditioning_tokens=400)
    [error] = refused(executor, flow, tight)["3"]["errors"]  # repeated to their least common multiple, 462
    assert error["extra_info"]["limit"] == "max_conditioning_tokens" and error["extra_info"]["received_value"] == 462
    flow["24"]["inputs"]["cfg"] = 1.0  # no negative pass: the positive's 154 alone
    validate_within_limits(flow, catalog(), executor.models, tight)
    flow["24"] = {"class_type": "BasicGuider", "inputs": {"model": k["model"], "conditioning": k["positive"]}}
    validate_within_limits(flow, catalog(), executor.models, tight)
