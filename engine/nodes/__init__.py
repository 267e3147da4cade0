"""The node catalog: importing the families registers every node class in `Node.registry`."""

from __future__ import annotations

from engine.nodes.base import Node


def catalog() -> dict[str, type[Node]]:
    """Every registered node class by ComfyUI class_type."""
    from engine.nodes import image_ops, latent_ops  # noqa: F401
    from engine.nodes import area_conditioning  # noqa: F401
    from engine.nodes import custom_sampling  # noqa: F401
    from engine.nodes import dual_cfg, guidance_patches  # noqa: F401
    from engine.nodes import sampler_nodes  # noqa: F401
    from engine.nodes import sigma_nodes  # noqa: F401
    from engine.nodes import merging_blocks  # noqa: F401
    from engine.nodes import differential_diffusion, hypernetwork, unet_patches  # noqa: F401
    from engine.nodes import gligen  # noqa: F401
    from engine.nodes import clip_vision  # noqa: F401
    from engine.nodes import instruct_pix2pix  # noqa: F401
    from engine.nodes import vae_tiled  # noqa: F401
    from engine.nodes import (conditioning, controlnet, images, latents, loaders, masks, merging,  # noqa: F401
                              model_sampling, sampling, upscale, vae)

    return Node.registry
