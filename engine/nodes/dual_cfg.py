"""DualCFGGuider: guidance by two conds and a negative, as ComfyUI 0.3.64's Guider_DualCFG
(comfy_extras/nodes_custom_sampler.py), run by SamplerCustomAdvanced.

With cond1 (positive), cond2 (middle) and the negative's denoised estimates, and ComfyUI's cfg_function
(engine/nodes/cfg_hooks.py, the MODEL's RescaleCFG / SAG / PAG hooks included):
- "regular": cfg_function(cond = middle, uncond = negative, cfg_cond2_negative) + (positive - middle) * cfg_conds.
  Unless disable_cfg1_optimization is set, cfg_cond2_negative 1 skips the negative pass, and cfg_conds 1 as well
  then skips the middle one (a skipped side's estimate is 0).
- "nested": negative + cfg_cond2_negative * (cfg_function(cond = positive, uncond = middle, cfg_conds) - negative),
  every pass always run.
The cond numbers a hook sees (cond_or_uncond) are ComfyUI's [negative, middle, positive] order: SAG's capture of
"uncond" number 1 is the middle's self-attention map in both styles, as in ComfyUI. A cfg_pp sampler's uncond
estimate is the uncond that cfg_function saw: the negative's (regular) or the middle's (nested).

Not matched: ComfyUI runs the three conds in one UNet batch; here the positive and middle share one and the
negative has its own (the same estimates, one more UNet call a step). ComfyUI's area twins go across all three
conds; here between the positive and the middle only (an area cond in a DualCFGGuider's negative gets no twin). The
middle's "prompt_type" "negative" changes nothing on SD1.x/SD2.x/SDXL UNets and is not carried.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import ClassVar

import torch
from pydantic import Field

import engine.nodes.area_conditioning as areas
from engine.nodes.gligen import spread_to_negative
from engine.nodes.attention_replace import Attn1Slot
from engine.nodes.base import Choice, Node, RunContext, Socket, register
from engine.nodes.cfg_hooks import HookModel, Side, cfg_function, sigma_per_latent
from engine.values import Conditioning, DualCFG, Guider, ModelPatches, ModelRef

__all__ = ["DualCFGGuider", "dual_eps"]

EpsFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
# (positive, negative, keep the negative at cfg 1, attn1 slot) -> guided_eps at cfg 1, read through its `sides`
Build = Callable[[Conditioning, Conditioning, bool, "Attn1Slot | None"], EpsFn]


def dual_eps(build: Build, positive: Conditioning | Sequence[Conditioning],
             negative: Conditioning | Sequence[Conditioning], cfg_conds: float, dual: DualCFG, patches: ModelPatches,
             disable_cfg1_optimization: bool) -> EpsFn:
    """Guider_DualCFG.predict_noise as a noise prediction, with `with_uncond` (see the module docstring)."""
    if not isinstance(positive, Conditioning) or not isinstance(negative, Conditioning):
        raise ValueError("a DualCFGGuider guides one batch of latents with one set of conds; "
                         "run its jobs one at a time")
    # ComfyUI's process_conds: the legacy ControlNetApply's ControlNet reaches the negative too
    negative = areas.spread_outside_areas(positive, negative)
    negative = spread_to_negative(positive, negative)  # and the positive's GLIGEN boxes (apply_empty_x_to_equal_area)
    slot = Attn1Slot(dict(patches.attn1_replace))  # one for the run: SAG's map goes from the passes to its hook
    cfg2, nested = dual.cfg_cond2_negative, dual.nested
    keep_all = disable_cfg1_optimization or patches.disable_cfg1_optimization

    def predictions(forced: bool) -> tuple[EpsFn, EpsFn | None, bool]:
        skip_negative = not (nested or forced or keep_all) and math.isclose(cfg2, 1.0)
        skip_middle = skip_negative and math.isclose(cfg_conds, 1.0)
        text = build(positive, dual.middle, not skip_middle, slot)  # cond 0: positive, cond 1: middle
        return text, None if skip_negative else build(negative, negative, False, slot), skip_middle

    built: dict[bool, tuple[EpsFn, EpsFn | None, bool]] = {}

    def predict(scaled: torch.Tensor, timestep: torch.Tensor, sigma: torch.Tensor,
                forced: bool) -> tuple[torch.Tensor, torch.Tensor]:
        if forced not in built:
            built[forced] = predictions(forced)
        text, uncond, skip_middle = built[forced]
        s = float(sigma)
        x = scaled.float() * math.sqrt(s * s + 1.0)
        pairs = text.sides(scaled, timestep, sigma)  # type: ignore[attr-defined]
        positive_pred = x - s * torch.cat([p for p, _ in pairs])
        middle_pred = torch.zeros_like(x) if skip_middle else x - s * torch.cat([m for _, m in pairs])
        if uncond is None:
            negative_pred = torch.zeros_like(x)
        else:
            alone = uncond.sides(scaled, timestep, sigma)  # type: ignore[attr-defined]
            negative_pred = x - s * torch.cat([n for n, _ in alone])
        positive_side = Side(text.sides, 0)  # type: ignore[attr-defined]
        middle_side = None if skip_middle else Side(text.sides, 1)  # type: ignore[attr-defined]
        negative_side = None if uncond is None else Side(uncond.sides, 0)  # type: ignore[attr-defined]
        model, sigmas = HookModel(slot, timestep), sigma_per_latent(s, x)
        if nested:
            text_pred = cfg_function(model, positive_pred, middle_pred, cfg_conds, x, sigmas, patches, positive_side,
                                     middle_side)
            denoised, seen = negative_pred + cfg2 * (text_pred - negative_pred), middle_pred
        else:
            denoised = (cfg_function(model, middle_pred, negative_pred, cfg2, x, sigmas, patches, middle_side,
                                     negative_side) + (positive_pred - middle_pred) * cfg_conds)
            seen = negative_pred
        return (x - denoised) / s, (x - seen) / s

    def eps(scaled: torch.Tensor, timestep: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        return predict(scaled, timestep, sigma, False)[0]

    def with_uncond(scaled: torch.Tensor, timestep: torch.Tensor, sigma: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return predict(scaled, timestep, sigma, True)

    eps.with_uncond = with_uncond  # type: ignore[attr-defined]
    return eps


@register
class DualCFGGuider(Node):
    """Guide the model by two conds and a negative: cond2 against the negative, cond1 against cond2."""

    CATEGORY: ClassVar[str] = "sampling/custom_sampling/guiders"
    RETURN_TYPES: ClassVar[tuple[str, ...]] = ("GUIDER",)

    model: ModelRef = Socket("MODEL")
    cond1: Conditioning = Socket("CONDITIONING")
    cond2: Conditioning = Socket("CONDITIONING")
    negative: Conditioning = Socket("CONDITIONING")
    cfg_conds: float = Field(8.0, ge=0.0, le=100.0, json_schema_extra={"step": 0.1, "round": 0.01})
    cfg_cond2_negative: float = Field(8.0, ge=0.0, le=100.0, json_schema_extra={"step": 0.1, "round": 0.01})
    style: str = Choice(("regular", "nested"))

    def run(self, ctx: RunContext) -> tuple[Guider]:
        dual = DualCFG(self.cond2, self.cfg_cond2_negative, self.style == "nested")
        return (Guider(self.model, self.cond1, self.negative, self.cfg_conds, dual),)
