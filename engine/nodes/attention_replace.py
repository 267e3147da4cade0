"""ComfyUI's attn1 "patches_replace" on the UNet's middle block, done with diffusers attention processors.

A ComfyUI attn1 replacement is a function (q, k, v, extra_options) -> out that stands in for the attention itself:
q, k and v are the block's own projections of its input ([batch, tokens, heads * head_dim]), and `out` goes on
through the block's output projection (comfy/ldm/modules/attention.py BasicTransformerBlock). It is looked up by
("middle", 0, i) for the middle block's i-th transformer block, else by ("middle", 0) for all of them, so a
per-block entry wins over the block-wide one (PerturbedAttentionGuidance sets the block-wide key,
SelfAttentionGuidance the first block's). The middle block is the only place these nodes patch, and the only one
mapped here: diffusers' `unet.mid_block.attentions[0].transformer_blocks[i].attn1`.

`Attn1Slot` is where one sampling run keeps the replacements that apply now (the MODEL's own, or a post-CFG hook's
for its extra pass) and what they carry from one call to the next (`state`: SelfAttentionGuidance's map). For each
UNet call it swaps the processors of the blocks that have a replacement and puts the old ones back afterwards, on
errors too: the shared UNet is never left patched.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F

__all__ = ["Attn1Fn", "Attn1Slot", "middle_attn1", "sdpa"]

Attn1Fn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, dict[str, Any]], torch.Tensor]
BlockKey = tuple[Any, ...]


def middle_attn1(unet: torch.nn.Module) -> list[torch.nn.Module]:
    """The self-attention (attn1) of each transformer block of the UNet's middle block, in order ([] without one)."""
    middle = getattr(unet, "mid_block", None)
    attentions = getattr(middle, "attentions", None)
    if not attentions:
        return []
    return [block.attn1 for block in attentions[0].transformer_blocks]


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int) -> torch.Tensor:
    """ComfyUI's optimized_attention: multi-head attention over [batch, tokens, heads * head_dim] inputs."""
    b, _, inner = q.shape
    split = [t.reshape(b, -1, heads, inner // heads).transpose(1, 2) for t in (q, k, v)]
    out = F.scaled_dot_product_attention(*split, dropout_p=0.0, is_causal=False)
    return out.transpose(1, 2).reshape(b, -1, inner)


class _Replaced:
    """A diffusers attention processor that runs a ComfyUI attn1 replacement between the block's projections."""

    def __init__(self, fn: Attn1Fn, extra: dict[str, Any]) -> None:
        self.fn, self.extra = fn, extra

    def __call__(self, attn: Any, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None,
                 *args: Any, **kwargs: Any) -> torch.Tensor:
        if (attention_mask is not None or hidden_states.ndim != 3 or attn.spatial_norm is not None
                or attn.group_norm is not None or attn.norm_q is not None):
            raise ValueError("an attention replacement (PerturbedAttentionGuidance, SelfAttentionGuidance) met an "
                             "attention layer unlike an SD1.x/SD2.x/SDXL UNet's self-attention; only those are patched")
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        q, k, v = attn.to_q(hidden_states), attn.to_k(context), attn.to_v(context)
        extra = {**self.extra, "n_heads": attn.heads,
                 # ComfyUI's attn_precision: fp32 where the model upcasts its attention (SD2.x)
                 "attn_precision": torch.float32 if getattr(attn, "upcast_attention", False) else None}
        out = self.fn(q, k, v, extra).to(q.dtype)
        out = attn.to_out[1](attn.to_out[0](out))  # the output projection and its dropout
        if attn.residual_connection:
            out = out + hidden_states
        return out / attn.rescale_output_factor


class Attn1Slot:
    """The attn1 replacements of one sampling run: `base` (the MODEL's) unless a call sets others, and `state`,
    which the replacements and the post-CFG hooks share for the run."""

    def __init__(self, base: Mapping[BlockKey, Attn1Fn]) -> None:
        self.base: dict[BlockKey, Attn1Fn] = dict(base)
        self.current: Mapping[BlockKey, Attn1Fn] = self.base
        self.labels_override: int | None = None  # an extra pass: every cond is number 0 of its calc_cond_batch
        self.state: dict[Any, Any] = {}
        for key in self.base:
            _check_key(key)

    @contextmanager
    def using(self, replacements: Mapping[BlockKey, Attn1Fn], label: int | None) -> Iterator[None]:
        """Calls inside run with `replacements` (a hook's model_options), their conds numbered `label`."""
        for key in replacements:
            _check_key(key)
        before = (self.current, self.labels_override)
        self.current, self.labels_override = replacements, label
        try:
            yield
        finally:
            self.current, self.labels_override = before

    def run(self, unet: torch.nn.Module, call: Callable[[], torch.Tensor], labels: Sequence[int],
            rows: Sequence[int], groups: Sequence[int]) -> torch.Tensor:
        """`call()` (one UNet call) with the current replacements swapped in. Per cond item of the batch, in order:
        `labels` its place in ComfyUI's calc_cond_batch list (0 cond, 1 uncond: extra_options["cond_or_uncond"]),
        `rows` its rows, `groups` which group of latents it guides."""
        if not self.current:
            return call()
        if self.labels_override is not None:
            labels = [self.labels_override] * len(labels)
        extra = {"cond_or_uncond": list(labels), "rows": list(rows), "groups": list(groups), "state": self.state}
        swapped: list[tuple[torch.nn.Module, Any]] = []
        try:
            for index, attention in enumerate(middle_attn1(unet)):
                fn = self.current.get(("middle", 0, index), self.current.get(("middle", 0)))
                if fn is None:
                    continue
                swapped.append((attention, attention.processor))
                attention.set_processor(_Replaced(fn, {**extra, "block": ("middle", 0, index)}))
            return call()
        finally:
            for attention, processor in reversed(swapped):
                attention.set_processor(processor)


def _check_key(key: BlockKey) -> None:
    if not (key[:2] == ("middle", 0) and len(key) in (2, 3)):
        raise ValueError(f"attn1 replacement at {key!r}: only the middle block (\"middle\", 0[, index]) is mapped "
                         "onto diffusers' UNet")
