"""ControlNet nodes with ComfyUI 0.3.64's names, inputs and math: the loaders, the apply nodes, the union type
switch, and the Canny preprocessor.

The loaders read a file from `models/controlnet/` through the model manager (engine/models/controlnet/). The
apply nodes put a ControlHint on each cond item (extras["control"]), chained to the one already there, as
ComfyUI's set_previous_controlnet does; the sampler runs the chain at every step (residuals.py).
ControlNetApplyAdvanced shares one hint object between the positive and the negative conds that had the same
previous one, as ComfyUI does; the legacy ControlNetApply marks its conds so that the sampler gives the
negative the same ControlNet (ComfyUI's control_apply_to_uncond).
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from kornia.filters import canny
from pydantic import Field

from engine.errors import UnsupportedModel
from engine.models.paths import FolderLookup, file_fingerprint
from engine.nodes.base import Choice, Node, RunContext, Socket, register
from engine.settings import Limits
from engine.values import CondItem, Conditioning, ControlHint, ControlNetRef, ImageBatch, ModelRef, VaeRef

# comfy/cldm/control_types.py UNION_CONTROLNET_TYPES, in its order
UNION_TYPES = ("openpose", "depth", "hed/pidi/scribble/ted", "canny/lineart/anime_lineart/mlsd", "normal", "segment",
               "tile", "repaint")


def _file_state(inputs: dict[str, Any], lookup: FolderLookup) -> str:
    # a file replaced under the same name must not be served from the cache
    return file_fingerprint(lookup.resolve("controlnet", inputs["control_net_name"]))


def _note(ctx: RunContext, control_net: ControlNetRef) -> None:
    ctx.meta.models.setdefault("controlnets", {})[control_net.name] = {"arch": control_net.family}


@register
class ControlNetLoader(Node):
    """Load a ControlNet (SD1.x or SDXL, original or diffusers layout) from the controlnet folder."""

    CATEGORY: ClassVar[str] = "loaders"
    RETURN_TYPES: ClassVar[tuple[str, ...]] = ("CONTROL_NET",)

    control_net_name: str = Choice("controlnet")

    @classmethod
    def fingerprint(cls, inputs: dict[str, Any], lookup: FolderLookup) -> str | None:
        return _file_state(inputs, lookup)

    def run(self, ctx: RunContext) -> tuple[ControlNetRef]:
        control_net = ctx.models.controlnet(self.control_net_name)
        _note(ctx, control_net)
        return (control_net,)


@register
class DiffControlNetLoader(Node):
    """Load a ControlNet; a diff ControlNet's weights are added to the model's, as ComfyUI does."""

    CATEGORY: ClassVar[str] = "loaders"
    RETURN_TYPES: ClassVar[tuple[str, ...]] = ("CONTROL_NET",)

    model: ModelRef = Socket("MODEL")
    control_net_name: str = Choice("controlnet")

    @classmethod
    def fingerprint(cls, inputs: dict[str, Any], lookup: FolderLookup) -> str | None:
        return _file_state(inputs, lookup)

    def run(self, ctx: RunContext) -> tuple[ControlNetRef]:
        control_net = ctx.models.controlnet(self.control_net_name, base=self.model)
        _note(ctx, control_net)
        return (control_net,)


def _hint(control_net: ControlNetRef, image: ImageBatch) -> torch.Tensor:
    """The IMAGE as ComfyUI's control_hint (image.movedim(-1, 1)), refused when its channels do not fit."""
    pixels = image.pixels
    wanted = int(control_net.module.config.conditioning_channels)
    if pixels.shape[-1] != wanted:
        raise UnsupportedModel(f"ControlNet {control_net.name!r} takes {wanted}-channel hint images and this IMAGE "
                               f"has {pixels.shape[-1]} channels")
    return pixels.movedim(-1, 1).float()


def _with_control(item: CondItem, control: ControlHint, *, to_uncond: bool) -> CondItem:
    extras = {**item.extras, "control": control, "control_apply_to_uncond": to_uncond}
    return CondItem(item.embeds, item.pooled, extras, item.report)


@register
class ControlNetApply(Node):
    """Apply a ControlNet to a conditioning (the legacy node; the sampler gives the negative the same one)."""

    CATEGORY: ClassVar[str] = "conditioning/controlnet"
    RETURN_TYPES: ClassVar[tuple[str, ...]] = ("CONDITIONING",)

    conditioning: Conditioning = Socket("CONDITIONING")
    control_net: ControlNetRef = Socket("CONTROL_NET")
    image: ImageBatch = Socket("IMAGE")
    strength: float = Field(1.0, ge=0.0, le=10.0, json_schema_extra={"step": 0.01})

    def run(self, ctx: RunContext) -> tuple[Conditioning]:
        if self.strength == 0:  # as ComfyUI: the conditioning itself, so the picture is exactly the plain one
            return (self.conditioning,)
        hint = _hint(self.control_net, self.image)
        items = tuple(_with_control(item, ControlHint(self.control_net, hint, self.strength,
                                                      previous=item.extras.get("control")), to_uncond=True)
                      for item in self.conditioning.items)
        return (Conditioning(items),)


@register
class ControlNetApplyAdvanced(Node):
    """Apply a ControlNet to the positive and negative conditioning, within a start/end percent window."""

    CATEGORY: ClassVar[str] = "conditioning/controlnet"
    RETURN_TYPES: ClassVar[tuple[str, ...]] = ("CONDITIONING", "CONDITIONING")
    RETURN_NAMES: ClassVar[tuple[str, ...]] = ("positive", "negative")

    positive: Conditioning = Socket("CONDITIONING")
    negative: Conditioning = Socket("CONDITIONING")
    control_net: ControlNetRef = Socket("CONTROL_NET")
    image: ImageBatch = Socket("IMAGE")
    strength: float = Field(1.0, ge=0.0, le=10.0, json_schema_extra={"step": 0.01})
    start_percent: float = Field(0.0, ge=0.0, le=1.0, json_schema_extra={"step": 0.001})
    end_percent: float = Field(1.0, ge=0.0, le=1.0, json_schema_extra={"step": 0.001})
    # ComfyUI hands the VAE only to ControlNets that work on latents (SD3, Flux); SD1.x and SDXL ControlNets take
    # pixels and ignore it there, as they do here
    vae: VaeRef | None = Socket("VAE", optional=True)

    def run(self, ctx: RunContext) -> tuple[Conditioning, Conditioning]:
        if self.strength == 0:
            return self.positive, self.negative
        hint = _hint(self.control_net, self.image)
        # one hint per previous ControlNet, shared by the positive and negative conds that had it (ComfyUI's cnets)
        made: dict[int, ControlHint] = {}
        out = []
        for conditioning in (self.positive, self.negative):
            items = []
            for item in conditioning.items:
                previous = item.extras.get("control")
                key = id(previous)
                if key not in made:
                    made[key] = ControlHint(self.control_net, hint, self.strength, self.start_percent,
                                            self.end_percent, previous)
                items.append(_with_control(item, made[key], to_uncond=False))
            out.append(Conditioning(tuple(items)))
        return out[0], out[1]


@register
class SetUnionControlNetType(Node):
    """Pick the control type of a ControlNet Union model (Noodle refuses union files when they load)."""

    CATEGORY: ClassVar[str] = "conditioning/controlnet"
    RETURN_TYPES: ClassVar[tuple[str, ...]] = ("CONTROL_NET",)

    control_net: ControlNetRef = Socket("CONTROL_NET")
    type: str = Choice(("auto", *UNION_TYPES))

    def run(self, ctx: RunContext) -> tuple[ControlNetRef]:
        # A union model's file is refused by the loader, so what arrives here is a plain ControlNet: ComfyUI sets
        # control_type as an extra argument that a plain ControlNet's forward takes and ignores. Same here.
        return (self.control_net,)


@register
class Canny(Node):
    """Canny edges of an image (kornia's canny, as ComfyUI uses), white on black, as an RGB image."""

    CATEGORY: ClassVar[str] = "image/preprocessors"
    RETURN_TYPES: ClassVar[tuple[str, ...]] = ("IMAGE",)

    image: ImageBatch = Socket("IMAGE")
    low_threshold: float = Field(0.4, ge=0.01, le=0.99, json_schema_extra={"step": 0.01})
    high_threshold: float = Field(0.8, ge=0.01, le=0.99, json_schema_extra={"step": 0.01})

    @classmethod
    def check_values(cls, values: dict[str, Any], limits: Limits) -> list[tuple[str, str]]:
        low, high = values.get("low_threshold", 0.4), values.get("high_threshold", 0.8)
        if low > high:  # kornia refuses it mid-run; say so before the job is queued
            return [("low_threshold", f"low_threshold {low} is above high_threshold {high}; the low threshold "
                                      "must not exceed the high one")]
        return []

    def run(self, ctx: RunContext) -> tuple[ImageBatch]:
        pixels = self.image.pixels.to(ctx.device, torch.float32).movedim(-1, 1)
        with torch.inference_mode():
            _, edges = canny(pixels, self.low_threshold, self.high_threshold)
        return (ImageBatch(edges.float().cpu().repeat(1, 3, 1, 1).movedim(1, -1)),)
