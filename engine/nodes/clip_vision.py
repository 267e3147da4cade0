"""CLIP vision nodes, as ComfyUI 0.3.64's nodes.py: CLIPVisionLoader (the `clip_vision` models folder),
CLIPVisionEncode and unCLIPConditioning; and what the sampler makes of an unCLIP cond, as comfy/model_base.py.

unCLIPConditioning appends `{"clip_vision_output", "strength", "noise_augmentation"}` to each cond's
"unclip_conditioning" list. At sampling, `unclip_adm` turns that list into ComfyUI's ADM vector: each image embed
noise-augmented (CLIPEmbeddingNoiseAugmentation, comfy/ldm/modules/encoders/noise_aug_modules.py: squaredcos_cap_v2
betas, level round(999 * noise_augmentation), noise seeded with the sampler's seed - 10) and joined with the
level's timestep embedding, times its strength; several are summed and augmented once more. SDXL's revision
(`sdxl_pooled`) takes its first 1280 (the pooled width) in place of the cond's pooled text embedding.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from functools import lru_cache
from typing import Any, ClassVar

import numpy as np
import torch
from pydantic import Field

from engine.models.clip_vision import encode_image, read_clip_vision
from engine.models.paths import FolderLookup, file_fingerprint
from engine.nodes.base import Choice, Node, RunContext, Socket, register
from engine.values import ClipVisionOutput, ClipVisionRef, CondItem, Conditioning, ImageBatch

__all__ = ["noise_augment", "sdxl_pooled", "unclip_adm"]

MAX_NOISE_LEVEL = 1000  # ImageConcatWithNoiseAugmentation's default, which CLIPEmbeddingNoiseAugmentation keeps
SEED_OFFSET = 10  # comfy/model_base.py: unclip_adm(..., seed=kwargs.get("seed", 0) - 10)


@register
class CLIPVisionLoader(Node):
    """Load a CLIP image encoder (clip_vision_g, clip_vision_h, ViT-L) from the clip_vision folder."""

    CATEGORY: ClassVar[str] = "loaders"
    RETURN_TYPES: ClassVar[tuple[str, ...]] = ("CLIP_VISION",)

    clip_name: str = Choice("clip_vision")

    @classmethod
    def fingerprint(cls, inputs: dict[str, Any], lookup: FolderLookup) -> str | None:
        # a file replaced under the same name must not be served from the cache
        return file_fingerprint(lookup.resolve("clip_vision", inputs["clip_name"]))

    def run(self, ctx: RunContext) -> tuple[ClipVisionRef]:
        path = ctx.models.resolve("clip_vision", self.clip_name)
        clip_vision = read_clip_vision(path, self.clip_name, ctx.device, ctx.dtype)
        ctx.meta.models.setdefault("clip_vision", {})[self.clip_name] = {"image_size": clip_vision.image_size}
        return (clip_vision,)


@register
class CLIPVisionEncode(Node):
    """Encode an image with a CLIP image encoder: center-cropped to its square input, or squeezed ("none")."""

    CATEGORY: ClassVar[str] = "conditioning"
    RETURN_TYPES: ClassVar[tuple[str, ...]] = ("CLIP_VISION_OUTPUT",)

    clip_vision: ClipVisionRef = Socket("CLIP_VISION")
    image: ImageBatch = Socket("IMAGE")
    crop: str = Choice(["center", "none"], "center")

    def run(self, ctx: RunContext) -> tuple[ClipVisionOutput]:
        return (encode_image(self.clip_vision, self.image.pixels, crop=self.crop == "center"),)


@register
class unCLIPConditioning(Node):  # noqa: N801  (ComfyUI's class_type)
    """Add an image's CLIP embedding to the conds, at a strength and a noise augmentation (unCLIP, SDXL revision)."""

    CATEGORY: ClassVar[str] = "conditioning"
    RETURN_TYPES: ClassVar[tuple[str, ...]] = ("CONDITIONING",)

    conditioning: Conditioning = Socket("CONDITIONING")
    clip_vision_output: ClipVisionOutput = Socket("CLIP_VISION_OUTPUT")
    strength: float = Field(1.0, ge=-10.0, le=10.0, json_schema_extra={"step": 0.01})
    noise_augmentation: float = Field(0.0, ge=0.0, le=1.0, json_schema_extra={"step": 0.01})

    def run(self, ctx: RunContext) -> tuple[Conditioning]:
        if self.strength == 0:  # ComfyUI hands the conds back untouched
            return (self.conditioning,)
        entry = {"clip_vision_output": self.clip_vision_output, "strength": self.strength,
                 "noise_augmentation": self.noise_augmentation}
        # conditioning_set_values(..., append=True): the list grows, one entry per unCLIPConditioning
        return (Conditioning(tuple(
            CondItem(item.embeds, item.pooled,
                     {**item.extras, "unclip_conditioning": (*item.extras.get("unclip_conditioning", ()), entry)},
                     item.report)
            for item in self.conditioning.items)),)


@lru_cache(maxsize=1)
def _schedule() -> tuple[torch.Tensor, torch.Tensor]:
    """sqrt(alphas_cumprod) and sqrt(1 - alphas_cumprod) of squaredcos_cap_v2 over 1000 steps, float32 as ComfyUI
    registers them (betas computed in float64 by betas_for_alpha_bar, capped at 0.999)."""
    def alpha_bar(t: float) -> float:
        return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

    betas = np.array([min(1 - alpha_bar((i + 1) / 1000) / alpha_bar(i / 1000), 0.999) for i in range(1000)])
    cumprod = np.cumprod(1.0 - betas)
    return (torch.tensor(np.sqrt(cumprod), dtype=torch.float32),
            torch.tensor(np.sqrt(1.0 - cumprod), dtype=torch.float32))


def _timestep_embedding(level: int, dim: int) -> torch.Tensor:
    # comfy's timestep_embedding: [cos | sin] of level * 10000^(-i/half), a zero column for an odd dim
    half = dim // 2
    freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32) / half)
    args = torch.tensor([float(level)])[:, None] * freqs[None]
    embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    return torch.cat([embedding, torch.zeros_like(embedding[:, :1])], dim=-1) if dim % 2 else embedding


def noise_augment(x: torch.Tensor, level: int, noise: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """CLIPEmbeddingNoiseAugmentation at `level`: x [1, dim] (ComfyUI's stats are mean 0, std 1) noised as q_sample,
    and the level's timestep embedding [1, dim]."""
    sqrt_alpha, sqrt_one_minus = _schedule()
    return sqrt_alpha[level] * x + sqrt_one_minus[level] * noise, _timestep_embedding(level, x.shape[-1])


def _level(noise_augmentation: float) -> int:
    return round((MAX_NOISE_LEVEL - 1) * noise_augmentation)


def unclip_adm(entries: Sequence[Mapping[str, Any]], seed: int, width: int,
               noise_augment_merge: float = 0.0) -> torch.Tensor:
    """comfy/model_base.py unclip_adm on the CPU in float32: [1, 2 * width] for a cond's unclip_conditioning list.

    `seed` is the sampler's (ComfyUI passes seed - 10 and reseeds with it for each embed, so each gets the same
    noise); a sum of several embeds is augmented again at `noise_augment_merge` with the next draw of that
    generator, as ComfyUI's unseeded randn_like takes it on the CPU."""
    seed = (seed - SEED_OFFSET) % 2**64
    noise = torch.randn((1, width), generator=torch.Generator().manual_seed(seed), dtype=torch.float32)
    outs = []
    for entry in entries:
        output: ClipVisionOutput = entry["clip_vision_output"]
        embeds = output.image_embeds.float().cpu()
        if embeds.shape[-1] != width:
            raise ValueError(f"unCLIPConditioning's image embeds are {embeds.shape[-1]} wide, but this model takes "
                             f"{width}: use the CLIP vision model it was trained with (SDXL's revision: "
                             "clip_vision_g; SD2.1 unCLIP-H: clip_vision_h; unCLIP-L: ViT-L)")
        for embed in embeds:  # one per image of the encoded batch
            noised, level_emb = noise_augment(embed[None], _level(float(entry["noise_augmentation"])), noise)
            outs.append(torch.cat([noised, level_emb], dim=1) * float(entry["strength"]))
    if len(outs) == 1:
        return outs[0]
    summed = torch.stack(outs).sum(0)
    merge_generator = torch.Generator().manual_seed(seed)
    torch.randn((1, width), generator=merge_generator)  # what the last per-embed draw took
    merge_noise = torch.randn((1, width), generator=merge_generator, dtype=torch.float32)
    noised, level_emb = noise_augment(summed[:, :width], _level(noise_augment_merge), merge_noise)
    return torch.cat([noised, level_emb], dim=1)


def sdxl_pooled(item: CondItem, seed: int, width: int) -> torch.Tensor | None:
    """The pooled vector an SDXL UNet gets for a cond, as comfy/model_base.py sdxl_pooled: with unCLIP entries (a
    revision) the first `width` columns of their ADM, else the cond's own pooled text embedding."""
    entries = item.extras.get("unclip_conditioning")
    if not entries:
        return item.pooled
    return unclip_adm(entries, seed, width)[:, :width]
