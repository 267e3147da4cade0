"""A half-precision VAE that overflows is decoded again in float32 instead of giving a black image."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

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

