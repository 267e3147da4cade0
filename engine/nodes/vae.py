"""VAE nodes: VAEDecode, VAEEncode and VAEEncodeForInpaint. LATENT values stay in the VAE's raw space, as
ComfyUI keeps them."""

from __future__ import annotations

import logging
import math
from typing import ClassVar

import torch
import torch.nn.functional as F
from pydantic import Field

from engine.nodes.base import Node, RunContext, Socket, register
from engine.values import ImageBatch, Latent, Mask, VaeRef

log = logging.getLogger(__name__)


def vae_ready(vae: VaeRef) -> torch.nn.Module:
    """The VAE's module, moved to float32 first where its config says it overflows in half precision."""
    # SDXL's VAE overflows in fp16 (its config says force_upcast): run it in fp32, as diffusers does
    module = vae.vae
    if module.dtype == torch.float16 and getattr(module.config, "force_upcast", False):
        module.to(torch.float32)
    return module


def decode_latents(module: torch.nn.Module, latents: torch.Tensor) -> torch.Tensor:
    """Latents [1, 4, h, w] (any device) -> the decoder's output [1, 3, 8h, 8w] in -1..1, float32 on the CPU."""
    decoded = module.decode(latents.to(module.device, module.dtype)).sample
    if module.dtype != torch.float32 and not bool(decoded.isfinite().all()):
        # Many SD1.x VAEs overflow in half precision now and then, giving a black image. As
        # A1111's automatic VAE precision does, keep this VAE in fp32 from now on and decode again.
        log.warning("the VAE gave NaN or inf in %s; it runs in float32 from now on", module.dtype)
        module.to(torch.float32)
        decoded = module.decode(latents.to(module.device, module.dtype)).sample
    return decoded.float().cpu()


@register
class VAEDecode(Node):
    """Decode latents into images."""

    CATEGORY: ClassVar[str] = "latent"
    RETURN_TYPES: ClassVar[tuple[str, ...]] = ("IMAGE",)

    samples: Latent = Socket("LATENT")
    vae: VaeRef = Socket("VAE")

    def run(self, ctx: RunContext) -> tuple[ImageBatch]:
        module = vae_ready(self.vae)
        images = []
        with torch.inference_mode():
            # one item at a time: a batch of large images would need the decoder's activations times the batch
            for index, item in enumerate(self.samples.samples):
                images.append(((decode_latents(module, item[None]) + 1.0) / 2.0).clamp(0, 1).movedim(1, -1))
                ctx.progress(index + 1, len(self.samples.samples))
        return (ImageBatch(torch.cat(images)),)


@register
class VAEEncode(Node):
    """Encode images into latents (the start of image-to-image)."""

    CATEGORY: ClassVar[str] = "latent"
    RETURN_TYPES: ClassVar[tuple[str, ...]] = ("LATENT",)

    pixels: ImageBatch = Socket("IMAGE")
    vae: VaeRef = Socket("VAE")

    def run(self, ctx: RunContext) -> tuple[Latent]:
        return (Latent(encode_pixels(self.vae, self.pixels.pixels)),)


def crop_to_grid(x: torch.Tensor, h_axis: int) -> torch.Tensor:
    """The middle of `x` with sides (at h_axis, h_axis + 1) floored to a multiple of 8, as ComfyUI's
    vae_encode_crop_pixels."""
    height, width = x.shape[h_axis], x.shape[h_axis + 1]
    x = x.narrow(h_axis, (height % 8) // 2, height // 8 * 8)
    return x.narrow(h_axis + 1, (width % 8) // 2, width // 8 * 8)


def encode_pixels(vae: VaeRef, pixels: torch.Tensor) -> torch.Tensor:
    """IMAGE [B, H, W, C] -> latents [B, 4, H/8, W/8], cropped to the 8-pixel grid first, one item at a time."""
    module = vae_ready(vae)
    pixels = crop_to_grid(pixels[..., :3], h_axis=1)
    latents = []
    with torch.inference_mode():
        for item in pixels:
            chw = (item.movedim(-1, 0)[None] * 2.0 - 1.0).to(module.device, module.dtype)
            # the distribution's mean, not a sample: ComfyUI's encode is deterministic
            latents.append(module.encode(chw).latent_dist.mode().float().cpu())
    return torch.cat(latents)


def masked_pixels(pixels: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """What ComfyUI's inpaint encoders do before encoding: the mask resized (bilinear) to the image, both cropped
    to the 8-pixel grid, and the pixels under the mask (rounded) set to grey 0.5.

    Returns the greyed pixels [B, h, w, 3] and the cropped mask [Bm, 1, h, w] (not rounded).
    """
    pixels = pixels[..., :3]
    mask = mask.reshape(-1, 1, mask.shape[-2], mask.shape[-1]).float()
    if mask.shape[0] not in (1, pixels.shape[0]):
        raise ValueError(f"{mask.shape[0]} masks for {pixels.shape[0]} images; give one mask, or one per image")
    mask = F.interpolate(mask, size=pixels.shape[1:3], mode="bilinear")
    pixels, mask = crop_to_grid(pixels, h_axis=1), crop_to_grid(mask, h_axis=2)
    keep = (1.0 - mask.round())[:, 0, :, :, None]
    return (pixels - 0.5) * keep + 0.5, mask


@register
class VAEEncodeForInpaint(Node):
    """Encode an image for inpainting: the masked area goes grey, and the latent gets the (grown) mask."""

    CATEGORY: ClassVar[str] = "latent/inpaint"
    RETURN_TYPES: ClassVar[tuple[str, ...]] = ("LATENT",)

    pixels: ImageBatch = Socket("IMAGE")
    vae: VaeRef = Socket("VAE")
    mask: Mask = Socket("MASK")
    grow_mask_by: int = Field(6, ge=0, le=64, json_schema_extra={"step": 1})

    def run(self, ctx: RunContext) -> tuple[Latent]:
        greyed, mask = masked_pixels(self.pixels.pixels, self.mask.values)
        grow = self.grow_mask_by
        if grow:
            # grown by a box of grow x grow pixels so the seam falls inside the sampled area (ComfyUI's conv2d;
            # an even box gives one row and column more, cut off below)
            box = torch.ones(1, 1, grow, grow)
            mask = F.conv2d(mask.round(), box, padding=math.ceil((grow - 1) / 2)).clamp(0.0, 1.0)
        height, width = greyed.shape[1:3]
        noise_mask = mask[:, :, :height, :width].round()
        return (Latent(encode_pixels(self.vae, greyed), noise_mask=noise_mask),)
