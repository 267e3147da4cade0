"""Model patches on the CFG combine: RescaleCFG, PerturbedAttentionGuidance and SelfAttentionGuidance, with
ComfyUI 0.3.64's names, defaults, ranges and math (comfy_extras/nodes_model_advanced.py, nodes_pag.py,
nodes_sag.py).

Each node returns the MODEL with its hook added to ModelPatches (RescaleCFG's replaces the cfg function, the
others join the post-CFG chain after any there), so patches compose and nothing reloads; guided_eps runs the hooks
(engine/nodes/cfg_hooks.py has their contracts) and swaps the middle block's attention only for the UNet calls
that need it (engine/nodes/attention_replace.py).

- RescaleCFG: CFG on the v-prediction, its result's spread per latent rescaled to the cond's, blended by
  `multiplier` with the plain CFG.
- PerturbedAttentionGuidance: one more pass of the cond with every middle-block self-attention replaced by its
  value projection; the guided estimate moves by `scale` * (cond - perturbed).
- SelfAttentionGuidance: the uncond pass's self-attention map of the middle block's first transformer block says
  where each latent is attended most (a key's attention summed over the queries, averaged over the heads, above
  1); there the uncond's denoised estimate is blurred (9x9 Gaussian, `blur_sigma`), noised back by the same amount
  and denoised again by the uncond; the guided estimate moves by `scale` * (blurred - re-denoised). Like ComfyUI
  it runs the uncond pass at cfg 1 too, computes the captured attention explicitly (softmax(q k^T / sqrt(d)) v,
  where diffusers would use its fused kernel: equal up to float rounding), and leaves latents of 4 cells or fewer
  a side alone.

With both SAG and PAG on a MODEL, PAG's pass keeps SAG's capture on the middle block's first transformer block, as
ComfyUI's lookup prefers a block's own key over the block-wide one: on SD1.x/SD2.x, whose middle block has only
that one, PAG then adds nothing (in ComfyUI too); on SDXL it perturbs the other nine.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from pydantic import Field

from engine.nodes.attention_replace import sdpa
from engine.nodes.base import Node, RunContext, Socket, register
from engine.settings import Limits
from engine.values import ModelRef

__all__ = ["PerturbedAttentionGuidance", "PerturbedAttentionPatch", "RescaleCFG", "RescaleCfgFunction",
           "SagCapture", "SelfAttentionGuidance", "SelfAttentionPatch", "attention_with_map", "blur_by_attention",
           "gaussian_blur"]


# -- RescaleCFG -------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RescaleCfgFunction:
    """RescaleCFG's sampler_cfg_function: args -> x - guided denoised estimate."""

    multiplier: float

    def __call__(self, args: dict[str, Any]) -> torch.Tensor:
        x = args["input"]
        sigma = args["sigma"].reshape(-1, *([1] * (x.ndim - 1)))
        # v-prediction's c_skip and c_out: v = (x * c_skip - denoised) / c_out
        c_skip, c_out = 1.0 / (sigma * sigma + 1.0), sigma / (sigma * sigma + 1.0) ** 0.5
        v_cond = (x * c_skip - (x - args["cond"])) / c_out
        v_uncond = (x * c_skip - (x - args["uncond"])) / c_out
        v_cfg = v_uncond + args["cond_scale"] * (v_cond - v_uncond)
        spread = v_cond.std(dim=(1, 2, 3), keepdim=True) / v_cfg.std(dim=(1, 2, 3), keepdim=True)
        v_final = self.multiplier * (v_cfg * spread) + (1.0 - self.multiplier) * v_cfg
        return x - (x * c_skip - v_final * c_out)


@register
class RescaleCFG(Node):
    """Rescale the CFG result's spread to the cond's (on the v-prediction), against over-saturation at high cfg."""

    CATEGORY: ClassVar[str] = "advanced/model"
    RETURN_TYPES: ClassVar[tuple[str, ...]] = ("MODEL",)

    model: ModelRef = Socket("MODEL")
    multiplier: float = Field(0.7, ge=0.0, le=1.0, json_schema_extra={"step": 0.01})

    def run(self, ctx: RunContext) -> tuple[ModelRef]:
        patches = self.model.patches.replace(cfg_function=RescaleCfgFunction(self.multiplier))
        return (self.model.with_patches(patches),)


# -- PerturbedAttentionGuidance ---------------------------------------------------------------------------------


def _value_only(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, extra: dict[str, Any]) -> torch.Tensor:
    """PAG's perturbed self-attention: each token attends to itself alone, so the attention is its value."""
    return v


@dataclass(frozen=True)
class PerturbedAttentionPatch:
    """PerturbedAttentionGuidance's post-CFG hook."""

    scale: float

    def __call__(self, args: dict[str, Any]) -> torch.Tensor:
        if self.scale == 0:
            return args["denoised"]
        options = args["model_options"]
        # the block-wide key: a per-block replacement already there (SAG's on block 0) still wins, as in ComfyUI
        options = {**options, "attn1": {**options.get("attn1", {}), ("middle", 0): _value_only}}
        (perturbed,) = args["model"].calc_cond_batch([args["cond"]], args["input"], args["sigma"], options)
        return args["denoised"] + (args["cond_denoised"] - perturbed) * self.scale


@register
class PerturbedAttentionGuidance(Node):
    """Guide away from a pass whose middle-block self-attention is made an identity (arXiv 2403.17377)."""

    CATEGORY: ClassVar[str] = "model_patches/unet"
    RETURN_TYPES: ClassVar[tuple[str, ...]] = ("MODEL",)

    model: ModelRef = Socket("MODEL")
    scale: float = Field(3.0, ge=0.0, le=100.0, json_schema_extra={"step": 0.01, "round": 0.01})

    def run(self, ctx: RunContext) -> tuple[ModelRef]:
        patches = self.model.patches
        hooked = patches.replace(post_cfg=(*patches.post_cfg, PerturbedAttentionPatch(self.scale)))
        return (self.model.with_patches(hooked),)


# -- SelfAttentionGuidance --------------------------------------------------------------------------------------


def attention_with_map(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int,
                       precision: torch.dtype | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Multi-head attention written out, with its map: (out [b, n, heads * d], softmax scores [b * heads, n, n]),
    the scores' rows ordered latent-major then head, as ComfyUI's attention_basic_with_sim."""
    b, _, inner = q.shape
    d = inner // heads
    q_, k_, v_ = (t.reshape(b, -1, heads, d).transpose(1, 2).reshape(b * heads, -1, d) for t in (q, k, v))
    if precision == torch.float32:
        q_, k_ = q_.float(), k_.float()
    scores = (torch.bmm(q_, k_.transpose(1, 2)) * d**-0.5).softmax(dim=-1)
    out = torch.bmm(scores.to(v_.dtype), v_)
    return out.reshape(b, heads, -1, d).transpose(1, 2).reshape(b, -1, inner), scores


def gaussian_blur(image: torch.Tensor, kernel_size: int, sigma: float) -> torch.Tensor:
    """Each channel convolved with a normalised 2-D Gaussian, reflect-padded to keep its size."""
    half = (kernel_size - 1) / 2
    taps = torch.exp(-0.5 * (torch.linspace(-half, half, kernel_size) / sigma) ** 2)
    taps = (taps / taps.sum()).to(image.device, image.dtype)
    channels = image.shape[-3]
    kernel = (taps[:, None] * taps[None, :]).expand(channels, 1, kernel_size, kernel_size)
    pad = kernel_size // 2
    return F.conv2d(F.pad(image, [pad] * 4, mode="reflect"), kernel, groups=channels)


def blur_by_attention(x0: torch.Tensor, scores: torch.Tensor, sigma: float, threshold: float = 1.0) -> torch.Tensor:
    """ComfyUI's create_blur_map: x0 blurred where the attention map's keys get more than `threshold` in all."""
    batch, _, height, width = x0.shape
    tokens = scores.shape[-1]
    attended = scores.reshape(batch, -1, tokens, tokens).mean(1).sum(1) > threshold
    # the map's grid: the divisor of its token count nearest the latent's aspect, searched outwards as ComfyUI
    rows_guess = round(math.sqrt(height / width * tokens))
    rows = next((r for i in range(math.floor(math.sqrt(tokens) / 2))
                 for r in (rows_guess + i, max(1, rows_guess - i)) if tokens % r == 0), None)
    if rows is None:
        raise ValueError(f"SelfAttentionGuidance cannot lay {tokens} attention tokens out on a {height}x{width} "
                         "latent (ComfyUI fails here too); use another size")
    mask = attended.reshape(batch, rows, tokens // rows).unsqueeze(1).to(scores.dtype)
    mask = F.interpolate(mask, (height, width)).to(x0.device, x0.dtype)  # nearest, as ComfyUI's default
    return gaussian_blur(x0, kernel_size=9, sigma=sigma) * mask + x0 * (1 - mask)


@dataclass(frozen=True, eq=False)
class SagCapture:
    """SelfAttentionGuidance's attn1 replacement on the middle block's first transformer block: plain attention,
    and in a pass that holds the uncond (number 1 of its calc_cond_batch), that uncond's map kept in the run's
    state for the hook. ComfyUI's batch lists conds last first, so of several uncond items it keeps the last one's
    (here per group of latents)."""

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, extra: dict[str, Any]) -> torch.Tensor:
        heads, labels = extra["n_heads"], extra["cond_or_uncond"]
        if 1 not in labels:
            return sdpa(q, k, v, heads)
        out, scores = attention_with_map(q, k, v, heads, extra["attn_precision"])
        starts = [sum(extra["rows"][:i]) for i in range(len(labels))]
        last: dict[int, int] = {}
        for item, (label, group) in enumerate(zip(labels, extra["groups"])):
            if label == 1:
                last[group] = item
        extra["state"][self] = torch.cat([scores[starts[i] * heads:(starts[i] + extra["rows"][i]) * heads]
                                          for _, i in sorted(last.items())])
        return out


@dataclass(frozen=True, eq=False)
class SelfAttentionPatch:
    """SelfAttentionGuidance's post-CFG hook, reading what its `capture` kept."""

    scale: float
    blur_sigma: float
    capture: SagCapture

    def __call__(self, args: dict[str, Any]) -> torch.Tensor:
        guided, uncond_pred, x = args["denoised"], args["uncond_denoised"], args["input"]
        if min(guided.shape[2:]) <= 4:  # too small for the blur's padding: ComfyUI leaves it alone
            return guided
        scores = args["state"].get(self.capture)
        if scores is None:
            raise ValueError("SelfAttentionGuidance found no self-attention map of the negative's UNet pass: the "
                             "negative has no cond active at the first step, or a second SelfAttentionGuidance "
                             "replaced this one's capture (ComfyUI keeps only the last one's); apply it once, with "
                             "a negative active from the start")
        degraded = blur_by_attention(uncond_pred, scores, self.blur_sigma)
        (redone,) = args["model"].calc_cond_batch([args["uncond"]], degraded + x - uncond_pred, args["sigma"],
                                                  args["model_options"])
        return guided + (degraded - redone) * self.scale


@register
class SelfAttentionGuidance(Node):
    """Guide away from a blur of the picture where the model's self-attention looks most (arXiv 2210.00939)."""

    CATEGORY: ClassVar[str] = "_for_testing"
    RETURN_TYPES: ClassVar[tuple[str, ...]] = ("MODEL",)

    model: ModelRef = Socket("MODEL")
    scale: float = Field(0.5, ge=-2.0, le=5.0, json_schema_extra={"step": 0.01})
    blur_sigma: float = Field(2.0, ge=0.0, le=10.0, json_schema_extra={"step": 0.1})

    @classmethod
    def check_values(cls, values: dict[str, Any], limits: Limits) -> list[tuple[str, str]]:
        if values.get("blur_sigma", 2.0) == 0:
            return [("blur_sigma", "blur_sigma 0 makes the blur kernel 0/0 (ComfyUI's picture turns to NaN); "
                                   "use a value above 0")]
        return []

    def run(self, ctx: RunContext) -> tuple[ModelRef]:
        capture = SagCapture()
        patches = self.model.patches
        hooked = patches.replace(post_cfg=(*patches.post_cfg, SelfAttentionPatch(self.scale, self.blur_sigma, capture)),
                                 attn1_replace=(*patches.attn1_replace, (("middle", 0, 0), capture)),
                                 disable_cfg1_optimization=True)
        return (self.model.with_patches(hooked),)
