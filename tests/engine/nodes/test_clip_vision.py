"""CLIP vision and unCLIP: ComfyUI 0.3.64's clip_preprocess, CLIPVision forward and unclip_adm rewritten compactly
here, against engine/models/clip_vision.py and engine/nodes/clip_vision.py; an SDXL revision workflow end to end
on the tiny SDXL and a tiny CLIP vision model (real architecture, random weights) in ComfyUI's key layout."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from engine.errors import UnsupportedModel
from engine.executor import Executor
from engine.models.clip_vision import clip_preprocess, encode_image, read_clip_vision
from engine.models.detect import Arch
from engine.nodes.clip_vision import sdxl_pooled, unCLIPConditioning, unclip_adm
from engine.nodes.guidance import guided_eps
from engine.tiny import tiny_components
from engine.values import ClipVisionOutput, CondItem, Conditioning
from tests.conftest import tiny_executor

MEAN = (0.48145466, 0.4578275, 0.40821073)
STD = (0.26862954, 0.26130258, 0.27577711)
POOLED = 48  # the tiny SDXL's pooled width (text_encoder_2's projection): a revision's embeds must match it


def tiny_clip_vision_state(seed: int = 0, projection: int = POOLED) -> dict[str, torch.Tensor]:
    """A tiny CLIP ViT (3 layers, width 32, 16 heads as ComfyUI's configs, 32 px in 8 px patches) in ComfyUI's
    clip_vision layout (transformers' key names, as clip_vision_g.safetensors)."""
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.manual_seed(seed)
    config = CLIPVisionConfig(hidden_size=32, intermediate_size=40, num_hidden_layers=3, num_attention_heads=16,
                              image_size=32, patch_size=8, projection_dim=projection, hidden_act="gelu")
    model = CLIPVisionModelWithProjection(config)
    state = {key: value.detach().clone() for key, value in model.state_dict().items()}
    # layer norms and embeddings away from their init, so a swapped or skipped one shows
    for key in state:
        if "norm" in key or "embedding" in key:
            state[key] = state[key] + 0.1 * torch.randn_like(state[key])
    return state


def to_open_clip(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """The same weights as open_clip names them (an unCLIP checkpoint's `embedder.model.visual.`)."""
    names = {"vision_model.embeddings.class_embedding": "class_embedding",
             "vision_model.embeddings.patch_embedding.weight": "conv1.weight",
             "vision_model.embeddings.position_embedding.weight": "positional_embedding",
             "vision_model.pre_layrnorm.weight": "ln_pre.weight", "vision_model.pre_layrnorm.bias": "ln_pre.bias",
             "vision_model.post_layernorm.weight": "ln_post.weight",
             "vision_model.post_layernorm.bias": "ln_post.bias"}
    block = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj",
             "self_attn.out_proj": "attn.out_proj"}
    out = {prefix + "proj": state["visual_projection.weight"].t().contiguous()}
    out |= {prefix + new: state[old] for old, new in names.items()}
    layers = {int(key.split(".")[3]) for key in state if key.startswith("vision_model.encoder.layers.")}
    for i in layers:
        base = f"vision_model.encoder.layers.{i}."
        for kind in ("weight", "bias"):
            out[f"{prefix}transformer.resblocks.{i}.attn.in_proj_{kind}"] = torch.cat(
                [state[f"{base}self_attn.{p}.{kind}"] for p in ("q_proj", "k_proj", "v_proj")])
            for old, new in block.items():
                out[f"{prefix}transformer.resblocks.{i}.{new}.{kind}"] = state[f"{base}{old}.{kind}"]
    return out


# ---- ComfyUI's math, rewritten compactly -------------------------------------------------------------------

def comfy_clip_preprocess(image: torch.Tensor, size: int, crop: bool) -> torch.Tensor:
    image = image[:, :, :, :3] if image.shape[3] > 3 else image
    image = image.movedim(-1, 1)
    if not (image.shape[2] == size and image.shape[3] == size):
        s = size / min(image.shape[2], image.shape[3])
        scale_size = (round(s * image.shape[2]), round(s * image.shape[3])) if crop else (size, size)
        image = torch.nn.functional.interpolate(image, size=scale_size, mode="bicubic", antialias=True)
        h, w = (image.shape[2] - size) // 2, (image.shape[3] - size) // 2
        image = image[:, :, h:h + size, w:w + size]
    image = torch.clip((255. * image), 0, 255).round() / 255.0
    return (image - torch.tensor(MEAN).view([3, 1, 1])) / torch.tensor(STD).view([3, 1, 1])


def comfy_clip_vision(sd: dict[str, torch.Tensor], pixels: torch.Tensor, heads: int = 16) -> tuple[torch.Tensor, ...]:
    """comfy/clip_model.py CLIPVisionModelProjection with intermediate_output=-2: (last, penultimate, embeds)."""
    ln = torch.nn.functional.layer_norm
    v = "vision_model."
    width = sd[v + "embeddings.class_embedding"].shape[0]
    x = torch.nn.functional.conv2d(pixels, sd[v + "embeddings.patch_embedding.weight"],
                                   stride=sd[v + "embeddings.patch_embedding.weight"].shape[-1])
    x = x.flatten(2).transpose(1, 2)
    x = torch.cat([sd[v + "embeddings.class_embedding"].expand(x.shape[0], 1, -1), x], dim=1)
    x = x + sd[v + "embeddings.position_embedding.weight"]
    x = ln(x, (width,), sd[v + "pre_layrnorm.weight"], sd[v + "pre_layrnorm.bias"])
    layers = 1 + max(int(k.split(".")[3]) for k in sd if k.startswith(v + "encoder.layers."))
    intermediate = None
    for i in range(layers):
        p = f"{v}encoder.layers.{i}."

        def lin(name: str, t: torch.Tensor) -> torch.Tensor:
            return torch.nn.functional.linear(t, sd[p + name + ".weight"], sd[p + name + ".bias"])

        h = ln(x, (width,), sd[p + "layer_norm1.weight"], sd[p + "layer_norm1.bias"])
        b, n, _ = h.shape
        q, k, val = (lin(f"self_attn.{m}_proj", h).view(b, n, heads, -1).transpose(1, 2) for m in "qkv")
        att = torch.nn.functional.scaled_dot_product_attention(q, k, val)
        x = x + lin("self_attn.out_proj", att.transpose(1, 2).reshape(b, n, width))
        h = ln(x, (width,), sd[p + "layer_norm2.weight"], sd[p + "layer_norm2.bias"])
        x = x + lin("mlp.fc2", torch.nn.functional.gelu(lin("mlp.fc1", h)))
        if i == layers - 2:
            intermediate = x.clone()
    pooled = ln(x[:, 0, :], (width,), sd[v + "post_layernorm.weight"], sd[v + "post_layernorm.bias"])
    return x, intermediate, pooled @ sd["visual_projection.weight"].t()


def comfy_unclip_adm(unclip_conditioning: list[dict[str, Any]], width: int, seed: int,
                     noise_augment_merge: float = 0.0) -> torch.Tensor:
    """comfy/model_base.py unclip_adm with CLIPEmbeddingNoiseAugmentation (squaredcos_cap_v2, mean 0, std 1),
    on the CPU with the process-wide generator as ComfyUI draws it."""
    betas = [min(1 - math.cos(((i + 1) / 1000 + 0.008) / 1.008 * math.pi / 2) ** 2
                 / math.cos((i / 1000 + 0.008) / 1.008 * math.pi / 2) ** 2, 0.999) for i in range(1000)]
    alphas_cumprod = np.cumprod(1. - np.array(betas), axis=0)
    sqrt_ac = torch.tensor(np.sqrt(alphas_cumprod), dtype=torch.float32)
    sqrt_1m = torch.tensor(np.sqrt(1. - alphas_cumprod), dtype=torch.float32)

    def augmentor(x: torch.Tensor, noise_level: torch.Tensor, seed: int | None = None) -> tuple[torch.Tensor, ...]:
        x = (x - torch.zeros(width)[None, :]) / torch.ones(width)[None, :]
        noise = torch.randn_like(x) if seed is None else torch.randn(x.size(), generator=torch.manual_seed(seed))
        z = sqrt_ac.gather(-1, noise_level).reshape(1, 1) * x + sqrt_1m.gather(-1, noise_level).reshape(1, 1) * noise
        half = width // 2
        freqs = torch.exp(-math.log(10000) * torch.arange(0, half, dtype=torch.float32) / half)
        args = noise_level[:, None].float() * freqs[None]
        return z, torch.cat([torch.cos(args), torch.sin(args)], dim=-1)

    adm_inputs = []
    for unclip_cond in unclip_conditioning:
        for adm_cond in unclip_cond["clip_vision_output"].image_embeds:
            noise_level = round(999 * unclip_cond["noise_augmentation"])
            c_adm, emb = augmentor(adm_cond, torch.tensor([noise_level]), seed=seed - 10)
            adm_inputs.append(torch.cat((c_adm, emb), 1) * unclip_cond["strength"])
    adm_out = adm_inputs[0]
    if len(adm_inputs) > 1:
        adm_out = torch.stack(adm_inputs).sum(0)
        c_adm, emb = augmentor(adm_out[:, :width], torch.tensor([round(999 * noise_augment_merge)]))
        adm_out = torch.cat((c_adm, emb), 1)
    return adm_out


# ---- preprocessing and encoding ----------------------------------------------------------------------------

@pytest.mark.parametrize("shape", [(2, 45, 70, 3), (1, 90, 33, 4), (1, 32, 32, 3)])
@pytest.mark.parametrize("crop", [True, False])
def test_preprocess_is_comfys_clip_preprocess(shape: tuple[int, ...], crop: bool) -> None:
    image = torch.rand(shape, generator=torch.Generator().manual_seed(3))
    ours = clip_preprocess(image, 32, MEAN, STD, crop)
    assert ours.shape == (shape[0], 3, 32, 32)
    assert torch.equal(ours, comfy_clip_preprocess(image, 32, crop))


@pytest.fixture(scope="module")
def clip_vision_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("cv") / "tiny-clip-vision.safetensors"
    save_file(tiny_clip_vision_state() | {"vision_model.embeddings.position_ids": torch.arange(17)[None]}, path)
    return path


def test_the_encode_outputs_are_comfys_clip_vision_outputs(clip_vision_file: Path) -> None:
    clip_vision = read_clip_vision(clip_vision_file, "tiny", torch.device("cpu"), torch.float32)
    assert clip_vision.image_size == 32
    image = torch.rand((2, 40, 56, 3), generator=torch.Generator().manual_seed(1))
    out = encode_image(clip_vision, image, crop=True)
    last, penultimate, embeds = comfy_clip_vision(tiny_clip_vision_state(), comfy_clip_preprocess(image, 32, True))
    assert out.image_embeds.shape == (2, POOLED) and out.last_hidden_state.shape == (2, 17, 32)
    for ours, theirs in ((out.image_embeds, embeds), (out.last_hidden_state, last),
                         (out.penultimate_hidden_states, penultimate)):
        assert (ours - theirs).abs().max() < 1e-4
    # "none" squeezes instead of cropping: another picture reaches the model
    assert (encode_image(clip_vision, image, crop=False).image_embeds - out.image_embeds).abs().max() > 1e-3


def test_open_clips_layout_loads_to_the_same_model(tmp_path: Path, clip_vision_file: Path) -> None:
    save_file(to_open_clip(tiny_clip_vision_state(), "visual."), tmp_path / "oc.safetensors")
    image = torch.rand((1, 32, 32, 3), generator=torch.Generator().manual_seed(2))
    ours = encode_image(read_clip_vision(tmp_path / "oc.safetensors", "oc", torch.device("cpu"), torch.float32), image)
    plain = encode_image(read_clip_vision(clip_vision_file, "t", torch.device("cpu"), torch.float32), image)
    assert torch.allclose(ours.image_embeds, plain.image_embeds, atol=1e-6)


def test_a_file_that_is_no_clip_vision_model_is_refused_with_why(tmp_path: Path) -> None:
    state = tiny_clip_vision_state()
    save_file({k: v for k, v in state.items() if k != "visual_projection.weight"}, tmp_path / "np.safetensors")
    with pytest.raises(UnsupportedModel, match="no visual_projection"):
        read_clip_vision(tmp_path / "np.safetensors", "np", torch.device("cpu"), torch.float32)
    save_file({"encoder.layer.0.weight": torch.zeros(2)}, tmp_path / "dino.safetensors")
    with pytest.raises(UnsupportedModel, match="not a CLIP vision encoder"):
        read_clip_vision(tmp_path / "dino.safetensors", "dino", torch.device("cpu"), torch.float32)


# ---- unCLIPConditioning and the pooled replacement ---------------------------------------------------------

def _output(rows: int, seed: int, width: int = POOLED) -> ClipVisionOutput:
    embeds = torch.randn((rows, width), generator=torch.Generator().manual_seed(seed))
    return ClipVisionOutput(embeds, torch.zeros(rows, 2, 4), torch.zeros(rows, 2, 4))


def _cond(**extras: Any) -> Conditioning:
    return Conditioning((CondItem(torch.zeros(1, 77, 8), torch.ones(1, POOLED), dict(extras)),
                         CondItem(torch.zeros(1, 77, 8), torch.ones(1, POOLED) * 2)))


def test_unclip_conditioning_appends_comfys_entries_to_every_cond() -> None:
    first, second = _output(1, 1), _output(1, 2)
    node = unCLIPConditioning.model_construct(conditioning=_cond(width=1024), clip_vision_output=first,
                                              strength=0.75, noise_augmentation=0.1)
    [once] = node.run(None)  # type: ignore[arg-type]
    [twice] = unCLIPConditioning.model_construct(conditioning=once, clip_vision_output=second,
                                                 strength=0.5).run(None)  # type: ignore[arg-type]
    for item in twice.items:
        entries = item.extras["unclip_conditioning"]
        assert [(e["clip_vision_output"], e["strength"], e["noise_augmentation"]) for e in entries] == [
            (first, 0.75, 0.1), (second, 0.5, 0.0)]
    assert twice.items[0].extras["width"] == 1024 and twice.items[1].pooled is once.items[1].pooled
    zero = _cond()
    [same] = unCLIPConditioning.model_construct(conditioning=zero, clip_vision_output=first,
                                                strength=0.0).run(None)  # type: ignore[arg-type]
    assert same is zero


@pytest.mark.parametrize("entries", [
    [(1, 0.75, 0.0)],  # one image
    [(1, 0.75, 0.0), (1, 0.75, 0.0)],  # the revision example: two images, summed and augmented again
    [(2, 1.3, 0.25), (1, -0.5, 1.0)],  # a batch of two images, a noise augmentation, a negative strength
])
@pytest.mark.parametrize("seed", [133632471276133, 3])
def test_sdxl_revision_pools_as_comfys_encode_adm(entries: list[tuple[int, float, float]], seed: int) -> None:
    unclip = [{"clip_vision_output": _output(rows, i + 10, 1280), "strength": strength, "noise_augmentation": aug}
              for i, (rows, strength, aug) in enumerate(entries)]
    state = torch.random.get_rng_state()
    try:
        reference = comfy_unclip_adm(unclip, 1280, seed)[:, :1280]
    finally:
        torch.random.set_rng_state(state)
    ours = unclip_adm(unclip, seed, 1280)[:, :1280]
    assert ours.shape == (1, 1280) and (ours - reference).abs().max() < 1e-5
    item = CondItem(torch.zeros(1, 77, 8), torch.ones(1, 1280), {"unclip_conditioning": tuple(unclip)})
    assert torch.equal(sdxl_pooled(item, seed, 1280), ours)
    assert torch.equal(sdxl_pooled(CondItem(item.embeds, item.pooled), seed, 1280), item.pooled)


def test_sd21_unclips_adm_with_its_merge_augmentation_is_comfys() -> None:
    # SD21UNCLIP's encode_adm: the whole [1, 2 * 1024] vector (augmented embeds | level embedding), merge at 0.05
    unclip = [{"clip_vision_output": _output(1, 20 + i, 1024), "strength": 0.5, "noise_augmentation": 0.4}
              for i in range(2)]
    state = torch.random.get_rng_state()
    try:
        reference = comfy_unclip_adm(unclip, 1024, 509273045161628, noise_augment_merge=0.05)
        single = comfy_unclip_adm(unclip[:1], 1024, 509273045161628)
    finally:
        torch.random.set_rng_state(state)
    assert (unclip_adm(unclip, 509273045161628, 1024, noise_augment_merge=0.05) - reference).abs().max() < 1e-5
    assert (unclip_adm(unclip[:1], 509273045161628, 1024) - single).abs().max() < 1e-5


def test_embeds_of_the_wrong_width_are_refused_with_the_model_to_use() -> None:
    with pytest.raises(ValueError, match="1024 wide, but this model takes 1280.*clip_vision_g"):
        unclip_adm([{"clip_vision_output": _output(1, 0, 1024), "strength": 1.0, "noise_augmentation": 0.0}], 0, 1280)


def test_the_sampler_hands_the_revision_pooled_to_the_sdxl_unet_as_text_embeds() -> None:
    unet = tiny_components("sdxl", 0).unet.eval()
    seen: list[torch.Tensor] = []
    unet.register_forward_pre_hook(lambda module, args, kwargs: seen.append(
        kwargs["added_cond_kwargs"]["text_embeds"].clone()), with_kwargs=True)
    unclip = ({"clip_vision_output": _output(1, 5), "strength": 0.75, "noise_augmentation": 0.0},)
    positive = Conditioning((CondItem(torch.randn(1, 77, 96), torch.randn(1, POOLED),
                                      {"unclip_conditioning": unclip}),))
    negative = Conditioning((CondItem(torch.randn(1, 77, 96), torch.randn(1, POOLED)),))
    eps = guided_eps(unet, positive, negative, 7.0, True, (64, 64), seed=99)
    with torch.inference_mode():
        eps(torch.randn(1, 4, 8, 8), torch.tensor([500.0]), torch.tensor(2.0))
    [text_embeds] = seen
    assert torch.equal(text_embeds[0:1], unclip_adm(unclip, 99, POOLED)[:, :POOLED])
    assert torch.equal(text_embeds[1:2], negative.items[0].pooled)
    # a queue batch of two jobs: each group's revision noise comes from its own job's seed
    eps = guided_eps(unet, [positive, positive], [negative, negative], 7.0, True, (64, 64), sizes=[1, 1],
                     seed=[99, 7])
    with torch.inference_mode():
        eps(torch.randn(2, 4, 8, 8), torch.tensor([500.0]), torch.tensor(2.0))
    batched = seen[-1]  # rows: group 0's cond, uncond, then group 1's
    assert torch.equal(batched[0:1], unclip_adm(unclip, 99, POOLED)[:, :POOLED])
    assert torch.equal(batched[2:3], unclip_adm(unclip, 7, POOLED)[:, :POOLED])
    assert not torch.equal(batched[0:1], batched[2:3])


# ---- end to end --------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def revision_executor(tiny_models: Path, tmp_path_factory: pytest.TempPathFactory) -> Executor:
    """The tiny checkpoints, a clip_vision folder holding the tiny CLIP vision model, two input pictures."""
    root = tmp_path_factory.mktemp("revision")
    models = root / "models"
    (models / "clip_vision").mkdir(parents=True)
    (models / "checkpoints").symlink_to(tiny_models / "checkpoints", target_is_directory=True)
    save_file(tiny_clip_vision_state(), models / "clip_vision" / "clip_vision_g.safetensors")
    executor = tiny_executor(models, root / "run")
    rng = np.random.default_rng(0)
    for name, size in (("mountains.png", (48, 40)), ("sunset.png", (40, 64))):
        Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(root / "run" / "input" / name)
    return executor


def revision_workflow(strength: float = 0.75) -> dict[str, Any]:
    """ComfyUI_examples' sdxl_revision_text_prompts, on the tiny SDXL at 64x64 and 4 steps (crop given, as 0.3.64
    requires)."""
    return {
        "3": {"class_type": "KSampler", "inputs": {
            "seed": 133632471276133, "steps": 4, "cfg": 8.0, "sampler_name": "dpmpp_3m_sde_gpu",
            "scheduler": "exponential", "denoise": 1.0, "model": ["40", 0], "positive": ["37", 0],
            "negative": ["7", 0], "latent_image": ["5", 0]}},
        "5": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "6": {"class_type": "CLIPTextEncode", "inputs": {"text": "anime", "clip": ["40", 1]}},
        "7": {"class_type": "CLIPTextEncode", "inputs": {"text": "text, watermark", "clip": ["40", 1]}},
        "8": {"class_type": "VAEDecode", "inputs": {"samples": ["3", 0], "vae": ["40", 2]}},
        "9": {"class_type": "SaveImage", "inputs": {"filename_prefix": "ComfyUI", "images": ["8", 0]}},
        "13": {"class_type": "CLIPVisionEncode", "inputs": {"clip_vision": ["39", 0], "image": ["34", 0],
                                                            "crop": "center"}},
        "19": {"class_type": "unCLIPConditioning", "inputs": {
            "strength": strength, "noise_augmentation": 0.0, "conditioning": ["6", 0],
            "clip_vision_output": ["13", 0]}},
        "34": {"class_type": "LoadImage", "inputs": {"image": "mountains.png"}},
        "36": {"class_type": "CLIPVisionEncode", "inputs": {"clip_vision": ["39", 0], "image": ["38", 0],
                                                            "crop": "none"}},
        "37": {"class_type": "unCLIPConditioning", "inputs": {
            "strength": strength, "noise_augmentation": 0.0, "conditioning": ["19", 0],
            "clip_vision_output": ["36", 0]}},
        "38": {"class_type": "LoadImage", "inputs": {"image": "sunset.png"}},
        "39": {"class_type": "CLIPVisionLoader", "inputs": {"clip_name": "clip_vision_g.safetensors"}},
        "40": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "tiny-sdxl.safetensors"}},
    }


def pixels(executor: Executor, workflow: dict[str, Any]) -> np.ndarray:
    [image] = executor.run(workflow).outputs["9"]["images"]
    return np.asarray(Image.open(executor.settings.output_dir / image["subfolder"] / image["filename"])).astype(int)


def test_a_revision_workflow_runs_and_its_images_change_the_picture(revision_executor: Executor) -> None:
    assert revision_executor.models.choices("clip_vision") == ["clip_vision_g.safetensors"]
    revised = pixels(revision_executor, revision_workflow())
    plain = copy.deepcopy(revision_workflow())
    plain["3"]["inputs"]["positive"] = ["6", 0]
    text_only = pixels(revision_executor, plain)
    assert revised.shape == (64, 64, 3) and np.abs(revised - text_only).max() > 0
    # strength 0 hands the conds back as they were: the text-only picture
    assert np.array_equal(pixels(revision_executor, revision_workflow(strength=0.0)), text_only)
    zero_positive = copy.deepcopy(revision_workflow())
    zero_positive["42"] = {"class_type": "ConditioningZeroOut", "inputs": {"conditioning": ["6", 0]}}
    zero_positive["19"]["inputs"]["conditioning"] = ["42", 0]
    assert np.abs(pixels(revision_executor, zero_positive) - revised).max() > 0


def test_the_arch_of_the_tiny_sdxl_takes_the_pooled_width_the_fixture_makes() -> None:
    config = Arch.of("sdxl", True).config_dir / "unet" / "config.json"
    unet = json.loads(config.read_text())
    assert unet["projection_class_embeddings_input_dim"] - 6 * unet["addition_time_embed_dim"] == POOLED
