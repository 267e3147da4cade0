"""Inpainting checkpoints at work on the tiny 9-channel SD1.5 and SDXL: ComfyUI's inpainting graphs end to end
(VAEEncodeForInpaint, as ComfyUI's inpaint example, and InpaintModelConditioning), the UNet's input checked against
comfy/model_base.py concat_cond written out here, its fallbacks, and a 4-channel model given the same conds."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from engine.executor import Executor
from engine.nodes.guidance import guided_eps
from engine.nodes.unet_concat import InpaintSource, inpaint_concat
from engine.values import CondItem, Conditioning
from tests.engine.nodes.test_inpaint import SIDE, write_holed_png

SD15, SDXL = "tiny-sd15-inpainting.safetensors", "tiny-sdxl-inpainting.safetensors"


@pytest.fixture(scope="module")
def holed_png(executor: Executor) -> str:
    return write_holed_png(executor, "inpaint-model.png")


def vae_encode_for_inpaint(ckpt: str, image: str, seed: int = 7) -> dict[str, Any]:
    """ComfyUI's inpaint example graph: LoadImage (alpha mask) -> VAEEncodeForInpaint -> KSampler -> save."""
    return {
        "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt}},
        "6": {"class_type": "CLIPTextEncode", "inputs": {"text": "a red fox", "clip": ["4", 1]}},
        "7": {"class_type": "CLIPTextEncode", "inputs": {"text": "blurry", "clip": ["4", 1]}},
        "10": {"class_type": "LoadImage", "inputs": {"image": image}},
        "11": {"class_type": "VAEEncodeForInpaint", "inputs": {
            "pixels": ["10", 0], "vae": ["4", 2], "mask": ["10", 1], "grow_mask_by": 6}},
        "3": {"class_type": "KSampler", "inputs": {
            "model": ["4", 0], "seed": seed, "steps": 3, "cfg": 7.0, "sampler_name": "euler", "scheduler": "normal",
            "positive": ["6", 0], "negative": ["7", 0], "latent_image": ["11", 0], "denoise": 1.0}},
        "8": {"class_type": "VAEDecode", "inputs": {"samples": ["3", 0], "vae": ["4", 2]}},
        "9": {"class_type": "SaveImage", "inputs": {"images": ["8", 0], "filename_prefix": "inpaint-model/test"}},
    }


def model_conditioning(ckpt: str, image: str, noise_mask: bool = True) -> dict[str, Any]:
    """The same with InpaintModelConditioning: the conds carry the masked image and the mask."""
    workflow = vae_encode_for_inpaint(ckpt, image)
    workflow["11"] = {"class_type": "InpaintModelConditioning", "inputs": {
        "positive": ["6", 0], "negative": ["7", 0], "vae": ["4", 2], "pixels": ["10", 0], "mask": ["10", 1],
        "noise_mask": noise_mask}}
    workflow["3"]["inputs"].update(positive=["11", 0], negative=["11", 1], latent_image=["11", 2])
    return workflow


@contextmanager
def unet_inputs(unet: torch.nn.Module) -> Iterator[list[torch.Tensor]]:
    """Every sample tensor the UNet is called with, while the block runs."""
    seen: list[torch.Tensor] = []
    handle = unet.register_forward_pre_hook(lambda module, args: seen.append(args[0].detach().clone()))
    try:
        yield seen
    finally:
        handle.remove()


def run_hooked(executor: Executor, workflow: dict[str, Any]) -> tuple[dict[str, tuple[Any, ...]], list[torch.Tensor]]:
    """Run `workflow` node by node, recording the UNet's inputs once the checkpoint ("4") is loaded."""
    run = executor.begin(workflow)
    order = list(run.prompt.order)
    run.compute("4")
    with unet_inputs(run.values["4"][0].pipe.unet) as seen:
        for node_id in order:
            run.compute(node_id)
    run.finish()
    return run.values, seen


def saved(executor: Executor, workflow: dict[str, Any]) -> np.ndarray:
    [image] = executor.run(workflow).outputs["9"]["images"]
    return np.asarray(Image.open(executor.settings.output_dir / image["subfolder"] / image["filename"]))


def comfy_mask(mask: torch.Tensor, height: int, width: int, batch: int) -> torch.Tensor:
    """concat_cond's mask: [N, 1, H, W] bilinear to the latent, rounded, repeated to the batch."""
    mask = mask.reshape(-1, 1, *mask.shape[-2:]).float()
    return F.interpolate(mask, size=(height, width), mode="bilinear").round().expand(batch, 1, height, width)


@pytest.mark.parametrize("ckpt", [SD15, SDXL])
def test_vae_encode_for_inpaint_on_an_inpainting_checkpoint_feeds_mask_and_masked_latent(
        executor: Executor, holed_png: str, ckpt: str) -> None:
    values, seen = run_hooked(executor, vae_encode_for_inpaint(ckpt, holed_png))
    latent, sampled = values["11"][0], values["3"][0]
    scale = float(values["4"][0].pipe.vae.config.scaling_factor)
    assert len(seen) == 3 and all(x.shape == (2, 9, 16, 16) for x in seen)  # cond and uncond, 3 euler steps
    # ComfyUI's fallback without concat_* conds: the latent's noise mask and the latent itself (scaled)
    mask = comfy_mask(latent.noise_mask, 16, 16, 1)
    expected = torch.cat([mask, latent.samples * scale], dim=1).repeat(2, 1, 1, 1)
    for x in seen:
        assert torch.allclose(x[:, 4:], expected, atol=1e-6)
        # the sampler's latent first (the same for cond and uncond), not the concat twice
        assert torch.equal(x[0, :4], x[1, :4]) and not torch.allclose(x[:, :4], x[:, 5:])
    # the kept area of the latent is the encoded one, the hole is drawn anew, and a picture comes out
    kept = (mask == 0).expand_as(latent.samples)
    assert torch.equal(sampled.samples[kept], latent.samples[kept])
    assert float((sampled.samples - latent.samples)[~kept].abs().mean()) > 0.05
    pixels = saved(executor, vae_encode_for_inpaint(ckpt, holed_png))
    assert pixels.shape == (SIDE, SIDE, 3) and pixels.std() > 1


@pytest.mark.parametrize("ckpt", [SD15, SDXL])
def test_inpaint_model_conditioning_feeds_the_conds_masked_image_and_mask(executor: Executor, holed_png: str,
                                                                          ckpt: str) -> None:
    values, seen = run_hooked(executor, model_conditioning(ckpt, holed_png))
    positive, negative, latent = values["11"]
    scale = float(values["4"][0].pipe.vae.config.scaling_factor)
    item = positive.items[0]
    # the cond's pixel-size concat_mask and its greyed-image latent, not the latent's own (the whole picture)
    mask = comfy_mask(item.extras["concat_mask"], 16, 16, 1)
    masked = item.extras["concat_latent_image"] * scale
    assert not torch.allclose(masked, latent.samples * scale)
    expected = torch.cat([mask, masked], dim=1).repeat(2, 1, 1, 1)
    assert all(torch.allclose(x[:, 4:], expected, atol=1e-6) for x in seen)
    assert int(mask.sum()) == 16  # the 32x32 hole is 4x4 latent cells
    pixels = saved(executor, model_conditioning(ckpt, holed_png))
    assert pixels.shape == (SIDE, SIDE, 3)
    # without the noise mask the whole latent is sampled, the concat still comes from the conds
    loose, seen_loose = run_hooked(executor, model_conditioning(ckpt, holed_png, noise_mask=False))
    assert loose["11"][2].noise_mask is None
    assert all(torch.allclose(x[:, 4:], expected, atol=1e-6) for x in seen_loose)


def test_an_inpainting_checkpoint_without_any_mask_gets_comfyuis_blank_concat(executor: Executor) -> None:
    workflow = vae_encode_for_inpaint(SD15, "unused")
    workflow["11"] = {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 2}}
    del workflow["10"]
    _, seen = run_hooked(executor, workflow)
    blank = torch.tensor([0.8223, -0.6876, 0.6364, 0.1380]).view(1, 4, 1, 1).expand(4, 4, 8, 8)
    for x in seen:  # txt2img on an inpainting model: mask all ones, masked image a black picture's latent
        assert x.shape == (4, 9, 8, 8)
        assert torch.equal(x[:, 4:5], torch.ones(4, 1, 8, 8)) and torch.allclose(x[:, 5:], blank)


def test_a_four_channel_model_given_inpaint_model_conditioning_still_runs_on_four_channels(
        executor: Executor, holed_png: str) -> None:
    values, seen = run_hooked(executor, model_conditioning("tiny-sdxl.safetensors", holed_png))
    assert seen and all(x.shape[1] == 4 for x in seen)
    assert values["11"][0].items[0].extras["concat_latent_image"].shape == (1, 4, 16, 16)
    assert saved(executor, model_conditioning("tiny-sdxl.safetensors", holed_png)).shape == (SIDE, SIDE, 3)


def test_a_controlnet_on_an_inpainting_checkpoint_sees_only_the_latents_four_channels(executor: Executor,
                                                                                       holed_png: str) -> None:
    workflow = vae_encode_for_inpaint(SD15, holed_png)
    workflow["30"] = {"class_type": "ControlNetLoader",
                      "inputs": {"control_net_name": "tiny-controlnet-sd15.safetensors"}}
    workflow["40"] = {"class_type": "ControlNetApplyAdvanced", "inputs": {
        "positive": ["6", 0], "negative": ["7", 0], "control_net": ["30", 0], "image": ["10", 0], "strength": 1.0,
        "start_percent": 0.0, "end_percent": 1.0}}
    workflow["3"]["inputs"].update(positive=["40", 0], negative=["40", 1])
    run = executor.begin(workflow)
    run.compute("4")
    run.compute("30")
    with unet_inputs(run.values["4"][0].pipe.unet) as unet_seen, unet_inputs(run.values["30"][0].module) as cn_seen:
        for node_id in run.prompt.order:
            run.compute(node_id)
    run.finish()
    assert cn_seen and all(x.shape[1] == 4 for x in cn_seen)  # ComfyUI's ControlNet gets x, not the concat
    assert unet_seen and all(x.shape[1] == 9 for x in unet_seen)
    assert torch.equal(cn_seen[0], unet_seen[0][:, :4])


# -- concat_cond's edges, against the rules written out ---------------------------------------------------------


def test_concat_mask_wins_over_the_noise_mask_and_both_fit_the_latent_and_batch() -> None:
    latent = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    noise_mask = torch.zeros(1, 1, 8, 8)
    concat_mask = torch.zeros(2, 1, 64, 64)
    concat_mask[0, :, :32], concat_mask[1, :, 32:] = 1.0, 1.0
    image = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(1))  # another size: resized
    item = CondItem(torch.zeros(1, 77, 8), extras={"concat_mask": concat_mask, "concat_latent_image": image})
    got = inpaint_concat(item, latent, noise_mask, scale=0.5)
    # comfy.utils.resize_to_batch_size from 2 to 3 rows: rows 0, 1, 1 (floor((i + 0.5) * 2 / 3))
    rows = [0, 1, 1]
    assert torch.equal(got[:, :1], F.interpolate(concat_mask, size=(8, 8), mode="bilinear").round()[rows])
    assert torch.allclose(got[:, 1:], F.interpolate(image * 0.5, size=(8, 8), mode="bilinear")[rows])
    # only the noise mask: it is the mask, and the latent is the masked image
    plain = inpaint_concat(CondItem(torch.zeros(1, 77, 8)), latent, torch.ones(1, 1, 4, 4) * 0.6, scale=0.5)
    assert torch.equal(plain[:, :1], torch.ones(3, 1, 8, 8)) and torch.equal(plain[:, 1:], latent)


def test_a_concat_of_another_aspect_is_center_cropped_as_comfyuis_common_upscale() -> None:
    latent = torch.zeros(1, 4, 16, 12)  # 3:4
    image = torch.randn(1, 4, 12, 8, generator=torch.Generator().manual_seed(3))  # 2:3, too tall
    mask = torch.rand(1, 1, 96, 64, generator=torch.Generator().manual_seed(4))
    item = CondItem(torch.zeros(1, 77, 8), extras={"concat_mask": mask, "concat_latent_image": image})
    got = inpaint_concat(item, latent, None, scale=1.0)
    # common_upscale cuts round((12 - 12 * (2/3) / (3/4)) / 2) = 1 row from the top and bottom (96 rows: 5 each)
    assert torch.equal(got[:, 1:], F.interpolate(image[:, :, 1:11], size=(16, 12), mode="bilinear"))
    assert torch.equal(got[:, :1], F.interpolate(mask[:, :, 5:91], size=(16, 12), mode="bilinear").round())


def test_queue_groups_get_their_own_latents_in_the_concat() -> None:
    class Recorder(torch.nn.Module):
        config = type("Config", (), {"in_channels": 9})()
        device, dtype = torch.device("cpu"), torch.float32

        def __init__(self) -> None:
            super().__init__()
            self.seen: list[torch.Tensor] = []

        def forward(self, x: torch.Tensor, t: torch.Tensor, encoder_hidden_states: torch.Tensor, **_: Any) -> Any:
            self.seen.append(x)
            return type("Out", (), {"sample": x[:, :4]})()

    def cond(value: float) -> Conditioning:
        return Conditioning((CondItem(torch.full((1, 77, 8), value)),))

    latent = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    mask = torch.zeros(3, 1, 8, 8)
    mask[1:, :, :4] = 1.0
    unet = Recorder()
    eps = guided_eps(unet, [cond(1.0), cond(2.0)], [cond(0.0), cond(0.0)], 2.0, False, (64, 64), sizes=[1, 2],
                     inpaint=InpaintSource(latent, mask, 1.0))
    eps(torch.zeros(3, 4, 8, 8), torch.tensor(500), torch.tensor(1.0))
    [x] = unet.seen
    # group 0: its cond then uncond over latent row 0; group 1: cond then uncond over rows 1, 2
    assert torch.equal(x[:, 5:], latent[[0, 0, 1, 2, 1, 2]])
    assert torch.equal(x[:, 4:5], mask[[0, 0, 1, 2, 1, 2]])
