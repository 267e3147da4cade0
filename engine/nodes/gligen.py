"""GLIGEN nodes: GLIGENLoader (a file from the `gligen` models folder) and GLIGENTextBoxApply (a text box on each
cond), as ComfyUI 0.3.64's nodes.py; `spread_to_negative` is comfy/samplers.py process_conds' hand-over of the
positive's boxes to the negative. The model and its sampling-time hooks: engine/models/gligen.py.

Only .safetensors loads; a .pth is refused by the models catalog with how to convert it (`noodle convert`).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any, ClassVar

import torch
from pydantic import Field

from engine.models.gligen import MAX_OBJS, read_gligen
from engine.models.paths import FolderLookup, file_fingerprint
from engine.nodes.area_conditioning import has_area
from engine.nodes.base import MAX_RESOLUTION, Choice, Node, RunContext, Socket, Text, register
from engine.nodes.conditioning import clip_encoders
from engine.values import ClipRef, CondItem, Conditioning, GligenRef
from prompts.encode import encode_prompt
from prompts.errors import PromptError

__all__ = ["GLIGENLoader", "GLIGENTextBoxApply", "box_text_pooled", "spread_to_negative"]


@register
class GLIGENLoader(Node):
    """Load a GLIGEN text-box model from the gligen folder."""

    CATEGORY: ClassVar[str] = "loaders"
    RETURN_TYPES: ClassVar[tuple[str, ...]] = ("GLIGEN",)

    gligen_name: str = Choice("gligen")

    @classmethod
    def fingerprint(cls, inputs: dict[str, Any], lookup: FolderLookup) -> str | None:
        # a file replaced under the same name must not be served from the cache
        return file_fingerprint(lookup.resolve("gligen", inputs["gligen_name"]))

    def run(self, ctx: RunContext) -> tuple[GligenRef]:
        path = ctx.models.resolve("gligen", self.gligen_name)
        module = read_gligen(path, self.gligen_name).requires_grad_(False)
        ctx.meta.models.setdefault("gligen", {})[self.gligen_name] = {}
        return (GligenRef(module, self.gligen_name),)


def box_text_pooled(text: str, clip: ClipRef, ctx: RunContext) -> torch.Tensor:
    """The text's pooled CLIP output [1, D] as ComfyUI's encode_from_tokens(return_pooled="unprojected") on SD1.x:
    the first chunk's end token in the last layer through the final norm, whatever CLIPSetLastLayer says; prompt
    weights do not reach it (the end token's weight is 1)."""
    if clip.arch.family != "sd15":
        raise ValueError(f"GLIGENTextBoxApply needs an SD1.x CLIP (GLIGEN text-box models are SD1.x), not "
                         f"{clip.arch.family}")
    encoder = replace(clip_encoders(clip, ctx)[0], layer=-1, final_norm=True)
    try:
        encoded = encode_prompt(text, [encoder], embeddings=ctx.models.embeddings, weighting="comfy",
                                cache=ctx.models.prompt_cache, max_chunks=ctx.limits.max_prompt_chunks,
                                syntax=ctx.prompt_syntax)  # type: ignore[arg-type]
    except PromptError as err:
        raise PromptError(f"node {ctx.node_id}: {err}") from err
    end = 1 + encoded.report.chunk_tokens[0]  # after the start token and the first chunk's tokens
    return encoded.embeds[:, end].detach().float().cpu()


@register
class GLIGENTextBoxApply(Node):
    """Ground a text in a box of the picture: append the box to each cond's GLIGEN boxes."""

    CATEGORY: ClassVar[str] = "conditioning/gligen"
    RETURN_TYPES: ClassVar[tuple[str, ...]] = ("CONDITIONING",)

    conditioning_to: Conditioning = Socket("CONDITIONING")
    clip: ClipRef = Socket("CLIP")
    gligen_textbox_model: GligenRef = Socket("GLIGEN")
    text: str = Text(multiline=True)
    width: int = Field(64, ge=8, le=MAX_RESOLUTION, json_schema_extra={"step": 8})
    height: int = Field(64, ge=8, le=MAX_RESOLUTION, json_schema_extra={"step": 8})
    x: int = Field(0, ge=0, le=MAX_RESOLUTION, json_schema_extra={"step": 8})
    y: int = Field(0, ge=0, le=MAX_RESOLUTION, json_schema_extra={"step": 8})

    def run(self, ctx: RunContext) -> tuple[Conditioning]:
        pooled = box_text_pooled(self.text, self.clip, ctx)
        # in latent cells, ComfyUI's order: (pooled, height, width, y, x)
        box = (pooled, self.height // 8, self.width // 8, self.y // 8, self.x // 8)
        items = []
        for item in self.conditioning_to.items:
            previous = item.extras.get("gligen")
            boxes = [] if previous is None else list(previous[2])
            if len(boxes) >= MAX_OBJS:  # ComfyUI fails at sampling (an index past its 30 slots)
                raise ValueError(f"node {ctx.node_id}: a cond already has {len(boxes)} GLIGEN text boxes; GLIGEN "
                                 f"takes at most {MAX_OBJS}")
            # the model is this node's, the boxes every earlier GLIGENTextBoxApply's plus this one
            extras = {**item.extras, "gligen": ("position", self.gligen_textbox_model, [*boxes, box])}
            items.append(CondItem(item.embeds, item.pooled, extras, item.report))
        return (Conditioning(tuple(items)),)


def spread_to_negative(positive: Conditioning, negative: Conditioning) -> Conditioning:
    """process_conds' apply_empty_x_to_equal_area(positive, negative, "gligen", ...): when no negative cond
    without an area has GLIGEN boxes, the positive conds' boxes (those without an area) go to the negative conds
    without an area, the x-th positive's to negative x mod n (a later one replacing an earlier one)."""
    boxed = [item.extras["gligen"] for item in positive.items
             if not has_area(item) and item.extras.get("gligen") is not None]
    plain = [k for k, item in enumerate(negative.items) if not has_area(item)]
    if not boxed or any(negative.items[k].extras.get("gligen") is not None for k in plain) or not plain:
        return negative
    items = list(negative.items)
    for x, entry in enumerate(boxed):
        k = plain[x % len(plain)]
        source = negative.items[k]  # ComfyUI copies the original cond each time
        items[k] = CondItem(source.embeds, source.pooled, {**source.extras, "gligen": entry}, source.report)
    return Conditioning(tuple(items))
