"""FCDD: Explainable Deep One-Class Classification (Liznerski et al., ICLR 2021).

Deep SVDD made fully convolutional: the network maps an image to a *heatmap* whose
pixels are one-class scores of their receptive fields, and the heatmap itself is the
explanation.

* Network (Sec. 3): a fully convolutional network phi: R^{c x h x w} -> R^{u x v}. The
  paper's MVTec-AD network is the first ten layers of an ImageNet-pretrained VGG11
  (frozen) plus trainable convolutions down to one channel. Here: the library's
  pretrained backbone up to one tap (``layers=None``: the tap at stride 8, Lite0's
  stage3; frozen, BatchNorm statistics included) plus a trainable head conv 3x3 -> BN ->
  ReLU -> conv 1x1 to one channel. Its receptive field (83 px at stride 8 for Lite0's
  stage3 plus the head) is read from the backbone's own layer geometry
  (``FeatureExtractor.receptive_field``), never re-described here.
* Pseudo-Huber heatmap (eq. 1): A(X) = sqrt(phi(X; W)^2 + 1) - 1, a smooth |phi|.
* Loss with outliers (eq. 2; y = 1 for an anomalous image):
      min_W 1/n sum_i (1 - y_i) 1/(u v) ||A(X_i)||_1
                       - y_i log(1 - exp(-1/(u v) ||A(X_i)||_1))
  Normal images are pulled to an all-zero heatmap, anomalous ones pushed away. No real
  anomalies are needed: as in the paper's MVTec-AD setting, each training image is
  replaced with probability 1/2 by a copy with *confetti noise* added (smoothed, rotated
  coloured and white squares, built as the reference code does) from the library's
  training-time synthesis (:mod:`anomaly_zoo.synthesis`), never by the test defects.
  With outliers in the loss the trivial constant solution is no longer a minimum, so
  FCDD, unlike Deep SVDD, needs no bias-free network.
* Score: the image score is the mean of A (1/(u v) ||A(X)||_1); the map is A upsampled
  by the receptive field's Gaussian (Sec. 3, "Heatmap upsampling", Algorithm 1): a
  transposed convolution with a fixed Gaussian kernel the size of the receptive field,
  the network's stride and a standard deviation ``gauss_std`` (12 px in the paper's
  MVTec-AD runs at 224 px; the quick preset scales it to 128 px), each heatmap pixel
  spreading its score over the input pixels it sees, centred where it looks.

Default preset: the reference code's MVTec-AD configuration (``DefaultMvtecConfig``):
224 px, 200 epochs, SGD with momentum 0.9, lr 1e-3 multiplied by 0.985 after every
epoch, weight decay 1e-5, an effective batch of 128, confetti noise on half of the
images. What the library does differently (backbone, no local contrast normalisation,
...) is listed in the model card's ``deviations``. Quick: 128 px, Adam, batch 16, 15 epochs.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ...base import FeatureDetector
from ...ops import gaussian_kernel2d
from ...params import Param, bad
from ...registry import register
from ...synthesis import KINDS, synthesize


# ----------------------------------------------------------------------- loss and upsampling
def pseudo_huber(phi: torch.Tensor) -> torch.Tensor:
    """Eq. (1): A = sqrt(phi^2 + 1) - 1."""
    return torch.sqrt(phi * phi + 1) - 1


def fcdd_loss(a: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Eq. (2): heatmaps ``a [B, u, v]`` (already pseudo-Huber), labels ``y [B]`` (1 = anomalous)."""
    m = a.flatten(1).mean(1)
    anomalous = -torch.log(-torch.expm1(-m).clamp_max(-1e-6))  # -log(1 - exp(-m)), stable for small m
    return ((1 - y) * m + y * anomalous).mean()


def receptive_upsample(a: torch.Tensor, size, r: int, j: int, c: float, std: float) -> torch.Tensor:
    """Algorithm 1: ``a [B, u, v]`` -> ``[B, H, W]`` by a transposed convolution with the Gaussian kernel
    (size ``r``, stride ``j``) placed on each cell's receptive-field centre ``c + i * j``. The kernel is
    normalised to sum 1 (the paper's code leaves its peak at 1; the scale changes no ranking)."""
    kernel = gaussian_kernel2d(r, std).to(a)
    out = F.conv_transpose2d(a[:, None], kernel[None, None], stride=j)[:, 0]
    # cell i's kernel centre lands on output index i*j + (r-1)/2; shift so it lands on c + i*j
    off = int(round((r - 1) / 2 - c))
    h, w = size
    if off < 0:
        out = F.pad(out, (-off, 0, -off, 0))
        off = 0
    out = out[:, off : off + h, off : off + w]
    return F.pad(out, (0, w - out.shape[-1], 0, h - out.shape[-2]))


class FCDDHead(nn.Module):
    """The trainable part: conv 3x3 -> BN -> ReLU -> conv 1x1 to one channel (phi's last layers)."""

    def __init__(self, cin: int, hidden: int = 128):
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(cin, hidden, 3, padding=1), nn.BatchNorm2d(hidden), nn.ReLU(inplace=True),
                                 nn.Conv2d(hidden, 1, 1))

    def forward(self, f):
        return self.net(f)[:, 0]


#: the head's 3x3 convolution (kernel, stride, pad), added to the backbone's receptive field
HEAD_GEOMETRY = [(3, 1, 1)]


@register("fcdd", family="one_class", paper="Explainable Deep One-Class Classification", year=2021,
          bibkey="liznerski2021fcdd", localizes=True, trains=True,
          quick=dict(image_size=128, epochs=15, batch_size=16, optimizer="adam", gauss_std=7.0),
          deviations=("backbone: EfficientNet-Lite0 up to stage3 (stride 8, frozen) + a conv 3x3 / BN / ReLU / "
                      "conv 1x1 head, instead of the first ten layers of an ImageNet VGG11 + trainable convolutions",
                      "no local contrast normalisation with per-class min-max scaling and no colour-jitter / noise "
                      "augmentation of the inputs: the backbone sees [0, 1] images with its own ImageNet "
                      "normalisation",
                      "SGD momentum 0.9 without Nesterov (the reference code uses Nesterov)",
                      "one batch of 128 images per step (the reference accumulates 8 batches of 16: the same "
                      "gradient, but batch norm statistics over 128 instead of 16)",
                      "confetti noise: sizes and blob counts are scaled from 224 px to image_size; the reference's "
                      "random noise inversion for nearly unchanged images is kept, its nearest-neighbour rotation "
                      "is replaced by an exact rotated-square test",
                      "quick preset: Adam, batch 16 and 15 epochs (the paper's SGD schedule needs its 200 epochs)"))
class FCDD(FeatureDetector):
    """Fully convolutional data description: pseudo-Huber heatmaps, confetti outliers, Gaussian upsampling."""

    default_strides = (8,)  # one tap: Lite0's stage3, the ResNets' layer2

    hidden = Param(128, int, low=1, help="channels of the head's 3x3 convolution")
    image_size = Param.image_size(224)
    epochs = Param.epochs(200)
    batch_size = Param(128, int, low=2, help="images per step (the paper: 8 accumulated batches of 16)")
    lr = Param.lr(1e-3)
    weight_decay = Param.weight_decay(1e-5)
    optimizer = Param("sgd", str, choices=("sgd", "adam"), help="the paper's SGD (momentum 0.9) or Adam")
    lr_decay = Param(0.985, float, low=0, high=1, low_open=True, help="learning rate factor per epoch (1: constant)")
    synthesis = Param("confetti", str, choices=tuple(KINDS), help="the synthetic outliers (anomaly_zoo.synthesis)")
    p_anomalous = Param(0.5, float, low=0, high=1, low_open=True, high_open=True,
                        help="share of each batch replaced by synthetic outliers")
    gauss_std = Param(12.0, float, low=0, low_open=True, help="std of the upsampling Gaussian, px (Algorithm 1)")

    def _check_params(self) -> None:
        super()._check_params()
        if self.layers is not None and len(self.layers) != 1:
            raise bad(self.name, "layers", self.layers, "one tap name (FCDD reads one stage), or None")

    def _build(self, shapes: dict) -> None:
        super()._build(shapes)
        self.tap_ = self.layers_[-1]
        self.head_ = FCDDHead(self.extractor_.channels[self.tap_], self.hidden)
        r, j, c = self.extractor_.receptive_field(self.tap_, extra=HEAD_GEOMETRY)  # the backbone's own geometry
        self.rf_ = (r if r % 2 else r + 1, j, c)

    def heatmap(self, x: torch.Tensor) -> torch.Tensor:
        """A(X) ``[B, u, v]``: the pseudo-Huber heatmap at the network's resolution (eq. 1)."""
        with torch.no_grad():
            f = self.extractor_(x)[self.tap_]
        return pseudo_huber(self.head_(f))

    def _step(self, x: torch.Tensor, ctx) -> torch.Tensor:
        xb, _, y = synthesize(x, self.synthesis, ctx.generator, p=self.p_anomalous)
        return fcdd_loss(self.heatmap(xb), y)  # eq. (2)

    def _fit(self, x: torch.Tensor) -> None:
        schedule = dict(schedule="exponential", gamma=self.lr_decay) if self.lr_decay < 1 else {}
        self._train(self._step, x, module=self.head_, optimizer=self.optimizer, momentum=0.9, **schedule)
        self.diagnostics_["receptive_field"] = list(self.rf_)

    def _score(self, x: torch.Tensor):
        a = self.heatmap(x)
        r, j, c = self.rf_
        maps = receptive_upsample(a, x.shape[-2:], r, j, c, self.gauss_std)
        return a.flatten(1).mean(1), maps


__all__ = ["FCDD", "fcdd_loss", "pseudo_huber", "receptive_upsample"]
