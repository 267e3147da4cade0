"""Merging nodes: ModelMergeSimple/Add/Subtract, CLIPMergeSimple/Add/Subtract and CheckpointSave.

A merge builds new modules from the weights of its inputs with their LoRAs folded in, and a
pipeline that shares every other component; the loaded checkpoints stay untouched. The new
modules count in the model manager's memory budget (`ModelManager.adopt_merge`) like a checkpoint.
"""

from __future__ import annotations

import json
from typing import Any, Callable, ClassVar

import torch
from diffusers import DiffusionPipeline, ModelMixin
from pydantic import Field

from engine.models.lora import folded_state_dict
from engine.models.to_original import text_encoders_to_original, unet_to_original, vae_to_original
from engine.nodes.base import Node, Output, RunContext, Socket, Text, register
from engine.nodes.images import save_path
from engine.safetensors_file import save_safetensors
from engine.values import ClipRef, ModelRef, VaeRef


Weigh = Callable[[str], tuple[float, float]]  # key -> (first's factor, second's factor)


def combine(first: dict[str, torch.Tensor], second: dict[str, torch.Tensor], weigh: Weigh,
            what: str, skip: tuple[str, ...] = ()) -> dict[str, torch.Tensor]:
    """`a * first + b * second`, key by key, `(a, b) = weigh(key)`; both must have the same architecture.

    This is ComfyUI's `add_patches(second, strength_patch=b, strength_model=a)` on a clone of first, and so is what
    happens to a weight whose shapes differ only in input channels (an inpainting or edit UNet's first convolution
    against a plain one's): ComfyUI scales it by a and leaves the other's out ("WEIGHT NOT MERGED"), so the merged
    model keeps first's channels.
    """
    mismatched = [k for k in first.keys() & second.keys() if first[k].shape != second[k].shape]
    if first.keys() != second.keys() or not all(_channels_only(first[k], second[k]) for k in mismatched):
        raise ValueError(f"cannot merge two {what}s of different architectures (e.g. SD1.5 with SDXL, or a "
                         "tiny model with a full-size one); merge models of one family")
    out = {}
    for key, value in first.items():
        if key.endswith(skip):
            out[key] = value
            continue
        a, b = weigh(key)
        other = second[key]
        out[key] = value * a + other.to(value.dtype) * b if other.shape == value.shape else value * a
    return out


def _channels_only(first: torch.Tensor, second: torch.Tensor) -> bool:
    """Whether two convolution weights differ only in their input channels (9- or 8-channel UNets' conv_in)."""
    return first.ndim == second.ndim == 4 and first.shape[0] == second.shape[0] and first.shape[2:] == second.shape[2:]


def blend(first: dict[str, torch.Tensor], second: dict[str, torch.Tensor], ratio: float,
          what: str, skip: tuple[str, ...] = ()) -> dict[str, torch.Tensor]:
    """`ratio * first + (1 - ratio) * second`, key by key; both must have the same architecture."""
    return combine(first, second, lambda _: (ratio, 1.0 - ratio), what, skip)


def rebuilt(module: torch.nn.Module, state: dict[str, torch.Tensor]) -> torch.nn.Module:
    """A fresh module of the same class and config holding `state` (no peft wrappers)."""
    # diffusers models are built with from_config, transformers models with their config object
    fresh = type(module).from_config(module.config) if isinstance(module, ModelMixin) else type(module)(module.config)
    fresh.load_state_dict(state, strict=True)
    return fresh.to(next(module.parameters()).device, next(module.parameters()).dtype).eval()


def with_components(pipe: DiffusionPipeline, **replace: Any) -> DiffusionPipeline:
    """A pipeline sharing `pipe`'s components except the ones given."""
    components = {**pipe.components, **replace}
    if "requires_safety_checker" in type(pipe).__init__.__code__.co_varnames:
        components["requires_safety_checker"] = False
    return type(pipe)(**components)


def merge_models(ctx: RunContext, model1: ModelRef, model2: ModelRef, weigh: Weigh, label: str) -> ModelRef:
    """A new model whose UNet is `combine` of the two UNets (LoRAs folded in), counted by the manager.

    It keeps model1's model sampling: ComfyUI clones model1, override and all.
    """
    with torch.inference_mode():
        first = {k: v.clone() for k, v in folded_state_dict(ctx.models.use_unet(model1)).items()}
        merged = combine(first, folded_state_dict(ctx.models.use_unet(model2)), weigh, "model")
    unet = rebuilt(model1.pipe.unet, merged)
    pipe = with_components(model1.pipe, unet=unet)
    ctx.models.adopt_merge(pipe, [unet], model1.checkpoint, label)
    return ModelRef(model1.checkpoint, pipe, (), label, sampling=model1.sampling)


def merge_clips(ctx: RunContext, clip1: ClipRef, clip2: ClipRef, weigh: Weigh, label: str) -> ClipRef:
    """New text encoder(s), `combine` of the two CLIPs' (LoRAs folded in), counted by the manager."""
    encoders1 = ctx.models.use_text_encoders(clip1)
    states1 = [{k: v.clone() for k, v in folded_state_dict(m).items()} for m in encoders1]
    encoders2 = ctx.models.use_text_encoders(clip2)
    if len(encoders1) != len(encoders2):
        raise ValueError("cannot merge text encoders of SD1.x and SDXL; merge models of one family")
    replace = {}
    for attr, module, first, other in zip(("text_encoder", "text_encoder_2"), encoders1, states1, encoders2):
        # ComfyUI leaves position ids and logit scale alone
        merged = combine(first, folded_state_dict(other), weigh, "text encoder",
                         skip=(".position_ids", ".logit_scale"))
        replace[attr] = rebuilt(module, merged)
    pipe = with_components(clip1.pipe, **replace)
    ctx.models.adopt_merge(pipe, list(replace.values()), clip1.checkpoint, label)
    return ClipRef(clip1.checkpoint, pipe, (), clip1.stop_at_layer)


@register
class ModelMergeSimple(Node):
    """Blend two diffusion models: ratio is model1's share."""

    CATEGORY: ClassVar[str] = "advanced/model_merging"
    RETURN_TYPES: ClassVar[tuple[str, ...]] = ("MODEL",)

    model1: ModelRef = Socket("MODEL")
    model2: ModelRef = Socket("MODEL")
    ratio: float = Field(1.0, ge=0.0, le=1.0, json_schema_extra={"step": 0.01})

    def run(self, ctx: RunContext) -> tuple[ModelRef]:
        ratio = self.ratio
        label = f"merge({self.model1.label}, {self.model2.label}, {ratio})"
        return (merge_models(ctx, self.model1, self.model2, lambda _: (ratio, 1.0 - ratio), label),)


@register
class CLIPMergeSimple(Node):
    """Blend two text encoders: ratio is clip1's share."""

    CATEGORY: ClassVar[str] = "advanced/model_merging"
    RETURN_TYPES: ClassVar[tuple[str, ...]] = ("CLIP",)

    clip1: ClipRef = Socket("CLIP")
    clip2: ClipRef = Socket("CLIP")
    ratio: float = Field(1.0, ge=0.0, le=1.0, json_schema_extra={"step": 0.01})

    def run(self, ctx: RunContext) -> tuple[ClipRef]:
        ratio = self.ratio
        label = f"clip merge({self.clip1.checkpoint.name}, {self.clip2.checkpoint.name}, {ratio})"
        return (merge_clips(ctx, self.clip1, self.clip2, lambda _: (ratio, 1.0 - ratio), label),)


@register
class ModelMergeAdd(Node):
    """model1 + model2, weight by weight."""

    CATEGORY: ClassVar[str] = "advanced/model_merging"
    RETURN_TYPES: ClassVar[tuple[str, ...]] = ("MODEL",)

    model1: ModelRef = Socket("MODEL")
    model2: ModelRef = Socket("MODEL")

    def run(self, ctx: RunContext) -> tuple[ModelRef]:
        label = f"add({self.model1.label}, {self.model2.label})"
        return (merge_models(ctx, self.model1, self.model2, lambda _: (1.0, 1.0), label),)


@register
class ModelMergeSubtract(Node):
    """multiplier * (model1 - model2), weight by weight (ComfyUI scales model1 by the multiplier too)."""

    CATEGORY: ClassVar[str] = "advanced/model_merging"
    RETURN_TYPES: ClassVar[tuple[str, ...]] = ("MODEL",)

    model1: ModelRef = Socket("MODEL")
    model2: ModelRef = Socket("MODEL")
    multiplier: float = Field(1.0, ge=-10.0, le=10.0, json_schema_extra={"step": 0.01})

    def run(self, ctx: RunContext) -> tuple[ModelRef]:
        m = self.multiplier
        label = f"subtract({self.model1.label}, {self.model2.label}, {m})"
        return (merge_models(ctx, self.model1, self.model2, lambda _: (m, -m), label),)


@register
class CLIPMergeAdd(Node):
    """clip1 + clip2, weight by weight (position ids and logit scale stay clip1's)."""

    CATEGORY: ClassVar[str] = "advanced/model_merging"
    RETURN_TYPES: ClassVar[tuple[str, ...]] = ("CLIP",)

    clip1: ClipRef = Socket("CLIP")
    clip2: ClipRef = Socket("CLIP")

    def run(self, ctx: RunContext) -> tuple[ClipRef]:
        label = f"clip add({self.clip1.checkpoint.name}, {self.clip2.checkpoint.name})"
        return (merge_clips(ctx, self.clip1, self.clip2, lambda _: (1.0, 1.0), label),)


@register
class CLIPMergeSubtract(Node):
    """multiplier * (clip1 - clip2), weight by weight (position ids and logit scale stay clip1's)."""

    CATEGORY: ClassVar[str] = "advanced/model_merging"
    RETURN_TYPES: ClassVar[tuple[str, ...]] = ("CLIP",)

    clip1: ClipRef = Socket("CLIP")
    clip2: ClipRef = Socket("CLIP")
    multiplier: float = Field(1.0, ge=-10.0, le=10.0, json_schema_extra={"step": 0.01})

    def run(self, ctx: RunContext) -> tuple[ClipRef]:
        m = self.multiplier
        label = f"clip subtract({self.clip1.checkpoint.name}, {self.clip2.checkpoint.name}, {m})"
        return (merge_clips(ctx, self.clip1, self.clip2, lambda _: (m, -m), label),)


@register
class CheckpointSave(Node):
    """Save a model, text encoder(s) and VAE as one original-layout .safetensors file."""

    CATEGORY: ClassVar[str] = "advanced/model_merging"
    OUTPUT_NODE: ClassVar[bool] = True

    model: ModelRef = Socket("MODEL")
    clip: ClipRef = Socket("CLIP")
    vae: VaeRef = Socket("VAE")
    filename_prefix: str = Text("checkpoints/ComfyUI")

    def run(self, ctx: RunContext) -> Output:
        family = self.model.arch.family
        if self.clip.arch.family != family:
            raise ValueError(f"the model is {family} but the CLIP is {self.clip.arch.family}; save one family")
        with torch.inference_mode():
            unet = rebuilt(self.model.pipe.unet, folded_state_dict(ctx.models.use_unet(self.model)))
            encoders = [rebuilt(m, folded_state_dict(m)) for m in ctx.models.use_text_encoders(self.clip)]
            tensors = {
                **unet_to_original(unet),
                **vae_to_original(self.vae.vae),
                **text_encoders_to_original(family, *encoders),
            }
        folder, stem, counter = save_path(ctx.output_dir, self.filename_prefix, suffix=".safetensors")
        path = folder / f"{stem}_{counter:05}_.safetensors"
        path.parent.mkdir(parents=True, exist_ok=True)
        cpu = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
        save_safetensors(cpu, str(path), metadata={"prompt": json.dumps(ctx.prompt), "noodle.family": family})
        subfolder = folder.relative_to(ctx.output_dir.resolve()).as_posix()
        return Output((), {"checkpoints": [{"filename": path.name, "subfolder": subfolder, "type": "output"}]})
