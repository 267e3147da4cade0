"""`EncodedPrompt`: what encoding one prompt gives, the value encode.py makes and cache.py keeps."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .report import TokenReport

__all__ = ["EncodedPrompt"]


@dataclass(frozen=True)
class EncodedPrompt:
    """`embeds` [1, 77 * chunks, sum of widths], `pooled` [1, projection] or None, and the report."""

    embeds: torch.Tensor
    pooled: torch.Tensor | None
    report: TokenReport

    def copy(self) -> EncodedPrompt:
        """The same values in fresh tensors (what a cache hit hands out)."""
        pooled = None if self.pooled is None else self.pooled.clone()
        return EncodedPrompt(self.embeds.clone(), pooled, self.report)
