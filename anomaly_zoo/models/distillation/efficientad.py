"""EfficientAD: Accurate Visual Anomaly Detection at Millisecond-Level Latencies
(Batzner, Heckler & König, WACV 2024).

Speed is the point: every network is a four-layer patch description network (PDN), so a
forward pass costs a few milliseconds on a GPU. Two detectors run side by side:

* Teacher (Sec. 3.1): a PDN-small (conv 4x4 128, avg-pool 2, conv 4x4 256, avg-pool 2,
  conv 3x3 256, conv 4x4 C; ReLU between; no padding, so an output pixel sees a 33 x 33 patch)
  distilled from a pretrained network's features: the mean-squared error between the PDN's
  output and the normalised, locally averaged (3x3) mid-level features of the pretrained
  network, on ImageNet images (60,000 steps, batch 16, Adam lr 1e-4, weight decay 1e-5; the
  paper's appendix, Algorithm 1). Here: the library's EfficientNet-Lite0 taps at strides 8 and
  16 (``stage3`` + ``stage5``, 152 channels, so C = 152 instead of WideResNet-101's 384), on
  random crops of scikit-image's bundled photographs
  (:func:`~anomaly_zoo.models.distillation.common.generic_images`) instead of ImageNet; the
  teacher's outputs are then normalised per channel with their mean and std on the training
  images (Algorithm 1, "teacher normalisation").
* Student (Sec. 3.2): a PDN-small with 2C outputs; the first C regress the teacher. Hard-feature
  loss: D = (T(I) - S_ST(I))^2 per channel and position, d_hard = the ``hard_quantile`` (0.999)
  quantile of D, L_hard = mean of D over the elements >= d_hard. Penalty: L_ST = L_hard +
  (1 / CWH) sum_c ||S_ST(P)_c||_F^2 for a generic photograph P (ImageNet in the paper), which
  keeps the student from imitating the teacher outside the normal images.
* Auto-encoder branch (Sec. 3.3, logical anomalies): an auto-encoder A (six strided 4x4 convs
  to a 1 x 1 code of 64 channels, then bilinear upsampling + 4x4 convs with dropout 0.2 back to
  the teacher's grid) regresses the teacher on augmented normal images (random brightness,
  contrast or saturation, factor in [0.8, 1.2]): L_AE = mean (T(I') - A(I'))^2, and the student's
  other C outputs regress the auto-encoder: L_STAE = mean (A(I') - S_AE(I'))^2.
  Total loss L_ST + L_AE + L_STAE, Adam lr 1e-4, weight decay 1e-5, 70,000 steps of one image,
  lr x 0.1 after 95 % of them.
* Maps (Sec. 3.4): M_ST = mean_c (T - S_ST)^2, M_AE = mean_c (A - S_AE)^2, each normalised
  with its quantiles q_a = 0.9, q_b = 0.995 over *held-out* normal images (the official code's
  validation images: here the last ``val_fraction`` of a seeded shuffle of the training images,
  which then take no part in training): M_hat = 0.1 (M - q_a) / (q_b - q_a). The map is
  (M_hat_ST + M_hat_AE) / 2, zero-padded by 4 pixels of the PDN grid (the receptive field's
  border) and resized to the image; the image score is its maximum.

Quick preset: 64 px, PDNs at a quarter of the paper's hidden width (``pdn_width=0.25``), 300
teacher steps of 8 photos, 300 student steps of 4 images, the paper's learning rates. Measured
on brick (data seeds 0 / 1): image AUROC 0.746 / 0.755, pixel AUROC 0.701 / 0.690, AUPRO 0.37 /
0.29, short of the 0.90 the issue asks:
in 300 steps the teacher barely leaves its initialisation (distillation loss 0.997 of the
variance; lr 1e-3 for both gave 0.87 but a worse detector, 0.69 / 0.66), so the quick preset
is a random-teacher EfficientAD. The paper's 60,000 + 70,000 steps need a GPU. The PDN's "millisecond" latency is a
GPU's: on a CPU its 4x4 convolutions over 128 and 256 channels cost more than the whole
EfficientNet-Lite0, and the paper's 60,000 + 70,000 steps take days there.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ...base import FeatureDetector
from ...params import Param, bad
from ...registry import register
from .common import generic_images


# --------------------------------------------------------------------------- networks
def pdn_small(out_channels: int, width: float = 1.0) -> nn.Sequential:
    """The PDN-small of the paper's Table 6 (no padding: receptive field 33 x 33); ``width``
    scales its hidden channels (128, 256, 256 at 1.0, the paper's)."""
    a, b = max(8, round(128 * width)), max(8, round(256 * width))
    return nn.Sequential(
        nn.Conv2d(3, a, 4), nn.ReLU(inplace=True), nn.AvgPool2d(2, 2),
        nn.Conv2d(a, b, 4), nn.ReLU(inplace=True), nn.AvgPool2d(2, 2),
        nn.Conv2d(b, b, 3), nn.ReLU(inplace=True),
        nn.Conv2d(b, out_channels, 4))


def pdn_grid(side: int) -> int:
    """Output side of :func:`pdn_small` for an input side."""
    return ((side - 3) // 2 - 3) // 2 - 5


class AutoEncoder(nn.Module):
    """The auto-encoder of the paper's Table 7, its upsampling sizes scaled to the input size."""

    def __init__(self, out_channels: int, side: int, grid: int):
        super().__init__()
        enc, c = [], 3
        for cout in (32, 32, 64, 64, 64):
            enc += [nn.Conv2d(c, cout, 4, 2, 1), nn.ReLU(inplace=True)]
            c = cout
        enc.append(nn.Conv2d(64, 64, max(1, side // 32)))  # 8 x 8 at 256 px: to a 1 x 1 code
        self.encoder = nn.Sequential(*enc)
        # the paper's sizes at 256 px (56 px grid) are 3, 8, 15, 32, 63, 127 before each 4x4 conv
        self.sizes = [max(2, round(s * grid / 56)) for s in (3, 8, 15, 32, 63, 127)]
        self.convs = nn.ModuleList([nn.Conv2d(64, 64, 4, 1, 2) for _ in self.sizes])
        self.head = nn.Sequential(nn.Conv2d(64, 64, 3, 1, 1), nn.ReLU(inplace=True), nn.Conv2d(64, out_channels, 3, 1, 1))
        self.grid = grid
        self.drop = nn.Dropout(0.2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.encoder(x)
        for size, conv in zip(self.sizes, self.convs):
            z = self.drop(F.relu(conv(F.interpolate(z, size=size, mode="bilinear", align_corners=False))))
        return self.head(F.interpolate(z, size=self.grid, mode="bilinear", align_corners=False))


# --------------------------------------------------------------------------- losses
def hard_feature_loss(t: torch.Tensor, s: torch.Tensor, q: float) -> torch.Tensor:
    """Sec. 3.2: the mean of the squared differences at or above their ``q`` quantile."""
    d = (t - s).pow(2)
    d_hard = torch.quantile(d.flatten().float()[: 2**24], q)
    return d[d >= d_hard].mean()


def augment(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Sec. 3.3: one of brightness, contrast, saturation per image, factor uniform in [0.8, 1.2]."""
    out = []
    for img in x:
        kind = int(torch.randint(3, (1,), generator=g))
        f = 0.8 + 0.4 * float(torch.rand(1, generator=g))
        grey = (0.299 * img[0] + 0.587 * img[1] + 0.114 * img[2])[None]
        ref = img.new_zeros(()) if kind == 0 else (grey.mean() if kind == 1 else grey)
        out.append((ref + f * (img - ref)).clamp(0, 1))
    return torch.stack(out)


@register("efficientad", family="distillation",
          paper="EfficientAD: Accurate Visual Anomaly Detection at Millisecond-Level Latencies", year=2024,
          bibkey="batzner2024efficientad", localizes=True, trains=True,
          quick=dict(image_size=64, pdn_width=0.25, teacher_steps=300, teacher_batch=8, steps=300, batch_size=4),
          deviations=("teacher PDN distilled from EfficientNet-Lite0 taps stage3 + stage5 (strides 8, 16; 152 "
                      "channels, so 152 instead of 384 teacher channels) instead of WideResNet-101 layers 2-3",
                      "teacher distillation and the student's penalty use random crops of scikit-image's bundled "
                      "photographs instead of ImageNet",
                      "the pretrained features are computed at the PDN's input size and resized to its grid "
                      "(the paper feeds the feature extractor twice the resolution)",
                      "held-out normal images for the map quantiles: the last val_fraction of the training images"))
class EfficientAD(FeatureDetector):
    """PDN student-teacher with hard-feature loss plus an auto-encoder branch; quantile-normalised maps."""

    default_strides = (8, 16)
    image_size = Param.image_size(256, low=64)
    teacher_steps = Param(60000, int, low=1, help="teacher distillation steps on generic photographs (appendix)")
    teacher_batch = Param(16, int, low=1, help="photographs per teacher distillation step")
    teacher_lr = Param(1e-4, float, low=0, low_open=True, help="Adam's learning rate of the teacher distillation")
    steps = Param(70000, int, low=1, help="student + auto-encoder steps (Algorithm 1)")
    batch_size = Param.batch_size(1)
    lr = Param.lr(1e-4)
    weight_decay = Param.weight_decay(1e-5)
    hard_quantile = Param(0.999, float, low=0, high=1, help="p_hard of the hard-feature loss (Sec. 3.2)")
    penalty = Param(True, bool, help="the penalty on generic photographs (Sec. 3.2)")
    pdn_width = Param(1.0, float, low=0.0625, high=4, help="multiplier of the PDNs' hidden channels (1: the paper)")
    val_fraction = Param(0.1, float, low=0, high=1, low_open=True, high_open=True,
                         help="share of the training images held out for the map quantiles")

    def _build(self, shapes: dict) -> None:
        super()._build(shapes)
        c = sum(self.extractor_.channels.values())
        side = shapes["input_hw"][0]
        grid = pdn_grid(side)
        self.teacher_ = pdn_small(c, self.pdn_width)
        self.student_ = pdn_small(2 * c, self.pdn_width)
        self.autoencoder_ = AutoEncoder(c, side, grid)
        for name in ("t_mean_", "t_std_", "f_mean_", "f_std_"):
            self.register_buffer(name, torch.zeros(1, c, 1, 1))
        self.register_buffer("quantiles_", torch.zeros(4))  # q_a, q_b of M_ST, then of M_AE

    def _check_params(self) -> None:
        super()._check_params()
        if self.image_size is None:
            raise bad(self.name, "image_size", None, "an integer >= 64 (the networks are built for one size)")

    # -------------------------------------------------------------- teacher (appendix)
    def _target(self, x: torch.Tensor, grid: int) -> torch.Tensor:
        """Locally averaged pretrained features, resized to the PDN grid, concatenated: [B, C, g, g]."""
        with torch.no_grad():
            f = self.extractor_(x)
            maps = [F.interpolate(F.avg_pool2d(f[k], 3, 1, 1, count_include_pad=False), size=(grid, grid),
                                  mode="bilinear", align_corners=False) for k in self.layers_]
            return torch.cat(maps, 1)

    def _distill_teacher(self, side: int, grid: int) -> None:
        g = torch.Generator().manual_seed(self.seed + 1)
        probe = self._target(generic_images(4 * self.teacher_batch, side, g).to(self.device_), grid)
        self.f_mean_.copy_(probe.mean(dim=(0, 2, 3), keepdim=True))
        self.f_std_.copy_(probe.std(dim=(0, 2, 3), keepdim=True).clamp_min(1e-6))
        dummy = torch.zeros(self.teacher_steps)  # the loop walks these "samples"; each step draws photographs

        def step(batch, ctx):
            p = generic_images(self.teacher_batch, side, ctx.generator).to(ctx.device)
            target = (self._target(p, grid) - self.f_mean_) / self.f_std_
            return F.mse_loss(self.teacher_(p), target)

        self._train(step, dummy, module=self.teacher_, key="teacher", params=self.teacher_.parameters(),
                    epochs=1, batch_size=1, lr=self.teacher_lr, weight_decay=1e-5)
        self.teacher_.requires_grad_(False)

    def _teacher(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return (self.teacher_(x) - self.t_mean_) / self.t_std_

    # -------------------------------------------------------------- student and auto-encoder
    def _step(self, batch: torch.Tensor, ctx) -> torch.Tensor:
        c = self.t_mean_.shape[1]
        s = self.student_(batch)[:, :c]
        loss_st = hard_feature_loss(self._teacher(batch), s, self.hard_quantile)
        if self.penalty:
            p = generic_images(len(batch), batch.shape[-1], ctx.generator).to(ctx.device)
            loss_st = loss_st + self.student_(p)[:, :c].pow(2).mean()
        aug = augment(batch, ctx.generator)
        a = self.autoencoder_(aug)
        loss_ae = (self._teacher(aug) - a).pow(2).mean()
        loss_stae = (a - self.student_(aug)[:, c:]).pow(2).mean()
        return loss_st + loss_ae + loss_stae

    def _raw_maps(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        c = self.t_mean_.shape[1]
        t, s, a = self._teacher(x), self.student_(x), self.autoencoder_(x)
        return (t - s[:, :c]).pow(2).mean(1), (a - s[:, c:]).pow(2).mean(1)

    def _fit(self, x: torch.Tensor) -> None:
        n_val = max(1, int(round(self.val_fraction * len(x))))
        if len(x) - n_val < 2:
            raise bad(self.name, "train images", len(x), f"at least {n_val + 2} images (val_fraction holds out {n_val})")
        order = torch.randperm(len(x), generator=torch.Generator().manual_seed(self.seed))
        train, val = x[order[:-n_val]], x[order[-n_val:]]
        side = x.shape[-1]
        grid = pdn_grid(side)
        self._distill_teacher(side, grid)
        with torch.no_grad():  # teacher normalisation (Algorithm 1) on the training images
            t = torch.cat([self.teacher_(train[i : i + 16].to(self.device_)) for i in range(0, len(train), 16)])
        self.t_mean_.copy_(t.mean(dim=(0, 2, 3), keepdim=True))
        self.t_std_.copy_(t.std(dim=(0, 2, 3), keepdim=True).clamp_min(1e-6))
        steps_per_epoch = max(1, len(train) // self.batch_size)
        epochs = max(1, math.ceil(self.steps / steps_per_epoch))
        nets = nn.ModuleList([self.student_, self.autoencoder_])
        self._train(self._step, train, module=nets, params=nets.parameters(), epochs=epochs,
                    schedule="multistep", milestones=[max(1, int(0.95 * epochs))], gamma=0.1)
        self.eval()
        with torch.no_grad():  # quantiles of each map on held-out normal images (Sec. 3.4)
            st, ae = zip(*[self._raw_maps(val[i : i + 16].to(self.device_)) for i in range(0, len(val), 16)])
            qs = []
            for m in (torch.cat(st), torch.cat(ae)):
                qs += [torch.quantile(m.flatten()[: 2**24], 0.9), torch.quantile(m.flatten()[: 2**24], 0.995)]
            self.quantiles_.copy_(torch.stack(qs))
        self.diagnostics_["held_out_images"] = int(n_val)

    def _score(self, x: torch.Tensor):
        st, ae = self._raw_maps(x)
        qa, qb, ra, rb = self.quantiles_.tolist()
        st = 0.1 * (st - qa) / max(qb - qa, 1e-12)
        ae = 0.1 * (ae - ra) / max(rb - ra, 1e-12)
        m = F.pad(0.5 * (st + ae), (4, 4, 4, 4))
        maps = F.interpolate(m[:, None], size=x.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
        return maps.flatten(1).amax(1), maps
