"""STPM: Student-Teacher Feature Pyramid Matching for Anomaly Detection (Wang et al., BMVC 2021).

A teacher network pretrained on ImageNet and a student of the *same architecture* with random
weights read the same image; the student is trained on normal images only to reproduce the
teacher's feature pyramid. Where the test image shows something the student never learned to
imitate, the two pyramids disagree, and the disagreement is the anomaly map.

* Features (Sec. 3.1): the teacher's taps at several depths, each channel-normalised per
  position, F_hat = F / ||F||_2 over channels. The paper reads ResNet-18's conv2-4 blocks
  (strides 4, 8, 16); here the library's frozen EfficientNet-Lite0 taps at strides 4, 8, 16
  (``stage2``, ``stage3``, ``stage5``) and a student EfficientNet-Lite0 built from random weights
  (:class:`~anomaly_zoo.models.distillation.common.StudentBackbone`, BatchNorm in train mode
  while it learns).
* Loss (eq. 1-2): per position l(i, j) = 1/2 || F_hat_t(i, j) - F_hat_s(i, j) ||^2, averaged over
  the h x w positions of each tap, summed over taps (weights alpha_l = 1), averaged over the batch
  (the official code, gdwang08/STFPM ``cal_loss``, divides the summed batch loss by its size).
* Map (eq. 3-4): each tap's per-position loss, bilinearly upsampled to the input size,
  multiplied over the taps: Omega = prod_l Upsample(Omega_l). Image score: its maximum.
  (Since F_hat are unit vectors, 1/2 ||a - b||^2 = 1 - cos(a, b), the official code's map.)

Default preset: the paper's, SGD with lr 0.4, momentum 0.9, weight decay 1e-4, batch 32,
100 epochs, 256 px. Quick: 128 px, 20 epochs, batch 8 (lr 0.4 as in the paper). Measured on the
quick brick set (data seeds 0 / 1 / 2): image AUROC 0.964 / 0.926 / 0.952, pixel AUROC 0.990 /
0.987 / 0.975, AUPRO 0.964 / 0.958 / 0.957; the untrained student (lr 1e-12, one epoch): 0.557
image, 0.719 pixel AUROC (seed 0). Phantom (seed 0): image AUROC 0.740, pixel AUROC 0.982, AUPRO
0.939: the lesions are found, but the maximum of the map over a whole head also picks up the
anatomy's variable edges.
"""
from __future__ import annotations

import torch

from ...base import FeatureDetector
from ...ops import upsample
from ...params import Param
from ...registry import register
from .common import StudentBackbone, sq_discrepancy


def stpm_loss(teacher: dict, student: dict) -> torch.Tensor:
    """Eq. (2): sum over taps of the mean over positions of eq. (1), averaged over the batch."""
    return sum(sq_discrepancy(teacher[k], student[k]).mean(dim=(1, 2)) for k in teacher).mean()


def stpm_map(teacher: dict, student: dict, size) -> torch.Tensor:
    """Eq. (3-4): product over taps of the upsampled per-position losses, ``[B, H, W]``."""
    out = None
    for k in teacher:
        m = upsample(sq_discrepancy(teacher[k], student[k]), size)
        out = m if out is None else out * m
    return out


@register("stpm", family="distillation", paper="Student-Teacher Feature Pyramid Matching for Anomaly Detection",
          year=2021, bibkey="wang2021stpm", localizes=True, trains=True,
          quick=dict(image_size=128, epochs=20, batch_size=8),
          deviations=("teacher and student: EfficientNet-Lite0 (taps stage2/3/5 at strides 4, 8, 16) instead of "
                      "ResNet-18 conv2-4 (strides 4, 8, 16); the student from the architecture's random "
                      "initialisation",
                      "images resized to image_size without the paper's normalisation by ImageNet mean/std "
                      "(the teacher's own input normalisation is used)"))
class STPM(FeatureDetector):
    """Same-architecture student regresses the teacher's channel-normalised feature pyramid."""

    default_strides = (4, 8, 16)
    image_size = Param.image_size(256, low=32)
    epochs = Param.epochs(100)
    batch_size = Param.batch_size(32)
    lr = Param.lr(0.4)
    momentum = Param(0.9, float, low=0, high=1, high_open=True, help="SGD momentum (Sec. 4.1)")
    weight_decay = Param.weight_decay(1e-4)

    def _build(self, shapes: dict) -> None:
        super()._build(shapes)
        self.student_ = StudentBackbone(self.backbone, self.layers_)

    def _teacher(self, x: torch.Tensor) -> dict:
        with torch.no_grad():
            return self.extractor_(x)

    def _step(self, batch: torch.Tensor, ctx) -> torch.Tensor:
        return stpm_loss(self._teacher(batch), self.student_(batch))

    def _fit(self, x: torch.Tensor) -> None:
        self._train(self._step, x, module=self.student_, params=self.student_.parameters(),
                    optimizer="sgd", momentum=self.momentum)

    def _score(self, x: torch.Tensor):
        maps = stpm_map(self._teacher(x), self.student_(x), x.shape[-2:])
        return maps.flatten(1).amax(1), maps

    def layer_maps(self, images) -> dict[str, torch.Tensor]:
        """Per-tap discrepancy maps ``{tap: [N, H, W]}`` (eq. 3 before the product), for the book."""
        x = self._prepare(images, "images").to(self.device_)
        self.eval()
        with torch.no_grad():
            t, s = self.extractor_(x), self.student_(x)
            return {k: upsample(sq_discrepancy(t[k], s[k]), x.shape[-2:]).cpu() for k in t}
