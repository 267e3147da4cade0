"""Inpainting checkpoints (9-channel UNets, as sd-v1-5-inpainting and SDXL inpainting 0.1): detected from the
UNet's first convolution, checked against the 9-channel layout, and loaded offline from the plain config folders."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from engine.errors import UnsupportedModel
from engine.models.detect import Arch, detect_checkpoint, detect_from_header
from engine.models.single_file import expected_shapes, load_checkpoint_pipeline, unet_config

UNET_IN = "model.diffusion_model.input_blocks.0.0.weight"
CPU = torch.device("cpu")


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
@pytest.mark.parametrize("tiny", [False, True])
def test_a_nine_channel_header_is_an_inpainting_model_of_its_family(family: str, tiny: bool) -> None:
    plain = Arch.of(family, tiny)  # type: ignore[arg-type]
    shapes = dict(expected_shapes(plain))  # every key a real (or tiny) single file has, from meta tensors
    width = shapes[UNET_IN][0]
    shapes[UNET_IN] = (width, 9, 3, 3)
    arch = detect_from_header(shapes, "inpainting.safetensors")
    assert arch == Arch.of(family, tiny, in_channels=9)  # type: ignore[arg-type]
    assert arch.inpainting and not plain.inpainting
    assert arch.config_dir == plain.config_dir  # no config folder of its own: in_channels is overridden
    assert arch.name == f"{plain.name}-inpainting"
    # the layout a 9-channel file must have is the plain one with the wider first convolution
    assert dict(expected_shapes(arch)) == shapes
    assert unet_config(arch)["in_channels"] == 9 and unet_config(plain)["in_channels"] == 4


@pytest.mark.parametrize("channels", [5, 12])
def test_other_input_channel_counts_are_refused_naming_what_runs(channels: int) -> None:
    shapes = dict(expected_shapes(Arch.of("sd15", False)))
    shapes[UNET_IN] = (320, channels, 3, 3)
    refusal = f"{channels} input channels.*4 \\(plain\\), 8 \\(InstructPix2Pix-style edit\\) and 9 \\(inpainting\\)"
    with pytest.raises(UnsupportedModel, match=refusal):
        detect_from_header(shapes, "odd.safetensors")


@pytest.mark.parametrize(("name", "family"), [("tiny-sd15-inpainting", "sd15"), ("tiny-sdxl-inpainting", "sdxl")])
def test_tiny_inpainting_checkpoints_load_with_a_nine_channel_unet(tiny_models: Path, name: str, family: str) -> None:
    path = tiny_models / "checkpoints" / f"{name}.safetensors"
    arch = detect_checkpoint(path)
    assert arch == Arch.of(family, True, in_channels=9)  # type: ignore[arg-type]
    pipe = load_checkpoint_pipeline(path, arch, CPU, torch.float32)
    assert pipe.unet.config.in_channels == 9 and pipe.unet.conv_in.weight.shape[1] == 9
    assert pipe.vae.config.in_channels == 3  # the override reached the UNet only
    # the same architecture as the plain tiny model everywhere but the first convolution
    plain = tiny_models / "checkpoints" / f"tiny-{family}.safetensors"
    plain_unet = load_checkpoint_pipeline(plain, detect_checkpoint(plain), CPU, torch.float32).unet
    shapes = {key: tuple(tensor.shape) for key, tensor in pipe.unet.state_dict().items()}
    plain_shapes = {key: tuple(tensor.shape) for key, tensor in plain_unet.state_dict().items()}
    assert {k for k in shapes if shapes[k] != plain_shapes[k]} == {"conv_in.weight"}


def test_a_plain_file_claiming_nine_channels_is_refused_by_the_layout_check(tiny_models: Path) -> None:
    path = tiny_models / "checkpoints" / "tiny-sd15.safetensors"
    with pytest.raises(UnsupportedModel, match="another shape .*conv|input_blocks.0.0.weight"):
        load_checkpoint_pipeline(path, Arch.of("sd15", True, in_channels=9), CPU, torch.float32)
