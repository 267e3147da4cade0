"""DifferentialDiffusion (arXiv 2306.00950): an inpainting mask read as a per-pixel strength map, as ComfyUI
0.3.64's comfy_extras/nodes_differential_diffusion.py does.

The node returns the MODEL with a `DifferentialMask` as its ModelPatches.denoise_mask. At every model call the
sampler's noise mask (engine/samplers/loop.py masked_eps) becomes binary: 1 where the mask is at least the call's
position between the schedule's ends, measured in the model's own timesteps, so a pixel of mask 0.3 changes only
in the last 30% of the schedule's timesteps. With strength below 1 the binary mask is blended with the original.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from pydantic import Field

from engine.nodes.base import Node, RunContext, Socket, register
from engine.samplers.model_sampling import ModelSampling
from engine.values import ModelRef

__all__ = ["DifferentialDiffusion", "DifferentialMask"]


@dataclass(frozen=True)
class DifferentialMask:
    """DifferentialDiffusion.forward: mask(sigma, mask, sigmas, sampling) for one model call.

    The threshold is (t(sigma) - t(to)) / (t(sigmas[0]) - t(to)), t the model's timestep and `to` the larger of
    the model's sigma_min and the run's last sigma; the mask is (mask >= threshold). A strength in (0, 1)
    blends it: strength * binary + (1 - strength) * mask. Strength 0 gives the binary mask too, as ComfyUI's
    `if strength and strength < 1` does.
    """

    strength: float = 1.0

    def __call__(self, sigma: float, mask: torch.Tensor, sigmas: torch.Tensor,
                 sampling: ModelSampling) -> torch.Tensor:
        sigma_to = torch.tensor(sampling.sigma_min, dtype=torch.float32)
        if sigmas[-1] > sigma_to:
            sigma_to = sigmas[-1].float()
        ts_from, ts_to = sampling.timestep(sigmas[0].float()), sampling.timestep(sigma_to)
        current = sampling.timestep(torch.tensor(float(sigma), dtype=torch.float32))
        threshold = (current - ts_to) / (ts_from - ts_to)
        # a host number (the sigmas live there): a 0-d tensor moved to the device would be a copy every model call
        binary = (mask >= float(threshold)).to(mask.dtype)
        if self.strength and self.strength < 1:
            return self.strength * binary + (1 - self.strength) * mask
        return binary


@register
class DifferentialDiffusion(Node):
    """Inpaint with the mask as a strength map: each pixel changes over its mask value's share of the schedule."""

    CATEGORY: ClassVar[str] = "_for_testing"
    RETURN_TYPES: ClassVar[tuple[str, ...]] = ("MODEL",)

    model: ModelRef = Socket("MODEL")
    # optional in ComfyUI 0.3.64: workflows exported before it existed leave it out
    strength: float = Field(1.0, ge=0.0, le=1.0, json_schema_extra={"step": 0.01, "optional": True})

    def run(self, ctx: RunContext) -> tuple[ModelRef]:
        patches = self.model.patches.replace(denoise_mask=DifferentialMask(self.strength))
        return (self.model.with_patches(patches),)
