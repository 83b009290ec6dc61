"""Network pieces of the medical family: a patch grid, residual conv stages, a small discriminator.

* :func:`to_patches` / :func:`from_patches`: cut images ``[B, C, H, W]`` into an ``n x n`` grid of
  non-overlapping patches ``[B * n * n, C, H / n, W / n]`` (position ``p = row * n + col``, row-major,
  the patches of one image consecutive) and put them back. SQUID encodes each patch separately.
* :class:`ResStage`: the "double conv" of SQUID's code (``models/basic_modules.py``): a 3x3
  convolution (stride 1 or 2) + BatchNorm + ReLU, then two 3x3 convolutions with a residual
  connection around them, then ReLU.
* :class:`Pyramid` (encoder: an input stage, then ``levels`` stride-2 stages doubling the channels)
  and :class:`UpPyramid` (decoder: ``levels`` stages of bilinear x2 upsampling + a stage halving the
  channels, then a 1x1 convolution and a sigmoid). ``UpPyramid`` decodes patch features one patch at a
  time and joins the patches into whole images before its last ``combine`` stages (SQUID's
  ``initial_combine``), so the last stages see across patch borders; it returns the image and the
  features after every stage (what knowledge distillation compares).
* :class:`SimpleDiscriminator`: five 5x5 stride-2 convolutions (16, 32, 64, 128, 128 channels;
  LeakyReLU 0.2; BatchNorm on all but the first) and a linear layer to one logit, as SQUID's
  ``SimpleDiscriminator``; here the linear layer's input size follows the image size.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def to_patches(x: torch.Tensor, n: int) -> torch.Tensor:
    """``[B, C, H, W] -> [B * n * n, C, H / n, W / n]``; patch ``b * n * n + row * n + col``."""
    b, c, h, w = x.shape
    x = x.view(b, c, n, h // n, n, w // n).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b * n * n, c, h // n, w // n)


def from_patches(p: torch.Tensor, n: int) -> torch.Tensor:
    """Inverse of :func:`to_patches`: ``[B * n * n, C, h, w] -> [B, C, n h, n w]``."""
    bp, c, h, w = p.shape
    x = p.view(bp // (n * n), n, n, c, h, w).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(bp // (n * n), c, n * h, n * w)


class ResStage(nn.Module):
    """conv3x3(stride) + BN + ReLU, then ``x + BN(conv(ReLU(BN(conv(x)))))``, then ReLU."""

    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.inp = nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))
        self.res = nn.Sequential(nn.Conv2d(cout, cout, 3, 1, 1), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
                                 nn.Conv2d(cout, cout, 3, 1, 1), nn.BatchNorm2d(cout))

    def forward(self, x):
        x = self.inp(x)
        return F.relu(x + self.res(x))


class Pyramid(nn.Module):
    """Encoder: ``[B, C, h, w] -> [B, width * 2^levels, h / 2^levels, w / 2^levels]``."""

    def __init__(self, channels: int, width: int, levels: int):
        super().__init__()
        stages = [ResStage(channels, width)]
        stages += [ResStage(width * 2**i, width * 2 ** (i + 1), stride=2) for i in range(levels)]
        self.net = nn.Sequential(*stages)
        self.out_channels = width * 2**levels

    def forward(self, x):
        return self.net(x)


class UpPyramid(nn.Module):
    """Decoder of patch features ``[B * n * n, width * 2^levels, s, s]`` -> (images ``[B, C, H, W]``
    in (0, 1), features after each of the ``levels`` stages). Patches are joined into whole images
    before the last ``combine`` stages (``combine = 0``: the output patches are joined)."""

    def __init__(self, channels: int, width: int, levels: int, grid: int, combine: int):
        super().__init__()
        self.stages = nn.ModuleList(ResStage(width * 2 ** (levels - i), width * 2 ** (levels - i - 1))
                                    for i in range(levels))
        self.out = nn.Conv2d(width, channels, 1)
        self.grid, self.join_at = grid, levels - combine

    def forward(self, z):
        feats = []
        for i, stage in enumerate(self.stages):
            if i == self.join_at:
                z = from_patches(z, self.grid)
            z = stage(F.interpolate(z, scale_factor=2, mode="bilinear", align_corners=False))
            feats.append(z)
        y = torch.sigmoid(self.out(z))
        return (from_patches(y, self.grid) if self.join_at == len(self.stages) else y), feats


class SimpleDiscriminator(nn.Module):
    """Five 5x5 stride-2 convolutions and a linear layer: ``[B, C, H, W] -> logit [B]`` ("real")."""

    CHANNELS = (16, 32, 64, 128, 128)

    def __init__(self, channels: int, hw: tuple[int, int]):
        super().__init__()
        layers, c, (h, w) = [], channels, hw
        for i, cout in enumerate(self.CHANNELS):
            layers.append(nn.Conv2d(c, cout, 5, 2, 2))
            if i:
                layers.append(nn.BatchNorm2d(cout))
            layers.append(nn.LeakyReLU(0.2, inplace=True))
            c, h, w = cout, (h + 1) // 2, (w + 1) // 2
        self.net = nn.Sequential(*layers)
        self.head = nn.Linear(c * h * w, 1)

    def forward(self, x):
        return self.head(self.net(x).flatten(1))[:, 0]
