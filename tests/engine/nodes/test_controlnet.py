"""ControlNet graphs on the tiny SD1.5 and SDXL models: LoadImage -> Canny -> ControlNetApplyAdvanced -> KSampler
draws; strength 0 and a window that excludes every step give exactly the plain picture; stacking and windows
change it; the legacy ControlNetApply reaches the negative as in ComfyUI; one guided model call against the
residual injection written out here; Canny against a hand-made edge picture; the cache when only the strength
changes; windows read on the model's own sigmas (zsnr, lcm) against ComfyUI's percent_to_sigma written
out here; and the refusals (an SD1.5 ControlNet on SDXL and on SD2)."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from engine.cost import validate_within_limits
from engine.errors import NodeExecutionError, WorkflowInvalid
from engine.executor import Executor
from engine.models.controlnet.residuals import ControlResiduals, hint_to_size, percent_to_sigma, spread_to_uncond
from engine.nodes import catalog
from engine.nodes.guidance import guided_eps
from engine.samplers import ksampler_sigmas, model_sigmas, timestep_for_sigma
from engine.samplers.model_sampling import ModelSampling
from engine.settings import Limits
from engine.values import CondItem, Conditioning, ControlHint, ControlNetRef
from tests.engine.nodes.test_inpaint import values_of
from tests.engine.nodes.test_model_sampling import comfy_rescale_zero_terminal_snr_sigmas, sd_sigmas

SD15, SDXL, SD2 = "tiny-sd15.safetensors", "tiny-sdxl.safetensors", "tiny-sd2-v.safetensors"
CONTROLNETS = {SD15: "tiny-controlnet-sd15.safetensors", SDXL: "tiny-controlnet-sdxl.safetensors"}


@pytest.fixture(scope="module")
def shapes_png(executor: Executor) -> str:
    """A 96x64 picture (another aspect than the 64x64 latent: the hint is center-cropped) with a bright square."""
    pixels = np.zeros((64, 96, 3), np.uint8)
    pixels[16:48, 32:64] = 255
    pixels[40:56, 70:90] = (200, 60, 30)
    Image.fromarray(pixels).save(executor.settings.input_dir / "shapes.png")
    return "shapes.png"


def graph(image: str, checkpoint: str = SD15, controls: list[dict[str, Any]] | None = None, *,
          legacy: bool = False, seed: int = 7) -> dict[str, Any]:
    """txt2img at 64x64, 4 steps; each control is {strength, start_percent, end_percent, name} applied in order
    by ControlNetApplyAdvanced (or ControlNetApply) to Canny edges of `image`. No controls: the plain graph."""
    workflow: dict[str, Any] = {
        "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": checkpoint}},
        "6": {"class_type": "CLIPTextEncode", "inputs": {"text": "a red fox", "clip": ["4", 1]}},
        "7": {"class_type": "CLIPTextEncode", "inputs": {"text": "blurry", "clip": ["4", 1]}},
        "5": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "8": {"class_type": "VAEDecode", "inputs": {"samples": ["3", 0], "vae": ["4", 2]}},
        "9": {"class_type": "SaveImage", "inputs": {"images": ["8", 0], "filename_prefix": "controlnet/test"}},
    }
    positive, negative = ["6", 0], ["7", 0]
    if controls:
        workflow["10"] = {"class_type": "LoadImage", "inputs": {"image": image}}
        workflow["20"] = {"class_type": "Canny", "inputs": {"image": ["10", 0], "low_threshold": 0.4,
                                                             "high_threshold": 0.8}}
    for k, control in enumerate(controls or ()):
        loader, apply = f"3{k}", f"4{k}"
        workflow[loader] = {"class_type": "ControlNetLoader",
                            "inputs": {"control_net_name": control.get("name") or CONTROLNETS[checkpoint]}}
        if legacy:
            workflow[apply] = {"class_type": "ControlNetApply", "inputs": {
                "conditioning": positive, "control_net": [loader, 0], "image": ["20", 0],
                "strength": control.get("strength", 1.0)}}
            positive = [apply, 0]
            continue
        workflow[apply] = {"class_type": "ControlNetApplyAdvanced", "inputs": {
            "positive": positive, "negative": negative, "control_net": [loader, 0], "image": ["20", 0],
            "strength": control.get("strength", 1.0), "start_percent": control.get("start_percent", 0.0),
            "end_percent": control.get("end_percent", 1.0)}}
        positive, negative = [apply, 0], [apply, 1]
    workflow["3"] = {"class_type": "KSampler", "inputs": {
        "model": ["4", 0], "seed": seed, "steps": 4, "cfg": 7.0, "sampler_name": "euler", "scheduler": "normal",
        "positive": positive, "negative": negative, "latent_image": ["5", 0], "denoise": 1.0}}
    return workflow


def pixels(executor: Executor, workflow: dict[str, Any]) -> torch.Tensor:
    """The decoded IMAGE of node 8."""
    return values_of(executor, workflow)["8"][0].pixels


@pytest.mark.parametrize("checkpoint", [SD15, SDXL])
def test_a_controlnet_graph_draws_and_changes_the_picture(executor: Executor, shapes_png: str,
                                                          checkpoint: str) -> None:
    result = executor.run(graph(shapes_png, checkpoint, [{}]))
    assert result.outputs["9"]["images"]
    assert result.meta["models"]["controlnets"][CONTROLNETS[checkpoint]]["arch"] == (
        "sdxl" if checkpoint == SDXL else "sd15")
    controlled = pixels(executor, graph(shapes_png, checkpoint, [{}]))
    plain = pixels(executor, graph(shapes_png, checkpoint))
    assert torch.isfinite(controlled).all()
    assert (controlled - plain).abs().mean() > 1e-3


@pytest.mark.parametrize("checkpoint", [SD15, SDXL])
def test_strength_zero_gives_exactly_the_plain_picture(executor: Executor, shapes_png: str, checkpoint: str) -> None:
    plain = pixels(executor, graph(shapes_png, checkpoint))
    assert torch.equal(pixels(executor, graph(shapes_png, checkpoint, [{"strength": 0.0}])), plain)


@pytest.mark.parametrize("window", [{"end_percent": 0.0}, {"start_percent": 1.0}, {"start_percent": 0.6,
                                                                                    "end_percent": 0.5}])
def test_a_window_that_holds_no_step_gives_exactly_the_plain_picture(executor: Executor, shapes_png: str,
                                                                      window: dict[str, float]) -> None:
    plain = pixels(executor, graph(shapes_png))
    assert torch.equal(pixels(executor, graph(shapes_png, controls=[window])), plain)


def test_a_window_over_some_steps_differs_from_all_and_none(executor: Executor, shapes_png: str) -> None:
    plain = pixels(executor, graph(shapes_png))
    full = pixels(executor, graph(shapes_png, controls=[{}]))
    # 4 normal steps have sigmas 14.6, 2.9, 0.93, 0.029: the first half of the timesteps holds the first two
    assert percent_to_sigma(0.5) < 2.9 < 14.6
    half = pixels(executor, graph(shapes_png, controls=[{"end_percent": 0.5}]))
    assert (half - plain).abs().mean() > 1e-4
    assert (half - full).abs().mean() > 1e-4


def test_two_stacked_controlnets_differ_from_one(executor: Executor, shapes_png: str) -> None:
    one = pixels(executor, graph(shapes_png, controls=[{"strength": 1.0}]))
    two = pixels(executor, graph(shapes_png, controls=[{"strength": 1.0}, {"strength": 0.7}]))
    assert (one - two).abs().mean() > 1e-4


def test_legacy_controlnet_apply_reaches_the_negative_as_the_advanced_node_does(executor: Executor,
                                                                                shapes_png: str) -> None:
    # ComfyUI's apply_empty_x_to_equal_area hands the positive's ControlNet to the negative at sampling time
    legacy = pixels(executor, graph(shapes_png, controls=[{"strength": 0.8}], legacy=True))
    advanced = pixels(executor, graph(shapes_png, controls=[{"strength": 0.8}]))
    assert torch.equal(legacy, advanced)


def test_spread_to_uncond_follows_apply_empty_x_to_equal_area() -> None:
    net = ControlNetRef(torch.nn.Identity(), "c", "sd15", True)
    first, second = ControlHint(net, torch.zeros(1, 3, 8, 8)), ControlHint(net, torch.ones(1, 3, 8, 8))

    def item(control: ControlHint | None = None, to_uncond: bool = True) -> CondItem:
        extras = {} if control is None else {"control": control, "control_apply_to_uncond": to_uncond}
        return CondItem(torch.zeros(1, 77, 8), extras=extras)

    negative = Conditioning((item(),))
    assert spread_to_uncond(Conditioning((item(first),)), negative).items[0].extras["control"] is first
    # a later positive replaces an earlier one on the same negative (uncond_other[x % n], overwritten)
    two = spread_to_uncond(Conditioning((item(first), item(second))), negative)
    assert len(two.items) == 1 and two.items[0].extras["control"] is second
    # not from ControlNetApplyAdvanced, and not when the negative has a ControlNet of its own
    assert spread_to_uncond(Conditioning((item(first, to_uncond=False),)), negative) is negative
    has_own = Conditioning((item(second, to_uncond=False),))
    assert spread_to_uncond(Conditioning((item(first),)), has_own) is has_own


def test_changing_only_the_strength_reruns_only_the_apply_node_and_what_follows(executor: Executor,
                                                                                shapes_png: str) -> None:
    executor.cache.clear()
    executor.run(graph(shapes_png, controls=[{"strength": 1.0}]))
    again = executor.run(graph(shapes_png, controls=[{"strength": 0.5}]))
    assert sorted(again.meta["cached"]) == ["10", "20", "30", "4", "5", "6", "7"]
    assert set(again.meta["timings"]) == {"40", "3", "8", "9", "total"}


def test_an_sd15_controlnet_on_an_sdxl_model_is_refused_by_name(executor: Executor, shapes_png: str) -> None:
    with pytest.raises(NodeExecutionError, match=r"tiny-controlnet-sd15.*SD1\.x.*this model is SDXL"):
        executor.run(graph(shapes_png, SDXL, [{"name": CONTROLNETS[SD15]}]))


def test_an_sd15_controlnet_on_an_sd2_model_is_refused_by_name(executor: Executor, shapes_png: str) -> None:
    # the tiny SD2 UNet has the tiny SD1.5 one's block widths and context width: only the family tells them apart
    with pytest.raises(NodeExecutionError, match=r"tiny-controlnet-sd15.*SD1\.x.*this model is SD2\.x"):
        executor.run(graph(shapes_png, SD2, [{"name": CONTROLNETS[SD15]}]))


# -- one model call against the math ------------------------------------------------------------------------


def test_one_guided_call_adds_the_scaled_summed_residuals_to_the_unet(executor: Executor) -> None:
    models = executor.models
    unet = models.checkpoint(SD15).pipe.unet
    net = models.controlnet(CONTROLNETS[SD15])
    generator = torch.Generator().manual_seed(3)
    x = torch.randn(2, 4, 8, 8, generator=generator)
    image = torch.rand(1, 3, 40, 64, generator=generator)  # 40x64: center-cropped to 40x40, then 64x64
    pos_embeds, neg_embeds = torch.randn(1, 77, 32, generator=generator), torch.randn(1, 77, 32, generator=generator)
    older = ControlHint(net, image, 0.6)
    newer = ControlHint(net, image.flip(-1), 1.3, previous=older)
    positive = Conditioning((CondItem(pos_embeds, extras={"control": newer}),))
    negative = Conditioning((CondItem(neg_embeds),))  # no ControlNet on the negative: it gets zeros
    sigma, cfg = 2.5, 6.0
    timestep = timestep_for_sigma(sigma, model_sigmas())
    scaled = x / math.sqrt(sigma**2 + 1)
    got = guided_eps(unet, positive, negative, cfg, False, (64, 64))(scaled, timestep, sigma)

    # the hint: common_upscale's center crop (x = round((64 - 64 * (1 / 1.6)) / 2) = 12 columns off each side),
    # then nearest-exact: source index floor((i + 0.5) * 40 / 64)
    rows = torch.floor((torch.arange(64) + 0.5) * 40 / 64).long()
    cols = 12 + torch.floor((torch.arange(64) + 0.5) * 40 / 64).long()
    assert torch.equal(hint_to_size(image, 64, 64), image[:, :, rows][:, :, :, cols])

    t = timestep.expand(2)
    with torch.inference_mode():
        def residuals(hint: ControlHint) -> tuple[list[torch.Tensor], torch.Tensor]:
            resized = hint.image[:, :, rows][:, :, :, cols].expand(2, -1, -1, -1)
            down, mid = net.module(scaled, t, encoder_hidden_states=pos_embeds.expand(2, -1, -1),
                                   controlnet_cond=resized, return_dict=False)
            return [d * hint.strength for d in down], mid * hint.strength

        old_down, old_mid = residuals(older)
        new_down, new_mid = residuals(newer)
        cond = unet(scaled, t, encoder_hidden_states=pos_embeds.expand(2, -1, -1),
                    down_block_additional_residuals=[a + b for a, b in zip(old_down, new_down)],
                    mid_block_additional_residual=old_mid + new_mid).sample
        uncond = unet(scaled, t, encoder_hidden_states=neg_embeds.expand(2, -1, -1)).sample
    expected = uncond + (cond - uncond) * cfg
    assert torch.allclose(got, expected, atol=1e-5, rtol=1e-5)
    plain = guided_eps(unet, Conditioning((CondItem(pos_embeds),)), negative, cfg, False, (64, 64))(
        scaled, timestep, sigma)
    assert (got - plain).abs().max() > 1e-3


def comfy_percent_to_sigma(percent: float, prediction: str = "eps", zsnr: bool = False) -> float:
    """ComfyUI 0.3.64's model_sampling.percent_to_sigma after ModelSamplingDiscrete(prediction, zsnr), written
    out: timestep (1 - percent) * 999 on the model's float32 log-sigmas, interpolated; "lcm" is
    ModelSamplingDiscreteDistilled, whose 50 sigmas sit at timesteps 19, 39, .., 999, so timestep t is table
    index (t - 19) / 20 (ModelSamplingDiscreteDistilled.sigma)."""
    if percent <= 0.0:
        return 999999999.9
    if percent >= 1.0:
        return 0.0
    sigmas = sd_sigmas()
    if zsnr:
        sigmas = comfy_rescale_zero_terminal_snr_sigmas(sigmas)
    timestep = torch.tensor((1.0 - percent) * 999.0)
    if prediction == "lcm":
        log_sigmas = sigmas.float()[19::20].log().float()
        t = torch.clamp(((timestep.float() - 19) / 20).float(), min=0, max=len(log_sigmas) - 1)
    else:
        log_sigmas = sigmas.log().float()
        t = torch.clamp(timestep.float(), min=0, max=len(log_sigmas) - 1)
    w = t.frac()
    return float(((1 - w) * log_sigmas[t.floor().long()] + w * log_sigmas[t.ceil().long()]).exp())


def test_percent_to_sigma_is_model_sampling_discretes() -> None:
    sigmas = model_sigmas().float()
    assert percent_to_sigma(0.0) == 999999999.9 and percent_to_sigma(1.0) == 0.0
    # 50%: timestep 499.5, halfway in log-sigma between training sigmas 499 and 500
    assert percent_to_sigma(0.5) == pytest.approx(math.exp((math.log(sigmas[499]) + math.log(sigmas[500])) / 2),
                                                  rel=1e-6)
    for prediction, zsnr in [("eps", False), ("v_prediction", True), ("lcm", False), ("lcm", True)]:
        sampling = ModelSampling(prediction, zsnr)
        for percent in (0.0, 0.001, 0.05, 0.1, 0.25, 0.5, 0.654, 0.9, 0.985, 0.999, 1.0):
            assert percent_to_sigma(percent, sampling) == comfy_percent_to_sigma(percent, prediction, zsnr), (
                prediction, zsnr, percent)


# zsnr: ComfyUI's sigma at 10% is 18.2 (the default table's 8.3), so only the first of 8 normal steps
# (4518.8, 11.6, ...) is in; lcm: every percent past 98.1% is the table's smallest sigma, the last step's 0.134,
# which the default table puts above (0.098 at 99%), leaving no step
WINDOWS = [(ModelSampling("eps", zsnr=True), {"end_percent": 0.1}, [0]),
           (ModelSampling("lcm"), {"start_percent": 0.99}, [7])]


@pytest.mark.parametrize(("sampling", "window", "steps_in"), WINDOWS)
def test_a_window_is_read_on_the_models_own_sigmas(executor: Executor, sampling: ModelSampling,
                                                   window: dict[str, float], steps_in: list[int]) -> None:
    schedule = [float(s) for s in ksampler_sigmas("normal", 8, 1.0, sampling, sampler_name="euler")][:-1]
    start_percent, end_percent = window.get("start_percent", 0.0), window.get("end_percent", 1.0)

    def comfy_steps(prediction: str, zsnr: bool) -> list[int]:  # get_control: t > range[0] or t < range[1] skips
        start = comfy_percent_to_sigma(start_percent, prediction, zsnr)
        end = comfy_percent_to_sigma(end_percent, prediction, zsnr)
        return [i for i, s in enumerate(schedule) if not (s > start or s < end)]

    assert comfy_steps(sampling.prediction, sampling.zsnr) == steps_in
    assert comfy_steps("eps", False) != steps_in  # the default table would draw another window
    unet = executor.models.checkpoint(SD15).pipe.unet
    net = executor.models.controlnet(CONTROLNETS[SD15])
    generator = torch.Generator().manual_seed(6)
    x, embeds = torch.randn(1, 4, 8, 8, generator=generator), torch.randn(1, 77, 32, generator=generator)
    hint = ControlHint(net, torch.rand(1, 3, 64, 64, generator=generator), 1.0, start_percent, end_percent)
    maker = ControlResiduals.for_groups([[CondItem(embeds, extras={"control": hint})]], unet, "sd15", sampling)
    assert maker is not None
    with torch.inference_mode():
        ran = [i for i, s in enumerate(schedule)
               if maker(x, sampling.timestep(s).reshape(1), s, embeds, None, [1])]
    assert ran == steps_in


def test_a_ksampler_reads_the_window_on_its_models_sampling(executor: Executor, shapes_png: str,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    # ModelSamplingDiscrete lcm before the KSampler: ControlNetApplyAdvanced's 99% start holds the last step only
    workflow = graph(shapes_png, controls=[{"start_percent": 0.99}])
    workflow["50"] = {"class_type": "ModelSamplingDiscrete",
                      "inputs": {"model": ["4", 0], "sampling": "lcm", "zsnr": False}}
    workflow["3"]["inputs"]["model"] = ["50", 0]
    calls: list[tuple[float, bool]] = []
    original = ControlResiduals.__call__

    def recording(self: ControlResiduals, *args: Any) -> dict[str, Any]:
        out = original(self, *args)
        calls.append((float(args[2]), bool(out)))
        return out

    monkeypatch.setattr(ControlResiduals, "__call__", recording)
    executor.run(workflow)
    schedule = [float(s) for s in ksampler_sigmas("normal", 4, 1.0, ModelSampling("lcm"), sampler_name="euler")]
    assert [sigma for sigma, _ in calls] == pytest.approx(schedule[:-1])
    assert [ran for _, ran in calls] == [False, False, False, True]


# -- Canny ----------------------------------------------------------------------------------------------------


def test_canny_finds_the_edges_of_a_square_and_nothing_else(executor: Executor) -> None:
    square = np.zeros((32, 32, 3), np.uint8)
    square[8:24, 8:24] = 255
    Image.fromarray(square).save(executor.settings.input_dir / "square.png")
    edges = values_of(executor, {
        "1": {"class_type": "LoadImage", "inputs": {"image": "square.png"}},
        "2": {"class_type": "Canny", "inputs": {"image": ["1", 0], "low_threshold": 0.4, "high_threshold": 0.8}},
        "3": {"class_type": "PreviewImage", "inputs": {"images": ["2", 0]}},
    })["2"][0].pixels
    assert edges.shape == (1, 32, 32, 3)
    assert torch.equal(edges[..., 0], edges[..., 2]) and set(edges.unique().tolist()) <= {0.0, 1.0}
    on = edges[0, ..., 0] > 0
    # the hand-made edge picture: the square's outline, one pixel either side of its border
    ring = torch.zeros(32, 32, dtype=torch.bool)
    ring[7:25, 7:25] = True
    ring[10:22, 10:22] = False
    assert on.any() and not (on & ~ring).any()
    for side in (on[7:10, 10:22], on[22:25, 10:22], on[10:22, 7:10], on[10:22, 22:25]):
        assert side.any(dim=0 if side.shape[0] == 3 else 1).all()  # every side is traced along its length


def test_canny_refuses_a_low_threshold_above_the_high_one(executor: Executor, shapes_png: str) -> None:
    workflow = graph(shapes_png, controls=[{}])
    workflow["20"]["inputs"].update(low_threshold=0.9, high_threshold=0.3)
    with pytest.raises(WorkflowInvalid) as caught:
        executor.validate(workflow)
    [error] = caught.value.body["node_errors"]["20"]["errors"]
    assert "low_threshold 0.9 is above high_threshold 0.3" in error["details"] + error["message"]


def test_set_union_controlnet_type_validates_its_choices_and_passes_a_plain_controlnet(executor: Executor,
                                                                                       shapes_png: str) -> None:
    workflow = graph(shapes_png, controls=[{}])
    workflow["50"] = {"class_type": "SetUnionControlNetType", "inputs": {"control_net": ["30", 0], "type": "canny"}}
    workflow["40"]["inputs"]["control_net"] = ["50", 0]
    with pytest.raises(WorkflowInvalid) as caught:
        executor.validate(workflow)
    [error] = caught.value.body["node_errors"]["50"]["errors"]
    assert error["type"] == "value_not_in_list"
    workflow["50"]["inputs"]["type"] = "canny/lineart/anime_lineart/mlsd"
    assert torch.equal(pixels(executor, workflow), pixels(executor, graph(shapes_png, controls=[{}])))


def test_a_shuffle_controlnets_residuals_are_averaged_over_the_picture(executor: Executor) -> None:
    plain = executor.models.controlnet(CONTROLNETS[SD15])
    shuffle = ControlNetRef(plain.module, "x_shuffle.safetensors", "sd15", True, "", global_average_pooling=True)
    generator = torch.Generator().manual_seed(4)
    x, embeds = torch.randn(1, 4, 8, 8, generator=generator), torch.randn(1, 77, 32, generator=generator)
    image = torch.rand(1, 3, 64, 64, generator=generator)
    unet = executor.models.checkpoint(SD15).pipe.unet

    def residuals(net: ControlNetRef) -> dict[str, Any]:
        item = CondItem(embeds, extras={"control": ControlHint(net, image, 0.5)})
        maker = ControlResiduals.for_groups([[item]], unet, "sd15")
        assert maker is not None
        with torch.inference_mode():
            return maker(x, torch.tensor([500.0]), 3.0, embeds, None, [1])

    pooled, full = residuals(shuffle), residuals(plain)
    for a, b in zip([*pooled["down_block_additional_residuals"], pooled["mid_block_additional_residual"]],
                    [*full["down_block_additional_residuals"], full["mid_block_additional_residual"]]):
        assert torch.allclose(a, (b / 0.5).mean(dim=(2, 3), keepdim=True).expand_as(b) * 0.5, atol=1e-6)
    # ComfyUI tells a shuffle ControlNet by its file name
    assert not plain.global_average_pooling


def test_the_cost_check_follows_conds_and_pictures_through_the_controlnet_nodes(executor: Executor,
                                                                              shapes_png: str) -> None:
    # 7 and 8 chunks: the sampler behind ControlNetApplyAdvanced still repeats them to lcm 56 chunks, 4,312 tokens
    workflow = graph(shapes_png, controls=[{}])
    workflow["6"]["inputs"]["text"], workflow["7"]["inputs"]["text"] = "cat " * 500, "dog " * 560
    with pytest.raises(WorkflowInvalid) as caught:
        validate_within_limits(workflow, catalog(), executor.models, Limits(max_conditioning_tokens=2464))
    assert list(caught.value.body["node_errors"]) == ["3"]
    assert "4,312" in caught.value.body["node_errors"]["3"]["errors"][0]["details"]


def test_batched_groups_get_their_own_controlnets_rows(executor: Executor) -> None:
    # the queue's batches guide several jobs' latents in one call: each group's rows see only its own ControlNet
    unet = executor.models.checkpoint(SD15).pipe.unet
    net = executor.models.controlnet(CONTROLNETS[SD15])
    generator = torch.Generator().manual_seed(5)
    x = torch.randn(3, 4, 8, 8, generator=generator)
    embeds = [torch.randn(1, 77, 32, generator=generator) for _ in range(4)]
    image = torch.rand(2, 3, 64, 64, generator=generator)
    hint = ControlHint(net, image, 0.8)
    controlled = (Conditioning((CondItem(embeds[0], extras={"control": hint}),)),
                  Conditioning((CondItem(embeds[1], extras={"control": hint}),)))
    plain = (Conditioning((CondItem(embeds[2]),)), Conditioning((CondItem(embeds[3]),)))
    timestep, sigma = timestep_for_sigma(1.5, model_sigmas()), 1.5
    with torch.inference_mode():
        both = guided_eps(unet, [controlled[0], plain[0]], [controlled[1], plain[1]], 5.0, False, (64, 64),
                          sizes=[2, 1])(x, timestep, sigma)
        alone = guided_eps(unet, controlled[0], controlled[1], 5.0, False, (64, 64))(x[:2], timestep, sigma)
        without = guided_eps(unet, plain[0], plain[1], 5.0, False, (64, 64))(x[2:], timestep, sigma)
    assert torch.allclose(both[:2], alone, atol=1e-5) and torch.allclose(both[2:], without, atol=1e-5)
