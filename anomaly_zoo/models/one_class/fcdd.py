"""FCDD: Explainable Deep One-Class Classification (Liznerski et al., ICLR 2021).

Deep SVDD made fully convolutional: the network maps an image to a *heatmap* whose
pixels are one-class scores of their receptive fields, and the heatmap itself is the
explanation.

* Network (Sec. 3): a fully convolutional network phi: R^{c x h x w} -> R^{u x v}. The
  paper's MVTec-AD network is the first ten layers of an ImageNet-pretrained VGG11
  (frozen) plus trainable convolutions down to one channel. Here: the library's
  pretrained EfficientNet-Lite0 up to ``layers="stage3"`` (stride 8, receptive field 67
  px; frozen, BatchNorm statistics included) plus a trainable head conv 3x3 -> BN ->
  ReLU -> conv 1x1 to one channel (receptive field 83 px at stride 8).
* Pseudo-Huber heatmap (eq. 1): A(X) = sqrt(phi(X; W)^2 + 1) - 1, a smooth |phi|.
* Loss with outliers (eq. 2; y = 1 for an anomalous image):
      min_W 1/n sum_i (1 - y_i) 1/(u v) ||A(X_i)||_1
                       - y_i log(1 - exp(-1/(u v) ||A(X_i)||_1))
  Normal images are pulled to an all-zero heatmap, anomalous ones pushed away. No real
  anomalies are needed: as in the paper's MVTec-AD setting, each training batch has
  half of its images corrupted by *confetti noise* (coloured blobs) from the library's
  training-time synthesis (:mod:`anomaly_zoo.synthesis`), never by the test defects.
  With outliers in the loss the trivial constant solution is no longer a minimum, so
  FCDD, unlike Deep SVDD, needs no bias-free network.
* Score: the image score is the mean of A (1/(u v) ||A(X)||_1); the map is A upsampled
  by the receptive field's Gaussian (Sec. 3, "Heatmap upsampling", Algorithm 1): a
  transposed convolution with a fixed Gaussian kernel the size of the receptive field,
  the network's stride and a standard deviation ``gauss_std`` (12 px in the paper's
  MVTec-AD runs at 224 px; the quick preset scales it to 128 px), each heatmap pixel
  spreading its score over the input pixels it sees, centred where it looks.

Paper settings (default preset): 224 px, 200 epochs, batch 16, lr 1e-3, weight decay
1e-6, confetti noise on half of the batch. Quick: 128 px and 15 epochs.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ...backbones import create_backbone
from ...backbones.efficientnet import _LITE0_STAGES
from ...base import Detector
from ...params import Param
from ...registry import register
from ...synthesis import KINDS, synthesize
from ...training import fit_loop
from ...utils import AnomalyZooError


# ----------------------------------------------------------------------- receptive field
def _lite0_layers(upto: str):
    """(kernel, stride, pad_top) of every spatial layer of EfficientNet-Lite0 up to a tap (TF "SAME" on
    even inputs: a stride-2 k x k convolution pads (k - 2) // 2 on the top/left)."""
    layers = [(3, 2, 0)]  # stem
    for i, (_, k, s, _, repeats) in enumerate(_LITE0_STAGES, start=1):
        for r in range(repeats):
            stride = s if r == 0 else 1
            layers.append((k, stride, (k - 2) // 2 if stride == 2 else k // 2))
        if f"stage{i}" == upto:
            return layers
    raise AnomalyZooError(f"unknown efficientnet_lite0 tap {upto!r}")


def _resnet_layers(upto: str, bottleneck: bool):
    layers = [(7, 2, 3), (3, 2, 1)]  # conv1, maxpool
    for i, blocks in enumerate((2, 2, 2, 2) if not bottleneck else (3, 4, 6, 3), start=1):
        for b in range(blocks):
            stride = 2 if (b == 0 and i > 1) else 1
            layers += [(3, stride, 1)] if bottleneck else [(3, stride, 1), (3, 1, 1)]
        if f"layer{i}" == upto:
            return layers
    raise AnomalyZooError(f"unknown resnet tap {upto!r}")


def receptive_field(layers) -> tuple[int, int, float]:
    """Walk ``(kernel, stride, pad_top)`` layers: returns (size r, jump j, centre c) so that output cell i
    sees input pixels whose centre is ``c + i * j`` and extent ``r``."""
    r, j, c = 1, 1, 0.0
    for k, s, pad in layers:
        c += j * ((k - 1) / 2 - pad)
        r += (k - 1) * j
        j *= s
    return r, j, c


def backbone_layers(backbone: str, tap: str):
    if backbone == "efficientnet_lite0":
        return _lite0_layers(tap)
    if backbone in ("resnet18", "wide_resnet50_2"):
        return _resnet_layers(tap, bottleneck=backbone != "resnet18")
    raise AnomalyZooError(f"FCDD knows the receptive field of efficientnet_lite0, resnet18 and "
                          f"wide_resnet50_2, not of {backbone!r}")


# ----------------------------------------------------------------------- loss and upsampling
def pseudo_huber(phi: torch.Tensor) -> torch.Tensor:
    """Eq. (1): A = sqrt(phi^2 + 1) - 1."""
    return torch.sqrt(phi * phi + 1) - 1


def fcdd_loss(a: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Eq. (2): heatmaps ``a [B, u, v]`` (already pseudo-Huber), labels ``y [B]`` (1 = anomalous)."""
    m = a.flatten(1).mean(1)
    anomalous = -torch.log(-torch.expm1(-m).clamp_max(-1e-6))  # -log(1 - exp(-m)), stable for small m
    return ((1 - y) * m + y * anomalous).mean()


def gaussian_kernel(size: int, std: float) -> torch.Tensor:
    """The 2-D Gaussian ``[size, size]`` of the receptive field, normalised to sum 1 (the scale of the
    map does not change any ranking; the paper's code leaves the peak at 1)."""
    t = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-0.5 * (t / std) ** 2)
    k = g[:, None] * g[None, :]
    return (k / k.sum()).float()


def receptive_upsample(a: torch.Tensor, size, r: int, j: int, c: float, std: float) -> torch.Tensor:
    """Algorithm 1: ``a [B, u, v]`` -> ``[B, H, W]`` by a transposed convolution with the Gaussian kernel
    (size ``r``, stride ``j``) placed on each cell's receptive-field centre ``c + i * j``."""
    kernel = gaussian_kernel(r, std).to(a)
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


@register("fcdd", family="one_class", paper="Explainable Deep One-Class Classification", year=2021,
          bibkey="liznerski2021fcdd", localizes=True, trains=True,
          quick=dict(image_size=128, epochs=15, gauss_std=7.0))
class FCDD(Detector):
    """Fully convolutional data description: pseudo-Huber heatmaps, confetti outliers, Gaussian upsampling."""

    backbone = Param("efficientnet_lite0", str)
    pretrained = Param(True, bool)
    layers = Param("stage3", str)
    weights = Param(None, str, none=True)
    hidden = Param(128, int)
    image_size = Param.image_size(224)
    epochs = Param.epochs(200)
    batch_size = Param.batch_size(16)
    lr = Param.lr(1e-3)
    weight_decay = Param.weight_decay(1e-6)
    synthesis = Param("confetti", str)
    p_anomalous = Param(0.5, float)
    gauss_std = Param(12.0, float)

    def _build(self, meta: dict) -> None:
        tap = self.layers if isinstance(self.layers, str) else list(self.layers)[-1]
        self.tap_ = tap
        self.extractor_ = create_backbone(self.backbone, pretrained=self.pretrained, layers=[tap],
                                          weights=self.weights)
        self.head_ = FCDDHead(self.extractor_.channels[tap], self.hidden)
        r, j, c = receptive_field(backbone_layers(self.backbone, tap) + [(3, 1, 1)])  # + the head's 3x3
        self.rf_ = (r if r % 2 else r + 1, j, c)

    def heatmap(self, x: torch.Tensor) -> torch.Tensor:
        """A(X) ``[B, u, v]``: the pseudo-Huber heatmap at the network's resolution (eq. 1)."""
        with torch.no_grad():
            f = self.extractor_(x)[self.tap_]
        return pseudo_huber(self.head_(f))

    def _loss(self, x: torch.Tensor) -> torch.Tensor:
        xb, _, y = synthesize(x, self.synthesis, self._gen, p=self.p_anomalous)
        return fcdd_loss(self.heatmap(xb), y)

    def _fit(self, x: torch.Tensor) -> None:
        if self.synthesis not in KINDS:
            raise AnomalyZooError(f"unknown synthesis {self.synthesis!r}; use one of {', '.join(KINDS)}")
        self._build(self.meta_)
        self.extractor_.to(self.device_)
        self._gen = torch.Generator().manual_seed(self.seed)
        try:
            self.meta_["history"] = fit_loop(self.head_, self._loss, x, epochs=self.epochs,
                                             batch_size=self.batch_size, lr=self.lr,
                                             weight_decay=self.weight_decay, device=self.device_, seed=self.seed,
                                             desc="fcdd", checkpoint=self.checkpoint)
        finally:
            del self._gen
        self.meta_["receptive_field"] = list(self.rf_)

    def _score(self, x: torch.Tensor):
        a = self.heatmap(x)
        r, j, c = self.rf_
        maps = receptive_upsample(a, x.shape[-2:], r, j, c, self.gauss_std)
        return a.flatten(1).mean(1), maps


__all__ = ["FCDD", "backbone_layers", "fcdd_loss", "gaussian_kernel", "pseudo_huber", "receptive_field", "receptive_upsample"]
