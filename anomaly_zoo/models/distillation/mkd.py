"""MKD: Multiresolution Knowledge Distillation for Anomaly Detection (Salehi et al., CVPR 2021).

A *smaller* network, the cloner C, learns to reproduce the activations of a pretrained source
network S at several depths ("critical points") on normal images. Being smaller, it can only
learn the part of the source's knowledge that normal images exercise; on an anomaly its
activations drift from the source's, in size (value) and in direction.

* Critical points (Sec. 3): the paper reads VGG-16 at the ends of four of its blocks; here the
  library's EfficientNet-Lite0 at the taps at strides 2, 4, 8, 16 (``stage1``, ``stage2``,
  ``stage3``, ``stage5``: 16, 24, 40, 112 channels).
* Cloner: a plain VGG-like network (the paper's cloner is a smaller VGG): per critical point one
  stride-2 conv 3x3 -> BN -> ReLU -> conv 3x3 to the source's channels at that point (ReLU
  before the next stage), 0.19 M parameters against the source's 0.70 M up to ``stage5``.
* Value loss (eq. 1): L_val = sum_i 1/N_i sum_j (a_s^{CP_i}(j) - a_c^{CP_i}(j))^2, the mean
  squared difference at each critical point i, summed over points.
* Direction loss (eq. 2): L_dir = sum_i 1 - vec(a_s^{CP_i})^T vec(a_c^{CP_i}) / (||vec(a_s)|| ||vec(a_c)||),
  one cosine per image between the flattened activations.
* Total (eq. 3): L = L_val + lambda L_dir, lambda = ``lamda`` (0.01, the official configuration,
  rohban-lab/Knowledge_Distillation_AD); Adam, lr 1e-3.
* Image score: L itself, per image. Map (Sec. 3.3, "localization"): the paper's choice, the
  vanilla gradient dL/dx of the per-image loss with respect to the input pixels, here its
  absolute value summed over colour channels, smoothed with a Gaussian (sigma = 4). The paper
  also applies a morphological opening, left out here.

Default preset: 128 px, 200 epochs, batch 64 (the official configuration's 201 epochs, rounded).
Quick: 64 px, 30 epochs, batch 16. Measured on the quick brick set (data seeds 0 / 1 / 2): image
AUROC 0.879 / 0.823 / 0.843, pixel AUROC 0.784 / 0.756 / 0.746, AUPRO 0.32 / 0.25 / 0.28 (the
untrained cloner: 0.685 image, 0.391 pixel). The gradient maps localise poorly (the paper, too,
reports its weakest numbers for localisation); the loss is the better detector.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ...base import FeatureDetector
from ...ops import gaussian_blur
from ...params import Param
from ...registry import register


class Cloner(nn.Module):
    """The smaller VGG-like cloner: one stride-2 stage per critical point."""

    def __init__(self, channels: list[int], strides: list[int]):
        super().__init__()
        stages, cin, stride = [], 3, 1
        for c, s in zip(channels, strides):
            layers = []
            while stride < s:
                layers += [nn.Conv2d(cin, c, 3, 2, 1, bias=False), nn.BatchNorm2d(c), nn.ReLU(inplace=True)]
                cin, stride = c, stride * 2
            layers.append(nn.Conv2d(cin, c, 3, 1, 1))
            stages.append(nn.Sequential(*layers))
            cin = c
        self.stages = nn.ModuleList(stages)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        out = []
        for i, stage in enumerate(self.stages):
            x = stage(F.relu(x) if i else x)
            out.append(x)
        return out


def mkd_loss(source: list, clone: list, lamda: float) -> torch.Tensor:
    """Eq. (1-3) per image: ``[B]`` = sum_i mean (a_s - a_c)^2 + lamda sum_i (1 - cos(vec a_s, vec a_c))."""
    val = sum((s - c).pow(2).flatten(1).mean(1) for s, c in zip(source, clone))
    direction = sum(1 - F.cosine_similarity(s.flatten(1), c.flatten(1), dim=1) for s, c in zip(source, clone))
    return val + lamda * direction


@register("mkd", family="distillation", paper="Multiresolution Knowledge Distillation for Anomaly Detection",
          year=2021, bibkey="salehi2021mkd", localizes=True, trains=True,
          quick=dict(image_size=64, epochs=30, batch_size=16),
          deviations=("source: EfficientNet-Lite0 taps stage1/2/3/5 (strides 2, 4, 8, 16) instead of VGG-16's "
                      "four critical layers; the cloner a plain VGG-like network sized to those taps",
                      "map: |dL/dx| summed over colour channels and Gaussian-smoothed, without the paper's "
                      "morphological opening",
                      "images resized to image_size without ImageNet mean/std (the source's own normalisation)"))
class MKD(FeatureDetector):
    """A smaller cloner imitates the source's activations (value + direction); gradient maps."""

    default_strides = (2, 4, 8, 16)
    needs_grad = True
    image_size = Param.image_size(128, low=16)
    epochs = Param.epochs(200)
    batch_size = Param.batch_size(64)
    lr = Param.lr(1e-3)
    weight_decay = Param.weight_decay(0.0)
    lamda = Param(0.01, float, low=0, help="weight of the direction loss (eq. 3)")
    sigma = Param.sigma(4.0)

    def _build(self, shapes: dict) -> None:
        super()._build(shapes)
        self.cloner_ = Cloner([self.extractor_.channels[k] for k in self.layers_],
                              [self.extractor_.strides[k] for k in self.layers_])

    def _pair(self, x: torch.Tensor) -> tuple[list, list]:
        with torch.no_grad() if not x.requires_grad else torch.enable_grad():
            f = self.extractor_(x)
        src = [f[k] for k in self.layers_]
        clone = [F.interpolate(c, size=s.shape[-2:], mode="bilinear", align_corners=False)
                 if c.shape[-2:] != s.shape[-2:] else c for c, s in zip(self.cloner_(x), src)]
        return src, clone

    def _fit(self, x: torch.Tensor) -> None:
        self._train(lambda b, ctx: mkd_loss(*self._pair(b), self.lamda).mean(), x, module=self.cloner_,
                    params=self.cloner_.parameters())

    def _score(self, x: torch.Tensor):
        x = x.detach().clone().requires_grad_(True)
        loss = mkd_loss(*self._pair(x), self.lamda)
        (grad,) = torch.autograd.grad(loss.sum(), x)  # images are independent: one backward for all
        maps = gaussian_blur(grad.abs().sum(1), self.sigma)
        return loss.detach(), maps.detach()
