"""ModelSamplingDiscrete: eps, v_prediction, lcm and zsnr as ComfyUI 0.3.64's model sampling computes them."""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from engine import samplers
from engine.errors import WorkflowInvalid
from engine.executor import Executor
from engine.nodes.guidance import guided_eps
from engine.queue.batching import batch_key
from engine.samplers.model_sampling import ModelSampling
from engine.values import CondItem, Conditioning
from tests.engine.conftest import txt2img


def sd_sigmas() -> torch.Tensor:
    """comfy/model_sampling.py ModelSamplingDiscrete's sigmas (linear betas 0.00085..0.012), float64."""
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)
    return ((1 - alphas_cumprod) / alphas_cumprod) ** 0.5


def comfy_rescale_zero_terminal_snr_sigmas(sigmas: torch.Tensor) -> torch.Tensor:
    """ComfyUI 0.3.64's rescale_zero_terminal_snr_sigmas, line by line."""
    alphas_cumprod = 1 / ((sigmas * sigmas) + 1)
    alphas_bar_sqrt = alphas_cumprod.sqrt()
    alphas_bar_sqrt_0 = alphas_bar_sqrt[0].clone()
    alphas_bar_sqrt_T = alphas_bar_sqrt[-1].clone()  # noqa: N806
    alphas_bar_sqrt -= alphas_bar_sqrt_T
    alphas_bar_sqrt *= alphas_bar_sqrt_0 / (alphas_bar_sqrt_0 - alphas_bar_sqrt_T)
    alphas_bar = alphas_bar_sqrt**2
    alphas_bar[-1] = 4.8973451890853435e-08
    return ((1 - alphas_bar) / alphas_bar) ** 0.5


class ConstantUNet(torch.nn.Module):
    """Returns a fixed output whatever it is given, so one call's conversion can be checked by hand."""

    def __init__(self, output: torch.Tensor) -> None:
        super().__init__()
        self.output = output
        self.device, self.dtype = torch.device("cpu"), torch.float32
        self.seen: list[tuple[torch.Tensor, torch.Tensor]] = []

    def forward(self, x: torch.Tensor, t: torch.Tensor, encoder_hidden_states: torch.Tensor, **_: object):
        self.seen.append((x.clone(), t.clone()))
        return type("Out", (), {"sample": self.output.expand_as(x).clone()})()


def one_call(sampling: ModelSampling, x: torch.Tensor, output: torch.Tensor, sigma: float) -> torch.Tensor:
    """The denoised estimate the loop forms (x - sigma * eps) from one guided call at `sigma` (cfg 1)."""
    cond = Conditioning((CondItem(torch.zeros(1, 77, 8)),))
    eps = guided_eps(ConstantUNet(output), cond, cond, cfg=1.0, sdxl=False, pixel_size=(64, 64), sampling=sampling)
    scaled = x / math.sqrt(sigma**2 + 1)  # what every scheduler hands the model (EPS.calculate_input)
    return x - sigma * eps(scaled, sampling.timestep(sigma), sigma)


def test_v_prediction_denoised_is_comfys_formula() -> None:
    gen = torch.Generator().manual_seed(0)
    x, v = torch.randn(1, 4, 8, 8, generator=gen) * 5, torch.randn(1, 4, 8, 8, generator=gen)
    for sigma in (14.6146, 3.0, 0.5, 0.0292):
        # V_PREDICTION.calculate_denoised with sigma_data 1, on the model input x (not the scaled one)
        expected = x * 1.0 / (sigma**2 + 1.0) - v * sigma * 1.0 / (sigma**2 + 1.0) ** 0.5
        assert torch.allclose(one_call(ModelSampling("v_prediction"), x, v, sigma), expected, atol=1e-5, rtol=1e-5)


def test_lcm_denoised_is_comfys_boundary_condition_at_the_distilled_timestep() -> None:
    gen = torch.Generator().manual_seed(1)
    x, out = torch.randn(1, 4, 8, 8, generator=gen) * 3, torch.randn(1, 4, 8, 8, generator=gen)
    distilled = sd_sigmas().float()[19::20]  # ModelSamplingDiscreteDistilled: 50 sigmas, timesteps 19, 39, .. 999
    assert len(distilled) == 50
    for sigma in (14.6146, 2.0, 0.2):
        timestep = float((math.log(sigma) - distilled.log()).abs().argmin()) * 20 + 19
        x0 = x - out * sigma
        scaled_timestep = timestep * 10.0
        c_skip = 0.5**2 / (scaled_timestep**2 + 0.5**2)
        c_out = scaled_timestep / (scaled_timestep**2 + 0.5**2) ** 0.5
        expected = c_out * x0 + c_skip * x
        assert float(ModelSampling("lcm").timestep(sigma)) == timestep
        assert torch.allclose(one_call(ModelSampling("lcm"), x, out, sigma), expected, atol=1e-4, rtol=1e-5)


def test_x0_hands_the_output_on_as_the_denoised_estimate() -> None:
    x, out = torch.full((1, 4, 8, 8), 2.0), torch.full((1, 4, 8, 8), 0.25)
    assert torch.allclose(one_call(ModelSampling("x0"), x, out, 1.5), out, atol=1e-6)


def test_img_to_img_feeds_the_unet_the_unscaled_latent() -> None:
    x, out = torch.full((1, 4, 8, 8), 2.0), torch.full((1, 4, 8, 8), 0.25)
    sampling, sigma = ModelSampling("img_to_img"), 1.5
    unet = ConstantUNet(out)
    cond = Conditioning((CondItem(torch.zeros(1, 77, 8)),))
    eps = guided_eps(unet, cond, cond, cfg=1.0, sdxl=False, pixel_size=(64, 64), sampling=sampling)
    denoised = x - sigma * eps(x / math.sqrt(sigma**2 + 1), sampling.timestep(sigma), sigma)
    assert torch.allclose(unet.seen[0][0], x, atol=1e-6)  # IMG_TO_IMG.calculate_input: the latent as it is
    assert torch.allclose(denoised, out, atol=1e-6)


def test_lcm_schedule_is_on_the_50_distilled_sigmas() -> None:
    lcm = ModelSampling("lcm")
    distilled = sd_sigmas().float()[19::20]
    assert lcm.sigma_max == float(distilled[-1]) and lcm.sigma_min == float(distilled[0])
    # normal_scheduler: timesteps linspace(999, 19), each mapped back through ModelSamplingDiscreteDistilled.sigma
    sigmas = samplers.ksampler_sigmas("normal", 4, 1.0, lcm, sampler_name="euler")
    ts = torch.linspace(999.0, 19.0, 4)
    t = ((ts - 19) / 20).clamp(0, 49)
    log = distilled.log()
    expected = ((1 - t.frac()) * log[t.floor().long()] + t.frac() * log[t.ceil().long()]).exp()
    assert torch.allclose(sigmas[:-1], expected) and sigmas[-1] == 0
    plan = samplers.build_scheduler("euler", "normal", sigmas, 0, lcm)
    assert [t for t, _ in plan.calls] == [999, 679, 339, 19]  # table index * 20 + 19, nearest in log-sigma


def test_zsnr_sigmas_are_comfys_rescaled_ones() -> None:
    expected = comfy_rescale_zero_terminal_snr_sigmas(sd_sigmas()).float()
    zsnr = ModelSampling("v_prediction", zsnr=True)
    assert zsnr.sigma_min == pytest.approx(float(expected[0]), rel=1e-6)
    assert zsnr.sigma_max == pytest.approx(float(expected[-1]), rel=1e-6)
    assert zsnr.sigma_max == pytest.approx(4518.76, rel=1e-4)  # not infinite: ComfyUI's alphas_bar[-1]
    sigmas = samplers.ksampler_sigmas("karras", 10, 1.0, zsnr, sampler_name="euler")
    assert float(sigmas[0]) == pytest.approx(float(expected[-1]), rel=1e-5)
    assert float(sigmas[-2]) == pytest.approx(float(expected[0]), rel=1e-5)
    assert float(samplers.ksampler_sigmas("normal", 10, 1.0, zsnr, sampler_name="euler")[0]) == pytest.approx(
        float(expected[-1]), rel=1e-5)


Denoiser = Callable[[torch.Tensor, float], torch.Tensor]


def _reference_euler(denoised: Denoiser, x: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    for i in range(len(sigmas) - 1):  # k_diffusion sample_euler without churn
        d = (x - denoised(x, float(sigmas[i]))) / sigmas[i]
        x = x + d * (sigmas[i + 1] - sigmas[i])
    return x


def _reference_dpmpp_2m(denoised: Denoiser, x: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    old = None  # k_diffusion sample_dpmpp_2m
    for i in range(len(sigmas) - 1):
        d = denoised(x, float(sigmas[i]))
        t, t_next = -sigmas[i].log(), -sigmas[i + 1].log() if sigmas[i + 1] > 0 else None
        if t_next is None:
            x = d
        elif old is None:
            h = t_next - t
            x = (sigmas[i + 1] / sigmas[i]) * x - (-h).expm1() * d
        else:
            h, h_last = t_next - t, t - (-sigmas[i - 1].log())
            r = h_last / h
            x = (sigmas[i + 1] / sigmas[i]) * x - (-h).expm1() * ((1 + 1 / (2 * r)) * d - (1 / (2 * r)) * old)
        old = d
    return x


@pytest.mark.parametrize(("sampler", "reference"), [("euler", _reference_euler), ("dpmpp_2m", _reference_dpmpp_2m)])
def test_zsnr_v_prediction_runs_through_the_schedulers_as_k_diffusion(sampler: str,
                                                                      reference: Callable[..., Any]) -> None:
    sampling = ModelSampling("v_prediction", zsnr=True)
    sigmas = samplers.ksampler_sigmas("normal", 8, 1.0, sampling, sampler_name=sampler)
    noise = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    weight = torch.linspace(-0.5, 0.5, 4).view(1, 4, 1, 1)

    def v_model(model_input: torch.Tensor) -> torch.Tensor:  # a toy v-prediction UNet
        return torch.tanh(model_input) * weight

    def denoised(x: torch.Tensor, sigma: float) -> torch.Tensor:  # ComfyUI: calculate_input, model, calculate_denoised
        v = v_model(x / (sigma**2 + 1) ** 0.5)
        return x / (sigma**2 + 1) - v * sigma / (sigma**2 + 1) ** 0.5

    def eps_fn(scaled: torch.Tensor, timestep: torch.Tensor, sigma: float) -> torch.Tensor:
        return sampling.to_eps(v_model(scaled), scaled, sigma)

    plan = samplers.build_scheduler(sampler, "normal", sigmas, 0, sampling)
    out = samplers.sample(plan, eps_fn, torch.zeros(1, 4, 8, 8), noise)
    # EPS.noise_scaling at a full denoise: noise * sqrt(1 + sigma_max^2), about 4518x
    expected = reference(denoised, noise * math.sqrt(1 + float(sigmas[0]) ** 2), sigmas)
    assert torch.isfinite(out).all()
    assert torch.allclose(out, expected, atol=2e-3, rtol=1e-3), float((out - expected).abs().max())


def test_every_sampler_follows_zsnr_sigmas_or_is_refused_by_name() -> None:
    sampling = ModelSampling("eps", zsnr=True)
    for sampler in samplers.SUPPORTED_SAMPLERS:
        for scheduler in ("normal", "karras", "simple"):
            sigmas = samplers.ksampler_sigmas(scheduler, 10, 1.0, sampling, sampler_name=sampler)
            try:
                plan = samplers.build_scheduler(sampler, scheduler, sigmas, 0, sampling)
            except samplers.UnfaithfulSampler as err:
                assert sampler in str(err) and scheduler in str(err)
                continue
            # build_scheduler checked that diffusers steps through these sigmas; the noise scale follows them
            assert plan.sigma_max == sampling.sigma_max and float(plan.effective_sigmas[0]) == float(sigmas[0])


def with_model_sampling(workflow: dict[str, Any], sampling: str, zsnr: bool = False) -> dict[str, Any]:
    changed = copy.deepcopy(workflow)
    changed["20"] = {"class_type": "ModelSamplingDiscrete",
                     "inputs": {"model": ["4", 0], "sampling": sampling, "zsnr": zsnr}}
    changed["3"]["inputs"]["model"] = ["20", 0]
    return changed


def pixels(executor: Executor, workflow: dict[str, Any]) -> np.ndarray:
    [image] = executor.run(workflow).outputs["9"]["images"]
    return np.asarray(Image.open(executor.settings.output_dir / image["subfolder"] / image["filename"])).astype(int)


@pytest.mark.parametrize("checkpoint", ["tiny-sd15.safetensors", "tiny-sdxl.safetensors"])
def test_eps_override_draws_exactly_the_picture_without_the_node(executor: Executor, checkpoint: str) -> None:
    plain = txt2img(checkpoint=checkpoint, seed=5)
    assert np.array_equal(pixels(executor, with_model_sampling(plain, "eps")), pixels(executor, plain))


def test_v_prediction_lcm_and_zsnr_change_the_picture_on_sd15(executor: Executor) -> None:
    plain = pixels(executor, txt2img(seed=6))
    for sampling, zsnr in (("v_prediction", False), ("v_prediction", True), ("lcm", False)):
        drawn = pixels(executor, with_model_sampling(txt2img(seed=6), sampling, zsnr))
        assert drawn.std() > 1 and not np.array_equal(drawn, plain), (sampling, zsnr)


def test_lcm_sampling_with_euler_draws_and_says_so_in_the_meta(executor: Executor) -> None:
    workflow = with_model_sampling(txt2img(seed=7, steps=4, cfg=1.0), "lcm")
    workflow["3"]["inputs"]["scheduler"] = "sgm_uniform"
    result = executor.run(workflow)
    assert result.meta["models"]["model_sampling"] == {"20": "lcm"}
    assert pixels(executor, workflow).std() > 1


def test_unknown_sampling_is_refused_with_comfys_choices(executor: Executor) -> None:
    with pytest.raises(WorkflowInvalid, match=r"Value not in list: sampling: 'flow' not in \['eps', 'v_prediction'"):
        executor.validate(with_model_sampling(txt2img(), "flow"))


def test_batch_key_keeps_an_override_apart_from_the_plain_graph(executor: Executor) -> None:
    plain = batch_key(executor.validate(txt2img()))
    assert plain is not None
    # a graph with ModelSamplingDiscrete runs alone: it never shares a sampler call with an eps job
    assert batch_key(executor.validate(with_model_sampling(txt2img(), "v_prediction"))) is None
    assert batch_key(executor.validate(with_model_sampling(txt2img(), "eps"))) is None
    # a v-prediction checkpoint is another checkpoint: its key differs
    sd2 = batch_key(executor.validate(txt2img(checkpoint="tiny-sd2-v.safetensors")))
    assert sd2 is not None and sd2 != plain
