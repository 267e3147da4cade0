"""ControlNet files: each layout users have is detected from its keys and loads to the same weights (lllyasviel's
original SD1.5 layout with and without `control_model.`, diffusers' layout, SDXL in both); real-size shapes are
detected too; other files are refused naming what they are; a diff ControlNet adds the model's weights; the
manager loads a ControlNet once and counts it in the model budget."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from accelerate import init_empty_weights
from diffusers import ControlNetModel, UNet2DConditionModel
from safetensors.torch import load_file, save_file

from engine.errors import UnsafeModelFile, UnsupportedModel
from engine.models.controlnet.layout import read_layout
from engine.models.controlnet.load import load_controlnet
from engine.models.controlnet.tiny import TINY_CONTROLNETS, controlnet_to_original, tiny_controlnet
from engine.models.detect import Arch, read_header_shapes
from engine.models.manager import ModelManager
from engine.models.paths import ModelCatalog
from engine.values import CondItem, Conditioning, ControlHint, LoraPatch, ModelRef

CPU = torch.device("cpu")


def reference(name: str) -> dict[str, torch.Tensor]:
    """The diffusers state of a tiny ControlNet as the generator builds it."""
    return tiny_controlnet(*TINY_CONTROLNETS[name]).state_dict()


def assert_loads_as(path: Path, name: str, layout: str, family: str) -> None:
    found = read_layout(read_header_shapes(path), path.name)
    assert (found.layout, found.family, found.arch.tiny) == (layout, family, True)
    loaded = load_controlnet(path, path.name, "k", CPU, torch.float32)
    state, expected = loaded.module.state_dict(), reference(name)
    assert state.keys() == expected.keys()
    assert all(torch.equal(state[key], expected[key]) for key in expected)


@pytest.mark.parametrize(("name", "family"), [("tiny-controlnet-sd15", "sd15"), ("tiny-controlnet-sdxl", "sdxl")])
def test_the_tiny_files_are_original_layout_and_load_to_the_generators_weights(tiny_models: Path, name: str,
                                                                              family: str) -> None:
    path = tiny_models / "controlnet" / f"{name}.safetensors"
    assert all(key.startswith("control_model.") for key in read_header_shapes(path))
    assert_loads_as(path, name, "original", family)


@pytest.mark.parametrize(("name", "family"), [("tiny-controlnet-sd15", "sd15"), ("tiny-controlnet-sdxl", "sdxl")])
def test_the_diffusers_layout_loads_to_the_same_weights(tmp_path: Path, name: str, family: str) -> None:
    path = tmp_path / "diffusers.safetensors"
    save_file({key: value.contiguous() for key, value in reference(name).items()}, str(path))
    assert_loads_as(path, name, "diffusers", family)


def test_an_original_file_without_the_control_model_prefix_loads(tiny_models: Path, tmp_path: Path) -> None:
    state = load_file(str(tiny_models / "controlnet" / "tiny-controlnet-sd15.safetensors"))
    path = tmp_path / "bare.safetensors"
    save_file({key.removeprefix("control_model."): value for key, value in state.items()}, str(path))
    assert_loads_as(path, "tiny-controlnet-sd15", "original", "sd15")


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_real_size_controlnets_are_detected_in_both_layouts(family: str) -> None:
    arch = Arch.of(family, False)
    with init_empty_weights():  # shapes only: a real ControlNet on the meta device
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(arch.config_dir / "unet"))
        controlnet = ControlNetModel.from_unet(unet, load_weights_from_unet=False)
    diffusers = read_layout({k: tuple(v.shape) for k, v in controlnet.state_dict().items()}, "real")
    original = read_layout({k: tuple(v.shape) for k, v in controlnet_to_original(controlnet, arch).items()}, "real")
    assert diffusers.arch == original.arch == arch
    assert dict(diffusers.config) == dict(original.config)
    assert diffusers.config["block_out_channels"] == list(unet.config.block_out_channels)
    assert diffusers.config["cross_attention_dim"] == (2048 if family == "sdxl" else 768)


def shapes_of(name: str) -> dict[str, tuple[int, ...]]:
    return {key: tuple(value.shape) for key, value in reference(name).items()}


@pytest.mark.parametrize(("change", "words"), [
    (lambda s: s | {"task_embedding": (8, 32)}, "ControlNet Union"),
    (lambda s: s | {"lora_controlnet": (1,)}, "Control-LoRA"),
    (lambda s: {"model.diffusion_model.input_blocks.0.0.weight": (320, 4, 3, 3)}, "whole checkpoint"),
    (lambda s: {"lora_unet_down_blocks_0.lora_down.weight": (4, 32)}, "LoRA"),
    (lambda s: {"controlnet_blocks.0.weight": (8, 8)}, "SD3 or Flux"),
    (lambda s: {"weird.weight": (1,)}, "neither the original"),
    (lambda s: {k: (v[0], 1024) if k.endswith("attn2.to_k.weight") else v for k, v in s.items()}, "SD2.x ControlNet"),
    (lambda s: {k: v for k, v in s.items() if not k.startswith("down_blocks.0.resnets.")}, "not a UNet encoder"),
])
def test_other_files_are_refused_saying_what_they_are(change, words: str) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(UnsupportedModel, match=words) as caught:
        read_layout(change(shapes_of("tiny-controlnet-sd15")), "odd.safetensors")
    assert "'odd.safetensors'" in str(caught.value) and "SD1.x and SDXL ControlNets" in str(caught.value)


def test_a_file_whose_weights_do_not_fit_its_keys_is_refused_by_key(tmp_path: Path) -> None:
    state = reference("tiny-controlnet-sd15")
    del state["controlnet_mid_block.bias"]
    path = tmp_path / "short.safetensors"
    save_file({key: value.contiguous() for key, value in state.items()}, str(path))
    with pytest.raises(UnsupportedModel, match="is missing controlnet_mid_block.bias"):
        load_controlnet(path, path.name, "k", CPU, torch.float32)


@pytest.fixture
def manager(tiny_models: Path, tmp_path: Path) -> ModelManager:
    """A fresh manager over a copy of the tiny models' checkpoints and ControlNets folders."""
    for folder in ("checkpoints", "controlnet"):
        (tmp_path / folder).mkdir()
        for file in (tiny_models / folder).glob("*.safetensors"):
            shutil.copyfile(file, tmp_path / folder / file.name)  # a symlink would leave the folder: refused
    return ModelManager(ModelCatalog(tmp_path), device=CPU, dtype=torch.float32, memory_budget=2**34,
                        input_dir=tmp_path / "input")


def test_a_diff_controlnet_adds_the_models_weights(manager: ModelManager) -> None:
    checkpoint = manager.checkpoint("tiny-sd15.safetensors")
    base = checkpoint.pipe.unet.state_dict()
    # the diff file: the ControlNet's weights minus the model's where the model has them, in the original layout,
    # with ComfyUI's marker key
    controlnet = tiny_controlnet(*TINY_CONTROLNETS["tiny-controlnet-sd15"])
    expected = {key: value.clone() for key, value in controlnet.state_dict().items()}
    controlnet.load_state_dict({key: value - base[key] if key in base else value for key, value in expected.items()})
    diff = controlnet_to_original(controlnet, Arch.of("sd15", True)) | {"difference": torch.tensor([0.0])}
    save_file({key: value.contiguous() for key, value in diff.items()},
              str(manager.catalog.root / "controlnet" / "diff.safetensors"))

    with pytest.raises(UnsupportedModel, match="diff ControlNet.*DiffControlNetLoader"):
        manager.controlnet("diff.safetensors")
    model = ModelRef(checkpoint, checkpoint.pipe)
    loaded = manager.controlnet("diff.safetensors", base=model).module.state_dict()
    assert all(torch.allclose(loaded[key], expected[key], atol=1e-6) for key in expected)
    with pytest.raises(UnsupportedModel, match="carries LoRAs"):
        manager.controlnet("diff.safetensors", base=model.with_lora(LoraPatch("x.safetensors", 1.0)))
    # a plain file through DiffControlNetLoader loads as it is, as in ComfyUI
    same = manager.controlnet("tiny-controlnet-sd15.safetensors", base=model).module.state_dict()
    reference_state = reference("tiny-controlnet-sd15")
    assert all(torch.equal(same[key], reference_state[key]) for key in reference_state)


def test_the_manager_loads_a_controlnet_once_and_counts_it_in_the_budget(manager: ModelManager) -> None:
    before = manager.resident_bytes()
    first = manager.controlnet("tiny-controlnet-sdxl.safetensors")
    size = sum(p.numel() * p.element_size() for p in first.module.parameters())
    assert manager.resident_bytes() == before + size
    assert manager.controlnet("tiny-controlnet-sdxl.safetensors").module is first.module
    assert manager.keys_held_by([first]) == {first.checkpoint_key}
    # so do the conds a ControlNet was applied to: the node cache lets go of them when it leaves memory
    hinted = CondItem(torch.zeros(1, 77, 32), extras={"control": ControlHint(first, torch.zeros(1, 3, 8, 8))})
    assert manager.keys_held_by([Conditioning((hinted,))]) == {first.checkpoint_key}
    # a budget with no room for both evicts the ControlNet when a checkpoint loads, telling the caches
    dropped: list[str] = []
    manager.on_unload(dropped.append)
    manager.memory_budget = size + 1
    manager.checkpoint("tiny-sd15.safetensors")
    assert dropped == [first.checkpoint_key] and manager.resident_bytes() > 0


def test_a_shuffle_file_name_turns_on_global_average_pooling(manager: ModelManager) -> None:
    folder = manager.catalog.root / "controlnet"
    shutil.copyfile(folder / "tiny-controlnet-sd15.safetensors", folder / "control_v11e_sd15_shuffle.safetensors")
    assert manager.controlnet("control_v11e_sd15_shuffle.safetensors").global_average_pooling
    assert not manager.controlnet("tiny-controlnet-sd15.safetensors").global_average_pooling


def test_a_pickle_controlnet_loads_only_where_the_owner_allows_weights_only_loading(tmp_path: Path) -> None:
    path = tmp_path / "controlnet" / "old.pth"
    path.parent.mkdir()
    torch.save({"state_dict": reference("tiny-controlnet-sd15")}, path)
    with pytest.raises(UnsafeModelFile, match="pickle"):
        load_controlnet(path, path.name, "k", CPU, torch.float32)
    loaded = load_controlnet(path, path.name, "k", CPU, torch.float32, allow_weights_only_pickle=True)
    expected = reference("tiny-controlnet-sd15")
    assert all(torch.equal(loaded.module.state_dict()[key], expected[key]) for key in expected)
