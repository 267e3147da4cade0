"""A half-precision VAE that overflows is decoded again in float32 instead of giving a black image; the VAE's
precision ([engine] vae_dtype) follows ComfyUI's rule and a bfloat16 VAE draws the float32 picture closely."""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from engine.device import DTYPES, pick_vae_dtype
from engine.models.single_file import load_vae
from engine.nodes import catalog
from engine.nodes.base import RunContext, RunMeta
from engine.values import Latent, VaeRef


def decode(vae: Any) -> torch.Tensor:
    ctx = RunContext.__new__(RunContext)  # VAEDecode touches only ctx.progress
    ctx.report_progress, ctx.is_cancelled, ctx.node_id, ctx.meta = (lambda *a: None), (lambda: False), "8", RunMeta()
    latent = Latent(torch.randn((1, 4, 8, 8), generator=torch.Generator().manual_seed(0)) * 1000)
    (images,) = catalog()["VAEDecode"].model_construct(samples=latent, vae=VaeRef(vae, "tiny-vae")).run(ctx)
    return images.pixels


def test_an_overflowing_fp16_vae_falls_back_to_fp32(tiny_models: Path) -> None:
    path = tiny_models / "vae" / "tiny-vae.safetensors"
    half = load_vae(path, "cpu", torch.float16)
    reference = load_vae(path, "cpu", torch.float16).to(torch.float32)  # the same fp16-rounded weights
    # Latents of size 1000 through weights 100 times their size overflow fp16 (max 65504) in the first
    # layers; in fp32 the group norms that follow bring them back to scale.
    with torch.no_grad():
        for vae in (reference, half):
            vae.post_quant_conv.weight.mul_(100)
        probe = half.post_quant_conv((torch.randn((1, 4, 8, 8)) * 1000).half())
    assert bool(half.post_quant_conv.weight.isfinite().all())
    assert not bool(probe.isfinite().all())  # the setup really overflows in half precision

    expected = decode(reference)
    got = decode(half)
    assert half.dtype == torch.float32  # kept in fp32 for the next decodes
    assert bool(got.isfinite().all()) and float(got.std()) > 0.01
    assert torch.allclose(got, expected, atol=1e-3)  # well under one 8-bit level



@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])  # (a float16 SD VAE is upcast anyway)
def test_a_latent_holding_nan_is_refused_and_the_vae_keeps_its_precision(tiny_models: Path,
                                                                         dtype: torch.dtype) -> None:
    # an fp16 UNet that overflowed hands over NaN: no precision decodes it, and the old retry turned the shared
    # VAE to float32 for every later job while the picture stayed black
    vae = load_vae(tiny_models / "vae" / "tiny-vae.safetensors", "cpu", dtype)
    ctx = RunContext.__new__(RunContext)
    ctx.report_progress, ctx.is_cancelled, ctx.node_id, ctx.meta = (lambda *a: None), (lambda: False), "8", RunMeta()
    samples = torch.zeros((1, 4, 8, 8))
    samples[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="the latent to decode holds NaN or inf: the sampler overflowed"):
        catalog()["VAEDecode"].model_construct(samples=Latent(samples), vae=VaeRef(vae, "tiny-vae")).run(ctx)
    assert vae.dtype == dtype


# --- the VAE's precision ([engine] vae_dtype) ------------------------------------------------------------------------

def card(monkeypatch: pytest.MonkeyPatch, capability: tuple[int, int], hip_arch: str | None = None) -> None:
    """torch reports a CUDA card of `capability` (NVIDIA), or an AMD card of `hip_arch`."""
    monkeypatch.setattr(torch.version, "hip", "6.2" if hip_arch else None)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda device=None: SimpleNamespace(gcnArchName=f"{hip_arch}:sramecc+:xnack-"))


def test_auto_picks_the_vae_precision_by_comfyuis_rule(monkeypatch: pytest.MonkeyPatch) -> None:
    cuda, fp16, fp32 = torch.device("cuda"), torch.float16, torch.float32
    assert pick_vae_dtype("auto", torch.device("cpu"), fp32) == fp32
    card(monkeypatch, (8, 6))  # an RTX 3090: bfloat16, as ComfyUI
    assert pick_vae_dtype("auto", cuda, fp16) == torch.bfloat16
    assert pick_vae_dtype("auto", cuda, fp32) == fp32  # the engine set to float32 (ComfyUI's --force-fp32)
    card(monkeypatch, (9, 0))  # an H100 / H200
    assert pick_vae_dtype("auto", cuda, fp16) == torch.bfloat16
    card(monkeypatch, (7, 5))  # a T4 or an RTX 2080: no native bfloat16, float32 as ComfyUI
    assert pick_vae_dtype("auto", cuda, fp16) == fp32
    assert pick_vae_dtype("float16", cuda, fp16) == fp16  # the owner's choice holds
    card(monkeypatch, (10, 3), hip_arch="gfx1030")  # an RX 6800 (RDNA2): emulated bfloat16
    assert pick_vae_dtype("auto", cuda, fp16) == fp32
    card(monkeypatch, (11, 0), hip_arch="gfx1100")  # an RX 7900 (RDNA3)
    assert pick_vae_dtype("auto", cuda, fp16) == torch.bfloat16
    cpu = torch.device("cpu")
    for amx in (True, False):  # a CPU with AMX (Sapphire Rapids), and one without
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda amx=amx: amx)
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True)
        assert pick_vae_dtype("auto", cpu, fp32) == fp32  # the CPU default: float32 everywhere, as ComfyUI
        assert pick_vae_dtype("auto", cpu, torch.bfloat16) == (torch.bfloat16 if amx else fp32)


def test_a_bfloat16_vae_is_loaded_so_and_draws_the_float32_picture_closely(
        tiny_models: Path, tmp_path: Path) -> None:
    from engine.executor import create_executor
    from engine.settings import EngineSettings, Limits, ModelsSettings
    from tests.engine.conftest import txt2img

    pictures = {}
    for vae_dtype in ("float32", "bfloat16"):
        settings = EngineSettings(output_dir=tmp_path / vae_dtype, input_dir=tmp_path, device="cpu",
                                  vae_dtype=vae_dtype)
        executor = create_executor(ModelsSettings(dir=tiny_models), settings, Limits())
        pipe = executor.models.checkpoint("tiny-sd15.safetensors").pipe
        assert pipe.vae.dtype == DTYPES[vae_dtype] and pipe.unet.dtype == torch.float32
        assert executor.models.vae("tiny-vae.safetensors").dtype == DTYPES[vae_dtype]
        result = executor.run(txt2img())
        [image] = result.outputs["9"]["images"]
        path = settings.output_dir / image["subfolder"] / image["filename"]
        pictures[vae_dtype] = torch.from_numpy(np.asarray(Image.open(path), dtype=np.float32) / 255)
    error = float(((pictures["bfloat16"] - pictures["float32"]) ** 2).mean())
    psnr = 10 * math.log10(1 / error) if error else math.inf
    print(f"bfloat16 VAE vs float32: PSNR {psnr:.1f} dB")
    assert 30.0 < psnr < math.inf  # a different precision, the same picture


def test_on_a_cpu_with_amx_the_engine_says_bfloat16_is_there(tiny_models: Path, tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch,
                                                             caplog: pytest.LogCaptureFixture) -> None:
    import logging

    from engine import executor as executor_module
    from engine.settings import EngineSettings, Limits, ModelsSettings

    def hints(amx: bool, **engine: Any) -> list[str]:
        monkeypatch.setattr(executor_module, "cpu_runs_bf16", lambda: amx)
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="engine.executor"):
            executor_module.create_executor(ModelsSettings(dir=tiny_models), EngineSettings(
                device="cpu", output_dir=tmp_path, input_dir=tmp_path, **engine), Limits())
        return [r.getMessage() for r in caplog.records if 'dtype = "bfloat16"' in r.getMessage()]

    assert len(hints(True)) == 1
    assert hints(False) == [] and hints(True, dtype="bfloat16") == [] and hints(True, workers="ray") == []
