"""Area conditioning: ConditioningSetArea, ConditioningSetAreaPercentage, ConditioningSetAreaStrength and
ConditioningSetMask, and how the sampler reads what they set, as ComfyUI 0.3.64 (nodes.py; comfy/samplers.py).

The nodes put ComfyUI's keys on each cond's extras: "area" as (height, width, y, x) in latent cells, or
("percentage", height, width, y, x) in fractions of the latent; "strength"; "mask" [B, H, W] with "mask_strength"
and "set_area_to_bounds" ("mask bounds"). engine/nodes/guidance.py guided_eps reads them at sampling time, on the
latent being sampled:
- `resolved_area`: percentages become cells (resolve_areas_and_cond_masks_multidim: round, a side at least 1
  cell); with "mask bounds" the area is the box around the mask resized to the latent, at least 8 cells a side;
- `with_opposite_areas`: an area cond on one side gets a twin on the other side, with the text of the smallest
  cond there that holds its area (create_cond_with_same_area_if_none), so guidance inside an area compares like
  with like;
- `region`: where a cond's prediction counts and with what weight (get_area_and_mult). An area is cut to the
  latent; the cond sees only that crop. Its weight `mult` is strength x the mask x mask_strength, or, without a
  mask, strength x a ramp over the cells next to each edge of the area that is not the latent's border (up to 8
  cells, a quarter of the side at most), so areas blend into what is around them;
- `weighted_mean`: calc_cond_batch's out_cond += output * mult, out_count += mult, out_cond / out_count over each
  side's conds; where no cond counts (count 0) ComfyUI's estimate is a denoised 0;
- `spread_outside_areas`: the legacy ControlNetApply's ControlNet reaches the negative from, and onto, conds
  without an area only (apply_empty_x_to_equal_area).
guided_eps batches conds by the shape they see, as ComfyUI; an area cond's ControlNet runs on its crop with the
whole hint center-cropped and resized to it (ComfyUI's get_control), and an inpainting UNet's concat is cut to it
(CONDNoiseShape). An area costs at most its latent: it is cut to the latent before the UNet sees it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from pydantic import Field

from engine.models.controlnet.residuals import spread_to_uncond
from engine.nodes.base import MAX_RESOLUTION, Choice, Node, RunContext, Socket, register
from engine.values import CondItem, Conditioning, Mask

__all__ = ["Region", "crop", "has_area", "region", "resolved_area", "spread_outside_areas",
           "weighted_mean", "with_opposite_areas"]

# the extras ComfyUI turns into model_conds (SDXL's size embedding, an inpainting UNet's concat): a twin takes
# these from the cond whose text it carries, everything else from the cond whose area it copies
_MODEL_COND_KEYS = ("width", "height", "crop_w", "crop_h", "target_width", "target_height", "concat_latent_image",
                    "concat_mask")
_FEATHER = 8  # get_area_and_mult's fuzz, in latent cells
_MIN_BOUNDS = 8  # "mask bounds": an area at least this many cells a side

Box = tuple[int, int, int, int]  # (height, width, y, x) in latent cells, ComfyUI's area order


@register
class ConditioningSetArea(Node):
    """Let the conds guide only a rectangle of the picture (in pixels, on the latent's 8-pixel grid)."""

    CATEGORY: ClassVar[str] = "conditioning"
    RETURN_TYPES: ClassVar[tuple[str, ...]] = ("CONDITIONING",)

    conditioning: Conditioning = Socket("CONDITIONING")
    width: int = Field(64, ge=64, le=MAX_RESOLUTION, json_schema_extra={"step": 8})
    height: int = Field(64, ge=64, le=MAX_RESOLUTION, json_schema_extra={"step": 8})
    x: int = Field(0, ge=0, le=MAX_RESOLUTION, json_schema_extra={"step": 8})
    y: int = Field(0, ge=0, le=MAX_RESOLUTION, json_schema_extra={"step": 8})
    strength: float = Field(1.0, ge=0.0, le=10.0, json_schema_extra={"step": 0.01})

    def run(self, ctx: RunContext) -> tuple[Conditioning]:
        area = (self.height // 8, self.width // 8, self.y // 8, self.x // 8)
        return (self.conditioning.with_values(area=area, strength=self.strength, set_area_to_bounds=False),)


@register
class ConditioningSetAreaPercentage(Node):
    """ConditioningSetArea in fractions of the picture, resolved against the latent when it is sampled."""

    CATEGORY: ClassVar[str] = "conditioning"
    RETURN_TYPES: ClassVar[tuple[str, ...]] = ("CONDITIONING",)

    conditioning: Conditioning = Socket("CONDITIONING")
    width: float = Field(1.0, ge=0.0, le=1.0, json_schema_extra={"step": 0.01})
    height: float = Field(1.0, ge=0.0, le=1.0, json_schema_extra={"step": 0.01})
    x: float = Field(0.0, ge=0.0, le=1.0, json_schema_extra={"step": 0.01})
    y: float = Field(0.0, ge=0.0, le=1.0, json_schema_extra={"step": 0.01})
    strength: float = Field(1.0, ge=0.0, le=10.0, json_schema_extra={"step": 0.01})

    def run(self, ctx: RunContext) -> tuple[Conditioning]:
        area = ("percentage", self.height, self.width, self.y, self.x)
        return (self.conditioning.with_values(area=area, strength=self.strength, set_area_to_bounds=False),)


@register
class ConditioningSetAreaStrength(Node):
    """Weigh the conds' predictions by `strength` where they count (the area, or the whole picture)."""

    CATEGORY: ClassVar[str] = "conditioning"
    RETURN_TYPES: ClassVar[tuple[str, ...]] = ("CONDITIONING",)

    conditioning: Conditioning = Socket("CONDITIONING")
    strength: float = Field(1.0, ge=0.0, le=10.0, json_schema_extra={"step": 0.01})

    def run(self, ctx: RunContext) -> tuple[Conditioning]:
        return (self.conditioning.with_values(strength=self.strength),)


@register
class ConditioningSetMask(Node):
    """Let the conds guide where the mask is, weighed by it; "mask bounds" also crops them to the mask's box."""

    CATEGORY: ClassVar[str] = "conditioning"
    RETURN_TYPES: ClassVar[tuple[str, ...]] = ("CONDITIONING",)

    conditioning: Conditioning = Socket("CONDITIONING")
    mask: Mask = Socket("MASK")
    strength: float = Field(1.0, ge=0.0, le=10.0, json_schema_extra={"step": 0.01})
    set_cond_area: str = Choice(("default", "mask bounds"))

    def run(self, ctx: RunContext) -> tuple[Conditioning]:
        mask = self.mask.values.float()
        if mask.ndim < 3:
            mask = mask.unsqueeze(0)
        return (self.conditioning.with_values(mask=mask, set_area_to_bounds=self.set_cond_area != "default",
                      mask_strength=self.strength),)


# -- at sampling time ---------------------------------------------------------------------------------------------


def has_area(item: CondItem) -> bool:
    """Whether ComfyUI gives the cond an "area" once resolved (its own, or its mask's bounds)."""
    extras = item.extras
    return extras.get("area") is not None or (extras.get("mask") is not None
                                              and bool(extras.get("set_area_to_bounds", False)))


def _latent_mask(item: CondItem, height: int, width: int) -> torch.Tensor:
    """The cond's mask [B, height, width], resized bilinearly to the latent (common_upscale, crop "none")."""
    mask = item.extras["mask"].float().cpu()
    if mask.ndim == 2:
        mask = mask.unsqueeze(0)
    if mask.ndim != 3:
        raise ValueError(f"a cond's mask has shape {list(mask.shape)}; ConditioningSetMask takes a MASK [B, H, W]")
    if tuple(mask.shape[1:]) != (height, width):
        mask = F.interpolate(mask.unsqueeze(1), size=(height, width), mode="bilinear").squeeze(1)
    return mask


def resolved_area(item: CondItem, height: int, width: int) -> Box | None:
    """The cond's area in cells on a latent of height x width cells, before it is cut to the latent; None: none."""
    extras = item.extras
    if extras.get("mask") is not None and extras.get("set_area_to_bounds", False):
        bounds = _latent_mask(item, height, width).abs().amax(dim=0)
        where = torch.nonzero(bounds)
        if where.numel() == 0:  # an empty mask: ComfyUI's smallest area, a no-op with a zero mask
            return (_MIN_BOUNDS, _MIN_BOUNDS, 0, 0)
        (top, left), (bottom, right) = where.amin(dim=0).tolist(), where.amax(dim=0).tolist()
        return (max(_MIN_BOUNDS, bottom - top + 1), max(_MIN_BOUNDS, right - left + 1), top, left)
    area = extras.get("area")
    if area is None:
        return None
    if len(area) == 5 and area[0] == "percentage":
        h, w, y, x = (float(v) for v in area[1:])
        # Python's round, as ComfyUI's (half to even)
        return (max(1, round(h * height)), max(1, round(w * width)), round(y * height), round(x * width))
    if len(area) != 4:
        raise ValueError(f"a cond's area {area!r} is not (height, width, y, x) in latent cells nor "
                         "('percentage', height, width, y, x); set it with ConditioningSetArea")
    return tuple(int(v) for v in area)  # type: ignore[return-value]


@dataclass(frozen=True)
class Region:
    """Where one cond's prediction counts: `box` on the latent (None: all of it) and `mult` [1 or B, 1, h, w],
    the weight of its prediction over that box."""

    box: Box | None
    mult: torch.Tensor


def region(item: CondItem, height: int, width: int, batch: int,
           device: torch.device | None = None) -> Region | None:
    """get_area_and_mult for a cond guiding `batch` latents of height x width cells; None for a plain cond (no
    area, mask or strength other than 1), whose prediction counts 1 everywhere. The mult is made on the host
    and put on `device` (the latents') once, so the steps that weigh by it copy nothing."""
    found = _region(item, height, width, batch)
    return found if found is None or device is None else Region(found.box, found.mult.to(device))


def _region(item: CondItem, height: int, width: int, batch: int) -> Region | None:
    extras = item.extras
    strength = float(extras.get("strength", 1.0))
    if extras.get("area") is None and extras.get("mask") is None and strength == 1.0:
        return None
    area = resolved_area(item, height, width)
    box = None
    if area is not None:
        h, w, y, x = area
        if y >= height or x >= width:
            raise ValueError(f"a cond's area starts at x {x * 8}, y {y * 8} (pixels), outside the {width * 8}x"
                             f"{height * 8} picture being sampled: give ConditioningSetArea an x and y inside it")
        box = (min(height - y, h), min(width - x, w), y, x)  # cut to the latent, as ComfyUI
    if extras.get("mask") is not None:
        mask = _latent_mask(item, height, width)[:batch]
        if box is not None:
            mask = _crop(mask.unsqueeze(1), box).squeeze(1)
        mask = mask * float(extras.get("mask_strength", 1.0))
        if batch % mask.shape[0]:
            raise ValueError(f"a cond's mask holds {mask.shape[0]} masks for {batch} latents; give one mask, or as "
                             "many as the latents (or a number that divides it)")
        mult = mask.repeat(batch // mask.shape[0], 1, 1).unsqueeze(1) * strength  # tiled over the batch
        return Region(box, mult)
    rows, cols = (box[0], box[1]) if box is not None else (height, width)
    mult = torch.ones((1, 1, rows, cols)) * strength
    if box is not None:
        _feather(mult, box, height, width)
    return Region(box, mult)


def _feather(mult: torch.Tensor, box: Box, height: int, width: int) -> None:
    """Ramp `mult` (in place) over the cells next to each edge of the box that is not the latent's border."""
    h, w, y, x = box
    for dim, size, offset, side in ((2, h, y, height), (3, w, x, width)):
        ramp = min(_FEATHER, mult.shape[dim] // 4)
        if offset != 0:
            for t in range(ramp):
                mult.narrow(dim, t, 1).mul_((1.0 / ramp) * (t + 1))
        if size + offset < side:
            for t in range(ramp):
                mult.narrow(dim, size - 1 - t, 1).mul_((1.0 / ramp) * (t + 1))


def _crop(tensor: torch.Tensor, box: Box | None) -> torch.Tensor:
    """The box of [.., rows, cols] tensors (all of it for None)."""
    if box is None:
        return tensor
    h, w, y, x = box
    return tensor[..., y:y + h, x:x + w]


def crop(tensor: torch.Tensor, where: Region | None) -> torch.Tensor:
    """What a cond with this region sees of latents (or an inpaint concat) [B, C, rows, cols]."""
    return tensor if where is None else _crop(tensor, where.box)


def weighted_mean(preds: Sequence[torch.Tensor], regions: Sequence[Region | None],
                  fallback: Callable[[], torch.Tensor]) -> torch.Tensor:
    """One side's prediction from its conds' `preds` (each over its region's box): their mean where every cond is
    plain, else calc_cond_batch's sum of pred x mult over sum of mult, with `fallback()` (ComfyUI's denoised 0)
    where the sum of mult is 0."""
    if all(r is None for r in regions):
        return torch.stack(list(preds)).mean(0)
    like = fallback()
    total = torch.zeros_like(like)
    count = torch.zeros((like.shape[0], 1, *like.shape[2:]), dtype=like.dtype, device=like.device)
    for pred, r in zip(preds, regions):
        mult = torch.ones((), dtype=like.dtype, device=like.device) if r is None else r.mult.to(like)
        _crop(total, None if r is None else r.box).add_(pred.to(like) * mult)
        _crop(count, None if r is None else r.box).add_(mult)
    return torch.where(count > 0, total / count.clamp_min(1e-37), like)


def with_opposite_areas(positive: Conditioning, negative: Conditioning, height: int,
                        width: int) -> tuple[Conditioning, Conditioning]:
    """process_conds' create_cond_with_same_area_if_none, positive first: each area cond of one side whose area no
    cond of the other side has gets a twin there (appended), its area with that side's smallest cond holding it."""
    pos, neg = list(positive.items), list(negative.items)
    if not any(has_area(item) for item in (*pos, *neg)):
        return positive, negative
    for item in list(pos):
        _add_twin(neg, item, height, width)
    for item in list(neg):  # the twins just added too, as ComfyUI walks the grown list
        _add_twin(pos, item, height, width)
    return Conditioning(tuple(pos)), Conditioning(tuple(neg))


def _inside(area: Box, other: Box) -> bool:
    return (area[2] >= other[2] and area[3] >= other[3] and area[0] + area[2] <= other[0] + other[2]
            and area[1] + area[3] <= other[1] + other[3])


def _add_twin(others: list[CondItem], item: CondItem, height: int, width: int) -> None:
    area = resolved_area(item, height, width)
    if area is None:
        return
    smallest, smallest_area = None, None
    for other in others:
        other_area = resolved_area(other, height, width)
        if other_area is not None:
            if not _inside(area, other_area):
                continue
            # an area that holds it beats a whole-picture cond; a smaller one beats a bigger one
            if smallest is None or smallest_area is None or math.prod(smallest_area[:2]) > math.prod(other_area[:2]):
                smallest, smallest_area = other, other_area
        elif smallest is None:
            smallest = other
    if smallest is None or smallest_area == area:
        return
    extras = {key: value for key, value in item.extras.items() if key not in _MODEL_COND_KEYS}
    extras.update({key: smallest.extras[key] for key in _MODEL_COND_KEYS if key in smallest.extras})
    others.append(CondItem(smallest.embeds, smallest.pooled, extras, smallest.report))


def spread_outside_areas(positive: Conditioning, negative: Conditioning) -> Conditioning:
    """spread_to_uncond over the conds without an area only, as ComfyUI's apply_empty_x_to_equal_area: an area
    cond's legacy ControlNet stays on it (and its twin), and a negative area cond neither receives one nor stops
    the others from receiving one."""
    if not any(has_area(item) for item in (*positive.items, *negative.items)):
        return spread_to_uncond(positive, negative)
    whole = [k for k, item in enumerate(negative.items) if not has_area(item)]
    spread = spread_to_uncond(Conditioning(tuple(item for item in positive.items if not has_area(item))),
                              Conditioning(tuple(negative.items[k] for k in whole)))
    items = list(negative.items)
    for k, item in zip(whole, spread.items):
        items[k] = item
    return Conditioning(tuple(items))
