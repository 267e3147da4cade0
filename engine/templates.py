"""Params -> workflows: the graphs a ComfyUI user would draw for txt2img, img2img, inpainting, ControlNet, and the
actions under a result: an upscale ("hires fix") and an outpaint (zoom out, pan).

The prompt arrives expanded (style, wildcards and `<lora:>` tags: bot/core/requests/prompt.py).

Node ids are fixed strings so that the same request always gives the same graph (and the
cache sees the same signatures); LoRAs are chained between the loader and everything else.
A ControlNet sits between the text encodes and the KSampler (LoadImage -> [Canny] -> ControlNetApplyAdvanced,
as ComfyUI's own ControlNet examples draw it); an inpaint masks the img2img latent with LoadImage's MASK.

An upscale (`upscale_by` > 1) loads the result's PNG and enlarges it, with an upscale model (UpscaleModelLoader +
ImageUpscaleWithModel, then ImageScale to the exact size) or in latent space (LatentUpscale), then samples it again
at a low denoise with the same prompt, seed and model. An outpaint (`outpaint`: the pads) grows the canvas with
ImagePadForOutpaint and fills the new area, on an inpainting checkpoint or by masked sampling on the same model.
`upscale_plan` and `outpaint_plan` work out the sizes within the server's limits before a graph is drawn.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

__all__ = ["CANNY_LOW", "CANNY_HIGH", "OUTPAINT_GROW_MASK", "LoraChoice", "OutpaintPlan", "UpscalePlan",
           "WorkflowParams", "build_workflow", "outpaint_plan", "upscale_plan"]

# ComfyUI's Canny defaults (comfy_extras/nodes_canny.py): what a published canny workflow uses untouched
CANNY_LOW, CANNY_HIGH = 0.4, 0.8
# ComfyUI's outpaint example (ComfyUI_examples, inpaint page) grows the pad's mask by 8 pixels in
# VAEEncodeForInpaint, so the seam between old and new pixels is sampled too
OUTPAINT_GROW_MASK = 8
# the resize method of ImageScale in the upscale and outpaint graphs: a model's 4x output scaled to a 2x request,
# or an image scaled down to fit the limits, keeps its detail best with lanczos
RESIZE_METHOD = "lanczos"
PanDirection = Literal["left", "right", "up", "down"]


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
    # an upscale of init_image to width x height (upscale_by is the factor that gives, for the card): with
    # upscale_model (a file of models/upscale_models), else in latent space with upscale_method
    upscale_by: float = 1.0
    upscale_model: str | None = None
    upscale_method: str = "nearest-exact"  # LatentUpscale's method, as ComfyUI's hires-fix example
    # the loaded image is first scaled to this size (upscale: so the model's raw output stays in the limits;
    # outpaint: so the grown canvas does)
    prescale: tuple[int, int] | None = None
    # outpaint init_image: the (left, top, right, bottom) pads, multiples of 8; width x height is the canvas
    outpaint: tuple[int, int, int, int] | None = None
    outpaint_feathering: int = 40  # ImagePadForOutpaint's default
    inpaint_checkpoint: str | None = None  # the outpaint's inpainting checkpoint; None: masked sampling on `checkpoint`

    @property
    def is_upscale(self) -> bool:
        """An upscale ("hires fix") of init_image rather than an img2img of it."""
        return bool(self.init_image) and self.upscale_by != 1.0 and self.outpaint is None

    @property
    def is_outpaint(self) -> bool:
        """An outpaint (zoom out, pan) of init_image."""
        return bool(self.init_image) and self.outpaint is not None


@dataclass(frozen=True)
class UpscalePlan:
    """The sizes of one upscale: the output (multiples of 8), and the input's size before the model, when the
    model's raw output at the image's own size would pass the limits."""

    width: int
    height: int
    prescale: tuple[int, int] | None
    factor: float  # what the output is of the input: the factor asked, or less when the limits held it


@dataclass(frozen=True)
class OutpaintPlan:
    """The sizes of one outpaint: the image's size on the canvas (prescale when it had to shrink or snap to 8),
    the pads around it and the canvas."""

    prescale: tuple[int, int] | None
    pads: tuple[int, int, int, int]  # left, top, right, bottom
    width: int
    height: int


def _fit(width: float, height: float, max_side: int, max_pixels: int) -> float:
    """The largest scale <= 1 that brings width x height within max_side and max_pixels."""
    return min(1.0, max_side / max(width, height), math.sqrt(max_pixels / (width * height)))


def _floor8(value: float) -> int:
    return max(8, int(value) // 8 * 8)


def upscale_plan(width: int, height: int, factor: float, *, model_scale: int | None, max_side: int,
                 max_pixels: int) -> UpscalePlan:
    """Upscale a width x height image by `factor`, held to max_side and max_pixels (sides multiples of 8, as the
    latent needs); `model_scale` is the upscale model's (None: the latent path, which needs no prescale)."""
    scale = factor * _fit(width * factor, height * factor, max_side, max_pixels)
    target_w, target_h = _floor8(width * scale), _floor8(height * scale)
    prescale = None
    if model_scale is not None:
        shrink = _fit(width * model_scale, height * model_scale, max_side, max_pixels)
        if shrink < 1.0:  # the model's output would pass the limits: feed it a smaller image
            prescale = (max(1, math.floor(width * shrink)), max(1, math.floor(height * shrink)))
    return UpscalePlan(target_w, target_h, prescale, round(target_w / width, 3))


def outpaint_plan(width: int, height: int, *, factor: float | None = None, direction: PanDirection | None = None,
                  max_side: int, max_pixels: int) -> OutpaintPlan:
    """Zoom out by `factor` (each side grows so the canvas is factor x the image) or pan in `direction` (half the
    image's side added there), the canvas held to max_side and max_pixels by scaling the image down first."""
    if (factor is None) == (direction is None):
        raise ValueError("outpaint_plan takes a zoom factor or a pan direction")
    grow_w, grow_h = (factor, factor) if factor is not None else \
        (1.5, 1.0) if direction in ("left", "right") else (1.0, 1.5)
    shrink = _fit(width * grow_w, height * grow_h, max_side, max_pixels)
    image_w, image_h = _floor8(width * shrink), _floor8(height * shrink)
    if factor is not None:
        pad_x, pad_y = _floor8(image_w * (factor - 1) / 2), _floor8(image_h * (factor - 1) / 2)
        pads = (pad_x, pad_y, pad_x, pad_y)
    else:
        half_w, half_h = _floor8(image_w / 2), _floor8(image_h / 2)
        pads = {"left": (half_w, 0, 0, 0), "right": (0, 0, half_w, 0), "up": (0, half_h, 0, 0),
                "down": (0, 0, 0, half_h)}[direction]  # type: ignore[index]
    prescale = None if (image_w, image_h) == (width, height) else (image_w, image_h)
    return OutpaintPlan(prescale, pads, image_w + pads[0] + pads[2], image_h + pads[1] + pads[3])


def build_workflow(p: WorkflowParams) -> dict[str, dict[str, Any]]:
    """The API-format workflow for `p`."""
    graph: dict[str, dict[str, Any]] = {}

    def add(node_id: str, class_type: str, **inputs: Any) -> list[Any]:
        graph[node_id] = {"class_type": class_type, "inputs": inputs}
        return [node_id, 0]

    if p.is_outpaint and p.inpaint_checkpoint:  # the inpainting checkpoint does all the work: it loads alone
        add("36", "CheckpointLoaderSimple", ckpt_name=p.inpaint_checkpoint)
        model, clip, vae = ["36", 0], ["36", 1], ["36", 2]
    else:
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
    if p.is_upscale:
        latent = _upscaled_latent(p, add, vae)
    elif p.is_outpaint:
        latent = _outpaint_latent(p, add, vae)
    elif p.init_image:
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


def _loaded(p: WorkflowParams, add: Any) -> list[Any]:
    image = add("12", "LoadImage", image=p.init_image)
    if p.prescale is not None:
        image = add("30", "ImageScale", image=image, upscale_method=RESIZE_METHOD, width=p.prescale[0],
                    height=p.prescale[1], crop="disabled")
    return image


def _upscaled_latent(p: WorkflowParams, add: Any, vae: list[Any]) -> list[Any]:
    """The enlarged image as a latent for the second pass ("hires fix")."""
    image = _loaded(p, add)
    if p.upscale_model:
        # the model enlarges by its own scale (a 4x model on a 2x request); ImageScale lands on the exact size
        upscaler = add("31", "UpscaleModelLoader", model_name=p.upscale_model)
        image = add("32", "ImageUpscaleWithModel", upscale_model=upscaler, image=image)
        image = add("33", "ImageScale", image=image, upscale_method=RESIZE_METHOD, width=p.width, height=p.height,
                    crop="disabled")
        return add("13", "VAEEncode", pixels=image, vae=vae)
    # ComfyUI's hires-fix example: LatentUpscale between two KSamplers; here the first pass is the parent's PNG
    latent = add("13", "VAEEncode", pixels=image, vae=vae)
    return add("34", "LatentUpscale", samples=latent, upscale_method=p.upscale_method, width=p.width,
               height=p.height, crop="disabled")


def _outpaint_latent(p: WorkflowParams, add: Any, vae: list[Any]) -> list[Any]:
    """The padded canvas as a latent whose noise mask is the new area (feathered into the old)."""
    assert p.outpaint is not None
    left, top, right, bottom = p.outpaint
    padded = add("35", "ImagePadForOutpaint", image=_loaded(p, add), left=left, top=top, right=right,
                 bottom=bottom, feathering=p.outpaint_feathering)
    if p.inpaint_checkpoint:
        # VAEEncodeForInpaint, as ComfyUI's published outpaint example draws it (ImagePadForOutpaint ->
        # VAEEncodeForInpaint on 512-inpainting-ema, denoise 1.0): the grey pad is no picture to keep, so the
        # inpainting UNet fills it from noise with the masked image beside it. InpaintModelConditioning is the
        # newer spelling for partial denoise, which an outpaint does not want.
        return add("37", "VAEEncodeForInpaint", pixels=padded, vae=vae, mask=["35", 1],
                   grow_mask_by=OUTPAINT_GROW_MASK)
    # any checkpoint: masked sampling, the old pixels kept, the pad sampled from noise at the params' denoise
    latent = add("13", "VAEEncode", pixels=padded, vae=vae)
    return add("15", "SetLatentNoiseMask", samples=latent, mask=["35", 1])
