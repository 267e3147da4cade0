"""diffusers -> original single-file layout -> diffusers' own single-file loader gives back every weight.

Also: the loader refuses files with a missing or misshapen weight instead of running with random
ones, and the converter's output for the full-size configs is what real SD1.5/SDXL files hold.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from accelerate import init_empty_weights
from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
from diffusers.loaders.single_file_utils import (
    CHECKPOINT_KEY_NAMES,
    convert_ldm_clip_checkpoint,
    convert_ldm_unet_checkpoint,
    convert_ldm_vae_checkpoint,
    convert_open_clip_checkpoint,
    infer_diffusers_model_type,
)
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import CLIPTextConfig, CLIPTextModelWithProjection

from engine.errors import UnsupportedModel
from engine.models.detect import Arch, detect_checkpoint
from engine.models.single_file import (
    clip_tokenizer,
    expected_shapes,
    load_checkpoint_pipeline,
    load_vae,
    missing_weights,
)
from engine.models.to_original import pipeline_to_original, unet_to_original, vae_file_dict, vae_to_original
from engine.tiny import tiny_components

CPU = torch.device("cpu")


def _assert_same_weights(expected: nn.Module, loaded: nn.Module, what: str) -> None:
    want, got = expected.state_dict(), loaded.state_dict()
    assert set(want) == set(got), f"{what}: keys differ: {sorted(set(want) ^ set(got))[:5]}"
    different = [key for key in want if not torch.equal(want[key], got[key])]
    assert not different, f"{what}: {len(different)} tensors differ, e.g. {different[:3]}"


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_every_tensor_survives_the_round_trip(tmp_path: Path, family: str) -> None:
    components = tiny_components(family, seed=123)  # type: ignore[arg-type]
    path = tmp_path / f"{family}.safetensors"
    save_file(pipeline_to_original(components, family), str(path))  # type: ignore[arg-type]

    arch = detect_checkpoint(path)
    assert arch == Arch.of(family, tiny=True)  # type: ignore[arg-type]
    pipe = load_checkpoint_pipeline(path, arch, CPU, torch.float32)
    names = ["unet", "vae", "text_encoder"] + (["text_encoder_2"] if family == "sdxl" else [])
    for name in names:
        _assert_same_weights(getattr(components, name), getattr(pipe, name), name)
    assert pipe.scheduler.config.beta_schedule == "scaled_linear"
    assert pipe.tokenizer("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
    if family == "sdxl":
        assert pipe.tokenizer_2.pad_token == "!"


def test_the_single_file_uses_the_original_key_layout(tiny_models: Path) -> None:
    keys = set(load_file(str(tiny_models / "checkpoints" / "tiny-sdxl.safetensors")))
    for key in [
        "model.diffusion_model.input_blocks.0.0.weight",
        "model.diffusion_model.input_blocks.3.0.op.weight",  # downsampler
        "model.diffusion_model.input_blocks.4.1.transformer_blocks.1.attn2.to_k.weight",
        "model.diffusion_model.middle_block.1.proj_in.weight",
        "model.diffusion_model.output_blocks.2.2.conv.weight",  # upsampler after an attention
        "model.diffusion_model.label_emb.0.0.weight",
        "model.diffusion_model.out.2.weight",
        "first_stage_model.decoder.up.3.upsample.conv.weight",
        "first_stage_model.encoder.down.1.block.0.nin_shortcut.weight",
        "first_stage_model.encoder.mid.attn_1.proj_out.weight",
        "conditioner.embedders.0.transformer.text_model.final_layer_norm.weight",
        "conditioner.embedders.1.model.transformer.resblocks.9.attn.in_proj_weight",
        "conditioner.embedders.1.model.text_projection",
    ]:
        assert key in keys, key
    assert not any(".text_model.text_model." in k or "conv_shortcut" in k for k in keys)


def test_open_clip_projection_is_stored_transposed_and_qkv_concatenated() -> None:
    components = tiny_components("sdxl", seed=5)
    state = pipeline_to_original(components, "sdxl")
    te2 = components.text_encoder_2
    assert te2 is not None
    projection = state["conditioner.embedders.1.model.text_projection"]
    assert projection.shape == (64, 48) and torch.equal(projection, te2.text_projection.weight.T)
    layer = te2.text_model.encoder.layers[0].self_attn
    in_proj = state["conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight"]
    assert torch.equal(in_proj, torch.cat([layer.q_proj.weight, layer.k_proj.weight, layer.v_proj.weight]))


def test_standalone_vae_file_round_trip(tmp_path: Path) -> None:
    vae = tiny_components("sd15", seed=9).vae
    path = tmp_path / "vae.safetensors"
    save_file({k: v.contiguous() for k, v in vae_file_dict(vae).items()}, str(path))
    keys = set(load_file(str(path)))
    assert "encoder.conv_in.weight" in keys and "decoder.mid.attn_1.q.weight" in keys
    assert not any(k.startswith("first_stage_model.") for k in keys)
    loaded = load_vae(path, CPU, torch.float32)
    _assert_same_weights(vae, loaded, "vae")
    assert loaded.config.scaling_factor == pytest.approx(0.18215)
    assert load_vae(path, CPU, torch.float32, family="sdxl").config.scaling_factor == pytest.approx(0.13025)


def test_a_checkpoint_given_as_vae_is_refused_with_a_hint(tiny_models: Path) -> None:
    with pytest.raises(UnsupportedModel, match="a checkpoint, not a VAE"):
        load_vae(tiny_models / "checkpoints" / "tiny-sd15.safetensors", CPU, torch.float32)


def test_a_unet_with_live_lora_adapters_is_not_converted(tiny_models: Path) -> None:
    path = tiny_models / "checkpoints" / "tiny-sd15.safetensors"
    pipe = load_checkpoint_pipeline(path, detect_checkpoint(path), CPU, torch.float32)
    pipe.load_lora_weights(str(tiny_models / "loras" / "tiny-lora-a.safetensors"), adapter_name="a")
    with pytest.raises(ValueError, match="LoRA adapters attached"):
        unet_to_original(pipe.unet)
    with pytest.raises(ValueError, match="LoRA adapters attached"):
        pipeline_to_original(pipe, "sd15")


def _without(tmp_path: Path, source: Path, drop: str) -> Path:
    state = load_file(str(source))
    del state[drop]
    path = tmp_path / "broken.safetensors"
    save_file(state, str(path))
    return path


MISSING_CLIP_KEY = "cond_stage_model.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight"


def test_a_missing_clip_weight_is_refused_not_loaded_randomly(tiny_models: Path, tmp_path: Path) -> None:
    path = _without(tmp_path, tiny_models / "checkpoints" / "tiny-sd15.safetensors", MISSING_CLIP_KEY)
    arch = detect_checkpoint(path)
    with pytest.raises(UnsupportedModel) as err:
        load_checkpoint_pipeline(path, arch, CPU, torch.float32)
    assert "'broken.safetensors'" in str(err.value) and MISSING_CLIP_KEY in str(err.value)


def test_diffusers_leaves_an_unloaded_clip_weight_on_meta_which_the_loader_reports(
    tiny_models: Path, tmp_path: Path
) -> None:
    # The second line of defence: with accelerate, diffusers builds CLIP on the meta device and
    # fills it from the file, so a weight the file lacks stays on meta (rather than random).
    path = _without(tmp_path, tiny_models / "checkpoints" / "tiny-sd15.safetensors", MISSING_CLIP_KEY)
    pipe = StableDiffusionPipeline.from_single_file(
        str(path), config=str(Arch.of("sd15", True).config_dir), local_files_only=True,
        tokenizer=clip_tokenizer(), safety_checker=None, requires_safety_checker=False,
    )
    assert missing_weights(pipe.text_encoder) == ["encoder.layers.0.self_attn.q_proj.weight"]
    assert missing_weights(pipe.unet) == []


def test_a_misshapen_weight_is_refused(tiny_models: Path, tmp_path: Path) -> None:
    state = load_file(str(tiny_models / "checkpoints" / "tiny-sd15.safetensors"))
    key = "model.diffusion_model.out.2.weight"
    state[key] = torch.zeros(4, 32, 1, 1)
    path = tmp_path / "misshapen.safetensors"
    save_file(state, str(path))
    with pytest.raises(UnsupportedModel, match="another shape") as err:
        load_checkpoint_pipeline(path, detect_checkpoint(path), CPU, torch.float32)
    assert key in str(err.value)


def test_allowed_pickle_checkpoints_load_weights_only(tiny_models: Path, tmp_path: Path) -> None:
    source = tiny_models / "checkpoints" / "tiny-sd15.safetensors"
    ckpt = tmp_path / "tiny.ckpt"
    torch.save({"state_dict": load_file(str(source))}, ckpt)
    arch = detect_checkpoint(ckpt, allow_weights_only_pickle=True)
    from_pickle = load_checkpoint_pipeline(ckpt, arch, CPU, torch.float32)
    from_safetensors = load_checkpoint_pipeline(source, arch, CPU, torch.float32)
    _assert_same_weights(from_safetensors.unet, from_pickle.unet, "unet")
    _assert_same_weights(from_safetensors.text_encoder, from_pickle.text_encoder, "text_encoder")


# -- full-size layouts, checked on the meta device (no weights, no memory) ----------------------


def _shapes(state: dict[str, torch.Tensor]) -> dict[str, tuple[int, ...]]:
    return {key: tuple(tensor.shape) for key, tensor in state.items()}


@pytest.mark.parametrize(
    ("family", "model_type", "unet_keys"),
    [("sd15", "v1", 686), ("sdxl", "xl_base", 1680)],
)
def test_full_size_layout_is_what_real_files_hold(family: str, model_type: str, unet_keys: int) -> None:
    arch = Arch.of(family, tiny=False)  # type: ignore[arg-type]
    shapes = expected_shapes(arch)
    with init_empty_weights():
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(arch.config_dir / "unet"))
        vae = AutoencoderKL.from_config(AutoencoderKL.load_config(arch.config_dir / "vae"))
        meta = {k: torch.empty(v, device="meta") for k, v in shapes.items()}
    assert infer_diffusers_model_type(meta) == model_type
    assert sum(k.startswith("model.diffusion_model.") for k in shapes) == unet_keys
    assert sum(k.startswith("first_stage_model.") for k in shapes) == 248

    # diffusers' own converters take our keys back to exactly the diffusers modules' keys.
    unet_back = convert_ldm_unet_checkpoint(unet_to_original(unet), unet.config)
    assert _shapes(unet_back) == _shapes(unet.state_dict())
    vae_back = convert_ldm_vae_checkpoint(vae_to_original(vae), vae.config)
    assert _shapes(vae_back) == _shapes(vae.state_dict())
    clip_l = convert_ldm_clip_checkpoint(meta)
    assert len(clip_l) == 196 and clip_l["text_model.embeddings.token_embedding.weight"].shape == (49408, 768)


def test_full_size_sd15_has_the_known_key_names() -> None:
    shapes = expected_shapes(Arch.of("sd15", tiny=False))
    assert CHECKPOINT_KEY_NAMES["v1"] in shapes
    assert shapes["model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"] == (320, 768)
    assert shapes["model.diffusion_model.output_blocks.2.1.conv.weight"] == (1280, 1280, 3, 3)
    assert shapes["first_stage_model.encoder.mid.attn_1.q.weight"] == (512, 512, 1, 1)
    assert shapes["cond_stage_model.transformer.text_model.encoder.layers.11.mlp.fc2.weight"] == (768, 3072)


def test_full_size_open_clip_converts_back_with_diffusers() -> None:
    arch = Arch.of("sdxl", tiny=False)
    shapes = expected_shapes(arch)
    meta = {k: torch.empty(v, device="meta") for k, v in shapes.items()}
    assert shapes["conditioner.embedders.1.model.transformer.resblocks.31.attn.in_proj_weight"] == (3840, 1280)
    with init_empty_weights():
        te2 = CLIPTextModelWithProjection(CLIPTextConfig.from_pretrained(arch.config_dir / "text_encoder_2"))
    back = convert_open_clip_checkpoint(te2, meta, prefix="conditioner.embedders.1.model.")
    assert _shapes(back) == _shapes(te2.state_dict())


def test_an_sd2_pipeline_saves_to_the_original_layout_and_loads_back_whole(tiny_models: Path, tmp_path: Path) -> None:
    """CheckpointSave of an SD2 model: UNet, VAE and the OpenCLIP ViT-H encoder under their single-file names."""
    source = tiny_models / "checkpoints" / "tiny-sd2-v.safetensors"
    arch = detect_checkpoint(source)
    pipe = load_checkpoint_pipeline(source, arch, CPU, torch.float32)
    saved = tmp_path / "sd2-again.safetensors"
    save_file(pipeline_to_original(pipe, "sd2"), str(saved))
    again = detect_checkpoint(saved)
    assert (again.family, again.tiny) == ("sd2", True)
    reloaded = load_checkpoint_pipeline(saved, again, CPU, torch.float32)
    for part in ("unet", "vae", "text_encoder"):
        before, after = getattr(pipe, part).state_dict(), getattr(reloaded, part).state_dict()
        assert before.keys() == after.keys()
        assert all(torch.equal(before[key], after[key]) for key in before), part
