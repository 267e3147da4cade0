"""A MODEL's UNet patches (ModelPatches.unet) applied to the shared diffusers UNet only while that MODEL samples.

ComfyUI patches its UNet through transformer_options: an output_block_patch sees (h, hsp) right before an output
block concatenates them, an attn1/attn2 patch sees (q, k, v) before the attention's projections. Diffusers' UNet
has no such places, so `unet_patched` registers forward pre-hooks for one run and removes them afterwards, on
errors too: the same UNet then runs unpatched for the next MODEL, whose picture is its own.

- An output-block patch (`kind = "output_block"`, FreeU's) is called as patch(h, hsp) -> (h, hsp) in a pre-hook
  on every resnet of the up blocks: its input is torch.cat([h, hsp]), split back at h's width, which the UNet's
  layout gives (the block before's output width for a block's first resnet, the block's own width after it).
- An attention patch (`kind = "attention_kv"`, a hypernetwork's) is called as patch.key(k) and patch.value(v) in
  pre-hooks on to_k and to_v of every transformer block's attn1 and attn2: the inputs of the key and value
  projections, which are ComfyUI's k and v before attn1's / attn2's to_k / to_v.

Hooks are registered in the tuple's order, so patches compose as ComfyUI's patch lists do. ControlNets get none
(ComfyUI hands them no transformer_options).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from diffusers.models.attention import BasicTransformerBlock
from diffusers.models.unets.unet_2d_blocks import CrossAttnUpBlock2D, UpBlock2D
from torch.utils.hooks import RemovableHandle

__all__ = ["skip_splits", "unet_patched"]


def skip_splits(unet: torch.nn.Module) -> list[tuple[torch.nn.Module, int]]:
    """Every up-block resnet with the width of the `h` part of its input (the rest is the skip `hsp`)."""
    splits: list[tuple[torch.nn.Module, int]] = []
    width = int(unet.config.block_out_channels[-1])  # what the middle block hands the first up block
    for block in unet.up_blocks:
        if not isinstance(block, (UpBlock2D, CrossAttnUpBlock2D)):
            raise ValueError(f"a UNet patch cannot find the skip connections of a {type(block).__name__}; "
                             "only SD1.x, SD2.x and SDXL UNets' UpBlock2D / CrossAttnUpBlock2D are patched")
        for resnet in block.resnets:
            if not 0 < width < resnet.in_channels:
                raise ValueError(f"unexpected UNet layout: an up-block resnet takes {resnet.in_channels} channels, "
                                 f"its h part would be {width}")
            splits.append((resnet, width))
            width = int(resnet.out_channels)
    return splits


def _output_block_hook(patch: Any, width: int) -> Any:
    def hook(module: torch.nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
        joined = args[0]
        h, hsp = patch(joined[:, :width].clone(), joined[:, width:].clone())
        return (torch.cat([h, hsp], dim=1), *args[1:])
    return hook


def _kv_hook(transform: Any) -> Any:
    def hook(module: torch.nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
        return (transform(args[0]), *args[1:])
    return hook


def _attach(unet: torch.nn.Module, patch: Any) -> list[RemovableHandle]:
    kind = getattr(patch, "kind", None)
    if kind == "output_block":
        return [resnet.register_forward_pre_hook(_output_block_hook(patch, width))
                for resnet, width in skip_splits(unet)]
    if kind == "attention_kv":
        patch.to(unet.device)
        handles = []
        for block in unet.modules():
            if not isinstance(block, BasicTransformerBlock):
                continue
            for attention in (block.attn1, getattr(block, "attn2", None)):
                if attention is None:
                    continue
                handles.append(attention.to_k.register_forward_pre_hook(_kv_hook(patch.key)))
                handles.append(attention.to_v.register_forward_pre_hook(_kv_hook(patch.value)))
        return handles
    raise ValueError(f"unknown UNet patch {patch!r}: its kind must be 'output_block' or 'attention_kv'")


@contextmanager
def unet_patched(unet: torch.nn.Module, patches: Sequence[Any]) -> Iterator[torch.nn.Module]:
    """`unet` with `patches` hooked in for the block's duration; every hook is removed on the way out."""
    handles: list[RemovableHandle] = []
    try:
        for patch in patches:
            handles += _attach(unet, patch)
        yield unet
    finally:
        for handle in handles:
            handle.remove()
