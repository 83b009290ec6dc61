"""EfficientAD: Accurate Visual Anomaly Detection at Millisecond-Level Latencies
(Batzner, Heckler & König, WACV 2024).

Speed is the point: every network is a four-layer patch description network (PDN), so a
forward pass costs a few milliseconds on a GPU. Two detectors run side by side:

* Teacher (Sec. 3.1): a PDN-small (conv 4x4 128, avg-pool 2, conv 4x4 256, avg-pool 2, conv 3x3 256,
  conv 4x4 C; ReLU between; no padding, so an output pixel sees a 33 x 33 patch) distilled ONCE from a
  pretrained network and reused for every category (the official code ships its weights): MSE between the
  PDN's output and the normalised, locally averaged (3x3) mid-level features, on ImageNet (60,000 steps,
  batch 16, Adam lr 1e-4, weight decay 1e-5; appendix, Algorithm 1; as in the official pre-training the
  extractor sees twice the PDN's resolution, 10 % greyscale, and the PDN is padded to the target's grid).
  Here :func:`distil_teacher`: EfficientNet-Lite0 taps at strides 8 and 16 (``stage3`` + ``stage5``, C = 152,
  not WideResNet-101's 384), on random crops of scikit-image's bundled photographs (``generic_images``: never
  a data set's image) instead of ImageNet. ``teacher="shipped"`` loads the package's teacher for ``pdn_width``
  (``anomaly_zoo/weights/efficientad_teacher_w0.25.pt``, made by ``python -m
  anomaly_zoo.models.distillation.efficientad distil-teacher --width 0.25 --out ...``); ``"distil"`` distils
  in ``fit``. Either way its outputs are normalised per channel on the training images (Algorithm 1).
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
  (M_hat_ST + M_hat_AE) / 2, padded by 4 cells of the PDN grid (the border no output centres on)
  and resized to the image; the image score is its maximum. The official code pads with zeros;
  here the edge cells are repeated (:func:`combine_maps` says why: zeros made phantom's maps
  anti-correlated).

Quick preset: ``pdn_width=0.25``, the shipped teacher (6000 steps leave 0.40 of the target's variance on fresh
crops, 1000 steps 0.53), 128 px, 300 student steps of 2 images at lr 1e-3 (the paper: 70,000 at 1e-4), chosen by
proxy validation (:mod:`anomaly_zoo.validation`; brick + phantom training images, data seed 0, proxy seeds 0, 1;
mean image / pixel AUROC / AUPRO at 64 px: 300x4 .55/.70/.22, 600x4 .65/.79/.32, 1200x2 .64/.80/.34 but 71 s, 600x4
at lr 1e-3 .65/.85/.42, with the 6000-step teacher .73/.90/.41; at 128 px, the quick sets' size (grid 24 x 24, not
8 x 8), 300x2: .82/.88/.48), 85 s on one thread (64 px x 600 x 4: 60 s). Test (data seeds 0 / 1 / 2): brick image
AUROC .779 / .679 / .639 (the issue's 0.90 missed), pixel .972 / .948 / .878, AUPRO .812 / .676 / .608 (at
64 px: image .594 / .573 / .669, pixel .707 / .602 / .709, below a random teacher); phantom image .689 / .559 / .792,
pixel .817 / .803 / .808 (at 64 px .766 / .734 / .792, .878 / .899 / .913: the test sets disagree with the proxy
there). The millisecond latency is a GPU's; 60,000 + 70,000 steps need a GPU.
"""
from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ...backbones import create_backbone, taps_at
from ...base import FeatureDetector
from ...ops import luma
from ...params import Param, bad
from ...registry import register
from ...training import fit_loop
from ...utils import AnomalyZooError
from .common import generic_images

#: the teachers that ship with the package: ``efficientad_teacher_w{width:g}.pt`` (see ``distil-teacher``)
WEIGHTS_DIR = Path(__file__).resolve().parents[2] / "weights"
TEACHER_STRIDES = (8, 16)

#: how the shipped quick-width teacher was made (the ``distil-teacher`` defaults)
SHIPPED = dict(steps=6000, seed=0, size=64, batch=16, lr=1e-3)
QUICK_SIZE, QUICK_STEPS, QUICK_BATCH, QUICK_LR = 128, 300, 2, 1e-3  # chosen by proxy validation (module docstring)
DEVIATIONS = (
    "teacher PDN distilled from EfficientNet-Lite0 taps stage3 + stage5 (strides 8, 16; 152 channels, so 152 "
    "instead of 384 teacher channels), each averaged over 3 x 3 neighbours, instead of WideResNet-101 layers 2-3",
    "ImageNet is replaced by random crops of scikit-image's bundled photographs (common.generic_images; no data "
    "set's image) for the teacher's distillation and the student's penalty",
    "the shipped teacher (quick preset, pdn_width 0.25: anomaly_zoo/weights/efficientad_teacher_w0.25.pt) was made "
    "by `python -m anomaly_zoo.models.distillation.efficientad distil-teacher --width 0.25 --out ...` (seed 0): "
    "6000 steps of 16 crops at 64 px (extractor at 128), Adam lr 1e-3, instead of 60,000 steps of 16 ImageNet "
    "images at 256 px, lr 1e-4; 0.40 of the target's variance is left on fresh crops. No full-width teacher ships: "
    "distil one on a GPU (--width 1 --size 256 --steps 60000 --lr 1e-4) into anomaly_zoo/weights/",
    "the map's 4-cell border repeats its edge cells instead of the official code's zeros (combine_maps)",
    "held-out normal images for the map quantiles: the last val_fraction of the training images",
)

if __name__ == "__main__":  # `python -m ...efficientad`: the CLI of the imported module (registered once)
    from anomaly_zoo.models.distillation.efficientad import main as _main

    raise SystemExit(_main())


# --------------------------------------------------------------------------- networks
def pdn_small(out_channels: int, width: float = 1.0, padded: bool = False) -> nn.Sequential:
    """The PDN-small of Table 6 (no padding: receptive field 33 x 33); ``width`` scales its hidden channels (128,
    256, 256 at 1.0). ``padded=True``: the official distillation's padding (output side / 4, the grid of stride-8
    features of twice the resolution); the same weights, unpadded, give the detector's teacher."""
    a, b = max(8, round(128 * width)), max(8, round(256 * width))
    p = int(padded)
    return nn.Sequential(
        nn.Conv2d(3, a, 4, padding=3 * p), nn.ReLU(inplace=True), nn.AvgPool2d(2, 2, padding=p),
        nn.Conv2d(a, b, 4, padding=3 * p), nn.ReLU(inplace=True), nn.AvgPool2d(2, 2, padding=p),
        nn.Conv2d(b, b, 3, padding=p), nn.ReLU(inplace=True),
        nn.Conv2d(b, out_channels, 4))


def pdn_grid(side: int) -> int:
    """Output side of :func:`pdn_small` (unpadded) for an input side."""
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


# --------------------------------------------------------------------------- teacher distillation (appendix)
def _photos(n: int, size: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Generic photographs at twice ``size`` (for the extractor) and at ``size`` (for the PDN), one in ten
    greyscale (the official pre-training's RandomGrayscale(0.1), applied to both)."""
    big = generic_images(n, 2 * size, g)
    grey = torch.rand(n, generator=g) < 0.1
    big[grey] = luma(big[grey]).expand(-1, 3, -1, -1)
    return big, F.interpolate(big, size=(size, size), mode="bilinear", align_corners=False, antialias=True)


def feature_target(extractor, big: torch.Tensor, hw) -> torch.Tensor:
    """The distillation target: each tap averaged over 3 x 3 neighbours, resized to ``hw``, concatenated."""
    with torch.no_grad():
        f = extractor(big)
        return torch.cat([F.interpolate(F.avg_pool2d(f[k], 3, 1, 1, count_include_pad=False), size=tuple(hw),
                                        mode="bilinear", align_corners=False) for k in extractor.layers], 1)


def distil_teacher(width: float = 0.25, steps: int = 1000, seed: int = 0, *, size: int = 64, batch: int = 16,
                   lr: float = 1e-3, extractor=None, device="cpu", report: dict | None = None) -> dict:
    """Distil a PDN-small teacher from the pretrained taps (default: EfficientNet-Lite0 at strides 8, 16) on
    random crops of the generic photographs, deterministically from ``seed``; returns its ``state_dict``.
    Algorithm 1 of the appendix: the target is the extractor's features of the image at ``2 * size``, normalised
    per channel (mean and std over ``8 * batch`` probe crops); the padded PDN sees the image at ``size``; MSE,
    Adam (``lr``, weight decay 1e-5), ``steps`` steps of ``batch`` crops. ``report`` (a dict) receives the loss
    per tenth of the run and ``variance_left``: MSE on 64 fresh crops / the target's variance (1: nothing learnt).
    """
    dev = torch.device(device)
    fx = extractor if extractor is not None else create_backbone(layers=taps_at("efficientnet_lite0", TEACHER_STRIDES))
    fx = fx.to(dev)
    c = sum(fx.channels.values())
    torch.manual_seed(seed)  # the PDN's initialisation
    pdn = pdn_small(c, width, padded=True).to(dev)
    g = torch.Generator().manual_seed(seed)
    probe, small = _photos(8 * batch, size, g)
    hw = pdn(small[:1].to(dev)).shape[-2:]
    probe = torch.cat([feature_target(fx, probe[i : i + 32].to(dev), hw) for i in range(0, len(probe), 32)])
    mean, std = probe.mean((0, 2, 3), keepdim=True), probe.std((0, 2, 3), keepdim=True).clamp_min(1e-6)

    def step(_, ctx):
        big, x = _photos(batch, size, ctx.generator)
        return F.mse_loss(pdn(x.to(ctx.device)), (feature_target(fx, big.to(ctx.device), hw) - mean) / std)

    chunks = min(10, steps)
    per = math.ceil(steps / chunks)  # `chunks` epochs of `per` steps (a "batch" of two dummy samples each)
    losses = fit_loop(pdn, step, torch.zeros(2 * per), epochs=chunks, batch_size=2, lr=lr, weight_decay=1e-5,
                      device=dev, seed=seed, desc="efficientad teacher")
    if report is not None:
        big, x = _photos(64, size, torch.Generator().manual_seed(seed + 7919))
        with torch.no_grad():
            t = (feature_target(fx, big.to(dev), hw) - mean) / std
            left = (pdn(x.to(dev)) - t).pow(2).mean() / (t - t.mean((0, 2, 3), keepdim=True)).pow(2).mean()
        report.update(loss=losses, variance_left=float(left), steps=chunks * per, target_mean=mean.cpu(),
                      target_std=std.cpu())
    return {k: v.detach().cpu() for k, v in pdn.state_dict().items()}


def teacher_path(width: float) -> Path:
    return WEIGHTS_DIR / f"efficientad_teacher_w{width:g}.pt"


def read_teacher(path) -> tuple[dict, dict]:
    """``(state_dict, meta)`` of a ``distil-teacher`` file: how it was made, the target's ``target_mean`` / ``_std``."""
    blob = torch.load(path, map_location="cpu", weights_only=True)
    meta = dict(json.loads(blob["meta"]), target_mean=blob["target_mean"], target_std=blob["target_std"])
    return {k: v.float() for k, v in blob["state_dict"].items()}, meta


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
        grey = luma(img)
        ref = img.new_zeros(()) if kind == 0 else (grey.mean() if kind == 1 else grey)
        out.append((ref + f * (img - ref)).clamp(0, 1))
    return torch.stack(out)


def combine_maps(st: torch.Tensor, ae: torch.Tensor, quantiles, side) -> torch.Tensor:
    """Sec. 3.4: each map normalised with its held-out quantiles, 0.1 (M - q_a) / (q_b - q_a), averaged,
    padded by 4 cells (the border the unpadded PDN's outputs do not centre on) and resized to ``side``.
    The padding repeats the edge cells, whose receptive fields cover that border (the official code pads
    with zeros: a zero sits above every normal cell, whose normalised value is mostly < 0, so the unseen
    border outranked the interior: at 64 px the padding is 3/4 of the map)."""
    qa, qb, ra, rb = [float(q) for q in quantiles]
    m = 0.5 * (0.1 * (st - qa) / max(qb - qa, 1e-12) + 0.1 * (ae - ra) / max(rb - ra, 1e-12))
    m = F.pad(m[:, None], (4, 4, 4, 4), mode="replicate")
    return F.interpolate(m, size=tuple(side), mode="bilinear", align_corners=False)[:, 0]


@register("efficientad", family="distillation",
          paper="EfficientAD: Accurate Visual Anomaly Detection at Millisecond-Level Latencies", year=2024,
          bibkey="batzner2024efficientad", localizes=True, trains=True,
          quick=dict(image_size=QUICK_SIZE, pdn_width=0.25, teacher="shipped", steps=QUICK_STEPS, batch_size=QUICK_BATCH,
                     lr=QUICK_LR),
          deviations=DEVIATIONS)
class EfficientAD(FeatureDetector):
    """PDN student-teacher with hard-feature loss plus an auto-encoder branch; quantile-normalised maps."""

    default_strides = TEACHER_STRIDES
    image_size = Param.image_size(256, low=64)
    teacher = Param("distil", str, choices=("shipped", "distil"),
                    help="'shipped': the package's teacher distilled once for this pdn_width (the paper's reuse of "
                         "one ImageNet teacher; pretrained=False: a random one); 'distil': distil it in fit")
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
        for name in ("t_mean_", "t_std_"):
            self.register_buffer(name, torch.zeros(1, c, 1, 1))
        self.register_buffer("quantiles_", torch.zeros(4))  # q_a, q_b of M_ST, then of M_AE

    def _check_params(self) -> None:
        super()._check_params()
        if self.image_size is None:
            raise bad(self.name, "image_size", None, "an integer >= 64 (the networks are built for one size)")
        if self.teacher == "shipped":
            self._shipped_teacher()

    # -------------------------------------------------------------- teacher (appendix)
    def _shipped_teacher(self) -> dict | None:
        """The package's teacher for ``pdn_width``, or one clear error naming the command that makes one;
        ``None`` with ``pretrained=False``: the random-feature baseline keeps the PDN's random initialisation."""
        if not self.pretrained:
            return None
        path = teacher_path(self.pdn_width)
        make = (f"python -m anomaly_zoo.models.distillation.efficientad distil-teacher --width {self.pdn_width:g} "
                f"--out {path}")
        if not path.is_file():
            have = sorted(p.name for p in WEIGHTS_DIR.glob("efficientad_teacher_w*.pt"))
            raise AnomalyZooError(f"{self.name}: no shipped teacher for pdn_width={self.pdn_width:g} (shipped: "
                                  f"{', '.join(have) or 'none'}); use teacher='distil', or make one with: {make}")
        state, meta = read_teacher(path)
        mine = dict(backbone=self.backbone, pretrained=self.pretrained, weights=self.weights,
                    layers=list(self._taps()), width=self.pdn_width)
        wrong = {k: v for k, v in mine.items() if meta.get(k) != v}
        if wrong:
            raise AnomalyZooError(f"{self.name}: the shipped teacher {path.name} was distilled with "
                                  f"{ {k: meta.get(k) for k in wrong} }, not {wrong}; use teacher='distil'")
        return state

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
        if self.teacher == "shipped":
            state = self._shipped_teacher()
        else:
            log: dict = {}
            state = distil_teacher(self.pdn_width, self.teacher_steps, self.seed, size=x.shape[-1],
                                   batch=self.teacher_batch, lr=self.teacher_lr, extractor=self.extractor_,
                                   device=self.device_, report=log)
            self.history_["teacher"] = log["loss"]
            self.diagnostics_["teacher_variance_left"] = log["variance_left"]
        if state is not None:
            self.teacher_.load_state_dict(state)
        self.teacher_.requires_grad_(False)
        with torch.no_grad():  # teacher normalisation (Algorithm 1) on the training images
            t = torch.cat([self.teacher_(train[i : i + 16].to(self.device_)) for i in range(0, len(train), 16)])
        self.t_mean_.copy_(t.mean(dim=(0, 2, 3), keepdim=True))
        self.t_std_.copy_(t.std(dim=(0, 2, 3), keepdim=True).clamp_min(1e-6))
        steps_per_epoch = max(1, len(train) // self.batch_size)
        epochs = max(1, math.ceil(self.steps / steps_per_epoch))
        nets = nn.ModuleList([self.student_, self.autoencoder_])
        torch.manual_seed(self.seed)  # the student and auto-encoder draw dropout masks: same seed, same fit
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
        maps = combine_maps(*self._raw_maps(x), self.quantiles_, x.shape[-2:])
        return maps.flatten(1).amax(1), maps


# --------------------------------------------------------------------------- command line
def main(argv=None) -> int:
    """``python -m anomaly_zoo.models.distillation.efficientad distil-teacher --out FILE [--width ...]``"""
    p = argparse.ArgumentParser(prog="python -m anomaly_zoo.models.distillation.efficientad")
    sub = p.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("distil-teacher", help="distil a PDN teacher on the generic photographs and save it")
    d.add_argument("--out", required=True)
    d.add_argument("--width", type=float, default=0.25, help="pdn_width of the detector that will use it")
    for key, value in SHIPPED.items():  # --steps, --seed, --size (the PDN's side; the extractor's is twice it), ...
        d.add_argument(f"--{key}", type=type(value), default=value)
    d.add_argument("--device", default="cpu")
    a = p.parse_args(argv)
    report: dict = {}
    state = distil_teacher(a.width, a.steps, a.seed, size=a.size, batch=a.batch, lr=a.lr, device=a.device,
                           report=report)
    layers = taps_at("efficientnet_lite0", TEACHER_STRIDES)
    meta = dict(backbone="efficientnet_lite0", pretrained=True, weights=None, layers=layers, width=a.width,
                steps=report["steps"], seed=a.seed, size=a.size, batch=a.batch, lr=a.lr, loss=report["loss"],
                variance_left=report["variance_left"], command="distil-teacher " + " ".join(
                    f"--{k} {getattr(a, k)}" for k in ("width", "steps", "seed", "size", "batch", "lr")))
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": state, "meta": json.dumps(meta), "target_mean": report["target_mean"],
                "target_std": report["target_std"]}, a.out)
    print(f"{a.out}: {report['steps']} steps, loss per tenth {[round(v, 3) for v in report['loss']]}, "
          f"variance left on fresh crops {report['variance_left']:.3f}")
    return 0
