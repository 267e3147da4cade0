"""VAE nodes: VAEDecode, VAEEncode and VAEEncodeForInpaint. LATENT values stay in the VAE's raw space, as
ComfyUI keeps them.

A picture too big to go through the VAE whole goes in tiles instead, as ComfyUI's VAE.decode / VAE.encode do on
an out-of-memory error (comfy/sd.py decode_tiled_ / encode_tiled_, with their tiles): on a GPU when its allocator
says so; on the CPU before it starts, where the picture's measured need is more than the machine has free, since
there the kernel's OOM killer would end the bot instead of an error. Only such pictures change (at the seams, by
a few levels): one that fits is decoded whole, as before.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from functools import partial
from typing import ClassVar

import torch
import torch.nn.functional as F
from pydantic import Field

from engine.device import available_ram, is_out_of_memory
from engine.heap import free_cached_memory, return_freed_memory
from engine.nodes.base import Node, RunContext, Socket, register
from engine.tiled_scale import Tile, TileFunction, averaged_passes
from engine.values import ImageBatch, Latent, Mask, VaeRef

log = logging.getLogger(__name__)

# Peak memory of a whole picture through a full-size SD VAE (diffusers' AutoencoderKL) beyond its weights, per
# pixel of the picture at float32: measured 3.85-4.05 KB to decode and 2.56-2.57 KB to encode at 512-1024 px on
# the CPU (ru_maxrss), counted here with a fifth more. A 2048x2048 decode takes 16 GiB.
DECODE_BYTES_PER_PIXEL = 4800
ENCODE_BYTES_PER_PIXEL = 3100


def decode_tiles(tile: int) -> tuple[Tile, Tile, Tile]:
    """comfy/sd.py decode_tiled_'s three passes (h x w, in its order) for tiles of `tile` latent cells."""
    return (tile * 2, tile // 2), (tile // 2, tile * 2), (tile, tile)


def encode_tiles(tile: int) -> tuple[Tile, Tile, Tile]:
    """comfy/sd.py encode_tiled_'s three passes (h x w, in its order) for tiles of `tile` pixels."""
    return (tile, tile), (tile // 2, tile * 2), (tile * 2, tile // 2)


# ComfyUI's fallback when a picture does not fit (decode_tiled_ and encode_tiled_'s defaults)
FALLBACK_DECODE_TILE, FALLBACK_DECODE_OVERLAP = 64, 16  # latent cells
FALLBACK_ENCODE_TILE, FALLBACK_ENCODE_OVERLAP = 512, 64  # pixels


def vae_compression(module: torch.nn.Module) -> int:
    """Pixels per latent cell a side: 8 for SD1.x / SD2.x / SDXL (each encoder block but the last halves)."""
    return 2 ** (len(module.config.block_out_channels) - 1)


def vae_ready(vae: VaeRef) -> torch.nn.Module:
    """The VAE's module, moved to float32 first where its config says it overflows in half precision."""
    # SDXL's VAE overflows in fp16 (its config says force_upcast): run it in fp32, as diffusers does
    module = vae.vae
    if module.dtype == torch.float16 and getattr(module.config, "force_upcast", False):
        module.to(torch.float32)
    return module


def decode_latents(module: torch.nn.Module, latents: torch.Tensor) -> torch.Tensor:
    """Latents [1, 4, h, w] (any device) -> the decoder's output [1, 3, 8h, 8w] in -1..1, float32 on the CPU.

    Latents that hold NaN or inf are refused: no precision decodes them (the old retry turned the shared VAE to
    float32 for good, and the picture stayed black)."""
    if not bool(latents.isfinite().all()):
        raise ValueError("the latent to decode holds NaN or inf: the sampler overflowed (in float16 a LoRA at a high "
                         "strength or a very high cfg does it); lower them, or set [engine] dtype to bfloat16 or "
                         "float32")
    decoded = module.decode(latents.to(module.device, module.dtype)).sample
    if module.dtype != torch.float32 and not bool(decoded.isfinite().all()):
        # Many SD1.x VAEs overflow in half precision now and then, giving a black image. As
        # A1111's automatic VAE precision does, keep this VAE in fp32 from now on and decode again.
        log.warning("the VAE gave NaN or inf in %s; it runs in float32 from now on", module.dtype)
        module.to(torch.float32)
        decoded = module.decode(latents.to(module.device, module.dtype)).sample
    return decoded.float().cpu()


def encode_piece(module: torch.nn.Module, pixels: torch.Tensor) -> torch.Tensor:
    """Pixels [1, 3, H, W] in 0..1 (on the CPU) -> the latent [1, 4, H/8, W/8], float32 on the CPU."""
    moments = module.encode((pixels * 2.0 - 1.0).to(module.device, module.dtype)).latent_dist
    return moments.mode().float().cpu()  # the distribution's mean, not a sample: ComfyUI's encode is deterministic


def fits_whole(module: torch.nn.Module, pixels: int, bytes_per_pixel: int) -> bool:
    """Whether a picture of `pixels` pixels can go through `module` whole. On a GPU it is tried, and its
    out-of-memory error says no; on the CPU the allocator would be handed memory the kernel may not have, so the
    measured need is held to the RAM free now (after this process gives back what its heap keeps)."""
    if module.device.type != "cpu":
        return True
    needed = pixels * bytes_per_pixel * module.dtype.itemsize // 4
    if needed <= available_ram():
        return True
    return_freed_memory()
    return needed <= available_ram()


def _whole_unless_out_of_memory(run: TileFunction, item: torch.Tensor, device: torch.device) -> torch.Tensor | None:
    """`run(item)`, or None after an out-of-memory error, with what that run held freed (as ComfyUI, the retry
    waits until the error, which holds the failed run's tensors, is gone)."""
    try:
        return run(item)
    except Exception as err:
        if not is_out_of_memory(err):
            raise
        log.warning("the VAE ran out of memory on a picture of %s cells: it goes in tiles (%s)",
                    "x".join(map(str, item.shape[2:])), str(err).splitlines()[0][:200])
    free_cached_memory(device)
    return None


def whole_or_tiled(items: torch.Tensor, run: TileFunction, module: torch.nn.Module, *, bytes_per_pixel: int,
                   tiles: tuple[Tile, ...], overlap: int, scale: float, out_channels: int,
                   progress: Callable[[int, int], None] = lambda value, total: None) -> torch.Tensor:
    """`items` [B, C, H, W] (on the CPU) through `run` one at a time, each whole where it fits, else as
    `averaged_passes` over `tiles`; once one picture has not fitted, the rest of the batch (the same size) goes
    in tiles too. `progress(done, total)` counts pictures, and tiles within a tiled one (a tiled decode takes
    minutes on a CPU: the progress line moves, and a cancel or the job's time limit is honoured at each tile)."""
    pixels = round(items.shape[2] * items.shape[3] * max(scale, 1) ** 2)  # a decode's output, an encode's input
    tiled = not fits_whole(module, pixels, bytes_per_pixel)
    if tiled:
        log.warning("a %s-pixel picture needs about %.1f GiB in the VAE, more than this machine has free: it goes "
                    "in tiles", f"{pixels:,}", pixels * bytes_per_pixel / 1024**3)
    results = []
    for index in range(len(items)):
        item = items[index:index + 1]
        result = None if tiled else _whole_unless_out_of_memory(run, item, module.device)
        if result is None:
            tiled = True
            result = averaged_passes(item, run, tiles, overlap, scale, out_channels,
                                     lambda done, total, index=index: progress(index * total + done,
                                                                               len(items) * total))
        results.append(result)
        progress(index + 1, len(items))
    return torch.cat(results)


def decode_pictures(module: torch.nn.Module, latents: torch.Tensor,
                    progress: Callable[[int, int], None] = lambda value, total: None) -> torch.Tensor:
    """Latents [B, 4, h, w] -> IMAGE pixels [B, 8h, 8w, 3] in 0..1 on the CPU, one picture at a time (a batch of
    large pictures would need the decoder's activations times the batch), in tiles where one does not fit."""
    with torch.inference_mode():
        decoded = whole_or_tiled(
            latents.cpu(), partial(decode_latents, module), module, bytes_per_pixel=DECODE_BYTES_PER_PIXEL,
            tiles=decode_tiles(FALLBACK_DECODE_TILE), overlap=FALLBACK_DECODE_OVERLAP,
            scale=vae_compression(module), out_channels=module.config.out_channels, progress=progress)
    return ((decoded + 1.0) / 2.0).clamp(0, 1).movedim(1, -1)


@register
class VAEDecode(Node):
    """Decode latents into images."""

    CATEGORY: ClassVar[str] = "latent"
    RETURN_TYPES: ClassVar[tuple[str, ...]] = ("IMAGE",)

    samples: Latent = Socket("LATENT")
    vae: VaeRef = Socket("VAE")

    def run(self, ctx: RunContext) -> tuple[ImageBatch]:
        return (ImageBatch(decode_pictures(vae_ready(self.vae), self.samples.samples, ctx.progress)),)


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
    """IMAGE [B, H, W, C] -> latents [B, 4, H/8, W/8], cropped to the 8-pixel grid first, one item at a time, in
    tiles where one does not fit."""
    module = vae_ready(vae)
    chw = crop_to_grid(pixels[..., :3], h_axis=1).movedim(-1, 1)
    with torch.inference_mode():
        return whole_or_tiled(
            chw, partial(encode_piece, module), module, bytes_per_pixel=ENCODE_BYTES_PER_PIXEL,
            tiles=encode_tiles(FALLBACK_ENCODE_TILE), overlap=FALLBACK_ENCODE_OVERLAP,
            scale=1 / vae_compression(module), out_channels=module.config.latent_channels)


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
