"""VAE nodes: VAEDecode and VAEEncode. LATENT values stay in the VAE's raw space, as ComfyUI keeps them."""

from __future__ import annotations

import logging
from typing import ClassVar

import torch

from engine.nodes.base import Node, RunContext, Socket, register
from engine.values import ImageBatch, Latent, VaeRef

log = logging.getLogger(__name__)


def _vae_ready(vae: VaeRef) -> torch.nn.Module:
    # SDXL's VAE overflows in fp16 (its config says force_upcast): run it in fp32, as diffusers does
    module = vae.vae
    if module.dtype == torch.float16 and getattr(module.config, "force_upcast", False):
        module.to(torch.float32)
    return module


@register
class VAEDecode(Node):
    """Decode latents into images."""

    CATEGORY: ClassVar[str] = "latent"
    RETURN_TYPES: ClassVar[tuple[str, ...]] = ("IMAGE",)

    samples: Latent = Socket("LATENT")
    vae: VaeRef = Socket("VAE")

    def run(self, ctx: RunContext) -> tuple[ImageBatch]:
        module = _vae_ready(self.vae)
        images = []
        with torch.inference_mode():
            # one item at a time: a batch of large images would need the decoder's activations times the batch
            for index, item in enumerate(self.samples.samples):
                decoded = module.decode(item[None].to(module.device, module.dtype)).sample
                if module.dtype != torch.float32 and not bool(decoded.isfinite().all()):
                    # Many SD1.x VAEs overflow in half precision now and then, giving a black image. As
                    # A1111's automatic VAE precision does, keep this VAE in fp32 from now on and decode again.
                    log.warning("the VAE gave NaN or inf in %s; it runs in float32 from now on", module.dtype)
                    module.to(torch.float32)
                    decoded = module.decode(item[None].to(module.device, module.dtype)).sample
                images.append(((decoded.float().cpu() + 1.0) / 2.0).clamp(0, 1).movedim(1, -1))
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
        module = _vae_ready(self.vae)
        pixels = self.pixels.pixels[..., :3]
        # crop to a multiple of 8, centred, as ComfyUI's vae_encode_crop_pixels
        h, w = (pixels.shape[1] // 8) * 8, (pixels.shape[2] // 8) * 8
        y, x = (pixels.shape[1] % 8) // 2, (pixels.shape[2] % 8) // 2
        pixels = pixels[:, y:y + h, x:x + w]
        latents = []
        with torch.inference_mode():
            for item in pixels:
                chw = (item.movedim(-1, 0)[None] * 2.0 - 1.0).to(module.device, module.dtype)
                # the distribution's mean, not a sample: ComfyUI's encode is deterministic
                latents.append(module.encode(chw).latent_dist.mode().float().cpu())
        return (Latent(torch.cat(latents)),)
