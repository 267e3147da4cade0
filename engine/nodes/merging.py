"""Merging nodes: ModelMergeSimple, CLIPMergeSimple and CheckpointSave.

A merge builds new modules from the weights of its inputs with their LoRAs folded in, and a
pipeline that shares every other component; the loaded checkpoints stay untouched. The new
modules count in the model manager's memory budget (`ModelManager.adopt_merge`) like a checkpoint.
"""

from __future__ import annotations

import json
from typing import Any, ClassVar

import torch
from diffusers import DiffusionPipeline, ModelMixin
from pydantic import Field
from safetensors.torch import save_file

from engine.models.lora import folded_state_dict
from engine.models.to_original import text_encoders_to_original, unet_to_original, vae_to_original
from engine.nodes.base import Node, Output, RunContext, Socket, Text, register
from engine.nodes.images import save_path
from engine.values import ClipRef, ModelRef, VaeRef


def blend(first: dict[str, torch.Tensor], second: dict[str, torch.Tensor], ratio: float,
          what: str, skip: tuple[str, ...] = ()) -> dict[str, torch.Tensor]:
    """`ratio * first + (1 - ratio) * second`, key by key; both must have the same architecture."""
    if first.keys() != second.keys() or any(first[k].shape != second[k].shape for k in first):
        raise ValueError(f"cannot merge two {what}s of different architectures (e.g. SD1.5 with SDXL, or a "
                         "tiny model with a full-size one); merge models of one family")
    return {k: (v if k.endswith(skip) else v * ratio + second[k].to(v.dtype) * (1.0 - ratio))
            for k, v in first.items()}


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


@register
class ModelMergeSimple(Node):
    """Blend two diffusion models: ratio is model1's share."""

    CATEGORY: ClassVar[str] = "advanced/model_merging"
    RETURN_TYPES: ClassVar[tuple[str, ...]] = ("MODEL",)

    model1: ModelRef = Socket("MODEL")
    model2: ModelRef = Socket("MODEL")
    ratio: float = Field(1.0, ge=0.0, le=1.0, json_schema_extra={"step": 0.01})

    def run(self, ctx: RunContext) -> tuple[ModelRef]:
        with torch.inference_mode():
            first = {k: v.clone() for k, v in folded_state_dict(ctx.models.use_unet(self.model1)).items()}
            second = folded_state_dict(ctx.models.use_unet(self.model2))
            merged = blend(first, second, self.ratio, "model")
        unet = rebuilt(self.model1.pipe.unet, merged)
        label = f"merge({self.model1.label}, {self.model2.label}, {self.ratio})"
        pipe = with_components(self.model1.pipe, unet=unet)
        ctx.models.adopt_merge(pipe, [unet], self.model1.checkpoint, label)
        # the merge keeps model1's model sampling (ComfyUI clones model1, override and all)
        return (ModelRef(self.model1.checkpoint, pipe, (), label, sampling=self.model1.sampling),)


@register
class CLIPMergeSimple(Node):
    """Blend two text encoders: ratio is clip1's share."""

    CATEGORY: ClassVar[str] = "advanced/model_merging"
    RETURN_TYPES: ClassVar[tuple[str, ...]] = ("CLIP",)

    clip1: ClipRef = Socket("CLIP")
    clip2: ClipRef = Socket("CLIP")
    ratio: float = Field(1.0, ge=0.0, le=1.0, json_schema_extra={"step": 0.01})

    def run(self, ctx: RunContext) -> tuple[ClipRef]:
        encoders1 = ctx.models.use_text_encoders(self.clip1)
        states1 = [{k: v.clone() for k, v in folded_state_dict(m).items()} for m in encoders1]
        encoders2 = ctx.models.use_text_encoders(self.clip2)
        if len(encoders1) != len(encoders2):
            raise ValueError("cannot merge text encoders of SD1.x and SDXL; merge models of one family")
        replace = {}
        for attr, module, first, other in zip(("text_encoder", "text_encoder_2"), encoders1, states1, encoders2):
            # ComfyUI leaves position ids and logit scale alone
            merged = blend(first, folded_state_dict(other), self.ratio, "text encoder",
                           skip=(".position_ids", ".logit_scale"))
            replace[attr] = rebuilt(module, merged)
        pipe = with_components(self.clip1.pipe, **replace)
        label = f"clip merge({self.clip1.checkpoint.name}, {self.clip2.checkpoint.name}, {self.ratio})"
        ctx.models.adopt_merge(pipe, list(replace.values()), self.clip1.checkpoint, label)
        return (ClipRef(self.clip1.checkpoint, pipe, (), self.clip1.stop_at_layer),)


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
        save_file(cpu, str(path), metadata={"prompt": json.dumps(ctx.prompt), "noodle.family": family})
        subfolder = folder.relative_to(ctx.output_dir.resolve()).as_posix()
        return Output((), {"checkpoints": [{"filename": path.name, "subfolder": subfolder, "type": "output"}]})
