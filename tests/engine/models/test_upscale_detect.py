"""Upscaler architectures (engine/models/upscale/): each key layout detected from state dicts written out here
key by key, forward passes of the right size, the same weights giving the same pixels in every layout, clear
refusals of what is not an upscaler we know, and ComfyUI's tiling (blending, tile count, halving on OOM)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import Tensor

from engine.errors import UnsafeModelFile, UnsupportedModel
from engine.models.upscale import UpscalerSpec, build_module, detect, read_spec, tile_steps, tiled_upscale, \
    to_canonical, upscale_image
from engine.tiny import esrgan_keys

CPU = torch.device("cpu")


def conv(out_ch: int, in_ch: int, generator: torch.Generator) -> dict[str, Tensor]:
    return {"weight": torch.randn(out_ch, in_ch, 3, 3, generator=generator) * 0.05,
            "bias": torch.randn(out_ch, generator=generator) * 0.01}


def put(state: dict[str, Tensor], name: str, params: dict[str, Tensor]) -> None:
    for param, tensor in params.items():
        state[f"{name}.{param}"] = tensor


def rrdb_state(layout: str, *, features: int = 8, growth: int = 4, blocks: int = 2, ups: int = 2, in_ch: int = 3,
               out_ch: int = 3, seed: int = 0) -> dict[str, Tensor]:
    """An RRDBNet state dict named as `layout`'s files name it, written out independently of detect.py."""
    g = torch.Generator().manual_seed(seed)
    state: dict[str, Tensor] = {}
    names = {
        "esrgan": {"first": "model.0", "rdb": "model.1.sub.{i}.RDB{j}.conv{k}.0", "trunk": f"model.1.sub.{blocks}",
                   "up": lambda n: f"model.{3 * n}", "hr": f"model.{3 * ups + 2}", "last": f"model.{3 * ups + 4}"},
        "real-esrgan": {"first": "conv_first", "rdb": "body.{i}.rdb{j}.conv{k}", "trunk": "conv_body",
                        "up": lambda n: f"conv_up{n}", "hr": "conv_hr", "last": "conv_last"},
        "bsrgan": {"first": "conv_first", "rdb": "RRDB_trunk.{i}.RDB{j}.conv{k}", "trunk": "trunk_conv",
                   "up": lambda n: f"upconv{n}", "hr": "HRconv", "last": "conv_last"},
    }[layout]
    put(state, names["first"], conv(features, in_ch, g))
    for i in range(blocks):
        for j in (1, 2, 3):
            for k in range(1, 6):
                put(state, names["rdb"].format(i=i, j=j, k=k),
                    conv(features if k == 5 else growth, features + (k - 1) * growth, g))
    put(state, names["trunk"], conv(features, features, g))
    for n in range(1, ups + 1):
        put(state, names["up"](n), conv(features, features, g))
    put(state, names["hr"], conv(features, features, g))
    put(state, names["last"], conv(out_ch, features, g))
    return state


def compact_state(*, features: int = 8, convs: int = 3, scale: int = 2, channels: int = 3) -> dict[str, Tensor]:
    g = torch.Generator().manual_seed(5)
    state: dict[str, Tensor] = {}
    put(state, "body.0", conv(features, channels, g))
    index = 1
    for _ in range(convs):
        state[f"body.{index}.weight"] = torch.full((features,), 0.25)  # PReLU slopes
        put(state, f"body.{index + 1}", conv(features, features, g))
        index += 2
    state[f"body.{index}.weight"] = torch.full((features,), 0.25)
    put(state, f"body.{index + 1}", conv(channels * scale * scale, features, g))
    return state


def shapes(state: dict[str, Tensor]) -> dict[str, tuple[int, ...]]:
    return {key: tuple(value.shape) for key, value in state.items()}


def run(state: dict[str, Tensor], x: Tensor) -> Tensor:
    spec = detect(shapes(state))
    module = build_module(spec).eval()
    module.load_state_dict(to_canonical(state))
    with torch.inference_mode():
        return module(x)


@pytest.mark.parametrize("layout", ["esrgan", "real-esrgan", "bsrgan"])
def test_rrdbnet_is_detected_from_each_key_layout_with_its_sizes_read_from_shapes(layout: str) -> None:
    spec = detect(shapes(rrdb_state(layout, features=8, growth=4, blocks=3, ups=2)))
    assert spec == UpscalerSpec("rrdb", layout, 4, 3, 3, 8, 3, growth=4, ups=2, shuffle=1)  # type: ignore[arg-type]
    x8 = detect(shapes(rrdb_state(layout, ups=3, blocks=1)))
    assert (x8.scale, x8.blocks, x8.ups) == (8, 1, 3)
    x1 = detect(shapes(rrdb_state(layout, ups=0)))
    assert x1.scale == 1


def test_rrdbnet_forward_grows_each_side_by_its_scale() -> None:
    x = torch.rand(1, 3, 10, 14)
    assert run(rrdb_state("esrgan", ups=2), x).shape == (1, 3, 40, 56)
    assert run(rrdb_state("real-esrgan", ups=1), x).shape == (1, 3, 20, 28)


def test_the_same_weights_give_the_same_pixels_in_every_layout() -> None:
    x = torch.rand(1, 3, 9, 11)
    # Real-ESRGAN, BSRGAN and old ESRGAN files with one seed hold the same tensors in the same order
    reference = run(rrdb_state("real-esrgan", seed=3), x)
    assert torch.equal(run(rrdb_state("bsrgan", seed=3), x), reference)
    assert torch.equal(run(rrdb_state("esrgan", seed=3), x), reference)
    spec = detect(shapes(rrdb_state("real-esrgan")))
    assert shapes(esrgan_keys(rrdb_state("real-esrgan"), spec)) == shapes(rrdb_state("esrgan"))


def test_real_esrgan_x2plus_unshuffles_its_input() -> None:
    # RealESRGAN_x2plus: 12 input channels (RGB folded 2x2), two x2 stages inside: x2 overall
    state = rrdb_state("real-esrgan", in_ch=12, out_ch=3, ups=2)
    spec = detect(shapes(state))
    assert (spec.scale, spec.shuffle, spec.in_channels, spec.out_channels) == (2, 2, 3, 3)
    assert run(state, torch.rand(1, 3, 7, 9)).shape == (1, 3, 14, 18)  # odd sides: reflect-padded, then cropped


def test_weights_saved_under_params_ema_are_found() -> None:
    state = {f"params_ema.{key}": value for key, value in rrdb_state("real-esrgan").items()}
    assert detect(shapes(state)).layout == "real-esrgan"
    assert set(to_canonical(state)) == set(rrdb_state("real-esrgan"))


def test_compact_srvgg_is_detected_and_adds_the_nearest_upscale() -> None:
    state = compact_state(features=8, convs=3, scale=2)
    spec = detect(shapes(state))
    assert spec == UpscalerSpec("compact", "compact", 2, 3, 3, 8, 3)
    x = torch.rand(1, 3, 6, 5)
    out = run(state, x)
    assert out.shape == (1, 3, 12, 10)
    zeroed = {**state, "body.8.weight": torch.zeros(12, 8, 3, 3), "body.8.bias": torch.zeros(12)}
    assert torch.equal(run(zeroed, x), F.interpolate(x, scale_factor=2, mode="nearest"))
    assert detect(shapes(compact_state(scale=4, convs=16))).describe() == \
        "SRVGGNetCompact x4 (compact SRVGG layout, 16 convs, 8 features)"


def test_an_unknown_layout_is_refused_naming_what_was_found() -> None:
    with pytest.raises(UnsupportedModel) as err:
        detect({"encoder.weight": (3, 3), "decoder.bias": (3,)}, "upscale model 'mystery.safetensors'")
    message = str(err.value)
    assert message.startswith("upscale model 'mystery.safetensors' has no key layout Noodle knows: 2 tensors, "
                              "starting decoder.bias, encoder.weight")
    assert "ESRGAN/RRDBNet" in message and "SRVGGNetCompact" in message
    with pytest.raises(UnsupportedModel, match="transformer upscaler"):
        detect({"layers.0.residual_group.blocks.0.attn.qkv.weight": (3, 3)})
    with pytest.raises(UnsupportedModel, match="Stable Diffusion checkpoint: those go in models/checkpoints"):
        detect({"model.diffusion_model.input_blocks.0.0.weight": (320, 4, 3, 3)})
    with pytest.raises(UnsupportedModel, match="holds no tensors"):
        detect({})


def test_a_known_layout_with_wrong_tensors_is_refused_naming_them() -> None:
    state = shapes(rrdb_state("esrgan"))
    state["model.1.sub.1.RDB2.conv3.0.weight"] = (4, 99, 3, 3)
    with pytest.raises(UnsupportedModel) as err:
        detect(state)
    assert "looks like an RRDBNet x4 (old ESRGAN layout, 2 blocks, 8 features), but its tensors do not fit" in \
        str(err.value)
    assert "body.1.rdb2.conv3.weight is [4, 99, 3, 3], needs [4, 16, 3, 3]" in str(err.value)
    missing = shapes(rrdb_state("real-esrgan"))
    del missing["conv_hr.bias"]
    with pytest.raises(UnsupportedModel, match="missing conv_hr.bias"):
        detect(missing)
    plus = {**shapes(rrdb_state("esrgan")), "model.1.sub.0.RDB1.conv1x1.weight": (4, 8, 1, 1)}
    with pytest.raises(UnsupportedModel, match="ESRGAN\\+"):
        detect(plus)
    with pytest.raises(UnsupportedModel, match="not 3 channels times a square scale"):
        detect(shapes(compact_state(scale=2)) | {"body.8.weight": (13, 8, 3, 3), "body.8.bias": (13,)})


def test_read_spec_reads_the_header_and_refuses_pickles(tmp_path: Path) -> None:
    path = tmp_path / "4x.safetensors"
    save_file(rrdb_state("esrgan"), str(path))
    assert read_spec(path, "4x.safetensors").scale == 4
    pickle = tmp_path / "4x.pth"
    pickle.write_bytes(b"\x80\x02}q\x00.")
    with pytest.raises(UnsafeModelFile, match="upscale model '4x.pth' is a pickle file \\(.pth\\).*noodle convert"):
        read_spec(pickle, "4x.pth")
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(UnsupportedModel, match="^upscale model 'broken.safetensors' is truncated"):
        read_spec(broken, "broken.safetensors")


# -- tiling --------------------------------------------------------------------------------------


def pointwise_x4(x: Tensor) -> Tensor:
    """An upscaler whose every output pixel depends on one input pixel: tiling must not change it at all."""
    up = F.interpolate(x, scale_factor=4, mode="nearest")
    return torch.sigmoid(up * torch.tensor([1.5, -0.7, 0.3])[:, None, None] + 0.1)


def test_tiled_output_equals_untiled_on_an_image_larger_than_a_tile() -> None:
    image = torch.rand(2, 3, 300, 190)
    whole = pointwise_x4(image)
    calls: list[tuple[int, ...]] = []

    def model(x: Tensor) -> Tensor:
        calls.append(tuple(x.shape[-2:]))
        return pointwise_x4(x)

    tiled = tiled_upscale(image, model, 4, tile=128, overlap=32)
    assert tiled.shape == (2, 3, 1200, 760)
    assert (tiled - whole).abs().max() < 1e-5
    # ComfyUI's positions: starts 0, 96, 192 down (300 > 128), 0, 96 across; the last tiles are cut short
    assert len(calls) == 2 * tile_steps(190, 300, 128) == 2 * 3 * 2
    assert calls[:6] == [(128, 128), (128, 94), (128, 128), (128, 94), (108, 128), (108, 94)]


def test_a_real_network_tiled_stays_close_to_untiled() -> None:
    # convolutions see past a tile's edge, so tiles differ near their seams; the feathered overlap hides it
    state = rrdb_state("real-esrgan", blocks=1, ups=1)
    spec = detect(shapes(state))
    module = build_module(spec).eval()
    module.load_state_dict(to_canonical(state))
    image = torch.rand(1, 3, 100, 90)
    with torch.inference_mode():
        whole = module(image)
    tiled = tiled_upscale(image, module, 2, tile=64, overlap=32)
    assert (tiled - whole).abs().mean() < 0.01 * whole.abs().mean()


def test_out_of_memory_halves_the_tile_down_to_128() -> None:
    tried: list[int] = []

    def model(x: Tensor) -> Tensor:
        tried.append(max(x.shape[-2:]))
        if max(x.shape[-2:]) > 128:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return pointwise_x4(x)

    image = torch.rand(1, 300, 200, 3)  # IMAGE layout: B, H, W, C
    out = upscale_image(image, model, 4, 512, CPU)
    assert out.shape == (1, 1200, 800, 3)
    assert tried[:2] == [300, 256] and max(tried[2:]) == 128  # the whole picture, one 256 tile, then 128s
    assert (out - pointwise_x4(image.movedim(-1, 1)).movedim(1, -1)).abs().max() < 1e-5

    def hopeless(x: Tensor) -> Tensor:
        raise torch.OutOfMemoryError("CUDA out of memory")

    with pytest.raises(torch.OutOfMemoryError):
        upscale_image(image, hopeless, 4, 512, CPU)


def test_the_output_is_clamped_to_0_1() -> None:
    out = upscale_image(torch.rand(1, 8, 8, 3), lambda x: F.interpolate(x, scale_factor=2) * 4 - 2, 2, 512, CPU)
    assert out.min() == 0 and out.max() == 1
