"""VAEDecodeTiled / VAEEncodeTiled (engine/nodes/vae_tiled.py) against ComfyUI 0.3.64's tiling written out here
(comfy/utils.py tiled_scale_multidim, comfy/sd.py decode_tiled_ / encode_tiled_, nodes.py's overlap clamp), on
stand-in functions whose output at a tile's edge depends on what lies beyond it (so the feathering shows), then
on the tiny VAE and in workflows."""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from engine.cost import check_cost, validate_within_limits
from engine.errors import WorkflowInvalid
from engine.executor import Executor
from engine.models.single_file import load_vae
from engine.nodes import catalog
from engine.nodes.vae import encode_tiles
from engine.settings import Limits
from engine.tiled_scale import TilingError, averaged_passes
from engine.values import ImageBatch, Latent, VaeRef
from tests.engine.conftest import txt2img

Fn = Callable[[torch.Tensor], torch.Tensor]


# --- ComfyUI's algorithm, compactly -------------------------------------------------------------------------------

def comfy_tiled_scale(samples: torch.Tensor, function: Fn, tile_x: int, tile_y: int, overlap: int,
                      upscale_amount: float, out_channels: int) -> torch.Tensor:
    """comfy/utils.py tiled_scale -> tiled_scale_multidim for 2D, as 0.3.64 has it."""
    tile, dims = (tile_y, tile_x), 2
    size = lambda n: round(upscale_amount * n)  # noqa: E731
    output = torch.empty([samples.shape[0], out_channels] + [size(n) for n in samples.shape[2:]])
    for b in range(samples.shape[0]):
        s = samples[b:b + 1]
        if all(s.shape[d + 2] <= tile[d] for d in range(dims)):
            output[b:b + 1] = function(s)
            continue
        out = torch.zeros([1, out_channels] + [size(n) for n in s.shape[2:]])
        out_div = torch.zeros_like(out)
        positions = [range(0, s.shape[d + 2] - overlap, tile[d] - overlap) if s.shape[d + 2] > tile[d] else [0]
                     for d in range(dims)]
        for it in itertools.product(*positions):
            s_in, upscaled = s, []
            for d in range(dims):
                pos = max(0, min(s.shape[d + 2] - overlap, it[d]))
                s_in = s_in.narrow(d + 2, pos, min(tile[d], s.shape[d + 2] - pos))
                upscaled.append(round(upscale_amount * pos))
            ps = function(s_in)
            mask = torch.ones_like(ps)
            for d in range(2, dims + 2):
                feather = round(upscale_amount * overlap)
                if feather >= mask.shape[d]:
                    continue
                for t in range(feather):
                    a = (t + 1) / feather
                    mask.narrow(d, t, 1).mul_(a)
                    mask.narrow(d, mask.shape[d] - 1 - t, 1).mul_(a)
            o, o_d = out, out_div
            for d in range(dims):
                o = o.narrow(d + 2, upscaled[d], mask.shape[d + 2])
                o_d = o_d.narrow(d + 2, upscaled[d], mask.shape[d + 2])
            o.add_(ps * mask)
            o_d.add_(mask)
        output[b:b + 1] = out / out_div
    return output


def comfy_decode_tiled(samples: torch.Tensor, decode: Fn, tile_size: int, overlap: int) -> torch.Tensor:
    """nodes.py VAEDecodeTiled.decode + comfy/sd.py decode_tiled_ for an image VAE: [B, H, W, 3] in 0..1."""
    if tile_size < overlap * 4:
        overlap = tile_size // 4
    t, o = tile_size // 8, overlap // 8
    passes = (comfy_tiled_scale(samples, decode, t // 2, t * 2, o, 8, 3)
              + comfy_tiled_scale(samples, decode, t * 2, t // 2, o, 8, 3)
              + comfy_tiled_scale(samples, decode, t, t, o, 8, 3)) / 3.0
    return torch.clamp((passes + 1.0) / 2.0, min=0.0, max=1.0).movedim(1, -1)


def comfy_encode_tiled(pixels: torch.Tensor, encode: Fn, tile: int, overlap: int) -> torch.Tensor:
    """comfy/sd.py encode_tiled_ on pixels [B, 3, H, W] already cropped to the 8-grid; `encode` takes 0..1."""
    samples = comfy_tiled_scale(pixels, encode, tile, tile, overlap, 1 / 8, 4)
    samples += comfy_tiled_scale(pixels, encode, tile * 2, tile // 2, overlap, 1 / 8, 4)
    samples += comfy_tiled_scale(pixels, encode, tile // 2, tile * 2, overlap, 1 / 8, 4)
    return samples / 3.0


# --- stand-ins: a per-pixel part plus a local one (zero-padded at the tile's edge, so tiles disagree there) -------

KERNEL = torch.randn(4, 4, 3, 3, generator=torch.Generator().manual_seed(5)) * 0.3


def standin_decode(z: torch.Tensor) -> torch.Tensor:
    """Latents [1, 4, h, w] -> [1, 3, 8h, 8w]."""
    local = F.conv2d(z, KERNEL, padding=1)
    cells = torch.tanh(z[:, :3]) + local[:, :3]
    return F.interpolate(cells, scale_factor=8, mode="bilinear") + 0.1 * z[:, 3:].repeat_interleave(8, 2) \
        .repeat_interleave(8, 3)


def standin_encode(x: torch.Tensor) -> torch.Tensor:
    """Pixels [1, 3, H, W] in 0..1 -> [1, 4, H/8, W/8]."""
    x = torch.cat([x, x.mean(1, keepdim=True)], 1)
    return F.avg_pool2d(x * x + F.conv2d(x, KERNEL, padding=1), 8)


def latent_noise(batch: int, h: int, w: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, 4, h, w, generator=torch.Generator().manual_seed(seed))


def ours_decode(samples: torch.Tensor, decode: Fn, tile_size: int, overlap: int) -> torch.Tensor:
    """Our passes the way VAEDecodeTiled drives them (its clamp, its tile order)."""
    overlap = tile_size // 4 if tile_size < overlap * 4 else overlap
    t = tile_size // 8
    out = averaged_passes(samples, decode, ((t * 2, t // 2), (t // 2, t * 2), (t, t)), overlap // 8, 8, 3)
    return ((out + 1.0) / 2.0).clamp(0, 1).movedim(1, -1)


@pytest.mark.parametrize(("h", "w", "tile_size", "overlap"), [
    (12, 20, 64, 32),    # 8-cell tiles, overlap clamped to 16 px = 2 cells; ragged last tiles
    (13, 7, 128, 64),    # odd sides, 16-cell tiles: the t/2 pass cuts, the others fit whole
    (30, 30, 96, 0),     # no overlap: feather 0, plain tiles side by side
    (40, 9, 160, 32),    # a tall latent; overlap 4 cells
    (8, 8, 512, 64),     # fits every pass's tile: decoded whole
])
def test_decode_blending_matches_comfyui(h: int, w: int, tile_size: int, overlap: int) -> None:
    samples = latent_noise(2, h, w)
    expected = comfy_decode_tiled(samples, standin_decode, tile_size, overlap)
    got = ours_decode(samples, standin_decode, tile_size, overlap)
    assert got.shape == expected.shape == (2, h * 8, w * 8, 3)
    assert float((got - expected).abs().max()) < 1e-5
    # the stand-in's local part really differs across seams: tiling is not the whole decode
    if tile_size // 8 // 2 < max(h, w):
        whole = ((standin_decode(samples[:1]) + 1) / 2).clamp(0, 1).movedim(1, -1)
        assert float((got[:1] - whole).abs().max()) > 1e-3


@pytest.mark.parametrize(("height", "width", "tile", "overlap"), [
    (96, 160, 128, 32), (200, 72, 256, 64), (64, 256, 64, 0), (96, 96, 512, 64),
])
def test_encode_blending_matches_comfyui(height: int, width: int, tile: int, overlap: int) -> None:
    pixels = torch.rand(1, 3, height, width, generator=torch.Generator().manual_seed(1))
    expected = comfy_encode_tiled(pixels, standin_encode, tile, overlap)
    tiles = ((tile, tile), (tile // 2, tile * 2), (tile * 2, tile // 2))
    got = averaged_passes(pixels, standin_encode, tiles, overlap, 1 / 8, 4)
    assert got.shape == expected.shape == (1, 4, height // 8, width // 8)
    assert float((got - expected).abs().max()) < 1e-5


# --- the tiny VAE ---------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_vae(tiny_models: Path) -> VaeRef:
    return VaeRef(load_vae(tiny_models / "vae" / "tiny-vae.safetensors", "cpu", torch.float32), "tiny-vae")


def context() -> Any:
    return SimpleNamespace(progress=lambda value, total: None, device=torch.device("cpu"))


def run(class_type: str, **inputs: Any) -> Any:
    (out,) = catalog()[class_type].model_construct(**inputs).run(context())  # defaults for what is not given
    return out


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    return 10 * math.log10(1.0 / float(((a - b) ** 2).mean()))


def test_tiles_covering_the_latent_decode_as_vae_decode(tiny_vae: VaeRef) -> None:
    latent = Latent(latent_noise(2, 8, 12, seed=3))
    plain = run("VAEDecode", samples=latent, vae=tiny_vae).pixels
    tiled = run("VAEDecodeTiled", samples=latent, vae=tiny_vae, tile_size=256, overlap=64).pixels
    assert tiled.shape == plain.shape == (2, 64, 96, 3)
    assert float((tiled - plain).abs().max()) < 1e-6  # (x + x + x) / 3 is x to a rounding


def test_tiles_covering_the_image_encode_as_vae_encode(tiny_vae: VaeRef) -> None:
    pixels = ImageBatch(torch.rand(1, 70, 100, 3, generator=torch.Generator().manual_seed(4)))
    plain = run("VAEEncode", pixels=pixels, vae=tiny_vae).samples
    tiled = run("VAEEncodeTiled", pixels=pixels, vae=tiny_vae, tile_size=256, overlap=64).samples
    assert tiled.shape == plain.shape == (1, 4, 8, 12)  # cropped to 64x96 first, as VAEEncode
    assert float((tiled - plain).abs().max()) < 1e-5


def test_small_tiles_decode_close_to_the_whole_and_as_comfyui(tiny_vae: VaeRef) -> None:
    latent = latent_noise(1, 24, 16, seed=6)
    plain = run("VAEDecode", samples=Latent(latent), vae=tiny_vae).pixels
    # 24-cell tiles: the 48x12 and 12x48 passes cut the 24x16 latent, the 24x24 one decodes it whole
    tiled = run("VAEDecodeTiled", samples=Latent(latent), vae=tiny_vae, tile_size=192, overlap=64).pixels
    module = tiny_vae.vae
    with torch.inference_mode():
        expected = comfy_decode_tiled(latent, lambda z: module.decode(z).sample.float(), 192, 64)
    assert float((tiled - expected).abs().max()) < 1e-5
    quality = psnr(tiled, plain)
    print(f"tiled (192 px tiles, 64 px overlap) vs whole decode: PSNR {quality:.1f} dB")
    # measured 31.2 dB: a random decoder's mid-block attention sees the whole latent, and a tile only itself
    assert 28.0 < quality < 100.0


def test_small_tiles_encode_close_to_the_whole_and_as_comfyui(tiny_vae: VaeRef) -> None:
    pixels = torch.rand(1, 192, 128, 3, generator=torch.Generator().manual_seed(7))
    pixels = F.avg_pool2d(pixels.movedim(-1, 1), 9, 1, 4, count_include_pad=False).movedim(1, -1)  # smoother
    plain = run("VAEEncode", pixels=ImageBatch(pixels), vae=tiny_vae).samples
    tiled = run("VAEEncodeTiled", pixels=ImageBatch(pixels), vae=tiny_vae, tile_size=128, overlap=32).samples
    module = tiny_vae.vae
    with torch.inference_mode():
        expected = comfy_encode_tiled(pixels.movedim(-1, 1), lambda x: module.encode(x * 2 - 1).latent_dist.mode(),
                                      128, 32)
    assert float((tiled - expected).abs().max()) < 1e-5
    error = float((tiled - plain).abs().max() / plain.abs().max())
    print(f"tiled (128 px tiles, 32 px overlap) vs whole encode: max difference {error:.3f} of the latent's range")
    assert 0 < error < 0.5


# --- in workflows ---------------------------------------------------------------------------------------------------

def tiled_round_trip() -> dict[str, Any]:
    """txt2img decoded tiled, then encoded and decoded again tiled, both saved."""
    workflow = txt2img(width=96, height=64)
    workflow["8"] = {"class_type": "VAEDecodeTiled", "inputs": {"samples": ["3", 0], "vae": ["4", 2],
                     "tile_size": 64, "overlap": 32, "temporal_size": 64, "temporal_overlap": 8}}
    workflow["20"] = {"class_type": "VAEEncodeTiled", "inputs": {"pixels": ["8", 0], "vae": ["4", 2],
                      "tile_size": 64, "overlap": 0, "temporal_size": 64, "temporal_overlap": 8}}
    workflow["21"] = {"class_type": "VAEDecodeTiled", "inputs": {"samples": ["20", 0], "vae": ["4", 2],
                      "tile_size": 512, "overlap": 64, "temporal_size": 64, "temporal_overlap": 8}}
    workflow["22"] = {"class_type": "SaveImage", "inputs": {"images": ["21", 0], "filename_prefix": "tiled/trip"}}
    return workflow


def test_a_workflow_with_the_tiled_nodes_runs_end_to_end(executor: Executor) -> None:
    cost = check_cost(executor.validate(tiled_round_trip()), executor.limits, executor.models, catalog())
    assert (cost.images, cost.side, cost.pixels) == (2, 96, 96 * 64)  # the cost rules follow both tiled nodes
    result = executor.run(tiled_round_trip())
    for node in ("9", "22"):
        [image] = result.outputs[node]["images"]
        assert image["filename"].endswith(".png")
    saved = Image.open(executor.settings.output_dir / result.outputs["22"]["images"][0]["subfolder"]
                       / result.outputs["22"]["images"][0]["filename"])
    assert saved.size == (96, 64)


def errors_of(executor: Executor, workflow: dict[str, Any]) -> dict[str, list[tuple[str, str]]]:
    with pytest.raises(WorkflowInvalid) as caught:
        executor.validate(workflow)
    return {node: [(error["type"], error["extra_info"].get("input_name", "")) for error in found["errors"]]
            for node, found in caught.value.body["node_errors"].items()}


def test_bad_inputs_are_refused_by_name(executor: Executor) -> None:
    workflow = tiled_round_trip()
    workflow["8"]["inputs"].update(tile_size=32, temporal_overlap=2)
    workflow["20"]["inputs"]["overlap"] = 5000
    del workflow["21"]["inputs"]["tile_size"]  # an export older than the input (ComfyUI refuses it too)
    assert errors_of(executor, workflow) == {
        "8": [("value_smaller_than_min", "tile_size"), ("value_smaller_than_min", "temporal_overlap")],
        "20": [("value_bigger_than_max", "overlap")],
        "21": [("required_input_missing", "tile_size")],
    }


def test_encode_tiles_that_would_never_move_on_are_refused_with_the_fix(executor: Executor) -> None:
    # ComfyUI's encode does not clamp: tile 64 with overlap 64 gives 32-pixel tiles overlapping by 64, a zero
    # step there (or NaN latents for a larger overlap); here it is refused at validation, naming both inputs
    workflow = tiled_round_trip()
    workflow["20"]["inputs"]["overlap"] = 64
    with pytest.raises(WorkflowInvalid) as caught:
        executor.validate(workflow)
    message = str(caught.value)
    assert "node 20 (VAEEncodeTiled)" in message and "tile_size 64, overlap 64) never move on" in message
    assert "under half" in message
    # tiles that move on but leave output cells uncovered: refused before any tile runs, also when run directly
    pixels = torch.rand(1, 3, 256, 256)
    with pytest.raises(TilingError, match="32x128 .h x w. overlapping by 31 leave parts of the output uncovered"):
        averaged_passes(pixels, lambda tile: pytest.fail("a tile ran"), encode_tiles(64), 31, 1 / 8, 4)


def test_tiny_tiles_over_a_big_batch_are_held_to_max_vae_tiles(executor: Executor) -> None:
    workflow = tiled_round_trip()
    workflow["20"]["inputs"].update(tile_size=64, overlap=24)
    workflow["5"]["inputs"].update(width=256, height=256)  # 210 encoder calls
    assert executor.validate(workflow) is not None  # within the default 2,048
    with pytest.raises(WorkflowInvalid, match=r"node 20 \(VAEEncodeTiled\): .*runs the VAE on 210 tiles \(tile_size "
                                              r"64, overlap 24, 1 picture, three passes\).*limits.max_vae_tiles"):
        validate_within_limits(workflow, catalog(), executor.models, Limits(max_vae_tiles=16))
