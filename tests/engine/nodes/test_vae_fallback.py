"""A picture too big for the VAE whole goes in ComfyUI's tiles (comfy/sd.py VAE.decode / VAE.encode falling back to
decode_tiled_ / encode_tiled_): on an out-of-memory error from the device, or on the CPU before it starts when the
machine has not the memory free. The device's limit is played by the tiny VAE refusing calls above a size, with
the error CUDA's allocator raises; everything else is the real VAE, nodes and tiling."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from engine.device import available_ram
from engine.models.single_file import load_vae
from engine.nodes import vae as vae_nodes
from engine.nodes.vae import DECODE_BYTES_PER_PIXEL, decode_pictures, encode_pixels
from engine.values import ImageBatch, Latent, VaeRef
from tests.engine.nodes.test_vae_tiled import comfy_decode_tiled, comfy_encode_tiled, latent_noise, run

DEVICE_CELLS = 64 * 64  # the pretend device holds a call on at most this many latent cells (or 8x8 times pixels)


class SmallDevice:
    """Wraps a VAE method: a call on an input bigger than `limit` elements per channel fails as CUDA's allocator
    fails; the calls are recorded by their sizes."""

    def __init__(self, method: Callable[..., Any], limit: int) -> None:
        self.method, self.limit, self.sizes = method, limit, []

    def __call__(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        self.sizes.append(tuple(x.shape[2:]))
        if x.shape[2] * x.shape[3] > self.limit:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 9.00 GiB. GPU 0 has a total "
                                         "capacity of 8.00 GiB of which 1.10 GiB is free.")
        return self.method(x, *args, **kwargs)


@pytest.fixture
def tiny_vae(tiny_models: Path) -> VaeRef:
    return VaeRef(load_vae(tiny_models / "vae" / "tiny-vae.safetensors", "cpu", torch.float32), "tiny-vae")


def real_decode(vae: VaeRef) -> Callable[[torch.Tensor], torch.Tensor]:
    module = vae.vae
    return lambda z: module.decode(z).sample.float()


def test_a_picture_the_gpu_cannot_hold_is_decoded_in_comfyuis_fallback_tiles(
        tiny_vae: VaeRef, caplog: pytest.LogCaptureFixture) -> None:
    samples = latent_noise(2, 72, 80, seed=11)  # 576x640 pixels: 5760 cells, over the device's 4096
    with torch.inference_mode():
        whole = ((real_decode(tiny_vae)(samples) + 1.0) / 2.0).clamp(0, 1).movedim(1, -1)
        expected = comfy_decode_tiled(samples, real_decode(tiny_vae), 512, 128)  # decode_tiled_(64, 64, 16)
    device = SmallDevice(tiny_vae.vae.decode, DEVICE_CELLS)
    tiny_vae.vae.decode = device
    with caplog.at_level(logging.WARNING, logger="engine.nodes.vae"):
        got = run("VAEDecode", samples=Latent(samples), vae=tiny_vae).pixels
    assert got.shape == (2, 576, 640, 3)
    assert float((got - expected).abs().max()) < 1e-5
    assert float((got - whole).abs().max()) > 1e-3  # really tiled: the seams differ from a whole decode
    assert device.sizes.count((72, 80)) == 1  # tried whole once; the batch's second picture went in tiles at once
    assert max(h * w for h, w in device.sizes[1:]) <= DEVICE_CELLS
    assert "ran out of memory" in caplog.text and "in tiles" in caplog.text


def test_a_picture_that_fits_is_decoded_whole_as_before(tiny_vae: VaeRef) -> None:
    samples = latent_noise(1, 72, 80, seed=12)
    with torch.inference_mode():
        whole = ((tiny_vae.vae.decode(samples).sample.float() + 1.0) / 2.0).clamp(0, 1).movedim(1, -1)
    device = SmallDevice(tiny_vae.vae.decode, 72 * 80)
    tiny_vae.vae.decode = device
    got = run("VAEDecode", samples=Latent(samples), vae=tiny_vae).pixels
    assert torch.equal(got, whole) and device.sizes == [(72, 80)]


def test_an_error_that_is_not_out_of_memory_is_not_retried(tiny_vae: VaeRef) -> None:
    def broken(z: torch.Tensor) -> Any:
        raise RuntimeError("Given groups=1, weight of size [64, 4, 3, 3], expected input to have 4 channels")

    tiny_vae.vae.decode = broken
    with pytest.raises(RuntimeError, match="expected input"):
        run("VAEDecode", samples=Latent(latent_noise(1, 72, 80)), vae=tiny_vae)


def test_on_the_cpu_a_picture_bigger_than_the_free_memory_is_tiled_before_it_starts(
        tiny_vae: VaeRef, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    samples = latent_noise(1, 72, 80, seed=13)
    with torch.inference_mode():
        expected = comfy_decode_tiled(samples, real_decode(tiny_vae), 512, 128)
    # the machine has 1 GiB free: a 576x640 decode is counted at 1.6 GiB (a 2048x2048 one at 19 GiB)
    assert 576 * 640 * DECODE_BYTES_PER_PIXEL > 1024**3 and 2048**2 * DECODE_BYTES_PER_PIXEL > 16 * 1024**3
    monkeypatch.setattr(vae_nodes, "available_ram", lambda: 1024**3)
    device = SmallDevice(tiny_vae.vae.decode, 10**9)  # never refuses: the CPU would just take it
    tiny_vae.vae.decode = device
    with caplog.at_level(logging.WARNING, logger="engine.nodes.vae"):
        got = run("VAEDecode", samples=Latent(samples), vae=tiny_vae).pixels
    assert float((got - expected).abs().max()) < 1e-5
    assert (72, 80) not in device.sizes  # never tried whole
    assert "more than this machine has free" in caplog.text
    # with the memory there, the same picture goes whole
    monkeypatch.setattr(vae_nodes, "available_ram", lambda: 64 * 1024**3)
    device.sizes.clear()
    run("VAEDecode", samples=Latent(samples), vae=tiny_vae)
    assert device.sizes == [(72, 80)]


def test_an_image_the_gpu_cannot_hold_is_encoded_in_comfyuis_fallback_tiles(tiny_vae: VaeRef) -> None:
    # 646x581: cropped to the 8-pixel grid (640x576) first, as a whole encode
    pixels = torch.rand(1, 581, 646, 3, generator=torch.Generator().manual_seed(14))
    module = tiny_vae.vae
    cropped = pixels[:, 2:578, 3:643].movedim(-1, 1)
    with torch.inference_mode():
        expected = comfy_encode_tiled(cropped, lambda x: module.encode(x * 2 - 1).latent_dist.mode(), 512, 64)
    device = SmallDevice(module.encode, DEVICE_CELLS * 64)
    module.encode = device
    got = run("VAEEncode", pixels=ImageBatch(pixels), vae=tiny_vae).samples
    assert got.shape == (1, 4, 72, 80)
    assert float((got - expected).abs().max()) < 1e-5
    assert device.sizes[0] == (576, 640) and max(h * w for h, w in device.sizes[1:]) <= DEVICE_CELLS * 64
    # every encoder goes through encode_pixels (inpainting, InstructPix2Pix, unCLIP's image): the same fallback
    assert torch.equal(encode_pixels(tiny_vae, pixels), got)


def test_the_free_memory_counts_a_containers_limit(tmp_path: Path) -> None:
    limit, usage = tmp_path / "memory.max", tmp_path / "memory.current"
    limit.write_text(f"{1024**3}\n")
    usage.write_text(f"{768 * 1024**2}\n")
    assert available_ram([limit], [usage]) <= 256 * 1024**2
    limit.write_text("max\n")  # no limit: the machine's own free memory
    assert available_ram([limit], [usage]) > 256 * 1024**2


def test_a_tiled_picture_reports_progress_at_every_tile(tiny_vae: VaeRef) -> None:
    tiny_vae.vae.decode = SmallDevice(tiny_vae.vae.decode, DEVICE_CELLS)
    reports: list[tuple[int, int]] = []
    decode_pictures(tiny_vae.vae, latent_noise(2, 72, 80, seed=15),
                    lambda value, total: reports.append((value, total)))
    fractions = [value / total for value, total in reports]
    # 72x80 cells in tiles (h x w) of 128x32, 32x128 and 64x64 stepping by 16 less: 1x4 + 4x1 + 2x2 a picture
    assert len(reports) == 2 * (4 + 4 + 4) + 2 and reports[-1] == (2, 2)
    assert fractions == sorted(fractions) and fractions[0] == 1 / 24
