"""The node catalog as ComfyUI's `/object_info`: one entry per class_type, in the shape of ComfyUI 0.3.64's
`server.py` `node_info`, so a ComfyUI front end pointed at it draws our nodes.

Each input is ComfyUI's `[TYPE, {options}]`, or `[[choices...], {options}]` for a COMBO; COMBO inputs declared
with a folder list that folder's current files through `choices_for` (the model manager's `choices`, as
validation uses).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from engine.data import comfyui_node
from engine.nodes.base import InputSpec, Node

__all__ = ["DISPLAY_NAMES", "HIDDEN_INPUTS", "WIDGET_KEYS", "input_entry", "node_info", "object_info"]

# ComfyUI's NODE_DISPLAY_NAME_MAPPINGS (nodes.py, comfy_extras) for the nodes we have; others show their class_type.
# ("ConditioningAverage " is keyed with a trailing space there, so ComfyUI shows the class_type for it too.)
DISPLAY_NAMES: dict[str, str] = {
    "KSampler": "KSampler", "KSamplerAdvanced": "KSampler (Advanced)",
    "CheckpointLoaderSimple": "Load Checkpoint", "VAELoader": "Load VAE", "LoraLoader": "Load LoRA",
    "ControlNetLoader": "Load ControlNet Model", "DiffControlNetLoader": "Load ControlNet Model (diff)",
    "CLIPTextEncode": "CLIP Text Encode (Prompt)", "CLIPSetLastLayer": "CLIP Set Last Layer",
    "ConditioningCombine": "Conditioning (Combine)", "ConditioningConcat": "Conditioning (Concat)",
    "ControlNetApply": "Apply ControlNet (OLD)", "ControlNetApplyAdvanced": "Apply ControlNet",
    "VAEEncodeForInpaint": "VAE Encode (for Inpainting)", "SetLatentNoiseMask": "Set Latent Noise Mask",
    "VAEDecode": "VAE Decode", "VAEEncode": "VAE Encode", "LatentRotate": "Rotate Latent",
    "VAEDecodeTiled": "VAE Decode (Tiled)", "VAEEncodeTiled": "VAE Encode (Tiled)",
    "LatentFlip": "Flip Latent", "LatentCrop": "Crop Latent", "EmptyLatentImage": "Empty Latent Image",
    "LatentUpscale": "Upscale Latent", "LatentUpscaleBy": "Upscale Latent By", "LatentComposite": "Latent Composite",
    "LatentBlend": "Latent Blend", "LatentFromBatch": "Latent From Batch", "RepeatLatentBatch": "Repeat Latent Batch",
    "SaveImage": "Save Image", "PreviewImage": "Preview Image", "LoadImage": "Load Image",
    "LoadImageMask": "Load Image (as Mask)", "ImageScale": "Upscale Image", "ImageScaleBy": "Upscale Image By",
    "ImageInvert": "Invert Image", "ImagePadForOutpaint": "Pad Image for Outpainting", "ImageBatch": "Batch Images",
    "ImageCrop": "Image Crop", "ImageBlend": "Image Blend", "ImageBlur": "Image Blur",
    "ImageSharpen": "Image Sharpen", "ImageScaleToTotalPixels": "Scale Image to Total Pixels",
    "CheckpointSave": "Save Checkpoint",
    "ConditioningSetArea": "Conditioning (Set Area)",
    "ConditioningSetAreaPercentage": "Conditioning (Set Area with Percentage)",
    "ConditioningSetMask": "Conditioning (Set Mask)", "DifferentialDiffusion": "Differential Diffusion",
    "SelfAttentionGuidance": "Self-Attention Guidance", "UpscaleModelLoader": "Load Upscale Model",
    "ImageUpscaleWithModel": "Upscale Image (using Model)",
    "SamplerEulerAncestralCFGPP": "SamplerEulerAncestralCFG++",
    "CLIPVisionLoader": "Load CLIP Vision", "CLIPVisionEncode": "CLIP Vision Encode",
}

# The hidden inputs ComfyUI declares on these nodes; the engine fills the same values itself.
_PROMPT_AND_PNGINFO = {"prompt": "PROMPT", "extra_pnginfo": "EXTRA_PNGINFO"}
HIDDEN_INPUTS: dict[str, dict[str, str]] = {
    "SaveImage": _PROMPT_AND_PNGINFO, "PreviewImage": _PROMPT_AND_PNGINFO, "SaveLatent": _PROMPT_AND_PNGINFO,
    "CheckpointSave": _PROMPT_AND_PNGINFO,
}

# Widget options ComfyUI's front end reads off an input, passed on from a field's json_schema_extra: the seed's
# "control after generate" box and a float's rounding.
WIDGET_KEYS = ("control_after_generate", "round")


def input_entry(spec: InputSpec, choices: Sequence[str] | None = None,
                extra: Mapping[str, Any] | None = None) -> list[Any]:
    """One input as ComfyUI writes it: `["INT", {"default": 20, "min": 1, "max": 10000}]`, `["MODEL"]`,
    or `[["euler", ...], {"default": "euler"}]`."""
    options: dict[str, Any] = {}
    if spec.type == "COMBO":
        head: Any = list(choices if choices is not None else spec.choices or ())
        if spec.default is not None:
            options["default"] = spec.default
        if spec.choices_from == "input":  # LoadImage's upload button
            options["image_upload"] = True
    elif spec.is_socket:
        head = spec.type
    else:
        head = spec.type
        if spec.default is not None:
            options["default"] = spec.default
        for key in ("min", "max", "step"):
            if getattr(spec, key) is not None:
                options[key] = getattr(spec, key)
        if spec.multiline:  # our multiline inputs are prompt boxes, which ComfyUI marks for dynamic prompts
            options["multiline"] = True
            options["dynamicPrompts"] = True
    options.update(extra or {})
    if spec.description:
        options["tooltip"] = spec.description
    return [head, options] if options or spec.type == "COMBO" else [head]


def _widget_options(cls: type[Node], field: str) -> dict[str, Any]:
    extra = cls.model_fields[field].json_schema_extra
    return {key: extra[key] for key in WIDGET_KEYS if key in extra} if isinstance(extra, dict) else {}


def node_info(name: str, cls: type[Node], choices_for: Callable[[str], Sequence[str]]) -> dict[str, Any]:
    """One class_type's entry of `/object_info`; `choices_for(folder)` lists a folder-backed COMBO's options."""
    inputs: dict[str, dict[str, Any]] = {"required": {}}
    for spec in cls.input_specs():
        listed = list(choices_for(spec.choices_from)) if spec.choices_from else None
        inputs.setdefault("required" if spec.required else "optional", {})[spec.name] = input_entry(
            spec, listed, _widget_options(cls, spec.name))
    hidden = HIDDEN_INPUTS.get(name)
    if hidden:
        inputs["hidden"] = dict(hidden)
    outputs = list(cls.RETURN_TYPES)
    doc = (cls.__doc__ or "").strip()
    return {
        "input": inputs,
        "input_order": {section: list(entries) for section, entries in inputs.items()},
        "output": outputs,
        "output_is_list": [False] * len(outputs),
        "output_name": list(cls.RETURN_NAMES or outputs),
        "name": name,
        "display_name": DISPLAY_NAMES.get(name, name),
        "description": cls.DESCRIPTION or (doc.splitlines()[0] if doc else ""),
        # ComfyUI's own module for the built-in node ours stands in for ("nodes", "comfy_extras.nodes_mask")
        "python_module": _python_module(name),
        "category": cls.CATEGORY or "sd",
        "output_node": bool(cls.OUTPUT_NODE),
        "deprecated": False,
        "experimental": False,
        "api_node": False,
    }


def _python_module(name: str) -> str:
    stock = comfyui_node(name)
    return stock.python_module if stock is not None else "nodes"


def object_info(registry: Mapping[str, type[Node]],
                choices_for: Callable[[str], Sequence[str]]) -> dict[str, dict[str, Any]]:
    """Every registered node by class_type, sorted by name; each folder is listed once."""
    listings: dict[str, list[str]] = {}

    def listed_once(folder: str) -> list[str]:
        if folder not in listings:
            listings[folder] = list(choices_for(folder))
        return listings[folder]

    return {name: node_info(name, registry[name], listed_once) for name in sorted(registry)}
