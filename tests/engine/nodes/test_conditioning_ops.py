"""ConditioningZeroOut, ConditioningAverage and ConditioningSetTimestepRange against ComfyUI 0.3.64's math written
out here (nodes.py; comfy/samplers.py calculate_start_end_timesteps, get_area_and_mult and calc_cond_batch for how
a timestep range is applied), on small tensors, through guided_eps with a recording UNet, and in graphs on the
tiny SD1.5 model: a range over [0, 1] gives exactly the picture without the node, a range that holds no step
exactly the picture without that cond, and the UNet sees a cond on the steps ComfyUI's formula says."""

from __future__ import annotations

import copy
import math
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from diffusers import UNet2DConditionModel

from engine.executor import Executor
from engine.nodes import catalog
from engine.nodes.guidance import guided_eps
from engine.samplers import DEFAULT_SAMPLING, ksampler_sigmas
from engine.samplers.model_sampling import ModelSampling
from engine.values import CondItem, Conditioning
from tests.engine.nodes.test_controlnet import comfy_percent_to_sigma, shapes_png  # noqa: F401 (a fixture)
from tests.engine.nodes.test_controlnet import graph as controlnet_graph
from tests.engine.nodes.test_inpaint import values_of


def run(class_type: str, **inputs: Any) -> Conditioning:
    ctx: Any = SimpleNamespace(node_id="12")  # what these nodes read of a RunContext
    (out,) = catalog()[class_type].model_construct(**inputs).run(ctx)
    return out


def item(seed: int, tokens: int = 77, width: int = 8, pooled: bool = True, **extras: Any) -> CondItem:
    generator = torch.Generator().manual_seed(seed)
    embeds = torch.randn((1, tokens, width), generator=generator)
    return CondItem(embeds, torch.randn((1, 4), generator=generator) if pooled else None, dict(extras))


def as_comfy(conditioning: Conditioning) -> list[list[Any]]:
    """ComfyUI's form of a CONDITIONING: [[embeds, {"pooled_output": ..., **extras}], ...] (a None pooled is absent,
    as our SD1.x conds carry none)."""
    return [[i.embeds, {**i.extras, **({} if i.pooled is None else {"pooled_output": i.pooled})}]
            for i in conditioning.items]


# -- ConditioningZeroOut ----------------------------------------------------------------------------------------


def comfy_zero_out(conditioning: list[list[Any]]) -> list[list[Any]]:
    """nodes.py ConditioningZeroOut.zero_out."""
    out = []
    for embeds, d in conditioning:
        d = d.copy()
        if d.get("pooled_output") is not None:
            d["pooled_output"] = torch.zeros_like(d["pooled_output"])
        out.append([torch.zeros_like(embeds), d])
    return out


def test_zero_out_zeros_the_embeddings_and_the_pooled_output_and_keeps_the_rest() -> None:
    given = Conditioning((item(1, width=16, width_px=1024), item(2, tokens=154, pooled=False)))
    got = run("ConditioningZeroOut", conditioning=given)
    expected = comfy_zero_out(as_comfy(given))
    assert len(got.items) == 2
    for mine, (embeds, d) in zip(got.items, expected):
        assert torch.equal(mine.embeds, embeds) and mine.embeds.shape == embeds.shape
        assert (mine.pooled is None) == ("pooled_output" not in d)
        if mine.pooled is not None:
            assert torch.equal(mine.pooled, d["pooled_output"])
        assert mine.extras == {k: v for k, v in d.items() if k != "pooled_output"}
    assert got.items[0].extras == {"width_px": 1024}
    assert given.items[0].embeds.abs().sum() > 0  # the input is not changed


# -- ConditioningAverage ------------------------------------------------------------------------------------------


def comfy_average(conditioning_to: list[list[Any]], conditioning_from: list[list[Any]],
                  conditioning_to_strength: float) -> list[list[Any]]:
    """nodes.py ConditioningAverage.addWeighted."""
    out = []
    cond_from = conditioning_from[0][0]
    pooled_output_from = conditioning_from[0][1].get("pooled_output", None)
    for i in range(len(conditioning_to)):
        t1 = conditioning_to[i][0]
        pooled_output_to = conditioning_to[i][1].get("pooled_output", pooled_output_from)
        t0 = cond_from[:, :t1.shape[1]]
        if t0.shape[1] < t1.shape[1]:
            t0 = torch.cat([t0] + [torch.zeros((1, (t1.shape[1] - t0.shape[1]), t1.shape[2]))], dim=1)
        tw = torch.mul(t1, conditioning_to_strength) + torch.mul(t0, (1.0 - conditioning_to_strength))
        t_to = conditioning_to[i][1].copy()
        if pooled_output_from is not None and pooled_output_to is not None:
            t_to["pooled_output"] = (torch.mul(pooled_output_to, conditioning_to_strength)
                                     + torch.mul(pooled_output_from, (1.0 - conditioning_to_strength)))
        elif pooled_output_from is not None:
            t_to["pooled_output"] = pooled_output_from
        out.append([tw, t_to])
    return out


def assert_same(got: Conditioning, expected: list[list[Any]]) -> None:
    assert len(got.items) == len(expected)
    for mine, (embeds, d) in zip(got.items, expected):
        assert mine.embeds.shape == embeds.shape and torch.equal(mine.embeds, embeds)
        if mine.pooled is None:
            assert d.get("pooled_output") is None
        else:
            assert torch.equal(mine.pooled, d["pooled_output"])
        assert mine.extras == {k: v for k, v in d.items() if k != "pooled_output"}


@pytest.mark.parametrize("strength", [0.0, 0.3, 0.75, 1.0])
@pytest.mark.parametrize(("to_tokens", "from_tokens"), [(77, 77), (154, 77), (77, 231)])
def test_average_is_comfyuis_weighted_sum_with_from_cut_or_zero_padded(strength: float, to_tokens: int,
                                                                        from_tokens: int) -> None:
    to = Conditioning((item(1, tokens=to_tokens, size=1), item(2, tokens=77)))
    source = Conditioning((item(3, tokens=from_tokens, ignored=True),))
    got = run("ConditioningAverage", conditioning_to=to, conditioning_from=source, conditioning_to_strength=strength)
    assert_same(got, comfy_average(as_comfy(to), as_comfy(source), strength))
    if to_tokens > from_tokens and strength < 1.0:  # the padding is zeros: only `to` is left there
        assert torch.equal(got.items[0].embeds[:, from_tokens:], to.items[0].embeds[:, from_tokens:] * strength)


@pytest.mark.parametrize(("to_pooled", "from_pooled"), [(True, True), (False, True), (True, False), (False, False)])
def test_average_blends_the_pooled_output_as_comfyui(to_pooled: bool, from_pooled: bool) -> None:
    to = Conditioning((item(1, pooled=to_pooled),))
    source = Conditioning((item(2, pooled=from_pooled), item(3)))  # only the first cond of `from` is used
    got = run("ConditioningAverage", conditioning_to=to, conditioning_from=source, conditioning_to_strength=0.4)
    assert_same(got, comfy_average(as_comfy(to), as_comfy(source), 0.4))


def test_average_refuses_conds_of_other_widths_in_words() -> None:
    with pytest.raises(ValueError, match="cannot blend conds of 8 and 16 features per token"):
        run("ConditioningAverage", conditioning_to=Conditioning((item(1),)),
            conditioning_from=Conditioning((item(2, width=16),)), conditioning_to_strength=0.5)


def test_the_nodes_have_comfyuis_inputs_defaults_and_ranges() -> None:
    def specs(class_type: str) -> list[tuple[Any, ...]]:
        return [(s.name, s.type, s.default, s.min, s.max, s.step) for s in catalog()[class_type].input_specs()]

    cond = ("CONDITIONING", None, None, None, None)
    assert specs("ConditioningAverage") == [("conditioning_to", *cond), ("conditioning_from", *cond),
                                            ("conditioning_to_strength", "FLOAT", 1.0, 0.0, 1.0, 0.01)]
    assert specs("ConditioningZeroOut") == [("conditioning", *cond)]
    assert specs("ConditioningSetTimestepRange") == [("conditioning", *cond), ("start", "FLOAT", 0.0, 0.0, 1.0, 0.001),
                                                     ("end", "FLOAT", 1.0, 0.0, 1.0, 0.001)]
    assert [catalog()[c].CATEGORY for c in ("ConditioningAverage", "ConditioningZeroOut",
                                            "ConditioningSetTimestepRange")] == [
        "conditioning", "advanced/conditioning", "advanced/conditioning"]


# -- ConditioningSetTimestepRange ---------------------------------------------------------------------------------


def test_set_timestep_range_puts_comfyuis_keys_on_every_cond_and_a_later_one_replaces_it() -> None:
    given = Conditioning((item(1, width_px=64), item(2)))
    once = run("ConditioningSetTimestepRange", conditioning=given, start=0.2, end=0.6)
    twice = run("ConditioningSetTimestepRange", conditioning=once, start=0.5, end=1.0)
    assert [i.extras for i in once.items] == [{"width_px": 64, "start_percent": 0.2, "end_percent": 0.6},
                                              {"start_percent": 0.2, "end_percent": 0.6}]
    assert [(i.extras["start_percent"], i.extras["end_percent"]) for i in twice.items] == [(0.5, 1.0)] * 2
    assert all(torch.equal(a.embeds, b.embeds) for a, b in zip(given.items, twice.items))


class ValueUNet(torch.nn.Module):
    """Predicts, per row, the mean of its context (each test cond is a constant), and records those values per call:
    which conds the UNet saw at each step."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.device, self.dtype = torch.device("cpu"), torch.float32
        self.calls: list[list[float]] = []

    def forward(self, x: torch.Tensor, t: torch.Tensor, encoder_hidden_states: torch.Tensor, **_: object) -> Any:
        values = encoder_hidden_states.mean(dim=(1, 2))
        self.calls.append([round(float(v), 4) for v in values])
        return type("Out", (), {"sample": values.view(-1, 1, 1, 1).expand_as(x)})()


def flat(value: float, **extras: Any) -> CondItem:
    return CondItem(torch.full((1, 77, 8), value), None, extras)


def comfy_active(sigma: float, start: float, end: float, prediction: str = "eps") -> bool:
    """calculate_start_end_timesteps + get_area_and_mult: skipped when sigma > start sigma or sigma < end sigma."""
    return not (sigma > comfy_percent_to_sigma(start, prediction) or sigma < comfy_percent_to_sigma(end, prediction))


@pytest.mark.parametrize("prediction", ["eps", "lcm"])
@pytest.mark.parametrize(("start", "end"), [(0.3, 0.7), (0.0, 0.5), (0.5, 1.0), (0.1, 0.1)])
def test_a_cond_reaches_the_unet_only_on_the_steps_comfyuis_formula_says(start: float, end: float,
                                                                          prediction: str) -> None:
    sampling = ModelSampling(prediction)
    positive = Conditioning((flat(1.0), flat(2.0, start_percent=start, end_percent=end)))
    negative = Conditioning((flat(0.5),))
    unet = ValueUNet()
    eps = guided_eps(unet, positive, negative, 4.0, False, (64, 64), sampling=sampling)
    sigmas = [float(s) for s in ksampler_sigmas("normal", 12, 1.0, sampling, sampler_name="euler")[:-1]]
    for sigma in sigmas:
        eps(torch.zeros(1, 4, 8, 8), sampling.timestep(sigma).reshape(1), torch.tensor(sigma))
    expected = [[1.0, 2.0, 0.5] if comfy_active(sigma, start, end, prediction) else [1.0, 0.5] for sigma in sigmas]
    assert unet.calls == expected
    assert [1.0, 2.0, 0.5] in expected and [1.0, 0.5] in expected or (start, end) == (0.1, 0.1)


def denoised_of(eps: torch.Tensor, scaled: torch.Tensor, sigma: float) -> torch.Tensor:
    """What the sampler makes of a noise prediction: x - sigma * eps, x = scaled * sqrt(sigma^2 + 1)."""
    return scaled * math.sqrt(sigma**2 + 1.0) - sigma * eps


def test_while_no_positive_cond_is_active_the_positive_is_a_denoised_zero_as_in_comfyui() -> None:
    scaled, sigma, cfg = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(5)), 2.918, 3.0
    positive = Conditioning((flat(1.0, start_percent=0.6, end_percent=1.0),))  # starts below sigma 2.9
    unet = ValueUNet()
    got = guided_eps(unet, positive, Conditioning((flat(0.5),)), cfg, False, (64, 64))(
        scaled, torch.tensor([500.0]), torch.tensor(sigma))
    assert unet.calls == [[0.5, 0.5]]  # the negative only, for both latents
    # calc_cond_batch: out_conds[0] is zeros / 1e-37 = 0; cfg_function: uncond + (cond - uncond) * cfg
    uncond = denoised_of(torch.full_like(scaled, 0.5), scaled, sigma)
    expected = uncond + (torch.zeros_like(uncond) - uncond) * cfg
    assert torch.allclose(denoised_of(got, scaled, sigma), expected, atol=1e-4)


def test_when_no_cond_is_active_the_unet_is_not_called_and_the_estimate_is_zero() -> None:
    scaled, sigma = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(6)), 14.6
    late = {"start_percent": 0.5, "end_percent": 1.0}
    unet = ValueUNet()
    got = guided_eps(unet, Conditioning((flat(1.0, **late),)), Conditioning((flat(0.5, **late),)), 7.0, False,
                     (64, 64))(scaled, torch.tensor([999.0]), torch.tensor(sigma))
    assert unet.calls == []
    assert torch.allclose(denoised_of(got, scaled, sigma), torch.zeros_like(scaled), atol=1e-4)


# -- graphs on the tiny SD1.5 model ------------------------------------------------------------------------------


def graph(positive_range: tuple[float, float] | None = None, *, second: str | None = None,
          second_range: tuple[float, float] | None = None) -> dict[str, Any]:
    """txt2img at 64x64, 4 euler/normal steps (sigmas 14.6, 2.9, 0.93, 0.029), cfg 7; the positive optionally
    through ConditioningSetTimestepRange, and a `second` positive text combined after it (with its own range)."""
    workflow: dict[str, Any] = {
        "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "tiny-sd15.safetensors"}},
        "6": {"class_type": "CLIPTextEncode", "inputs": {"text": "a red fox", "clip": ["4", 1]}},
        "7": {"class_type": "CLIPTextEncode", "inputs": {"text": "blurry", "clip": ["4", 1]}},
        "5": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "8": {"class_type": "VAEDecode", "inputs": {"samples": ["3", 0], "vae": ["4", 2]}},
        "9": {"class_type": "PreviewImage", "inputs": {"images": ["8", 0]}},
    }
    positive = ["6", 0]
    if positive_range is not None:
        workflow["10"] = {"class_type": "ConditioningSetTimestepRange",
                          "inputs": {"conditioning": positive, "start": positive_range[0], "end": positive_range[1]}}
        positive = ["10", 0]
    if second is not None:
        workflow["11"] = {"class_type": "CLIPTextEncode", "inputs": {"text": second, "clip": ["4", 1]}}
        other = ["11", 0]
        if second_range is not None:
            workflow["12"] = {"class_type": "ConditioningSetTimestepRange",
                              "inputs": {"conditioning": other, "start": second_range[0], "end": second_range[1]}}
            other = ["12", 0]
        workflow["13"] = {"class_type": "ConditioningCombine", "inputs": {"conditioning_1": positive,
                                                                           "conditioning_2": other}}
        positive = ["13", 0]
    workflow["3"] = {"class_type": "KSampler", "inputs": {
        "model": ["4", 0], "seed": 7, "steps": 4, "cfg": 7.0, "sampler_name": "euler", "scheduler": "normal",
        "positive": positive, "negative": ["7", 0], "latent_image": ["5", 0], "denoise": 1.0}}
    return workflow


def pixels(executor: Executor, workflow: dict[str, Any]) -> torch.Tensor:
    return values_of(executor, workflow)["8"][0].pixels


def test_a_range_over_all_of_sampling_gives_exactly_the_picture_without_the_node(executor: Executor) -> None:
    assert torch.equal(pixels(executor, graph((0.0, 1.0))), pixels(executor, graph()))


def test_a_range_that_holds_no_step_gives_exactly_the_picture_without_that_cond(executor: Executor) -> None:
    # start 1.0 is sigma 0: every step's sigma is above it
    alone = pixels(executor, graph())
    assert torch.equal(pixels(executor, graph(second="snowy hills", second_range=(1.0, 1.0))), alone)
    assert (pixels(executor, graph(second="snowy hills")) - alone).abs().max() > 1e-3  # the cond does matter


def test_the_ksampler_runs_a_cond_on_the_steps_of_its_range(executor: Executor,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    rows: list[int] = []
    original = UNet2DConditionModel.forward

    def counting(self: UNet2DConditionModel, sample: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        rows.append(sample.shape[0])
        return original(self, sample, *args, **kwargs)

    monkeypatch.setattr(UNet2DConditionModel, "forward", counting)
    workflow = graph(second="snowy hills", second_range=(0.3, 1.0))
    executor.run(copy.deepcopy(workflow))
    sigmas = [float(s) for s in ksampler_sigmas("normal", 4, 1.0, DEFAULT_SAMPLING, sampler_name="euler")[:-1]]
    # "a red fox" and the negative at every step; "snowy hills" only where sigma <= percent_to_sigma(0.3) (3.33)
    assert rows == [3 if comfy_active(sigma, 0.3, 1.0) else 2 for sigma in sigmas] == [2, 3, 3, 3]
    full = pixels(executor, graph(second="snowy hills"))
    late = pixels(executor, workflow)
    assert (late - full).abs().max() > 1e-4  # leaving it out of the first step changes the picture


def test_a_controlnet_on_a_cond_outside_its_range_is_left_out_with_it(executor: Executor, shapes_png: str) -> None:
    # the ControlNet'd positive combined with the plain one, the plain negative: while the ControlNet'd cond is out
    # of its range neither it nor its ControlNet runs
    def workflow(start: float) -> dict[str, Any]:
        w = controlnet_graph(shapes_png, controls=[{}])
        w["60"] = {"class_type": "ConditioningSetTimestepRange", "inputs": {"conditioning": ["40", 0],
                                                                             "start": start, "end": 1.0}}
        w["61"] = {"class_type": "ConditioningCombine", "inputs": {"conditioning_1": ["6", 0],
                                                                    "conditioning_2": ["60", 0]}}
        w["3"]["inputs"].update(positive=["61", 0], negative=["7", 0])
        return w

    plain = pixels(executor, controlnet_graph(shapes_png))
    assert torch.equal(pixels(executor, workflow(1.0)), plain)
    late = pixels(executor, workflow(0.3))
    assert torch.isfinite(late).all() and (late - plain).abs().max() > 1e-4
