"""Block-weighted model merges: ModelMergeBlocks, ModelMergeSD1 and ModelMergeSDXL.

Each ratio is model1's share for the UNet weights whose original-layout name (`input_blocks.4.1.…`,
`middle_block.1.…`, `out.2.…`, without `diffusion_model.`) starts with the input's name; the longest
matching name wins and a weight no name matches takes the first ratio, as in ComfyUI's
ModelMergeBlocks. ModelMergeBlocks's `out` therefore also covers `output_blocks.*`.
"""

from __future__ import annotations

from typing import Any, ClassVar

from pydantic import Field, create_model

from engine.models.to_original import unet_original_namer
from engine.nodes.base import Node, RunContext, Socket, register
from engine.nodes.merging import Weigh, merge_models
from engine.values import ModelRef


def by_prefix(ratios: dict[str, float], unet: Any) -> Weigh:
    """`(ratio, 1 - ratio)` for a diffusers key of `unet`, ratio the one of the longest input name its
    original-layout name starts with (the first ratio when none does)."""
    default = next(iter(ratios.values()))
    original_name = unet_original_namer(unet)

    def weigh(key: str) -> tuple[float, float]:
        original = original_name(key)
        matches = [prefix for prefix in ratios if original.startswith(prefix)]
        ratio = ratios[max(matches, key=len)] if matches else default
        return ratio, 1.0 - ratio

    return weigh


class BlockMerge(Node):
    """Shared run of the block merges: every float input is a ratio named by a key prefix."""

    CATEGORY: ClassVar[str] = "advanced/model_merging"
    RETURN_TYPES: ClassVar[tuple[str, ...]] = ("MODEL",)

    model1: ModelRef = Socket("MODEL")
    model2: ModelRef = Socket("MODEL")

    def ratios(self) -> dict[str, float]:
        return {name: getattr(self, name) for name in type(self).model_fields if name not in ("model1", "model2")}

    def run(self, ctx: RunContext) -> tuple[ModelRef]:
        ratios = self.ratios()
        shown = ", ".join(f"{name}={value}" for name, value in ratios.items() if value != 1.0)
        label = f"{type(self).__name__}({self.model1.label}, {self.model2.label}{', ' + shown if shown else ''})"
        return (merge_models(ctx, self.model1, self.model2, by_prefix(ratios, self.model1.pipe.unet), label),)


def ratio() -> Any:
    return Field(1.0, ge=0.0, le=1.0, json_schema_extra={"step": 0.01})


@register
class ModelMergeBlocks(BlockMerge):
    """Blend two diffusion models with one ratio (model1's share) for input, middle and output blocks."""

    input: float = ratio()
    middle: float = ratio()
    out: float = ratio()


class _ModelSpecific(BlockMerge):
    CATEGORY: ClassVar[str] = "advanced/model_merging/model_specific"


def block_merge(name: str, doc: str, prefixes: list[str]) -> type[BlockMerge]:
    """A block merge whose inputs are ComfyUI's key prefixes (dotted names, so built with create_model)."""
    fields: dict[str, Any] = {prefix: (float, ratio()) for prefix in prefixes}
    return register(create_model(name, __base__=_ModelSpecific, __module__=__name__, __doc__=doc, **fields))


# SD1 names end with a dot (input_blocks.1. is not input_blocks.10.); ComfyUI's SDXL names do not
ModelMergeSD1 = block_merge(
    "ModelMergeSD1", "Blend two SD1.x models block by block: each ratio is model1's share.",
    ["time_embed.", "label_emb."] + [f"input_blocks.{i}." for i in range(12)]
    + [f"middle_block.{i}." for i in range(3)] + [f"output_blocks.{i}." for i in range(12)] + ["out."])
ModelMergeSDXL = block_merge(
    "ModelMergeSDXL", "Blend two SDXL models block by block: each ratio is model1's share.",
    ["time_embed.", "label_emb."] + [f"input_blocks.{i}" for i in range(9)]
    + [f"middle_block.{i}" for i in range(3)] + [f"output_blocks.{i}" for i in range(9)] + ["out."])
