"""Area conditioning with the rest of the model: an inpainting UNet's concat and an SDXL twin's added conds cut to
the area, ControlNets on area conds (the legacy spread, the hint resized to the area), an area composition graph on
the tiny SD1.5 model and the cost check's bound on area sizes; against ComfyUI 0.3.64 as test_area_conditioning.py
writes its area math out."""

from __future__ import annotations

import copy
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from diffusers import ControlNetModel, UNet2DConditionModel

from engine.executor import Executor
from engine.models.controlnet.residuals import spread_to_uncond
from engine.nodes.area_conditioning import spread_outside_areas
from engine.nodes.guidance import guided_eps
from engine.nodes.unet_concat import InpaintSource, inpaint_concat
from engine.samplers.loop import resize_noise_mask
from engine.settings import Limits
from engine.values import CondItem
from tests.engine.nodes.test_controlnet import shapes_png  # noqa: F401,F811 (a fixture)
from tests.engine.nodes.test_controlnet import graph as controlnet_graph
from tests.engine.nodes.test_inpaint import values_of
from tests.engine.test_cost import cost_of, refusal
from tests.engine.nodes.test_area_conditioning import (FULL, LEFT, NEG, PIXELS, H, SpatialUNet, W, area, conds, flat,
                                                       latents)


class InpaintUNet(SpatialUNet):
    """A 9-channel (inpainting) SpatialUNet that records the concat each call gets after the latent's channels."""

    config = SimpleNamespace(in_channels=9)

    def __init__(self) -> None:
        super().__init__()
        self.concats: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor, t: torch.Tensor, encoder_hidden_states: torch.Tensor, **_: object) -> Any:
        self.concats.append(x[:, 4:].clone())
        return super().forward(x[:, :4], t, encoder_hidden_states)


def test_an_inpainting_unet_gets_the_concat_cut_to_the_area() -> None:
    latent, mask = latents(seed=8), (torch.rand(1, 1, 64, 96, generator=torch.Generator().manual_seed(9)) > 0.5)
    source = InpaintSource(latent, mask.float(), 1.0)
    positive = conds(area(flat(LEFT), 64, 64, 112, 32), flat(FULL))
    unet = InpaintUNet()
    guided_eps(unet, positive, conds(flat(NEG)), 6.0, False, PIXELS, inpaint=source)(
        latents(), torch.tensor([500.0]), torch.tensor(1.5))
    whole = inpaint_concat(positive.items[1], latent, resize_noise_mask(mask.float(), latent.shape), 1.0)
    # the area cond and its negative twin first (the first cond's shape), then the whole-picture ones
    assert [c.shape for c in unet.concats] == [(2, 5, 8, 8), (2, 5, H, W)]
    assert torch.equal(unet.concats[0], whole[..., 4:12, 14:22].repeat(2, 1, 1, 1))  # ComfyUI's CONDNoiseShape
    assert torch.equal(unet.concats[1], whole.repeat(2, 1, 1, 1))


class AddedUNet(SpatialUNet):
    """Records SDXL's added conds per call."""

    def __init__(self) -> None:
        super().__init__()
        self.added: list[dict[str, torch.Tensor]] = []

    def forward(self, x: torch.Tensor, t: torch.Tensor, encoder_hidden_states: torch.Tensor, **kwargs: Any) -> Any:
        self.added.append(kwargs["added_cond_kwargs"])
        return super().forward(x, t, encoder_hidden_states)


def test_an_sdxl_twin_takes_the_text_pooled_output_and_sizes_of_the_cond_it_copies_from() -> None:
    def sdxl(value: float, **extras: Any) -> CondItem:
        return CondItem(torch.full((1, 77, 8), value), torch.full((1, 1280), value), extras)

    positive = conds(area(sdxl(LEFT, width=1024, height=768), 96, 128, 0, 0), sdxl(FULL))
    negative = conds(sdxl(NEG, width=512, height=512, target_width=640))
    unet = AddedUNet()
    guided_eps(unet, positive, negative, 6.0, True, PIXELS)(latents(), torch.tensor([500.0]), torch.tensor(1.5))
    (halves, whole) = unet.added
    assert halves["text_embeds"][:, 0].tolist() == [LEFT, NEG]  # the area cond, then the negative's twin
    assert halves["time_ids"].tolist() == [[768, 1024, 0, 0, 768, 1024], [512, 512, 0, 0, 512, 640]]
    assert whole["text_embeds"][:, 0].tolist() == [FULL, NEG]


def test_the_legacy_controlnet_reaches_the_negative_from_conds_without_an_area_only() -> None:
    plain_net, area_net = object(), object()  # spread_to_uncond reads them by identity only
    legacy = {"control_apply_to_uncond": True}
    positive = conds(flat(FULL, control=plain_net, **legacy), area(flat(LEFT, control=area_net, **legacy), 96, 128,
                                                                   0, 0))
    negative = conds(flat(NEG), area(flat(0.25), 96, 128, 96, 0))
    spread = spread_outside_areas(positive, negative)
    assert [item.extras.get("control") for item in spread.items] == [plain_net, None]  # ComfyUI's; not area_net
    # what ignoring areas would give: the area cond's ControlNet on the negative's area cond
    assert [item.extras.get("control") for item in spread_to_uncond(positive, negative).items] == [plain_net, area_net]


def test_a_controlnet_on_an_area_cond_sees_its_hint_resized_to_the_area(executor: Executor, shapes_png: str,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    hints: list[tuple[int, ...]] = []
    original = ControlNetModel.forward

    def recording(self: ControlNetModel, sample: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        hints.append(tuple(kwargs["controlnet_cond"].shape))
        return original(self, sample, *args, **kwargs)

    monkeypatch.setattr(ControlNetModel, "forward", recording)
    workflow = controlnet_graph(shapes_png, controls=[{}])
    workflow["5"]["inputs"].update(width=128, height=64)
    workflow["70"] = {"class_type": "ConditioningSetArea", "inputs": {"conditioning": ["6", 0], "width": 64,
                                                                       "height": 64, "x": 64, "y": 0, "strength": 1.0}}
    workflow["40"]["inputs"]["positive"] = ["70", 0]
    out = values_of(executor, workflow)["8"][0].pixels
    # per step: the area cond and its negative twin on their 64x64 crop, the whole hint center-cropped and resized
    # to it (ComfyUI's get_control), then the negative over the whole picture (the hint at 128x64)
    assert hints == [(2, 3, 64, 64), (1, 3, 64, 128)] * 4
    assert torch.isfinite(out).all()


# -- on the tiny SD1.5 model ----------------------------------------------------------------------------------------


def composition(areas: bool = True) -> dict[str, Any]:
    """The published area composition shape at 128x64: a prompt per half through ConditioningSetArea, combined with
    each other and a whole-picture prompt, into a KSampler (4 euler steps, cfg 7)."""
    workflow: dict[str, Any] = {
        "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "tiny-sd15.safetensors"}},
        "6": {"class_type": "CLIPTextEncode", "inputs": {"text": "a meadow at dawn", "clip": ["4", 1]}},
        "7": {"class_type": "CLIPTextEncode", "inputs": {"text": "blurry", "clip": ["4", 1]}},
        "11": {"class_type": "CLIPTextEncode", "inputs": {"text": "a red fox", "clip": ["4", 1]}},
        "12": {"class_type": "CLIPTextEncode", "inputs": {"text": "a snowy mountain", "clip": ["4", 1]}},
        "13": {"class_type": "ConditioningSetArea", "inputs": {"conditioning": ["11", 0], "width": 64, "height": 64,
                                                                "x": 0, "y": 0, "strength": 1.0}},
        "14": {"class_type": "ConditioningSetArea", "inputs": {"conditioning": ["12", 0], "width": 64, "height": 64,
                                                                "x": 64, "y": 0, "strength": 1.0}},
        "15": {"class_type": "ConditioningCombine", "inputs": {"conditioning_1": ["13", 0],
                                                                "conditioning_2": ["14", 0]}},
        "16": {"class_type": "ConditioningCombine", "inputs": {"conditioning_1": ["6", 0],
                                                                "conditioning_2": ["15", 0]}},
        "5": {"class_type": "EmptyLatentImage", "inputs": {"width": 128, "height": 64, "batch_size": 1}},
        "3": {"class_type": "KSampler", "inputs": {
            "model": ["4", 0], "seed": 7, "steps": 4, "cfg": 7.0, "sampler_name": "euler", "scheduler": "normal",
            "positive": ["16", 0], "negative": ["7", 0], "latent_image": ["5", 0], "denoise": 1.0}},
        "8": {"class_type": "VAEDecode", "inputs": {"samples": ["3", 0], "vae": ["4", 2]}},
        "9": {"class_type": "PreviewImage", "inputs": {"images": ["8", 0]}},
    }
    if not areas:
        for node in ("13", "14"):
            workflow[node] = {"class_type": "ConditioningSetAreaStrength",
                              "inputs": {"conditioning": workflow[node]["inputs"]["conditioning"], "strength": 1.0}}
    return workflow


def test_an_area_composition_runs_on_the_tiny_model(executor: Executor, monkeypatch: pytest.MonkeyPatch) -> None:
    shapes: list[tuple[int, ...]] = []
    original = UNet2DConditionModel.forward

    def recording(self: UNet2DConditionModel, sample: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        shapes.append(tuple(sample.shape))
        return original(self, sample, *args, **kwargs)

    monkeypatch.setattr(UNet2DConditionModel, "forward", recording)
    composed = values_of(executor, copy.deepcopy(composition()))["8"][0].pixels
    # per step: the whole-picture prompt with the negative, then both halves with their negative twins
    assert shapes == [(2, 4, 8, 16), (4, 4, 8, 8)] * 4
    plain = values_of(executor, composition(areas=False))["8"][0].pixels
    assert composed.shape == plain.shape == (1, 64, 128, 3) and torch.isfinite(composed).all()
    assert (composed - plain).abs().max() > 1e-3  # the areas do change the picture


def test_the_cost_check_bounds_area_sizes(executor: Executor) -> None:
    workflow = composition()
    workflow["13"]["inputs"]["width"] = 4096
    errors = refusal(executor, workflow, Limits(max_side=2048))
    [error] = errors["13"]["errors"]
    assert error["extra_info"]["limit"] == "max_side" and error["extra_info"]["input_name"] == "width"
    assert "sets an area of 4,096x64 pixels" in error["details"]
    workflow["13"]["inputs"]["width"] = 1024  # bigger than the 128x64 picture: cut to it when sampled
    cost = cost_of(executor, workflow)
    assert (cost.side, cost.conditioning_items) == (128, 3)
