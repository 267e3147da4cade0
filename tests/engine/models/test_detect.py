"""Architecture detection from safetensors headers, and the refusals for everything Noodle cannot run."""

from __future__ import annotations

import json
import os
import struct
import zipfile
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file

from engine.errors import UnsafeModelFile, UnsupportedModel
from engine.models.detect import (
    Arch,
    detect_checkpoint,
    detect_from_header,
    read_header_shapes,
    read_pickle_weights,
)
from engine.models.single_file import expected_shapes

SUPPORTED = "SD1.x and SDXL single-file .safetensors"


def _write_shapes(path: Path, shapes: dict[str, tuple[int, ...]]) -> Path:
    save_file({key: torch.zeros(shape) for key, shape in shapes.items()}, str(path))
    return path


@pytest.mark.parametrize(
    ("name", "family"),
    [("tiny-sd15", "sd15"), ("tiny-sd15-b", "sd15"), ("tiny-sdxl", "sdxl")],
)
def test_tiny_checkpoints_are_detected_as_tiny_models_of_their_family(
    tiny_models: Path, name: str, family: str
) -> None:
    arch = detect_checkpoint(tiny_models / "checkpoints" / f"{name}.safetensors")
    assert arch == Arch.of(family, tiny=True)  # type: ignore[arg-type]
    assert arch.name == f"tiny-{family}" and (arch.config_dir / "model_index.json").is_file()


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_a_full_size_header_is_detected_as_the_real_model(family: str) -> None:
    # Every key and shape a real single file has (derived from the real config), without the GBs.
    real = Arch.of(family, tiny=False)  # type: ignore[arg-type]
    shapes = dict(expected_shapes(real))
    assert detect_from_header(shapes, "real.safetensors") == real
    assert shapes["model.diffusion_model.input_blocks.0.0.weight"] == (320, 4, 3, 3)


def test_real_files_have_extra_keys_that_do_not_disturb_detection() -> None:
    shapes = dict(expected_shapes(Arch.of("sd15", tiny=False)))
    shapes["cond_stage_model.transformer.text_model.embeddings.position_ids"] = (1, 77)
    shapes["model_ema.decay"] = ()
    assert detect_from_header(shapes).family == "sd15"


def test_header_reader_matches_the_file(tiny_models: Path) -> None:
    shapes = read_header_shapes(tiny_models / "checkpoints" / "tiny-sd15.safetensors")
    assert shapes["cond_stage_model.transformer.text_model.embeddings.token_embedding.weight"] == (49408, 32)


def test_truncated_file_is_refused(tiny_models: Path, tmp_path: Path) -> None:
    data = (tiny_models / "checkpoints" / "tiny-sd15.safetensors").read_bytes()
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(UnsupportedModel, match="truncated") as err:
        detect_checkpoint(cut)
    assert "'cut.safetensors'" in str(err.value) and SUPPORTED in str(err.value)


def test_cut_inside_the_header_is_refused(tiny_models: Path, tmp_path: Path) -> None:
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes((tiny_models / "checkpoints" / "tiny-sd15.safetensors").read_bytes()[:1000])
    with pytest.raises(UnsupportedModel, match="not a safetensors file"):
        detect_checkpoint(cut)


@pytest.mark.parametrize("size", [0, 5, 4096])
def test_random_bytes_are_refused(tmp_path: Path, size: int) -> None:
    path = tmp_path / "noise.safetensors"
    path.write_bytes(os.urandom(size))
    with pytest.raises(UnsupportedModel) as err:
        detect_checkpoint(path)
    assert "'noise.safetensors'" in str(err.value) and SUPPORTED in str(err.value)


def test_a_pickle_renamed_to_safetensors_is_named_as_such(tmp_path: Path) -> None:
    zipped = tmp_path / "renamed.safetensors"
    torch.save({"state_dict": {"w": torch.zeros(2)}}, zipped)  # torch's zip container
    assert zipfile.is_zipfile(zipped)
    with pytest.raises(UnsupportedModel, match="PyTorch zip/pickle file"):
        detect_checkpoint(zipped)
    legacy = tmp_path / "legacy.safetensors"
    torch.save({"w": torch.zeros(2)}, legacy, _use_new_zipfile_serialization=False)
    with pytest.raises(UnsupportedModel, match="pickle file"):
        detect_checkpoint(legacy)


def test_header_json_that_is_not_an_object_is_refused(tmp_path: Path) -> None:
    body = json.dumps([1, 2, 3]).encode()
    path = tmp_path / "list.safetensors"
    path.write_bytes(struct.pack("<Q", len(body)) + body)
    with pytest.raises(UnsupportedModel, match="not a safetensors file"):
        detect_checkpoint(path)


def test_unrelated_keys_are_an_unknown_architecture(tmp_path: Path) -> None:
    path = _write_shapes(tmp_path / "mlp.safetensors", {"layer.0.weight": (4, 4), "layer.0.bias": (4,)})
    with pytest.raises(UnsupportedModel, match="unknown layout") as err:
        detect_checkpoint(path)
    assert "'mlp.safetensors'" in str(err.value) and SUPPORTED in str(err.value)


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        ({"double_blocks.0.img_attn.qkv.weight": (9, 3)}, "Flux"),
        ({"model.diffusion_model.joint_blocks.0.x_block.attn.qkv.weight": (9, 3)}, "SD3"),
        ({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": (4, 32)}, "LoRA"),
        ({"encoder.conv_in.weight": (128, 3, 3, 3), "decoder.conv_in.weight": (512, 4, 3, 3)}, "VAE"),
        ({"emb_params": (2, 768)}, "embedding"),
    ],
)
def test_other_model_kinds_are_named_in_the_refusal(extra: dict[str, tuple[int, ...]], expected: str) -> None:
    with pytest.raises(UnsupportedModel, match=expected):
        detect_from_header(extra, "thing.safetensors")


def _sd15_header() -> dict[str, tuple[int, ...]]:
    return dict(expected_shapes(Arch.of("sd15", tiny=False)))


def test_an_sd2_text_encoder_on_an_sd1_unet_is_refused_by_its_widths() -> None:
    # SD2.x itself is detected (tests/engine/models/test_sd2.py); OpenCLIP-H keys beside a 768-context UNet are not
    shapes = {k: v for k, v in _sd15_header().items() if not k.startswith("cond_stage_model.")}
    shapes["cond_stage_model.model.token_embedding.weight"] = (49408, 1280)
    with pytest.raises(UnsupportedModel, match="sd2 keys but widths"):
        detect_from_header(shapes, "v2-1_768.safetensors")


def test_sdxl_refiner_is_refused_by_name() -> None:
    shapes = {"model.diffusion_model.input_blocks.0.0.weight": (384, 4, 3, 3),
              "conditioner.embedders.0.model.token_embedding.weight": (49408, 1280)}
    with pytest.raises(UnsupportedModel, match="SDXL refiner"):
        detect_from_header(shapes, "refiner.safetensors")


def test_an_instruct_unet_loads_and_other_channel_counts_are_refused() -> None:
    # 9 channels (inpainting) load: tests/engine/models/test_inpaint_checkpoint.py; 8 (InstructPix2Pix) too, run in
    # tests/engine/nodes/test_instruct_pix2pix.py
    shapes = _sd15_header()
    shapes["model.diffusion_model.input_blocks.0.0.weight"] = (320, 8, 3, 3)
    arch = detect_from_header(shapes, "instruct-pix2pix.safetensors")
    assert (arch.in_channels, arch.instruct, arch.inpainting, arch.name) == (8, True, False, "sd15-ip2p")
    shapes["model.diffusion_model.input_blocks.0.0.weight"] = (320, 7, 3, 3)
    with pytest.raises(UnsupportedModel, match="7 input channels; Noodle runs 4 .plain., 8 .InstructPix2Pix"):
        detect_from_header(shapes, "odd.safetensors")


def test_a_checkpoint_without_vae_is_refused() -> None:
    shapes = {k: v for k, v in _sd15_header().items() if not k.startswith("first_stage_model.")}
    with pytest.raises(UnsupportedModel, match="no VAE"):
        detect_from_header(shapes, "novae.safetensors")


def test_widths_of_neither_real_nor_tiny_are_refused() -> None:
    shapes = _sd15_header()
    shapes["cond_stage_model.transformer.text_model.embeddings.token_embedding.weight"] = (49408, 32)
    with pytest.raises(UnsupportedModel, match="match neither the real model"):
        detect_from_header(shapes, "mixed.safetensors")


def test_pickle_checkpoints_need_the_owner_opt_in(tiny_models: Path, tmp_path: Path) -> None:
    from safetensors.torch import load_file

    state = load_file(str(tiny_models / "checkpoints" / "tiny-sd15.safetensors"))
    ckpt = tmp_path / "tiny.ckpt"
    torch.save({"state_dict": state, "global_step": 7}, ckpt)
    with pytest.raises(UnsafeModelFile, match="models.allow_weights_only_pickle"):
        detect_checkpoint(ckpt)
    assert detect_checkpoint(ckpt, allow_weights_only_pickle=True) == Arch.of("sd15", tiny=True)


class Payload:
    """Stands in for a hostile object: anything that is not a tensor or a plain container."""


def test_weights_only_loading_refuses_pickled_objects(tmp_path: Path) -> None:
    path = tmp_path / "hostile.ckpt"
    torch.save({"state_dict": {"w": torch.zeros(2)}, "payload": Payload()}, path)
    with pytest.raises(UnsafeModelFile, match="holds more than weights"):
        read_pickle_weights(path)


def test_weights_only_loading_unwraps_state_dict_and_keeps_tensors(tmp_path: Path) -> None:
    path = tmp_path / "plain.pt"
    torch.save({"state_dict": {"w": torch.ones(2), "epoch": 3}}, path)
    weights = read_pickle_weights(path)
    assert list(weights) == ["w"] and torch.equal(weights["w"], torch.ones(2))


def _relabelled(source: Path, target: Path, change: Any) -> Path:
    """`source` with its header edited by `change(header)` and its data as it was: a header that lies."""
    raw = source.read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + length])
    change(header)
    text = json.dumps(header).encode()
    target.write_bytes(struct.pack("<Q", len(text)) + text + raw[8 + length:])
    return target


def _first(header: dict[str, Any], dtype: str) -> str:
    return next(key for key, entry in header.items() if key != "__metadata__" and entry["dtype"] == dtype)


def _same_range_as_another(header: dict[str, Any]) -> None:
    by_shape: dict[str, list[str]] = {}
    for key, entry in header.items():
        if key != "__metadata__":
            by_shape.setdefault(json.dumps([entry["shape"], entry["dtype"]]), []).append(key)
    first, second = next(keys for keys in by_shape.values() if len(keys) > 1)[:2]
    header[second]["data_offsets"] = header[first]["data_offsets"]


@pytest.mark.parametrize(("change", "expected"), [
    (lambda h: h[_first(h, "F32")].update(dtype="F8_E4M3"), r"is F8_E4M3 \[77, 32\], 2464 bytes, but its header gives "
                                                              r"it 9856"),
    (lambda h: h[_first(h, "F32")].update(dtype="I64"), "is I64 .*but its header gives it"),
    (lambda h: h[_first(h, "F32")].update(dtype="Q4_K"), "has the dtype 'Q4_K', which safetensors does not know"),
    (_same_range_as_another, "overlaps the tensor before it"),
    (lambda h: h.update({"zzz.huge": {"dtype": "F32", "shape": [1000000, 1000000], "data_offsets": [0, 4]}}),
     r"'zzz.huge' is F32 \[1000000, 1000000\], 4000000000000 bytes, but its header gives it 4"),
    (lambda h: h[_first(h, "F32")].update(shape=[-1, 32]), r"negative dimension in its shape \[-1, 32\]"),
])
def test_a_header_that_lies_about_its_data_is_refused_naming_the_file_and_tensor(
        tiny_models: Path, tmp_path: Path, change: Any, expected: str) -> None:
    lie = _relabelled(tiny_models / "checkpoints" / "tiny-sd15.safetensors", tmp_path / "lie.safetensors", change)
    with pytest.raises(UnsupportedModel, match=rf"^'lie.safetensors' is corrupt: .*{expected}.*download it again"):
        read_header_shapes(lie)


def test_legitimate_dtypes_pass_the_header_checks(tmp_path: Path) -> None:
    tensors = {"bf16": torch.zeros(3, 5, dtype=torch.bfloat16), "fp8": torch.zeros(7, dtype=torch.float8_e4m3fn),
               "i64": torch.zeros(2, 2, dtype=torch.int64), "bool": torch.zeros(9, dtype=torch.bool),
               "empty": torch.zeros(0, 4), "scalar": torch.tensor(1.5)}
    save_file(tensors, str(tmp_path / "mixed.safetensors"))
    assert read_header_shapes(tmp_path / "mixed.safetensors") == {k: tuple(v.shape) for k, v in tensors.items()}


def test_an_sd2_file_safetensors_cannot_open_is_refused_naming_it(tiny_models: Path, tmp_path: Path) -> None:
    # metadata values must be strings: the header's tensors are sound, safetensors still refuses the file
    broken = _relabelled(tiny_models / "checkpoints" / "tiny-sd2-v.safetensors", tmp_path / "sd2.safetensors",
                         lambda h: h.update({"__metadata__": {"format": 1}}))
    with pytest.raises(UnsupportedModel, match=r"^'sd2.safetensors' is corrupt: safetensors cannot read it"):
        detect_checkpoint(broken)
