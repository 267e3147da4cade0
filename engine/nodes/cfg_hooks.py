"""ComfyUI's hooks on the CFG combine (comfy/samplers.py cfg_function), for MODELs patched by RescaleCFG,
SelfAttentionGuidance and PerturbedAttentionGuidance: guided_eps (engine/nodes/guidance.py) hands each step's cond
and uncond predictions here when the MODEL has any, and gets the guided noise prediction back.

The hooks work in ComfyUI's denoised space, on k-diffusion's x (the sampler's latent at sigma, not divided by
sqrt(sigma^2 + 1)): a prediction eps is the denoised estimate x - sigma * eps. The contracts, ComfyUI's:

- `ModelPatches.cfg_function(args) -> x - denoised` (sampler_cfg_function) replaces `uncond + (cond - uncond) *
  cond_scale`. args: "cond" and "uncond" (x - each side's denoised), "cond_denoised", "uncond_denoised",
  "cond_scale", "input" (x), "sigma" and "timestep" (the sigma, one per latent), "model", "model_options",
  "input_cond", "input_uncond" (the sides' conds).
- each of `ModelPatches.post_cfg`, in order (sampler_post_cfg_function): args -> denoised. args: "denoised" (so
  far), "cond", "uncond" (the sides' conds: `Side`, None for a skipped uncond), "cond_denoised", "uncond_denoised",
  "cond_scale", "input", "sigma", "model", "model_options", and "state" (a dict that lives for the run).
- "model" is a `HookModel`: `calc_cond_batch([side, ...], x, sigma, model_options)` runs more UNet passes of those
  sides at another x and returns their denoised estimates, as ComfyUI's calc_cond_batch; "model_options" holds
  the run's attn1 replacements under "attn1" (engine/nodes/attention_replace.py), to copy and extend for a pass.

A skipped uncond (cfg 1 without disable_cfg1_optimization) has a denoised estimate of exactly 0, as ComfyUI's
calc_cond_batch gives for a missing cond list.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from engine.nodes.attention_replace import Attn1Slot
from engine.values import ModelPatches

__all__ = ["CfgHooks", "HookModel", "Side", "SidesFn", "cfg_function", "is_hooked", "sigma_per_latent"]

# (x_scaled, timestep, sigma, only) -> per group (cond eps, uncond eps or None when skipped); `only` 0 or 1 runs
# that side's conds alone (the other one's prediction is then meaningless)
SidesFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, "int | None"],
                   list[tuple[torch.Tensor, "torch.Tensor | None"]]]


def is_hooked(patches: ModelPatches | None) -> bool:
    """Whether a MODEL's patches change the CFG combine or the UNet's attention (else the plain CFG runs)."""
    return patches is not None and (patches.cfg_function is not None or bool(patches.post_cfg)
                                    or bool(patches.attn1_replace))


@dataclass(frozen=True, eq=False)
class Side:
    """One side's conds as a hook sees them (ComfyUI hands the cond list itself): the prediction that runs them,
    and which half of its (cond, uncond) pairs they are."""

    sides: SidesFn
    half: int  # 0: the pair's cond, 1: its uncond


@dataclass(frozen=True, eq=False)
class HookModel:
    """What a hook calls for more UNet passes (ComfyUI's `model` argument with calc_cond_batch)."""

    slot: Attn1Slot
    timestep: torch.Tensor

    def calc_cond_batch(self, conds: Sequence[Side | None], x: torch.Tensor, sigma: torch.Tensor,
                        model_options: dict[str, Any]) -> list[torch.Tensor]:
        """Each side's denoised estimate at k-diffusion's `x` (0 for None), with `model_options`' attn1
        replacements; a cond is numbered by its place in `conds`, as ComfyUI's cond_or_uncond."""
        s = float(sigma.reshape(-1)[0])
        scaled = x / math.sqrt(s * s + 1.0)
        out = []
        for label, side in enumerate(conds):
            if side is None:
                out.append(torch.zeros_like(x))
                continue
            with self.slot.using(model_options.get("attn1", {}), label):
                pairs = side.sides(scaled, self.timestep, torch.tensor(s), side.half)
            eps = torch.cat([pair[side.half] for pair in pairs])  # type: ignore[misc]
            out.append(x - s * eps.to(x.dtype))
        return out


def cfg_function(model: HookModel, cond_pred: torch.Tensor, uncond_pred: torch.Tensor, cond_scale: float,
                 x: torch.Tensor, sigma: torch.Tensor, patches: ModelPatches, cond: Side | None,
                 uncond: Side | None) -> torch.Tensor:
    """comfy/samplers.py cfg_function: the guided denoised estimate from the sides' denoised estimates, with the
    MODEL's sampler_cfg_function and post_cfg chain."""
    options = {"attn1": dict(model.slot.base)}
    if patches.cfg_function is not None:
        args = {"cond": x - cond_pred, "uncond": x - uncond_pred, "cond_scale": cond_scale, "timestep": sigma,
                "input": x, "sigma": sigma, "cond_denoised": cond_pred, "uncond_denoised": uncond_pred,
                "model": model, "model_options": options, "input_cond": cond, "input_uncond": uncond}
        result = x - patches.cfg_function(args)
    else:
        result = uncond_pred + (cond_pred - uncond_pred) * cond_scale
    for fn in patches.post_cfg:
        args = {"denoised": result, "cond": cond, "uncond": uncond, "cond_scale": cond_scale, "model": model,
                "uncond_denoised": uncond_pred, "cond_denoised": cond_pred, "sigma": sigma,
                "model_options": options, "input": x, "state": model.slot.state}
        result = fn(args)
    return result


def sigma_per_latent(sigma: float, x: torch.Tensor) -> torch.Tensor:
    """ComfyUI's sigma argument: one per latent of the batch."""
    return torch.full((x.shape[0],), sigma, device=x.device, dtype=x.dtype)


class CfgHooks:
    """The CFG combine of one sampling run with a MODEL's hooks: (pairs of side predictions) -> (guided eps,
    uncond eps), for all groups of latents at once."""

    def __init__(self, patches: ModelPatches, cfg: float, sides: SidesFn, slot: Attn1Slot) -> None:
        self.patches, self.cfg, self.sides, self.slot = patches, cfg, sides, slot

    def __call__(self, scaled: torch.Tensor, timestep: torch.Tensor, sigma: torch.Tensor,
                 pairs: Sequence[tuple[torch.Tensor, torch.Tensor | None]]) -> tuple[torch.Tensor, torch.Tensor]:
        s = float(sigma)
        x = scaled.float() * math.sqrt(s * s + 1.0)
        cond_eps = torch.cat([cond for cond, _ in pairs])
        skipped = any(uncond is None for _, uncond in pairs)
        uncond_eps = None if skipped else torch.cat([uncond for _, uncond in pairs])  # type: ignore[misc]
        cond_pred = x - s * cond_eps
        uncond_pred = torch.zeros_like(x) if uncond_eps is None else x - s * uncond_eps
        model = HookModel(self.slot, timestep)
        denoised = cfg_function(model, cond_pred, uncond_pred, self.cfg, x, sigma_per_latent(s, x), self.patches,
                                Side(self.sides, 0), None if skipped else Side(self.sides, 1))
        return (x - denoised) / s, (x - uncond_pred) / s if uncond_eps is None else uncond_eps
