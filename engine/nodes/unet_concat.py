"""What an inpainting (9-channel) or InstructPix2Pix (8-channel) UNet gets after the latent's 4 channels, as
ComfyUI's comfy/model_base.py concat_cond builds it: the mask and the masked image's latent, or the edit source's
latent; each fitted to the latent and the batch, and cut to a cond's area (engine/nodes/area_conditioning.py).
engine/nodes/guidance.py calls `group_concats` once per set of active conds and latent shape.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

import engine.nodes.area_conditioning as areas
from engine import samplers
from engine.samplers.loop import resize_noise_mask
from engine.samplers.model_sampling import ContinuousEDM
from engine.values import CondItem

__all__ = ["IP2P_SDXL_SCALE", "InpaintSource", "group_concats", "inpaint_concat", "ip2p_concat", "ip2p_scale"]


@dataclass(frozen=True)
class InpaintSource:
    """What an inpainting UNet's extra channels fall back to where the conds carry no `concat_latent_image` /
    `concat_mask` (InpaintModelConditioning's): the sampler's latent in the model's scaled space and its noise
    mask, as ComfyUI hands `latent_image` and `denoise_mask` to concat_cond; `scale` is the VAE's scaling factor,
    which brings a cond's raw `concat_latent_image` into that space (ComfyUI's process_latent_in)."""

    latent: torch.Tensor
    noise_mask: torch.Tensor | None
    scale: float


# comfy/model_base.py set_inpaint's blank_inpaint_image_like: a black picture's latent, per channel (SD1.x and
# SDXL alike), for an inpainting model sampled without any mask
_BLANK_LATENT = (0.8223, -0.6876, 0.6364, 0.1380)


def _to_batch(tensor: torch.Tensor, batch: int) -> torch.Tensor:
    """comfy/utils.py resize_to_batch_size: pick rows spread evenly over the batch (not a repeat of the whole)."""
    have = tensor.shape[0]
    if have == batch:
        return tensor
    if batch <= 1:
        return tensor[:batch]
    if batch < have:
        rows = [min(round(i * (have - 1) / (batch - 1)), have - 1) for i in range(batch)]
    else:
        rows = [min(math.floor((i + 0.5) * have / batch), have - 1) for i in range(batch)]
    return tensor[rows]


def _fit(tensor: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """comfy.utils.common_upscale(..., "bilinear", "center"), as concat_cond resizes both parts to the latent: cut
    round((side - side * ratio) / 2) from both ends of the side that is too long, then resize."""
    old_h, old_w = tensor.shape[-2:]
    if (old_h, old_w) == (height, width):
        return tensor
    old_aspect, new_aspect = old_w / old_h, width / height
    x = round((old_w - old_w * (new_aspect / old_aspect)) / 2) if old_aspect > new_aspect else 0
    y = round((old_h - old_h * (old_aspect / new_aspect)) / 2) if old_aspect < new_aspect else 0
    cropped = tensor.narrow(-2, y, old_h - 2 * y).narrow(-1, x, old_w - 2 * x)
    return F.interpolate(cropped, size=(height, width), mode="bilinear")


def inpaint_concat(item: CondItem, latent: torch.Tensor, noise_mask: torch.Tensor | None,
                   scale: float) -> torch.Tensor:
    """An inpainting UNet's extra input for one cond over latents [b, 4, h, w] (scaled): [b, 5, h, w], the mask
    then the masked image's latent, as comfy/model_base.py concat_cond with concat_keys ("mask", "masked_image").

    The mask is the cond's `concat_mask`, else the latent's noise mask; it is resized to the latent, rounded and
    fitted to the batch. The masked image is the cond's `concat_latent_image` (scaled here), else the latent
    itself. Without any mask the mask is all ones and the image a black picture's latent, whatever else is given.
    """
    batch, _, height, width = latent.shape
    mask = item.extras.get("concat_mask")
    if mask is None and noise_mask is not None:
        mask = resize_noise_mask(noise_mask, latent.shape)  # the sampler's denoise_mask (reshape_mask)
    if mask is None:
        blank = torch.tensor(_BLANK_LATENT, dtype=torch.float32).view(1, 4, 1, 1).expand(batch, 4, height, width)
        return torch.cat([torch.ones(batch, 1, height, width), blank], dim=1)
    mask = mask.float()
    if mask.ndim == latent.ndim:
        mask = mask[:, :1]
    mask = _to_batch(_fit(mask.reshape(-1, 1, *mask.shape[-2:]), height, width).round(), batch)
    image = item.extras.get("concat_latent_image")
    image = latent.float() if image is None else image.float() * scale
    image = _to_batch(_fit(image, height, width), batch)
    return torch.cat([mask.to(image.device), image], dim=1)


# comfy/latent_formats.py SDXL.scale_factor: what SDXL_instructpix2pix.process_ip2p_image_in multiplies by
IP2P_SDXL_SCALE = 0.13025


def ip2p_scale(sdxl: bool, sampling: samplers.ModelSampling) -> float:
    """process_ip2p_image_in's factor: SDXL's scale for CosXL Edit (an SDXL edit model sampled as v-prediction on a
    continuous EDM range, ComfyUI's V_PREDICTION_EDM), else 1 (instruct-pix2pix and diffusers' SDXL edit models take
    the raw VAE latent). ComfyUI reads the checkpoint's own model type; this, the MODEL's sampling, is the
    checkpoint's (engine/models/detect.py, `edm_vpred.*` keys) unless a ModelSampling* node replaced it."""
    edm_v = isinstance(sampling, ContinuousEDM) and sampling.prediction == "v_prediction"
    return IP2P_SDXL_SCALE if sdxl and edm_v else 1.0


def ip2p_concat(item: CondItem, latent_shape: Sequence[int], scale: float) -> torch.Tensor:
    """An 8-channel edit UNet's extra input for one cond over latents of `latent_shape` [b, 4, h, w], as
    comfy/model_base.py IP2P.concat_cond: the cond's `concat_latent_image` (InstructPixToPixConditioning's, raw)
    fitted to the latent and the batch, times `scale` (`ip2p_scale`); zeros where the cond has none."""
    batch, channels, height, width = latent_shape
    image = item.extras.get("concat_latent_image")
    if image is None:
        return torch.zeros(batch, channels, height, width)
    return _to_batch(_fit(image.float().cpu(), height, width), batch) * scale


def group_concats(groups: Sequence[Sequence[CondItem]], counts: Sequence[int], x: torch.Tensor,
                   inpaint: InpaintSource | None,
                   regions: Sequence[Sequence[areas.Region | None]] | None = None,
                   edit_scale: float | None = None) -> torch.Tensor:
    """Every cond item's inpaint concat over its group's latents, in the UNet batch's order (item-major per group),
    cut to the item's area as ComfyUI's CONDNoiseShape.process_cond; with `edit_scale`, an InstructPix2Pix UNet's
    `ip2p_concat` at that scale (it reads neither the latent nor its mask)."""
    if edit_scale is not None:
        parts = []
        for group, (items, batch) in enumerate(zip(groups, counts)):
            parts += [areas.crop(ip2p_concat(item, (batch, *x.shape[1:]), edit_scale),
                                 None if regions is None else regions[group][k]) for k, item in enumerate(items)]
        return torch.cat(parts)
    if inpaint is None:  # a caller that knows no latent: only the no-mask case can be built
        if any("concat_mask" in item.extras for items in groups for item in items):
            raise ValueError("an inpainting UNet with a concat_mask needs the sampler's latent (InpaintSource)")
        latent, mask = torch.zeros(x.shape), None
    else:
        latent, mask = inpaint.latent.float().cpu(), inpaint.noise_mask
    if mask is not None:
        mask = resize_noise_mask(mask.cpu(), latent.shape)  # over the whole batch first, as ComfyUI's denoise_mask
    parts, offset = [], 0
    for group, (items, batch) in enumerate(zip(groups, counts)):
        rows = slice(offset, offset + batch)
        offset += batch
        parts += [areas.crop(inpaint_concat(item, latent[rows], None if mask is None else mask[rows],
                                            1.0 if inpaint is None else inpaint.scale),
                             None if regions is None else regions[group][k]) for k, item in enumerate(items)]
    return torch.cat(parts)
