"""ESRGAN's RRDBNet (Wang et al. 2018), in Real-ESRGAN/BasicSR's module names so their files load as they are.

    x -> conv_first -> [RRDB x blocks] -> conv_body -> (+ skip) -> [nearest x2, conv_upN, lrelu] x ups
      -> conv_hr -> lrelu -> conv_last

An RRDB is three residual dense blocks (five 3x3 convs, each seeing the block input and every earlier conv's
output) with residuals scaled by 0.2, the whole RRDB's residual scaled by 0.2 again. LeakyReLU slope 0.2.
Real-ESRGAN's x2 and x1 models fold the input with pixel_unshuffle first (12 or 48 input channels for RGB) and
upsample x4 inside, which gives x2 or x1 overall; the output is cropped back to scale x the input size.
The old ESRGAN and BSRGAN key layouts are renamed to these names in detect.py.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["RRDBNet"]

SLOPE = 0.2  # LeakyReLU negative slope in every ESRGAN variant
RESIDUAL_SCALE = 0.2


class ResidualDenseBlock(nn.Module):
    """Five 3x3 convs, densely connected; the fifth maps back to `features` channels."""

    def __init__(self, features: int, growth: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(features, growth, 3, 1, 1)
        self.conv2 = nn.Conv2d(features + growth, growth, 3, 1, 1)
        self.conv3 = nn.Conv2d(features + 2 * growth, growth, 3, 1, 1)
        self.conv4 = nn.Conv2d(features + 3 * growth, growth, 3, 1, 1)
        self.conv5 = nn.Conv2d(features + 4 * growth, features, 3, 1, 1)

    def forward(self, x: Tensor) -> Tensor:
        x1 = F.leaky_relu(self.conv1(x), SLOPE)
        x2 = F.leaky_relu(self.conv2(torch.cat((x, x1), 1)), SLOPE)
        x3 = F.leaky_relu(self.conv3(torch.cat((x, x1, x2), 1)), SLOPE)
        x4 = F.leaky_relu(self.conv4(torch.cat((x, x1, x2, x3), 1)), SLOPE)
        x5 = self.conv5(torch.cat((x, x1, x2, x3, x4), 1))
        return x5 * RESIDUAL_SCALE + x


class RRDB(nn.Module):
    """Residual in residual dense block: three dense blocks and a scaled residual around them."""

    def __init__(self, features: int, growth: int) -> None:
        super().__init__()
        self.rdb1 = ResidualDenseBlock(features, growth)
        self.rdb2 = ResidualDenseBlock(features, growth)
        self.rdb3 = ResidualDenseBlock(features, growth)

    def forward(self, x: Tensor) -> Tensor:
        return self.rdb3(self.rdb2(self.rdb1(x))) * RESIDUAL_SCALE + x


class RRDBNet(nn.Module):
    """ESRGAN's generator; `ups` nearest-x2 stages, `shuffle` the pixel_unshuffle factor of Real-ESRGAN x2/x1."""

    def __init__(self, *, in_channels: int, out_channels: int, features: int, blocks: int, growth: int, ups: int,
                 shuffle: int = 1) -> None:
        super().__init__()
        self.shuffle = shuffle
        self.ups = ups
        self.conv_first = nn.Conv2d(in_channels * shuffle * shuffle, features, 3, 1, 1)
        self.body = nn.Sequential(*(RRDB(features, growth) for _ in range(blocks)))
        self.conv_body = nn.Conv2d(features, features, 3, 1, 1)
        # conv_up1, conv_up2 ... as Real-ESRGAN names them (its files load without renaming)
        for index in range(1, ups + 1):
            self.add_module(f"conv_up{index}", nn.Conv2d(features, features, 3, 1, 1))
        self.conv_hr = nn.Conv2d(features, features, 3, 1, 1)
        self.conv_last = nn.Conv2d(features, out_channels, 3, 1, 1)

    @property
    def scale(self) -> int:
        """How many times each side grows: 2**ups, less the unshuffle's folding."""
        return 2**self.ups // self.shuffle

    def forward(self, x: Tensor) -> Tensor:
        height, width = x.shape[-2:]
        if self.shuffle > 1:
            # reflect-pad to a multiple of the factor, as Real-ESRGAN's inference and spandrel do
            pad_h, pad_w = -height % self.shuffle, -width % self.shuffle
            if pad_h or pad_w:
                x = F.pad(x, (0, pad_w, 0, pad_h), mode="reflect")
            x = F.pixel_unshuffle(x, self.shuffle)
        feat = self.conv_first(x)
        feat = feat + self.conv_body(self.body(feat))
        for index in range(1, self.ups + 1):
            conv = getattr(self, f"conv_up{index}")
            feat = F.leaky_relu(conv(F.interpolate(feat, scale_factor=2, mode="nearest")), SLOPE)
        out = self.conv_last(F.leaky_relu(self.conv_hr(feat), SLOPE))
        if self.shuffle > 1:
            out = out[..., : height * self.scale, : width * self.scale]
        return out
