"""Real-ESRGAN's SRVGGNetCompact: a plain stack of 3x3 convs at the input size, then one pixel shuffle.

    x -> conv, PReLU -> [conv, PReLU] x convs -> conv to out x scale^2 channels -> pixel_shuffle(scale)
      -> + nearest-upsampled x

`body` is one ModuleList holding the convs at even indices and the PReLUs (one slope per channel) at odd
ones, as the original files store them (`body.0.weight`, `body.1.weight` ...). The network learns a residual
over the nearest-neighbour upscale, so its input and output channels are equal.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["SRVGGNetCompact"]


class SRVGGNetCompact(nn.Module):
    """The compact network; no convolution runs at the output size, which makes it fast."""

    def __init__(self, *, channels: int, features: int, convs: int, scale: int) -> None:
        super().__init__()
        self.scale = scale
        layers: list[nn.Module] = [nn.Conv2d(channels, features, 3, 1, 1), nn.PReLU(features)]
        for _ in range(convs):
            layers += [nn.Conv2d(features, features, 3, 1, 1), nn.PReLU(features)]
        layers.append(nn.Conv2d(features, channels * scale * scale, 3, 1, 1))
        self.body = nn.ModuleList(layers)

    def forward(self, x: Tensor) -> Tensor:
        out = x
        for layer in self.body:
            out = layer(out)
        return F.pixel_shuffle(out, self.scale) + F.interpolate(x, scale_factor=self.scale, mode="nearest")
