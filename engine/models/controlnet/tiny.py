"""Tiny ControlNets for the tiny SD1.5 and SDXL UNets, written in lllyasviel's original `control_model.*` layout.

A ControlNet is a copy of its UNet's encoder (conv_in, time and SDXL size embeddings, down blocks, middle
block) plus a hint encoder and zero convolutions. Here the encoder comes from a tiny UNet of the same config
built from a seed of its own, the hint encoder keeps the real 16/32/96/256 widths (ComfyUI's cldm.ControlNet
hard-codes them, so ComfyUI loads these files too), and the zero convolutions, zero in a fresh diffusers
ControlNet, get PyTorch's default initialisation so that a tiny ControlNet changes the picture visibly.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from accelerate import init_empty_weights
from diffusers import ControlNetModel, UNet2DConditionModel
from torch import Tensor, nn

from engine.models.detect import Arch, Family
from engine.models.to_original import unet_to_original
from engine.safetensors_file import save_safetensors

__all__ = ["TINY_CONTROLNETS", "controlnet_to_original", "tiny_controlnet", "tiny_controlnet_paths",
           "write_tiny_controlnets"]

# name -> (family, seed)
TINY_CONTROLNETS: dict[str, tuple[Family, int]] = {
    "tiny-controlnet-sd15": ("sd15", 40),
    "tiny-controlnet-sdxl": ("sdxl", 41),
}
_ENCODER_PREFIXES = ("input_blocks.", "middle_block.", "time_embed.", "label_emb.")


def tiny_controlnet(family: Family, seed: int) -> ControlNetModel:
    """A random tiny ControlNet fitting Noodle's tiny UNet of `family`, from `torch.manual_seed(seed)`."""
    config_dir = Arch.of(family, True).config_dir
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(config_dir / "unet"))
        controlnet = ControlNetModel.from_unet(unet)
        zero_convs = [*controlnet.controlnet_down_blocks, controlnet.controlnet_mid_block,
                      controlnet.controlnet_cond_embedding.conv_out]
        for conv in zero_convs:
            conv.reset_parameters()
    return controlnet.eval()


def controlnet_to_original(controlnet: ControlNetModel, arch: Arch) -> dict[str, Tensor]:
    """A ControlNet's weights under lllyasviel's `control_model.*` names (for the UNet config of `arch`).

    The encoder is renamed by Noodle's UNet converter (an empty UNet of the same config given the ControlNet's
    encoder weights, so meta-device ControlNets convert too); the hint encoder is `input_hint_block.{0,2,..,14}`
    (convs between SiLUs), the zero convolutions `zero_convs.N.0` and `middle_block_out.0`.
    """
    state = controlnet.state_dict()
    with init_empty_weights():
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(arch.config_dir / "unet"))
    unet_state = unet.state_dict()
    shared = {k: v for k, v in state.items() if k in unet_state}
    _, unexpected = unet.load_state_dict(shared, strict=False, assign=True)
    if unexpected:
        raise ValueError(f"ControlNet weights with no UNet place: {unexpected[:5]}")
    out = {f"control_model.{key.removeprefix('model.diffusion_model.')}": value
           for key, value in unet_to_original(unet).items()
           if key.removeprefix("model.diffusion_model.").startswith(_ENCODER_PREFIXES)}
    embedding = controlnet.controlnet_cond_embedding
    hint: list[nn.Conv2d] = [embedding.conv_in, *embedding.blocks, embedding.conv_out]
    for index, conv in enumerate(hint):
        out[f"control_model.input_hint_block.{2 * index}.weight"] = conv.weight
        out[f"control_model.input_hint_block.{2 * index}.bias"] = conv.bias
    for index, conv in enumerate(controlnet.controlnet_down_blocks):
        out[f"control_model.zero_convs.{index}.0.weight"] = conv.weight
        out[f"control_model.zero_convs.{index}.0.bias"] = conv.bias
    out["control_model.middle_block_out.0.weight"] = controlnet.controlnet_mid_block.weight
    out["control_model.middle_block_out.0.bias"] = controlnet.controlnet_mid_block.bias
    converted = len(out) - 2 * (len(hint) + len(controlnet.controlnet_down_blocks) + 1)
    if converted != len(shared):
        raise ValueError(f"{len(shared)} encoder weights but {converted} original-layout names")
    return {key: value.detach() for key, value in out.items()}


def tiny_controlnet_paths(root: Path) -> dict[str, Path]:
    """Where write_tiny_models puts the tiny ControlNets under a models folder."""
    return {name: Path(root) / "controlnet" / f"{name}.safetensors" for name in TINY_CONTROLNETS}


def write_tiny_controlnets(root: Path, *, force: bool = False) -> dict[str, Path]:
    """Write the tiny ControlNets (fp32, original layout) into root/controlnet/; files already there are kept
    unless `force`. Returns name -> path."""
    paths = tiny_controlnet_paths(root)
    for name, (family, seed) in TINY_CONTROLNETS.items():
        path = paths[name]
        if path.is_file() and not force:
            continue
        with torch.no_grad():
            state = controlnet_to_original(tiny_controlnet(family, seed), Arch.of(family, True))
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")  # atomic: parallel test runs build the same cache
        save_safetensors({key: value.contiguous() for key, value in state.items()}, str(tmp), metadata={"format": "pt"})
        os.replace(tmp, path)
    return paths
