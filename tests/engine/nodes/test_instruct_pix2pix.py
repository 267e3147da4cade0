"""InstructPixToPixConditioning and 8-channel edit UNets against ComfyUI 0.3.64 (comfy_extras/nodes_ip2p.py; the
concat of comfy/model_base.py IP2P.concat_cond and SD15/SDXL_instructpix2pix.process_ip2p_image_in, written out
here): the node's outputs, the UNet input through guided_eps with a recording UNet, and graphs on tiny 8-channel
SD1.5 / SDXL / CosXL-Edit-style checkpoints written by a fixture (ComfyUI's edit example among them), a 4-channel
model given the same conds, and the detection of such files."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save_file

from engine.errors import UnsupportedModel
from engine.executor import Executor
from engine.models.detect import Arch, detect_checkpoint, detect_from_header
from engine.models.single_file import expected_shapes
from engine.models.to_original import pipeline_to_original
from engine.nodes import catalog
from engine.nodes.unet_concat import IP2P_SDXL_SCALE as SDXL_SCALE
from engine.nodes.guidance import guided_eps
from engine.nodes.vae import encode_pixels
from engine.samplers import DEFAULT_SAMPLING
from engine.samplers.model_sampling import ContinuousEDM, ModelSampling
from engine.tiny import tiny_components
from engine.values import CondItem, Conditioning
from tests.conftest import tiny_executor
from tests.engine.nodes.test_inpaint_model import run_hooked

SD15, SDXL, COSXL = "tiny-sd15-ip2p.safetensors", "tiny-sdxl-ip2p.safetensors", "tiny-cosxl-edit.safetensors"
COSXL_SIGMAS = (0.004, 80.0)  # not ModelSamplingContinuousEDM's defaults (0.002, 120): read from the file
PICTURE = "edit-me.png"
HEIGHT, WIDTH = 70, 45  # not multiples of 8: the node crops to 64 x 40


@pytest.fixture(scope="module")
def ip2p_executor(tmp_path_factory: pytest.TempPathFactory) -> Executor:
    """An executor over a models folder holding tiny 8-channel checkpoints (written once per run, in tmp): SD1.5,
    SDXL, and SDXL with CosXL's `edm_vpred.*` keys; and a picture to edit in its input folder."""
    root = tmp_path_factory.mktemp("ip2p")
    checkpoints = root / "models" / "checkpoints"
    checkpoints.mkdir(parents=True)
    for name, family, seed, extra in [(SD15, "sd15", 40, {}), (SDXL, "sdxl", 41, {}),
                                      (COSXL, "sdxl", 42, {"edm_vpred.sigma_min": torch.tensor(COSXL_SIGMAS[0]),
                                                           "edm_vpred.sigma_max": torch.tensor(COSXL_SIGMAS[1])})]:
        state = pipeline_to_original(tiny_components(family, seed, in_channels=8), family) | extra
        save_file({key: tensor.contiguous() for key, tensor in state.items()}, str(checkpoints / name))
    executor = tiny_executor(root / "models", root)
    rows, cols = np.mgrid[0:HEIGHT, 0:WIDTH]
    rgb = np.stack([cols * 5 % 256, rows * 3 % 256, (rows * cols) % 256], -1).astype(np.uint8)
    Image.fromarray(rgb, "RGB").save(executor.settings.input_dir / PICTURE)
    return executor


# -- the node -----------------------------------------------------------------------------------------------------


def test_the_node_has_comfyuis_inputs_and_outputs() -> None:
    node = catalog()["InstructPixToPixConditioning"]
    assert [(s.name, s.type) for s in node.input_specs()] == [
        ("positive", "CONDITIONING"), ("negative", "CONDITIONING"), ("vae", "VAE"), ("pixels", "IMAGE")]
    assert node.RETURN_TYPES == ("CONDITIONING", "CONDITIONING", "LATENT")
    assert node.RETURN_NAMES == ("positive", "negative", "latent")
    assert node.CATEGORY == "conditioning/instructpix2pix"


def edit_graph(ckpt: str, *, ip2p: bool = True, seed: int = 3) -> dict[str, Any]:
    """An edit on SD1.x's KSampler: the picture through InstructPixToPixConditioning (two positive items, to see
    the image on each), sampled from the node's empty latent. `ip2p=False`: the plain conds, the same latent."""
    workflow: dict[str, Any] = {
        "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt}},
        "6": {"class_type": "CLIPTextEncode", "inputs": {"text": "make it snow", "clip": ["4", 1]}},
        "16": {"class_type": "CLIPTextEncode", "inputs": {"text": "oil painting", "clip": ["4", 1]}},
        "17": {"class_type": "ConditioningCombine",
               "inputs": {"conditioning_1": ["6", 0], "conditioning_2": ["16", 0]}},
        "7": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["4", 1]}},
        "13": {"class_type": "LoadImage", "inputs": {"image": PICTURE}},
        "11": {"class_type": "InstructPixToPixConditioning", "inputs": {
            "positive": ["17", 0], "negative": ["7", 0], "vae": ["4", 2], "pixels": ["13", 0]}},
        "3": {"class_type": "KSampler", "inputs": {
            "model": ["4", 0], "seed": seed, "steps": 3, "cfg": 5.0, "sampler_name": "euler", "scheduler": "normal",
            "positive": ["11", 0], "negative": ["11", 1], "latent_image": ["11", 2], "denoise": 1.0}},
        "8": {"class_type": "VAEDecode", "inputs": {"samples": ["3", 0], "vae": ["4", 2]}},
        "9": {"class_type": "SaveImage", "inputs": {"images": ["8", 0], "filename_prefix": "ip2p/test"}},
    }
    if not ip2p:
        workflow["3"]["inputs"].update(positive=["17", 0], negative=["7", 0])
    return workflow


def comfy_crop(pixels: torch.Tensor) -> torch.Tensor:
    """InstructPixToPixConditioning.execute's crop: sides floored to 8, offset by half the remainder."""
    x, y = pixels.shape[1] // 8 * 8, pixels.shape[2] // 8 * 8
    x_offset, y_offset = (pixels.shape[1] % 8) // 2, (pixels.shape[2] % 8) // 2
    return pixels[:, x_offset:x + x_offset, y_offset:y + y_offset, :]


def saved(executor: Executor, workflow: dict[str, Any]) -> np.ndarray:
    [image] = executor.run(workflow).outputs["9"]["images"]
    return np.asarray(Image.open(executor.settings.output_dir / image["subfolder"] / image["filename"]))


def test_the_node_crops_to_the_grid_encodes_and_puts_the_latent_on_every_cond(ip2p_executor: Executor) -> None:
    values, _ = run_hooked(ip2p_executor, edit_graph(SD15))
    positive, negative, latent = values["11"]
    picture, vae = values["13"][0].pixels, values["4"][2]
    assert comfy_crop(picture).shape == (1, 64, 40, 3)
    encoded = encode_pixels(vae, comfy_crop(picture))  # the cropped picture's raw VAE latent
    assert encoded.shape == (1, 4, 8, 5)
    assert len(positive.items) == 2 and len(negative.items) == 1
    for given, item in zip([*values["17"][0].items, *values["7"][0].items], [*positive.items, *negative.items]):
        assert torch.equal(item.extras["concat_latent_image"], encoded)
        assert torch.equal(item.embeds, given.embeds)  # the rest of the cond as it was
        assert {k: v for k, v in item.extras.items() if k != "concat_latent_image"} == given.extras
    assert latent.samples.shape == (1, 4, 8, 5) and not latent.samples.any() and latent.noise_mask is None


# -- the UNet's input ---------------------------------------------------------------------------------------------


class RecordingUNet(torch.nn.Module):
    """A UNet of `in_channels` that records its inputs and predicts 0."""

    def __init__(self, in_channels: int) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.device, self.dtype = torch.device("cpu"), torch.float32
        self.config = SimpleNamespace(in_channels=in_channels)
        self.seen: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor, t: torch.Tensor, encoder_hidden_states: torch.Tensor, **_: object) -> Any:
        self.seen.append(x.clone())
        return SimpleNamespace(sample=torch.zeros(x.shape[0], 4, *x.shape[2:]))


def comfy_ip2p_concat(image: torch.Tensor | None, noise: torch.Tensor, scale: float) -> torch.Tensor:
    """IP2P.concat_cond then process_ip2p_image_in: zeros without an image; else common_upscale(bilinear, center)
    to the noise when its shape differs, resize_to_batch_size (repeat, for one image), times the model's factor."""
    if image is None:
        return torch.zeros_like(noise)
    if image.shape[1:] != noise.shape[1:]:
        old_h, old_w = image.shape[-2:]
        new_h, new_w = noise.shape[-2:]
        old_aspect, new_aspect = old_w / old_h, new_w / new_h
        x = y = 0
        if old_aspect > new_aspect:
            x = round((old_w - old_w * (new_aspect / old_aspect)) / 2)
        elif old_aspect < new_aspect:
            y = round((old_h - old_h * (old_aspect / new_aspect)) / 2)
        image = F.interpolate(image[:, :, y:old_h - y, x:old_w - x], size=(new_h, new_w), mode="bilinear")
    return image.repeat(noise.shape[0] // image.shape[0], 1, 1, 1) * scale


def conds(image: torch.Tensor | None, **extras: Any) -> Conditioning:
    more = {} if image is None else {"concat_latent_image": image}
    return Conditioning((CondItem(torch.ones(1, 77, 8), torch.zeros(1, 1280), {**extras, **more}),))


@pytest.mark.parametrize(("sdxl", "sampling", "scale"), [
    (False, DEFAULT_SAMPLING, 1.0),                              # SD15_instructpix2pix: the raw latent
    (True, DEFAULT_SAMPLING, 1.0),                               # diffusers' SDXL edit models: raw too
    (True, ContinuousEDM("v_prediction", sigma_low=0.002, sigma_high=120.0), SDXL_SCALE),  # CosXL Edit
    (False, ContinuousEDM("v_prediction", sigma_low=0.002, sigma_high=120.0), 1.0),   # SD1.5 is never scaled
    (True, ModelSampling("v_prediction"), 1.0),                  # discrete v-prediction: not V_PREDICTION_EDM
])
@pytest.mark.parametrize("source_side", [(11, 7), (16, 16)])  # fitted to the latent, or already its size
def test_an_eight_channel_unet_sees_the_latent_then_comfyuis_concat(sdxl: bool, sampling: ModelSampling,
                                                                    scale: float, source_side: tuple[int, int]) -> None:
    source = torch.randn(1, 4, *source_side, generator=torch.Generator().manual_seed(1))
    scaled = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(2))
    unet = RecordingUNet(8)
    sigma = 2.5
    # the negative without an image, as the edit example's DualCFGGuider negative: zeros there
    eps = guided_eps(unet, conds(source), conds(None), 4.0, sdxl, (128, 128), sampling=sampling)
    eps(scaled, sampling.timestep(sigma).reshape(1), torch.tensor(sigma))
    [x] = unet.seen
    assert x.shape == (4, 8, 16, 16)
    # the sampler's latent first, as the model sees it (EPS.calculate_input), for cond then uncond
    assert torch.allclose(x[:, :4], torch.cat([sampling.model_input(scaled, sigma)] * 2), atol=1e-6)
    expected = torch.cat([comfy_ip2p_concat(source, scaled, scale), comfy_ip2p_concat(None, scaled, scale)])
    assert torch.allclose(x[:, 4:], expected, atol=1e-5)
    assert x[:2, 4:].abs().sum() > 0


def test_batched_jobs_each_get_their_own_source() -> None:
    # the queue's batches: group g's conds guide its `sizes[g]` latents, item-major per group in one UNet call
    first, second = (torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(s)) for s in (5, 6))
    unet = RecordingUNet(8)
    guided_eps(unet, [conds(first), conds(second)], [conds(None), conds(None)], 3.0, False, (64, 64), sizes=[1, 2])(
        torch.zeros(3, 4, 8, 8), torch.tensor([500.0]), torch.tensor(2.5))
    [x] = unet.seen
    zero = torch.zeros(1, 4, 8, 8)
    assert torch.equal(x[:, 4:], torch.cat([first, zero, second, second, zero, zero]))


def test_the_concat_is_cut_to_an_area_cond_as_comfyui() -> None:
    # CONDNoiseShape.process_cond: an area cond's concat is its crop of the whole-latent concat
    source = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(3))
    unet = RecordingUNet(8)
    area = conds(source, area=(8, 6, 4, 2), strength=1.0)  # 8 x 6 cells from row 4, column 2
    guided_eps(unet, area, conds(None), 1.0, False, (128, 128))(torch.zeros(1, 4, 16, 16), torch.tensor([500.0]),
                                                                 torch.tensor(2.5))
    crops = {tuple(x.shape[-2:]): x for x in unet.seen}
    assert torch.allclose(crops[(8, 6)][:1, 4:], source[:, :, 4:12, 2:8])


def test_inpainting_and_four_channel_unets_read_the_same_conds_as_before() -> None:
    # a 9-channel UNet takes concat_latent_image as its masked image: without a mask ComfyUI's blank concat;
    # a 4-channel UNet has no concat at all (ComfyUI's concat_keys are empty)
    source = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(4))
    for channels, width in [(9, 9), (4, 4)]:
        unet = RecordingUNet(channels)
        guided_eps(unet, conds(source), conds(source), 3.0, False, (64, 64))(
            torch.zeros(1, 4, 8, 8), torch.tensor([500.0]), torch.tensor(2.5))
        [x] = unet.seen
        assert x.shape == (2, width, 8, 8)
        if channels == 9:
            assert torch.equal(x[:, 4:5], torch.ones(2, 1, 8, 8))
            blank = torch.tensor([0.8223, -0.6876, 0.6364, 0.1380]).view(1, 4, 1, 1)
            assert torch.allclose(x[:, 5:], blank.expand(2, 4, 8, 8))


# -- graphs on the tiny 8-channel checkpoints ---------------------------------------------------------------------


def test_eight_channel_checkpoints_are_detected_with_their_model_sampling(ip2p_executor: Executor) -> None:
    folder = ip2p_executor.settings.input_dir.parent / "models" / "checkpoints"  # the fixture's
    sd15, sdxl, cosxl = (detect_checkpoint(folder / name) for name in (SD15, SDXL, COSXL))
    assert (sd15.family, sd15.in_channels, sd15.instruct, sd15.name) == ("sd15", 8, True, "tiny-sd15-ip2p")
    assert (sdxl.family, sdxl.in_channels, sdxl.sampling) == ("sdxl", 8, ModelSampling("eps"))
    # supported_models.py SDXL.model_type: edm_vpred.* keys make it V_PREDICTION_EDM on the file's sigmas
    assert cosxl.edm_sigmas == pytest.approx(COSXL_SIGMAS)
    # float(tensor.item()) of the file's float32 scalars, as ComfyUI reads them
    low, high = (float(torch.tensor(v)) for v in COSXL_SIGMAS)
    assert cosxl.sampling == ContinuousEDM("v_prediction", sigma_low=low, sigma_high=high)
    assert cosxl.label == "SDXL v-prediction EDM" and not Arch.of("sdxl", True).instruct


def test_an_sd2_unet_with_eight_channels_is_refused_as_comfyui_has_no_such_model() -> None:
    shapes = dict(expected_shapes(Arch.of("sd2", False)))
    shapes["model.diffusion_model.input_blocks.0.0.weight"] = (320, 8, 3, 3)
    with pytest.raises(UnsupportedModel, match="SD2.x model with an InstructPix2Pix-style UNet"):
        detect_from_header(shapes, "sd2-ip2p.safetensors")


def test_an_edit_on_the_tiny_sd15_ip2p_checkpoint_feeds_the_raw_source_latent(ip2p_executor: Executor) -> None:
    values, seen = run_hooked(ip2p_executor, edit_graph(SD15, seed=4))  # a seed no other test ran (cache)
    source = values["11"][0].items[0].extras["concat_latent_image"]
    # diffusers built the UNet from the file with its 8-channel conv_in (the whole of it, not a 4-channel cut)
    unet = values["4"][0].pipe.unet
    folder = ip2p_executor.settings.input_dir.parent / "models" / "checkpoints"
    with safe_open(str(folder / SD15), framework="pt") as handle:
        conv_in = handle.get_tensor("model.diffusion_model.input_blocks.0.0.weight")
    assert unet.config.in_channels == 8 and torch.equal(unet.conv_in.weight.detach().cpu(), conv_in)
    assert len(seen) == 3  # one batch of the two positive items and the negative, per euler step
    for x in seen:
        assert x.shape == (3, 8, 8, 5)
        assert torch.allclose(x[:, 4:], source.expand(3, 4, 8, 5), atol=1e-6)  # SD15: not scaled
    assert float(values["3"][0].samples.abs().mean()) > 0
    pixels = saved(ip2p_executor, edit_graph(SD15))
    assert pixels.shape == (64, 40, 3) and pixels.std() > 1
    # the concat counts: without it (the plain conds, zeros there) the same seed gives another picture
    assert not np.array_equal(pixels, saved(ip2p_executor, edit_graph(SD15, ip2p=False)))


def comfy_edit_example(ckpt: str, steps: int = 3) -> dict[str, Any]:
    """ComfyUI_examples' edit_models_sdxl_edit_model graph (CosXL Edit): InstructPixToPixConditioning into a
    DualCFGGuider whose negative is the plain empty prompt, SamplerCustomAdvanced on BasicScheduler's sigmas. (The
    example predates DualCFGGuider's `style`, which ComfyUI 0.3.64 requires: "regular" is what it did then.)"""
    return {
        "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt}},
        "6": {"class_type": "CLIPTextEncode", "inputs": {"text": "snow at sunset oil painting", "clip": ["4", 1]}},
        "7": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["4", 1]}},
        "13": {"class_type": "LoadImage", "inputs": {"image": PICTURE, "upload": "image"}},
        "37:0": {"class_type": "KSamplerSelect", "inputs": {"sampler_name": "euler"}},
        "37:1": {"class_type": "RandomNoise", "inputs": {"noise_seed": 11652752290163}},
        "37:3": {"class_type": "BasicScheduler", "inputs": {"scheduler": "normal", "steps": steps, "denoise": 1.0,
                                                            "model": ["4", 0]}},
        "37:6": {"class_type": "InstructPixToPixConditioning", "inputs": {
            "positive": ["6", 0], "negative": ["7", 0], "vae": ["4", 2], "pixels": ["13", 0]}},
        "37:7": {"class_type": "DualCFGGuider", "inputs": {
            "cfg_conds": 5.0, "cfg_cond2_negative": 1.5, "model": ["4", 0], "cond1": ["37:6", 0],
            "cond2": ["37:6", 1], "negative": ["7", 0], "style": "regular"}},
        "37:8": {"class_type": "SamplerCustomAdvanced", "inputs": {
            "noise": ["37:1", 0], "guider": ["37:7", 0], "sampler": ["37:0", 0], "sigmas": ["37:3", 0],
            "latent_image": ["37:6", 2]}},
        "8": {"class_type": "VAEDecode", "inputs": {"samples": ["37:8", 0], "vae": ["4", 2]}},
        "9": {"class_type": "SaveImage", "inputs": {"images": ["8", 0], "filename_prefix": "ip2p/edit"}},
    }


def test_comfyuis_sdxl_edit_example_runs_on_a_cosxl_edit_checkpoint(ip2p_executor: Executor) -> None:
    # (a diffusers-style SDXL edit model takes the raw latent instead: the recording-UNet test above)
    ckpt, scale = COSXL, SDXL_SCALE
    values, seen = run_hooked(ip2p_executor, comfy_edit_example(ckpt))
    source = values["37:6"][0].items[0].extras["concat_latent_image"]
    assert seen and all(x.shape[1:] == (8, 8, 5) for x in seen)
    # every UNet row is cond1 or cond2 (the source, scaled as the model wants it) or the plain negative (zeros)
    with_source = [torch.allclose(row[4:], source[0] * scale, atol=1e-5) for x in seen for row in x]
    zeros = [not row[4:].any() for x in seen for row in x]
    assert all(a or b for a, b in zip(with_source, zeros)) and any(with_source) and any(zeros)
    # the file's own sampling (no ModelSamplingContinuousEDM node): BasicScheduler's sigmas from its sigma_max
    assert float(values["37:3"][0].values[0]) == pytest.approx(COSXL_SIGMAS[1], rel=1e-5)
    pixels = saved(ip2p_executor, comfy_edit_example(ckpt))
    assert pixels.shape == (64, 40, 3) and np.isfinite(pixels).all() and pixels.std() > 1


def test_a_four_channel_model_ignores_the_concat_as_comfyui(executor: Executor, ip2p_executor: Executor) -> None:
    # the picture is the one the plain conds give from the same (empty) latent: the concat is never read
    Image.open(ip2p_executor.settings.input_dir / PICTURE).save(executor.settings.input_dir / PICTURE)
    values, seen = run_hooked(executor, edit_graph("tiny-sd15.safetensors"))
    assert seen and all(x.shape[1] == 4 for x in seen)
    assert "concat_latent_image" in values["11"][0].items[0].extras
    assert np.array_equal(saved(executor, edit_graph("tiny-sd15.safetensors")),
                          saved(executor, edit_graph("tiny-sd15.safetensors", ip2p=False)))
