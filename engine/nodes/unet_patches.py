"""FreeU and FreeU_V2 (arXiv 2309.11497): rescale the UNet's decoder features and damp its skip connections'
low frequencies, as ComfyUI 0.3.64's comfy_extras/nodes_freelunch.py does.

Each node returns the MODEL with a `FreeUPatch` added to its ModelPatches.unet; engine/models/unet_hooks.py hooks
it into the shared UNet only while that MODEL samples. ComfyUI's output_block_patch runs before each output
block's concat and is keyed on the width of `h`: model_channels * 4 takes (b1, s1), model_channels * 2 takes
(b2, s2), any other width is left alone. Diffusers' own FreeU (`enable_freeu`) is not used: it keys on the first
two up blocks (resolution_idx 0 and 1) instead, which in SD1.x misses the first resnet of the third up block
(1280 channels wide, b1 in ComfyUI) and scales the second up block with b2 where ComfyUI uses b1.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from pydantic import Field

from engine.nodes.base import Node, RunContext, Socket, register
from engine.values import ModelRef

__all__ = ["FreeU", "FreeUPatch", "FreeU_V2", "fourier_filter"]


def fourier_filter(x: torch.Tensor, threshold: int, scale: float) -> torch.Tensor:
    """ComfyUI's Fourier_filter: the centred (2 * threshold)^2 low frequencies of each channel times `scale`,
    computed in float32 and handed back in x's dtype."""
    freq = torch.fft.fftshift(torch.fft.fftn(x.float(), dim=(-2, -1)), dim=(-2, -1))
    batch, channels, height, width = freq.shape
    mask = torch.ones((batch, channels, height, width), device=x.device)
    row, col = height // 2, width // 2
    mask[..., row - threshold:row + threshold, col - threshold:col + threshold] = scale
    filtered = torch.fft.ifftn(torch.fft.ifftshift(freq * mask, dim=(-2, -1)), dim=(-2, -1)).real
    return filtered.to(x.dtype)


def _filtered(hsp: torch.Tensor, scale: float) -> torch.Tensor:
    try:
        return fourier_filter(hsp, threshold=1, scale=scale)
    except (RuntimeError, NotImplementedError):  # a device without torch.fft (ComfyUI falls back the same way)
        return fourier_filter(hsp.cpu(), threshold=1, scale=scale).to(hsp.device)


@dataclass(frozen=True)
class FreeUPatch:
    """FreeU's output-block patch: patch(h, hsp) -> (h, hsp) before an up-block resnet's concat.

    `model_channels` is the UNet's first block width (ComfyUI's unet_config["model_channels"]); `v2` scales the
    first half of h's channels by (b - 1) * m + 1, m the per-item min-max normalised channel mean of h, instead of
    by b itself.
    """

    kind: ClassVar[str] = "output_block"

    b1: float
    b2: float
    s1: float
    s2: float
    model_channels: int
    v2: bool = False

    def __call__(self, h: torch.Tensor, hsp: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        scales = {self.model_channels * 4: (self.b1, self.s1), self.model_channels * 2: (self.b2, self.s2)}
        scale = scales.get(int(h.shape[1]))
        if scale is None:
            return h, hsp
        half = h.shape[1] // 2
        if self.v2:
            mean = h.mean(1).unsqueeze(1)
            batch = mean.shape[0]
            high = mean.view(batch, -1).max(dim=-1, keepdim=True).values.unsqueeze(2).unsqueeze(3)
            low = mean.view(batch, -1).min(dim=-1, keepdim=True).values.unsqueeze(2).unsqueeze(3)
            mean = (mean - low) / (high - low)
            h[:, :half] = h[:, :half] * ((scale[0] - 1) * mean + 1)
        else:
            h[:, :half] = h[:, :half] * scale[0]
        return h, _filtered(hsp, scale[1])


def _factor(default: float) -> float:
    return Field(default, ge=0.0, le=10.0, json_schema_extra={"step": 0.01})


class _FreeUNode(Node):
    """The FreeU nodes' shared run: the patch added to the MODEL's UNet patches, after any it has."""

    CATEGORY: ClassVar[str] = "model_patches/unet"
    RETURN_TYPES: ClassVar[tuple[str, ...]] = ("MODEL",)
    V2: ClassVar[bool] = False

    model: ModelRef = Socket("MODEL")
    b1: float
    b2: float
    s1: float
    s2: float

    def run(self, ctx: RunContext) -> tuple[ModelRef]:
        channels = int(self.model.pipe.unet.config.block_out_channels[0])
        patch = FreeUPatch(self.b1, self.b2, self.s1, self.s2, channels, self.V2)
        patches = self.model.patches
        return (self.model.with_patches(patches.replace(unet=(*patches.unet, patch))),)


@register
class FreeU(_FreeUNode):
    """Scale the UNet's decoder features (b1, b2) and damp its skip connections' low frequencies (s1, s2)."""

    b1: float = _factor(1.1)
    b2: float = _factor(1.2)
    s1: float = _factor(0.9)
    s2: float = _factor(0.2)


@register
class FreeU_V2(_FreeUNode):  # noqa: N801 (ComfyUI's class_type)
    """FreeU with the decoder scaling weighted by each position's normalised channel mean."""

    V2: ClassVar[bool] = True

    b1: float = _factor(1.3)
    b2: float = _factor(1.4)
    s1: float = _factor(0.9)
    s2: float = _factor(0.2)
