"""InstructPix2Pix editing: ComfyUI 0.3.64's InstructPixToPixConditioning node (comfy_extras/nodes_ip2p.py), for
the 8-channel edit UNets (SD1.5 instruct-pix2pix, SDXL edit models such as CosXL Edit) that read the picture to
edit beside the latent.

The node encodes the picture to edit and puts its raw VAE latent on every cond as "concat_latent_image"; the
sampler (engine/nodes/unet_concat.py ip2p_concat: comfy/model_base.py IP2P.concat_cond) concatenates it
after the latent's 4 channels for an 8-channel UNet (zeros for a cond without one, as a DualCFGGuider's plain
negative; scaled into SDXL's space for CosXL Edit), and a 4-channel UNet never reads it (ComfyUI's concat_keys are
empty there). An inpainting (9-channel) UNet reads the same key as its masked image.
"""

from __future__ import annotations

from typing import ClassVar

import torch

from engine.nodes.base import Node, RunContext, Socket, register
from engine.nodes.vae import encode_pixels
from engine.values import Conditioning, ImageBatch, Latent, VaeRef

__all__ = ["InstructPixToPixConditioning"]


@register
class InstructPixToPixConditioning(Node):
    """Conditioning for InstructPix2Pix edit models: the picture to edit rides on both conds, and the latent to
    sample is an empty one of its size."""

    CATEGORY: ClassVar[str] = "conditioning/instructpix2pix"
    RETURN_TYPES: ClassVar[tuple[str, ...]] = ("CONDITIONING", "CONDITIONING", "LATENT")
    RETURN_NAMES: ClassVar[tuple[str, ...]] = ("positive", "negative", "latent")

    positive: Conditioning = Socket("CONDITIONING")
    negative: Conditioning = Socket("CONDITIONING")
    vae: VaeRef = Socket("VAE")
    pixels: ImageBatch = Socket("IMAGE")

    def run(self, ctx: RunContext) -> tuple[Conditioning, Conditioning, Latent]:
        # encode_pixels crops the picture to the 8-pixel grid around its middle, as the node does before encoding;
        # the raw VAE latent is stored, as ComfyUI's, and the UNet's concat scales it where the model wants it
        source = encode_pixels(self.vae, self.pixels.pixels)
        positive, negative = (cond.with_values(concat_latent_image=source) for cond in (self.positive, self.negative))
        return positive, negative, Latent(torch.zeros_like(source))
