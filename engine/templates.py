"""Params -> workflows: the graphs a ComfyUI user would draw for txt2img, img2img, inpainting and ControlNet.

The prompt arrives expanded (style, wildcards and `<lora:>` tags: bot/core/requests/prompt.py).

Node ids are fixed strings so that the same request always gives the same graph (and the
cache sees the same signatures); LoRAs are chained between the loader and everything else.
A ControlNet sits between the text encodes and the KSampler (LoadImage -> [Canny] -> ControlNetApplyAdvanced,
as ComfyUI's own ControlNet examples draw it); an inpaint masks the img2img latent with LoadImage's MASK.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

# ComfyUI's Canny defaults (comfy_extras/nodes_canny.py): what a published canny workflow uses untouched
CANNY_LOW, CANNY_HIGH = 0.4, 0.8


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
    # inpaint the init image's transparent area: LoadImage's MASK (1 where transparent) on the latent
    inpaint: bool = False
    control_image: str | None = None  # a file in the input folder, the ControlNet's hint
    controlnet: str | None = None  # a file of models/controlnet
    control_strength: float = 1.0
    control_canny: bool = False  # edge-detect the control image first (ComfyUI's Canny node, its defaults)
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
    if p.controlnet and p.control_image:
        hint = add("20", "LoadImage", image=p.control_image)
        if p.control_canny:
            hint = add("21", "Canny", image=hint, low_threshold=CANNY_LOW, high_threshold=CANNY_HIGH)
        control_net = add("22", "ControlNetLoader", control_net_name=p.controlnet)
        add("23", "ControlNetApplyAdvanced", positive=positive, negative=negative, control_net=control_net,
            image=hint, strength=p.control_strength, start_percent=0.0, end_percent=1.0)
        positive, negative = ["23", 0], ["23", 1]
    if p.init_image:
        image = add("12", "LoadImage", image=p.init_image)
        latent = add("13", "VAEEncode", pixels=image, vae=vae)
        if p.inpaint:
            # SetLatentNoiseMask, not VAEEncodeForInpaint: the latter greys the hole and fills it well only at
            # denoise 1.0, so at the img2img denoise a member sets (0.75 by default) the grey shows through.
            # The noise mask keeps their denoise meaning "how much to change" inside the hole, keeps every
            # opaque pixel as it was (masked sampling), and works on any checkpoint, inpainting-trained or not.
            latent = add("15", "SetLatentNoiseMask", samples=latent, mask=["12", 1])
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
