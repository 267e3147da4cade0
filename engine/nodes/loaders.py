"""Loader nodes: CheckpointLoaderSimple, VAELoader, LoraLoader, LoraLoaderModelOnly, CLIPSetLastLayer."""

from __future__ import annotations

from typing import Any, ClassVar

from pydantic import Field

from engine.models.paths import FolderLookup, file_fingerprint
from engine.nodes.base import Choice, Node, RunContext, Socket, register
from engine.values import ClipRef, LoraPatch, ModelRef, VaeRef


def _file_state(folder: str, name: str, lookup: FolderLookup) -> str:
    # a file replaced under the same name must not be served from the cache
    return file_fingerprint(lookup.resolve(folder, name))


@register
class CheckpointLoaderSimple(Node):
    """Load an SD1.x or SDXL checkpoint: its UNet, text encoder(s) and VAE."""

    CATEGORY: ClassVar[str] = "loaders"
    RETURN_TYPES: ClassVar[tuple[str, ...]] = ("MODEL", "CLIP", "VAE")

    ckpt_name: str = Choice("checkpoints")

    @classmethod
    def fingerprint(cls, inputs: dict[str, Any], lookup: FolderLookup) -> str | None:
        return _file_state("checkpoints", inputs["ckpt_name"], lookup)

    def run(self, ctx: RunContext) -> tuple[ModelRef, ClipRef, VaeRef]:
        loaded = ctx.models.checkpoint(self.ckpt_name)
        ctx.meta.models.setdefault("checkpoints", {})[self.ckpt_name] = {
            "hash": ctx.models.catalog.short_hash(loaded.path), "arch": loaded.arch.family}
        return (ModelRef(loaded, loaded.pipe, label=self.ckpt_name),
                ClipRef(loaded, loaded.pipe),
                VaeRef(loaded.pipe.vae, self.ckpt_name, loaded.key))


@register
class VAELoader(Node):
    """Load a standalone VAE file from the vae folder."""

    CATEGORY: ClassVar[str] = "loaders"
    RETURN_TYPES: ClassVar[tuple[str, ...]] = ("VAE",)

    vae_name: str = Choice("vae")

    @classmethod
    def fingerprint(cls, inputs: dict[str, Any], lookup: FolderLookup) -> str | None:
        return _file_state("vae", inputs["vae_name"], lookup)

    def run(self, ctx: RunContext) -> tuple[VaeRef]:
        return (VaeRef(ctx.models.vae(self.vae_name), self.vae_name),)


@register
class LoraLoader(Node):
    """Apply a LoRA to the model and the text encoder, each at its own strength."""

    CATEGORY: ClassVar[str] = "loaders"
    RETURN_TYPES: ClassVar[tuple[str, ...]] = ("MODEL", "CLIP")

    model: ModelRef = Socket("MODEL")
    clip: ClipRef = Socket("CLIP")
    lora_name: str = Choice("loras")
    strength_model: float = Field(1.0, ge=-100.0, le=100.0, json_schema_extra={"step": 0.01})
    strength_clip: float = Field(1.0, ge=-100.0, le=100.0, json_schema_extra={"step": 0.01})

    @classmethod
    def fingerprint(cls, inputs: dict[str, Any], lookup: FolderLookup) -> str | None:
        return _file_state("loras", inputs["lora_name"], lookup)

    def run(self, ctx: RunContext) -> tuple[ModelRef, ClipRef]:
        ctx.models.lora_state(self.lora_name)  # read it now: a broken file fails here, naming this node
        model, clip = self.model, self.clip
        if self.strength_model != 0:
            model = model.with_lora(LoraPatch(self.lora_name, self.strength_model))
        if self.strength_clip != 0:
            clip = ClipRef(clip.checkpoint, clip.pipe, (*clip.loras, LoraPatch(self.lora_name, self.strength_clip)),
                           clip.stop_at_layer)
        ctx.meta.models.setdefault("loras", {})[self.lora_name] = {
            "strength_model": self.strength_model, "strength_clip": self.strength_clip}
        return model, clip


@register
class LoraLoaderModelOnly(Node):
    """Apply a LoRA to the model only."""

    CATEGORY: ClassVar[str] = "loaders"
    RETURN_TYPES: ClassVar[tuple[str, ...]] = ("MODEL",)

    model: ModelRef = Socket("MODEL")
    lora_name: str = Choice("loras")
    strength_model: float = Field(1.0, ge=-100.0, le=100.0, json_schema_extra={"step": 0.01})

    @classmethod
    def fingerprint(cls, inputs: dict[str, Any], lookup: FolderLookup) -> str | None:
        return _file_state("loras", inputs["lora_name"], lookup)

    def run(self, ctx: RunContext) -> tuple[ModelRef]:
        ctx.models.lora_state(self.lora_name)
        if self.strength_model == 0:
            return (self.model,)
        ctx.meta.models.setdefault("loras", {})[self.lora_name] = {"strength_model": self.strength_model}
        return (self.model.with_lora(LoraPatch(self.lora_name, self.strength_model)),)


@register
class CLIPSetLastLayer(Node):
    """Stop the text encoder at an earlier layer ("clip skip": -2 is A1111's clip skip 2)."""

    CATEGORY: ClassVar[str] = "conditioning"
    RETURN_TYPES: ClassVar[tuple[str, ...]] = ("CLIP",)

    clip: ClipRef = Socket("CLIP")
    stop_at_clip_layer: int = Field(-1, ge=-24, le=-1, json_schema_extra={"step": 1})

    def run(self, ctx: RunContext) -> tuple[ClipRef]:
        clip = self.clip
        return (ClipRef(clip.checkpoint, clip.pipe, clip.loras, self.stop_at_clip_layer),)
