"""Reverse Distillation: Anomaly Detection via Reverse Distillation from One-Class Embedding
(Deng & Li, CVPR 2022).

Classic student-teacher methods give the student the same input as the teacher, and a student
that generalises well imitates the teacher on anomalies too. Reverse distillation changes the
direction: the student is a *decoder* that must rebuild the teacher's multi-scale features from
a compact one-class embedding of them. The embedding keeps what normal images need and drops
the rest, so an anomalous region cannot be passed through and comes back "normal".

* Teacher encoder E (Sec. 3.1): frozen, pretrained; the paper reads WideResNet-50's conv2-4
  blocks (strides 4, 8, 16); here EfficientNet-Lite0's taps at strides 4, 8, 16
  (``stage2``, ``stage3``, ``stage5``: 24, 40, 112 channels).
* One-class bottleneck embedding, OCBE (Sec. 3.2): multi-scale feature fusion (the stride-4
  tap through two 3x3 stride-2 conv-BN-ReLU layers, the stride-8 tap through one, both to the
  deepest tap's width, concatenated with the deepest tap), then the one-class embedding: a
  ResNet stage of ``bottleneck_blocks`` basic residual blocks, the first with stride 2 (ResNet's
  4th stage in the official code, hq-deng/RD4AD ``BN_layer``), to twice the deepest width.
* Student decoder D (Sec. 3.1): the teacher in reverse: per tap, from deep to shallow, a stage of
  ``decoder_blocks`` residual blocks whose first block upsamples by 2 (a 2x2 transposed
  convolution, as the official ``de_resnet``), ending with the tap's channels.
* Loss (eq. 2-3): M^k(h, w) = 1 - cos(f_E^k(h, w), f_D^k(h, w)) and
  L = sum_k 1/(H_k W_k) sum_{h, w} M^k(h, w), i.e. per position (``loss_form="position"``, the
  paper). The official code instead takes one cosine per image between the flattened maps
  (``loss_function`` views each map as ``[B, -1]``): ``loss_form="flattened"``.
* Map (eq. 4): S = sum_k Upsample(M^k), smoothed with a Gaussian (sigma = 4); image score: max.

Default preset: the paper's, Adam with lr 0.005 and betas (0.5, 0.999), batch 16, 200 epochs,
256 px. Quick: 128 px, 40 epochs, chosen by proxy validation (:mod:`anomaly_zoo.validation`, brick + phantom
training images of data seed 0, proxy seeds 0, 1; mean image AUROC / pixel AUROC / AUPRO: 20 epochs .763 /
.978 / .782, 40 epochs .795 / .978 / .804). Measured on the quick brick set (data seeds 0 / 1 / 2): image
AUROC 0.942 / 0.951 / 0.926, pixel AUROC 0.966 / 0.986 / 0.977, AUPRO 0.923 / 0.948 / 0.947 (20 epochs: image
0.922 / 0.894 / 0.925); the untrained student (lr 1e-12, one epoch): 0.391 image, 0.223 pixel AUROC (seed 0).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ...base import FeatureDetector
from ...ops import gaussian_blur, upsample
from ...params import Param, bad
from ...registry import register
from .common import cosine_distance


# --------------------------------------------------------------------------- networks
def conv_bn_relu(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class BasicBlock(nn.Module):
    """ResNet's basic residual block; ``mode="down"`` strides by 2, ``mode="up"`` upsamples by 2
    with a 2x2 transposed convolution (the decoder's block of the official ``de_resnet``)."""

    def __init__(self, cin: int, cout: int, mode: str = "same"):
        super().__init__()
        if mode == "up":
            first = nn.ConvTranspose2d(cin, cout, 2, 2, bias=False)
        else:
            first = nn.Conv2d(cin, cout, 3, 2 if mode == "down" else 1, 1, bias=False)
        self.body = nn.Sequential(first, nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
                                  nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout))
        if mode == "same" and cin == cout:
            self.short = nn.Identity()
        elif mode == "up":
            self.short = nn.Sequential(nn.ConvTranspose2d(cin, cout, 2, 2, bias=False), nn.BatchNorm2d(cout))
        else:
            self.short = nn.Sequential(nn.Conv2d(cin, cout, 1, 2 if mode == "down" else 1, bias=False),
                                       nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.body(x) + self.short(x))


def stage(cin: int, cout: int, blocks: int, mode: str) -> nn.Sequential:
    return nn.Sequential(BasicBlock(cin, cout, mode), *[BasicBlock(cout, cout) for _ in range(blocks - 1)])


def _resize_to(f: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """Match the decoder's grid to the teacher's where the input side is not a multiple of 32."""
    return f if f.shape[-2:] == ref.shape[-2:] else F.interpolate(f, size=ref.shape[-2:], mode="bilinear",
                                                                    align_corners=False)


class OCBE(nn.Module):
    """One-class bottleneck embedding (Sec. 3.2): multi-scale fusion, then one ResNet stage."""

    def __init__(self, channels: list[int], blocks: int):
        super().__init__()
        c1, c2, c3 = channels
        self.fuse1 = nn.Sequential(conv_bn_relu(c1, c2, 2), conv_bn_relu(c2, c3, 2))
        self.fuse2 = conv_bn_relu(c2, c3, 2)
        self.embed = stage(3 * c3, 2 * c3, blocks, "down")

    def forward(self, f1, f2, f3) -> torch.Tensor:
        a, b = self.fuse1(f1), self.fuse2(f2)
        return self.embed(torch.cat([_resize_to(a, f3), _resize_to(b, f3), f3], 1))


class Decoder(nn.Module):
    """The student: the teacher in reverse, one upsampling stage per tap, deep to shallow."""

    def __init__(self, channels: list[int], blocks: int):
        super().__init__()
        c1, c2, c3 = channels
        self.up3, self.up2, self.up1 = stage(2 * c3, c3, blocks, "up"), stage(c3, c2, blocks, "up"), \
            stage(c2, c1, blocks, "up")

    def forward(self, z: torch.Tensor, refs) -> list[torch.Tensor]:
        d3 = _resize_to(self.up3(z), refs[2])
        d2 = _resize_to(self.up2(d3), refs[1])
        d1 = _resize_to(self.up1(d2), refs[0])
        return [d1, d2, d3]


# --------------------------------------------------------------------------- loss and map
def rd_loss(teacher: list, student: list, form: str = "position") -> torch.Tensor:
    """Eq. (3) (``form="position"``) or the official code's flattened cosine, summed over taps."""
    if form == "flattened":
        return sum((1 - F.cosine_similarity(t.flatten(1), s.flatten(1), dim=1)).mean() for t, s in zip(teacher, student))
    return sum(cosine_distance(t, s).mean() for t, s in zip(teacher, student))


def rd_map(teacher: list, student: list, size) -> torch.Tensor:
    """Eq. (4) before smoothing: sum over taps of the upsampled per-position 1 - cos, ``[B, H, W]``."""
    return sum(upsample(cosine_distance(t, s), size) for t, s in zip(teacher, student))


@register("reverse_distillation", family="distillation",
          paper="Anomaly Detection via Reverse Distillation from One-Class Embedding", year=2022,
          bibkey="deng2022reverse", localizes=True, trains=True, quick=dict(image_size=128, epochs=40),
          deviations=("teacher: EfficientNet-Lite0 taps stage2/3/5 (strides 4, 8, 16; 24, 40, 112 channels) "
                      "instead of WideResNet-50 conv2-4; bottleneck and decoder widths follow the taps (the "
                      "deepest tap's width, twice that in the embedding)",
                      "ResNet basic blocks (ResNet-18's) in the embedding and the decoder, where the paper's "
                      "WideResNet-50 teacher comes with bottleneck blocks",
                      "images resized to image_size without ImageNet mean/std (the teacher's own normalisation)"))
class ReverseDistillation(FeatureDetector):
    """Decoder student rebuilds the teacher's features from a one-class bottleneck embedding."""

    default_strides = (4, 8, 16)
    image_size = Param.image_size(256, low=32)
    epochs = Param.epochs(200)
    batch_size = Param.batch_size(16)
    lr = Param.lr(0.005)
    beta1 = Param(0.5, float, low=0, high=1, high_open=True, help="Adam's first beta (the paper: 0.5)")
    weight_decay = Param.weight_decay(0.0)
    bottleneck_blocks = Param(2, int, low=1, high=8, help="residual blocks of the one-class embedding (Sec. 3.2)")
    decoder_blocks = Param(2, int, low=1, high=8, help="residual blocks per decoder stage (ResNet-18: 2)")
    loss_form = Param("position", str, choices=("position", "flattened"),
                      help="'position': eq. 3 (mean of per-position 1 - cos); 'flattened': the official code")
    sigma = Param.sigma(4.0)

    def _check_params(self) -> None:
        super()._check_params()
        if self.layers is not None and len(self.layers) != 3:
            raise bad(self.name, "layers", self.layers, "three taps (fine, middle, deep), or None")

    def _build(self, shapes: dict) -> None:
        super()._build(shapes)
        ch = [self.extractor_.channels[k] for k in self.layers_]
        self.bottleneck_ = OCBE(ch, self.bottleneck_blocks)
        self.decoder_ = Decoder(ch, self.decoder_blocks)

    def _features(self, x: torch.Tensor) -> tuple[list, list]:
        with torch.no_grad():
            f = self.extractor_(x)
        t = [f[k] for k in self.layers_]
        return t, self.decoder_(self.bottleneck_(*t), t)

    def _fit(self, x: torch.Tensor) -> None:
        student = nn.ModuleList([self.bottleneck_, self.decoder_])
        self._train(lambda b, ctx: rd_loss(*self._features(b), self.loss_form), x, module=student,
                    params=student.parameters(), betas=(self.beta1, 0.999))

    def _score(self, x: torch.Tensor):
        maps = gaussian_blur(rd_map(*self._features(x), x.shape[-2:]), self.sigma)
        return maps.flatten(1).amax(1), maps

    def layer_maps(self, images) -> dict[str, torch.Tensor]:
        """Per-tap 1 - cos maps ``{tap: [N, H, W]}`` (eq. 2, upsampled), for the book."""
        x = self._prepare(images, "images").to(self.device_)
        self.eval()
        with torch.no_grad():
            t, s = self._features(x)
        return {k: upsample(cosine_distance(a, b), x.shape[-2:]).cpu() for k, a, b in zip(self.layers_, t, s)}
