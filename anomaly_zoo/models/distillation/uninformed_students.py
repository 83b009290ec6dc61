"""Uninformed Students: Student-Teacher Anomaly Detection with Discriminative Latent Embeddings
(Bergmann, Fauser, Sattlegger & Steger, CVPR 2020). Equation numbers as in the arXiv v2 text.

A small *teacher* network T_hat turns every p x p patch of an image into a d = 128 descriptor.
An ensemble of M students of the same architecture, from random weights, learns on normal images
only to predict the teacher's descriptors. Where a patch shows something never seen in training,
the students miss the teacher (regression error) and disagree with each other (predictive
variance); both, normalised, make the anomaly map. Three receptive fields p (17, 33, 65) see
defects of three sizes; their maps are averaged.

* Patch networks (Sec. 3.1 and the supplementary tables): convolutions with LeakyReLU (slope
  5e-3), 2 x 2 max pooling of stride 2, no padding, a 1 x 1 convolution to the d descriptor
  channels; one descriptor for one p x p input. :data:`PATCH_NETS` lists the layers; the kernel
  sizes are chosen so that the receptive field is *exactly* p (checked by the input gradient in the
  tests): p = 17 has no pooling, p = 33 two poolings (stride 4), p = 65 three (stride 8).
* Teacher (Sec. 3.1), trained once per p on patches of generic images with
  L(T_hat) = lambda_k L_k + lambda_m L_m + lambda_c L_c (eq. 6):
  - knowledge distillation (eq. 1): L_k = || D(T_hat(p)) - P(p) ||^2, D a fully connected decoder
    from d to the pretrained network's dimension, P(p) the pretrained descriptor of the patch:
    here the global average of EfficientNet-Lite0's ``stage7`` (320 channels, its last MBConv
    stage: the counterpart of ResNet-18's pooled 512 features) on the p x p patch;
  - metric learning (eq. 2-4): delta+ = ||T(p) - T(p+)||^2 to an augmented copy p+ (noise and
    brightness), delta- = min(||T(p) - T(p-)||^2, ||T(p+) - T(p-)||^2) to another patch p-,
    L_m = max(0, delta + delta+ - delta-) with margin delta;
  - compactness (eq. 5): L_c = sum_{i != j} c_ij, the off-diagonal entries of the correlation
    matrix of the descriptors of a minibatch (decorrelates the d components).
  Weights: lambda_k = lambda_c = 1, lambda_m = 0 (the paper's choice for its MVTec teachers as we
  read Sec. 4; the triplet term is implemented and ``lambda_m > 0`` switches it on). Adam, lr 2e-4,
  weight decay 1e-5, batch 64. ImageNet is replaced by random crops of scikit-image's bundled photographs
  (:func:`~anomaly_zoo.models.distillation.common.generic_images`), ``teacher_patches`` of them.
* Students (Sec. 3.2): each S_i predicts the teacher's descriptor *normalised* with the
  component-wise mean mu and std sigma of all teacher descriptors of the training images:
  L(S_i) = 1/(wh) sum_(r,c) || mu^{S_i}_(r,c) - (y^T_(r,c) - mu) diag(sigma)^-1 ||^2 (eq. 8, the
  mean of a Gaussian with constant covariance, eq. 7). The M students are trained side by side
  (one optimiser over disjoint parameters: the same as M separate runs on the same batches).
* Scores (Sec. 3.3): predictive mean mu_(r,c) = 1/M sum_i mu^{S_i} (eq. 9), regression error
  e = || mu - y_hat^T ||^2 (eq. 10), predictive variance v = 1/M sum_i ||mu^{S_i}||^2 - ||mu||^2
  (eq. 11), score s = (e - e_mu) / e_sigma + (v - v_mu) / v_sigma (eq. 12), the four statistics over
  every pixel of held-out normal images (the paper's validation set: here the last
  ``val_fraction`` of a seeded shuffle of the training images, kept out of all training).
  Multi-scale (Sec. 3.4): the mean over the receptive fields of the normalised scores (eq. 13).
  Image score: the maximum of the map (the paper evaluates localisation; the library's choice).
* Dense output: the paper uses Fast Dense Feature Extraction to get one descriptor per pixel.
  ``dense=True`` computes the same thing differently: every max pooling gets stride 1 and each
  later layer the accumulated dilation ("a trous"), so position (r, c) of the output is exactly
  the patch network applied to the patch at (r, c) (tested). Images are reflect-padded by p // 2
  so that every pixel is the centre of a patch. ``dense=False`` (the quick preset) runs the
  networks at their own stride (4 or 8) and upsamples the maps bilinearly.

Settings of Sec. 4 (the teacher's above; students: 100 epochs, Adam lr 1e-4, weight decay 1e-5,
batch 1; 256 px images) are the paper's as recalled when this file was written: no copy of the paper
or of its supplementary layer tables was at hand offline to recheck them.

Quick preset (CPU, about 15 s of one thread): 128 px, one receptive field (p = 33), the networks
at an eighth of the paper's width, d = 64, 256 teacher patches and 100 teacher steps at lr 1e-3,
M = 3 students for 16 epochs on random 48 px windows (batch 2, lr 3e-3), maps on the stride-4
grid. These student and teacher settings were checked on training data only (:mod:`anomaly_zoo.validation`:
a quarter of the normal training images held out, half of those given thin scars or Poisson-blended patches;
mean over 5 splits of brick and 3 of grass): no change beat them by more than the split-to-split noise in AUPRO
(0.514; 24 epochs 0.513, crop 64 0.525, both together 0.515, 200 teacher steps 0.451), and they had the best
pixel AUROC (0.836; 0.781-0.803); on 3 brick splits student lr 1e-3 or 1e-2, 8 epochs, crop 32 and teacher lr
2e-4 or 3e-3 were all lower (AUPRO 0.50-0.76 against 0.78). Measured afterwards on the quick brick set (data
seeds 0 / 1 / 2): AUPRO 0.858 / 0.846 / 0.887, pixel
AUROC 0.978 / 0.971 / 0.978, image AUROC 0.878 / 0.826 / 0.900, 15 s of CPU time per fit. Seed 0,
degenerate baselines: the teacher distilled from a random EfficientNet (``pretrained=False``) AUPRO
0.676, pixel AUROC 0.911; untrained students AUPRO 0.764, pixel AUROC 0.946 (random students are
nearly constant, so e alone is the distance of the normalised teacher descriptor to its mean).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ...base import FeatureDetector
from ...ops import upsample
from ...params import Param, bad
from ...registry import register
from .common import generic_images

#: layers of the patch network of receptive field p: (kernel, channels at width 1) or "M" (max pool 2/2)
PATCH_NETS = {
    17: ((5, 128), (5, 128), (5, 256), (5, 256)),
    33: ((6, 128), "M", (5, 256), "M", (5, 256)),
    65: ((6, 128), "M", (5, 128), "M", (6, 256), "M", (4, 256)),
}


class PatchNet(nn.Module):
    """T_hat (and each student): descriptors ``[B, d, h, w]`` of the p x p patches of ``x``."""

    def __init__(self, p: int, d: int = 128, width: float = 1.0):
        super().__init__()
        layers, c = [], 3
        for spec in PATCH_NETS[p]:
            if spec == "M":
                layers.append(nn.MaxPool2d(2, 2))
                continue
            k, cout = spec[0], max(8, round(spec[1] * width))
            layers += [nn.Conv2d(c, cout, k), nn.LeakyReLU(5e-3)]
            c = cout
        layers.append(nn.Conv2d(c, d, 1))
        self.layers = nn.Sequential(*layers)
        self.p, self.stride = p, 2 ** PATCH_NETS[p].count("M")

    def forward(self, x: torch.Tensor, dense: bool = False) -> torch.Tensor:
        """``dense=False``: the network as it is (output stride ``self.stride``); ``dense=True``: one
        descriptor per input position, ``H - p + 1`` per side (pooling at stride 1, dilated layers)."""
        if not dense:
            return self.layers(x)
        dil = 1
        for m in self.layers:
            if isinstance(m, nn.MaxPool2d):
                x, dil = F.max_pool2d(x, 2, stride=1, dilation=dil), dil * 2
            elif isinstance(m, nn.Conv2d):
                x = F.conv2d(x, m.weight, m.bias, dilation=dil)
            else:
                x = m(x)
        return x


# --------------------------------------------------------------------------- losses and score
def distillation_loss(decoded: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Eq. (1): ``||D(T_hat(p)) - P(p)||^2`` per patch, averaged over the batch."""
    return (decoded - target).pow(2).sum(1).mean()


def triplet_loss(a: torch.Tensor, pos: torch.Tensor, neg: torch.Tensor, margin: float) -> torch.Tensor:
    """Eq. (2-4) on descriptors ``[B, d]``: ``max(0, margin + delta+ - delta-)``, averaged."""
    d_pos = (a - pos).pow(2).sum(1)
    d_neg = torch.minimum((a - neg).pow(2).sum(1), (pos - neg).pow(2).sum(1))
    return F.relu(margin + d_pos - d_neg).mean()


def compactness_loss(desc: torch.Tensor) -> torch.Tensor:
    """Eq. (5): the sum of the off-diagonal entries of the correlation matrix of ``desc [B, d]``."""
    z = desc - desc.mean(0, keepdim=True)
    z = z / z.pow(2).sum(0, keepdim=True).sqrt().clamp_min(1e-8)
    c = z.T @ z
    return c.sum() - c.diagonal().sum()


def student_loss(students: list[torch.Tensor], target: torch.Tensor) -> torch.Tensor:
    """Eq. (8) summed over the students: ``1/(wh) sum ||mu^S_i - y_hat^T||^2`` each, batch mean."""
    return sum((s - target).pow(2).sum(1).mean() for s in students)


def error_and_variance(students: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Eq. (9-11): ``students [M, B, d, h, w]``, normalised teacher ``[B, d, h, w]`` -> e, v ``[B, h, w]``."""
    mean = students.mean(0)
    e = (mean - target).pow(2).sum(1)
    v = students.pow(2).sum(2).mean(0) - mean.pow(2).sum(1)
    return e, v.clamp_min(0)


@register("uninformed_students", family="distillation",
          paper="Uninformed Students: Student-Teacher Anomaly Detection with Discriminative Latent Embeddings",
          year=2020, bibkey="bergmann2020students", localizes=True, trains=True,
          quick=dict(image_size=128, receptive_fields=(33,), width=0.125, descriptor_dim=64, teacher_patches=256,
                     teacher_steps=100, teacher_lr=1e-3, epochs=16, batch_size=2, lr=3e-3, student_crop=48,
                     dense=False),
          deviations=("teacher distilled from EfficientNet-Lite0's stage7 (320 channels, global average over the "
                      "patch) instead of ResNet-18's pooled 512-dimensional output",
                      "teacher patches: random crops of scikit-image's bundled photographs instead of ImageNet; "
                      "a fixed pool of teacher_patches crops, visited in epochs",
                      "patch networks: kernel sizes chosen so that the receptive field is exactly p",
                      "dense descriptors by dilated layers (the same output as Fast Dense Feature Extraction); "
                      "images reflect-padded by p // 2",
                      "the M students are trained side by side on the same batches (one optimiser)",
                      "image score: maximum of the map (the paper evaluates localisation only)",
                      "patch networks read images after the backbone's input normalisation",
                      "quick preset: one receptive field (33) instead of three, networks at 1/8 width, d = 64, 256 "
                      "teacher patches and 100 teacher steps at lr 1e-3, students for 16 epochs on random 48 px "
                      "windows (batch 2, lr 3e-3), descriptors on the networks' stride-4 grid and bilinear maps; "
                      "student lr, epochs, crop and teacher lr/steps chosen by AUPRO on a proxy validation set of "
                      "synthetic anomalies (scars, Poisson-blended patches) made from held-out brick and grass "
                      "*training* images (anomaly_zoo.validation), never on test metrics"))
class UninformedStudents(FeatureDetector):
    """An ensemble of students regresses a distilled patch teacher; error + variance, several scales."""

    default_strides = (32,)  # the pretrained descriptor P(p): the deepest tap, pooled over the patch
    image_size = Param(256, int, low=64, help="images are resized to this side, px")
    receptive_fields = Param((17, 33, 65), tuple, item=int, help="patch sizes p, each one of 17, 33, 65 (Sec. 3.4)")
    descriptor_dim = Param(128, int, low=2, help="d, the teacher's descriptor length (Sec. 4)")
    width = Param(1.0, float, low=0.0625, high=4, help="multiplier of the patch networks' channels (1: the paper)")
    n_students = Param(3, int, low=2, help="M, students per receptive field (Sec. 3.2)")
    teacher_patches = Param(16384, int, low=2, help="generic photograph crops the teachers learn from")
    teacher_steps = Param(50000, int, low=1, help="teacher optimisation steps per receptive field")
    teacher_batch = Param(64, int, low=2, help="patches per teacher step (eq. 5 needs two or more)")
    teacher_lr = Param(2e-4, float, low=0, low_open=True, help="Adam's learning rate for the teachers")
    lambda_k = Param(1.0, float, low=0, help="weight of the distillation loss (eq. 6)")
    lambda_m = Param(0.0, float, low=0, help="weight of the triplet loss (eq. 6)")
    lambda_c = Param(1.0, float, low=0, help="weight of the compactness loss (eq. 6)")
    margin = Param(1.0, float, low=0, help="delta, the triplet margin (eq. 4)")
    epochs = Param.epochs(100)
    batch_size = Param.batch_size(1)
    lr = Param.lr(1e-4)
    weight_decay = Param.weight_decay(1e-5)
    student_crop = Param(None, int, low=16, none=True, help="students learn on random crops of this side (None: whole images)")
    dense = Param(True, bool, help="one descriptor per pixel (True) or the networks' own stride plus upsampling")
    val_fraction = Param(0.1, float, low=0, high=1, low_open=True, high_open=True,
                         help="share of the training images held out for the score statistics (eq. 12)")

    def _check_params(self) -> None:
        super()._check_params()
        wrong = [p for p in self.receptive_fields if p not in PATCH_NETS]
        if wrong or len(set(self.receptive_fields)) != len(self.receptive_fields):
            raise bad(self.name, "receptive_fields", self.receptive_fields, "distinct values out of 17, 33, 65")
        if self.lambda_k + self.lambda_m + self.lambda_c == 0:
            raise bad(self.name, "lambda_k", self.lambda_k, "> 0 when lambda_m and lambda_c are 0 (eq. 6)")
        if self.student_crop is not None and self.student_crop > self.image_size:
            raise bad(self.name, "student_crop", self.student_crop, f"an integer <= image_size={self.image_size}, or None")

    def _build(self, shapes: dict) -> None:
        super()._build(shapes)
        dim = sum(self.extractor_.channels.values())
        self.teachers_ = nn.ModuleDict()
        self.decoders_ = nn.ModuleDict()
        self.students_ = nn.ModuleDict()
        for p in self.receptive_fields:
            k = str(p)
            self.teachers_[k] = PatchNet(p, self.descriptor_dim, self.width)
            self.decoders_[k] = nn.Linear(self.descriptor_dim, dim)
            self.students_[k] = nn.ModuleList(PatchNet(p, self.descriptor_dim, self.width)
                                              for _ in range(self.n_students))
            self.register_buffer(f"mu_{p}_", torch.zeros(1, self.descriptor_dim, 1, 1))
            self.register_buffer(f"sigma_{p}_", torch.ones(1, self.descriptor_dim, 1, 1))
            self.register_buffer(f"stats_{p}_", torch.tensor([0.0, 1.0, 0.0, 1.0]))

    # -------------------------------------------------------------- teacher (Sec. 3.1)
    def _pretrained(self, patches: torch.Tensor) -> torch.Tensor:
        """P(p): the pretrained taps, globally averaged over the patch and concatenated, ``[B, dim]``."""
        f = self.extractor_(patches)
        return torch.cat([f[k].mean(dim=(2, 3)) for k in self.layers_], 1)

    def _normalise(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.extractor_.mean) / self.extractor_.std

    def _teacher_step(self, p: int):
        teacher, decoder = self.teachers_[str(p)], self.decoders_[str(p)]

        def step(batch, ctx):
            x, target = batch
            desc = teacher(self._normalise(x)).flatten(1)
            loss = self.lambda_k * distillation_loss(decoder(desc), target)
            if self.lambda_c > 0:
                loss = loss + self.lambda_c * compactness_loss(desc)
            if self.lambda_m > 0:
                g = ctx.generator
                gain = 0.8 + 0.4 * torch.rand(len(x), 1, 1, 1, generator=g)
                noise = 0.05 * torch.randn(x.shape, generator=g)
                pos = teacher(self._normalise((x * gain.to(x.device) + noise.to(x.device)).clamp(0, 1))).flatten(1)
                loss = loss + self.lambda_m * triplet_loss(desc, pos, desc.roll(1, 0), self.margin)
            return loss

        return step

    def _distill_teacher(self, p: int) -> None:
        g = torch.Generator().manual_seed(self.seed + p)
        patches = generic_images(self.teacher_patches, p, g, min_side=0.05)
        with torch.no_grad():
            targets = torch.cat([self._pretrained(patches[i : i + 256].to(self.device_)).cpu()
                                 for i in range(0, len(patches), 256)])
        teacher, decoder = self.teachers_[str(p)], self.decoders_[str(p)]
        nets = nn.ModuleList([teacher, decoder])
        epochs = max(1, math.ceil(self.teacher_steps * self.teacher_batch / len(patches)))
        self._train(self._teacher_step(p), (patches, targets), module=nets, key=f"teacher_{p}",
                    params=nets.parameters(), epochs=epochs, batch_size=self.teacher_batch, lr=self.teacher_lr,
                    weight_decay=1e-5)
        nets.requires_grad_(False)

    # -------------------------------------------------------------- students (Sec. 3.2)
    def _pad(self, x: torch.Tensor, p: int) -> torch.Tensor:
        """Reflect padding by p // 2: every pixel of ``x`` becomes the centre of a p x p patch."""
        r = p // 2
        return F.pad(x, (r, r, r, r), mode="reflect")

    def _descriptors(self, net: PatchNet, xp: torch.Tensor) -> torch.Tensor:
        """Descriptors of a padded image ``xp``: one per pixel (dense) or on the network's stride grid."""
        return net(self._normalise(xp), dense=self.dense)

    def _target(self, p: int, xp: torch.Tensor) -> torch.Tensor:
        """The normalised teacher descriptors (y^T - mu) diag(sigma)^-1 of eq. (8), of a padded image."""
        with torch.no_grad():
            y = self._descriptors(self.teachers_[str(p)], xp)
        return (y - getattr(self, f"mu_{p}_")) / getattr(self, f"sigma_{p}_")

    def _student_step(self, p: int):
        students = self.students_[str(p)]

        def step(batch, ctx):
            xp = self._pad(batch, p)
            if self.student_crop is not None and self.student_crop < batch.shape[-1]:
                # a window of the padded image: the crop's descriptors are the full image's there
                c, side = self.student_crop + 2 * (p // 2), xp.shape[-1]
                i, j = (int(v) for v in torch.randint(side - c + 1, (2,), generator=ctx.generator))
                xp = xp[..., i : i + c, j : j + c]
            return student_loss([self._descriptors(s, xp) for s in students], self._target(p, xp))

        return step

    def _fit(self, x: torch.Tensor) -> None:
        n_val = max(1, int(round(self.val_fraction * len(x))))
        if len(x) - n_val < 1:
            raise bad(self.name, "train images", len(x), f"at least {n_val + 1} images (val_fraction holds out {n_val})")
        order = torch.randperm(len(x), generator=torch.Generator().manual_seed(self.seed))
        train, val = x[order[:-n_val]], x[order[-n_val:]]
        for p in self.receptive_fields:
            self._distill_teacher(p)
            with torch.no_grad():  # mu, sigma of eq. (8) over every teacher descriptor of the training images
                n, total, squares = 0, 0.0, 0.0
                for i in range(0, len(train), 8):
                    y = self._descriptors(self.teachers_[str(p)], self._pad(train[i : i + 8].to(self.device_), p))
                    y = y.transpose(0, 1).flatten(1).double()
                    n, total, squares = n + y.shape[1], total + y.sum(1), squares + y.pow(2).sum(1)
                var = (squares - total**2 / n) / max(n - 1, 1)
                getattr(self, f"mu_{p}_").copy_((total / n).view(1, -1, 1, 1))
                getattr(self, f"sigma_{p}_").copy_(var.clamp_min(0).sqrt().clamp_min(1e-6).view(1, -1, 1, 1))
            students = self.students_[str(p)]
            self._train(self._student_step(p), train, module=students, key=f"students_{p}",
                        params=students.parameters())
            students.eval()
            with torch.no_grad():  # e_mu, e_sigma, v_mu, v_sigma of eq. (12) on the held-out images
                ev = [self._error_variance(p, val[i : i + 8].to(self.device_)) for i in range(0, len(val), 8)]
                e, v = torch.cat([a for a, _ in ev]).flatten(), torch.cat([b for _, b in ev]).flatten()
                getattr(self, f"stats_{p}_").copy_(torch.stack([e.mean(), e.std().clamp_min(1e-12),
                                                                v.mean(), v.std().clamp_min(1e-12)]))
        self.diagnostics_["held_out_images"] = int(n_val)

    # -------------------------------------------------------------- score (Sec. 3.3-3.4)
    def _error_variance(self, p: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        xp = self._pad(x, p)
        out = torch.stack([self._descriptors(s, xp) for s in self.students_[str(p)]])
        return error_and_variance(out, self._target(p, xp))

    def _scale_maps(self, x: torch.Tensor) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
        """Per receptive field, the two normalised terms of eq. (12), upsampled to the input size."""
        out = {}
        for p in self.receptive_fields:
            e, v = self._error_variance(p, x)
            e_mu, e_sd, v_mu, v_sd = getattr(self, f"stats_{p}_").tolist()
            out[p] = (upsample((e - e_mu) / e_sd, x.shape[-2:]), upsample((v - v_mu) / v_sd, x.shape[-2:]))
        return out

    def score_parts(self, images) -> dict[int, dict[str, torch.Tensor]]:
        """For the book: ``{p: {"error": [N, H, W], "variance": [N, H, W]}}``, each term of eq. (12)
        normalised (their sum is the map of receptive field p; the mean over p is ``predict``'s map)."""
        x = self._prepare(images, "images").to(self.device_)
        self.eval()
        with torch.no_grad():
            return {p: {"error": e.cpu(), "variance": v.cpu()} for p, (e, v) in self._scale_maps(x).items()}

    def _score(self, x: torch.Tensor):
        maps = torch.stack([e + v for e, v in self._scale_maps(x).values()]).mean(0)  # eq. (12), (13)
        return maps.flatten(1).amax(1), maps
