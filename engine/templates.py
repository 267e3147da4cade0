"""Params -> workflows: the graphs a ComfyUI user would draw for txt2img and img2img.

The prompt arrives expanded (style, wildcards and `<lora:>` tags: bot/core/requests/prompt.py).

Node ids are fixed strings so that the same request always gives the same graph (and the
cache sees the same signatures); LoRAs are chained between the loader and everything else.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any



@dataclass(frozen=True)
class LoraChoice:
    """A LoRA file with its UNet and text-encoder strengths."""

    name: str
    strength_model: float = 1.0
    strength_clip: float = 1.0


@dataclass(frozen=True)
class WorkflowParams:
    """Everything a txt2img or img2img graph needs; defaults are ComfyUI's."""

    checkpoint: str
    prompt: str
    negative: str = ""
    seed: int = 0
    steps: int = 20
    cfg: float = 8.0
    sampler_name: str = "euler"
    scheduler: str = "normal"
    width: int = 512
    height: int = 512
    batch_size: int = 1
    loras: tuple[LoraChoice, ...] = ()
    vae: str | None = None
    clip_skip: int | None = None  # ComfyUI's stop_at_clip_layer: -2 is A1111's "clip skip 2"
    init_image: str | None = None  # a file in the input folder: img2img
    denoise: float = 1.0
    filename_prefix: str = "noodle"


def build_workflow(p: WorkflowParams) -> dict[str, dict[str, Any]]:
    """The API-format workflow for `p`."""
    graph: dict[str, dict[str, Any]] = {}

    def add(node_id: str, class_type: str, **inputs: Any) -> list[Any]:
        graph[node_id] = {"class_type": class_type, "inputs": inputs}
        return [node_id, 0]

    add("4", "CheckpointLoaderSimple", ckpt_name=p.checkpoint)
    model, clip, vae = ["4", 0], ["4", 1], ["4", 2]
    for index, lora in enumerate(p.loras):
        node_id = f"lora{index + 1}"
        add(node_id, "LoraLoader", model=model, clip=clip, lora_name=lora.name,
            strength_model=lora.strength_model, strength_clip=lora.strength_clip)
        model, clip = [node_id, 0], [node_id, 1]
    if p.clip_skip is not None and p.clip_skip != -1:
        clip = add("10", "CLIPSetLastLayer", clip=clip, stop_at_clip_layer=p.clip_skip)
    if p.vae:
        vae = add("11", "VAELoader", vae_name=p.vae)
    positive = add("6", "CLIPTextEncode", text=p.prompt, clip=clip)
    negative = add("7", "CLIPTextEncode", text=p.negative, clip=clip)
    if p.init_image:
        image = add("12", "LoadImage", image=p.init_image)
        latent = add("13", "VAEEncode", pixels=image, vae=vae)
        if p.batch_size > 1:
            latent = add("14", "RepeatLatentBatch", samples=latent, amount=p.batch_size)
    else:
        latent = add("5", "EmptyLatentImage", width=p.width, height=p.height, batch_size=p.batch_size)
    sampled = add("3", "KSampler", model=model, seed=p.seed, steps=p.steps, cfg=p.cfg,
                  sampler_name=p.sampler_name, scheduler=p.scheduler, positive=positive,
                  negative=negative, latent_image=latent, denoise=p.denoise)
    images = add("8", "VAEDecode", samples=sampled, vae=vae)
    add("9", "SaveImage", images=images, filename_prefix=p.filename_prefix)
    return graph
