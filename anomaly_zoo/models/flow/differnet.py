"""DifferNet: Same Same But DifferNet: Semi-Supervised Defect Detection with Normalizing Flows
(Rudolph, Wandt and Rosenhahn, WACV 2021).

The first flow-based detector of the survey: one normalizing flow on a *single vector per
image*, the globally pooled CNN features of the image at three scales (Sec. 3):

1. Features (Sec. 3.1): the image at full, half and quarter size through a frozen CNN (official:
   AlexNet's convolutional part, 256 channels, 448 px input), each map averaged over positions,
   concatenated: y = f_ex(x) in R^{3C}.
2. Flow (Sec. 3.2, eqs. 1-2): 8 blocks, each a fixed random permutation then a two-sided affine
   coupling (FrEIA's ``glow_coupling_layer``) whose log-scales are soft-clamped,
   s -> 0.636 a atan(s / a), a = 3 (``clamp_alpha``); the subnets are fully connected,
   three hidden ReLU layers of ``fc_internal`` units (official ``F_fully_connected``).
3. Training (eq. 3): L(y) = ||z||^2 / 2 - log |det dz/dy|, divided by the dimension (official
   ``get_loss``), on ``n_transforms`` = 4 random rotations of each training image; Adam with lr 2e-4,
   betas (0.8, 0.8), weight decay 1e-5.
4. Score (eq. 4): tau(x) = E_T[-log p_Z(f(f_ex(T(x))))] over ``n_transforms_test`` rotations of
   the test image; the official code computes mean(z^2), the same up to constants.
5. Localisation (Sec. 3.4, Fig. 5): the gradient of the score with respect to the input image,
   |d tau / d x|, averaged over colour channels and smoothed with a Gaussian (sigma 4 px here).
   The rotations are inside the differentiated function, so the gradient is already in the
   frame of the unrotated image.

Differences (on the model card): EfficientNet-Lite0's stride-32 tap (stage7, 320 channels,
so 960 dimensions) replaces AlexNet (256 channels, 768 dimensions); test rotations are evenly
spaced (k 360 / T degrees) instead of random, so a score does not depend on a random draw;
scales made by antialiased bilinear resizing (official: nearest).

Measured (quick preset, brick, data seeds 0 / 1 / 2, CPU): image AUROC 0.792 / 0.776 / 0.827,
pixel AUROC 0.847 / 0.864 / 0.844 and AUPRO 0.641 / 0.419 / 0.576 from the gradient maps (23 s of
CPU time per fit + predict); random backbone (seed 0): 0.605, 0.679, 0.239. With 16 epochs instead
of 6 (seed 0): 0.833 / 0.835 / 0.630 (44 s). The issue's 0.85 is not reached: one pooled vector per image hides small defects
(the paper targets whole-object defects), and the quick preset trains briefly.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ...base import FeatureDetector
from ...ops import gaussian_blur, one_thread_on_cpu
from ...params import Param
from ...registry import register
from .coupling import glow_flow


def rotate(x: torch.Tensor, degrees: torch.Tensor) -> torch.Tensor:
    """Rotate each image of ``x`` [B, 3, H, W] by its angle (degrees, counter-clockwise) about its
    centre; corners outside the image are filled with 0 (as torchvision's ``RandomRotation``).
    Differentiable in ``x``. Exact for square images (``image_size`` makes them square); others
    are rotated in normalised coordinates, i.e. slightly sheared."""
    a = degrees.to(x.dtype) * math.pi / 180
    cos, sin, zero = torch.cos(a), torch.sin(a), torch.zeros_like(a)
    theta = torch.stack([torch.stack([cos, -sin, zero], 1), torch.stack([sin, cos, zero], 1)], 1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def fc_subnet(hidden: int):
    """Official ``F_fully_connected``: Linear -> ReLU, three times ``hidden`` units, then Linear."""
    def make(c_in: int, c_out: int) -> nn.Module:
        return nn.Sequential(nn.Linear(c_in, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                             nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, c_out))
    return make


def differnet_loss(z: torch.Tensor, logdet: torch.Tensor) -> torch.Tensor:
    """Eq. (3) per dimension: mean_b (||z_b||^2 / 2 - log |det J_b|) / D."""
    return (0.5 * z.pow(2).sum(1) - logdet).mean() / z.shape[1]


@register("differnet", family="flow", paper="Same Same But DifferNet: Semi-Supervised Defect Detection with "
          "Normalizing Flows", year=2021, bibkey="rudolph2021differnet", localizes=True, trains=True,
          quick=dict(image_size=128, epochs=6, fc_internal=256, n_transforms=2, n_transforms_test=4),
          deviations=("backbone: EfficientNet-Lite0's stride-32 tap (stage7, 320 channels: 960 dimensions over "
                      "three scales) instead of AlexNet's features (256 channels: 768 dimensions)",
                      "test-time rotations evenly spaced (k 360/T degrees) instead of random",
                      "image scales by antialiased bilinear resizing (official: nearest)",
                      "Adam with PyTorch's eps 1e-8 (official: 1e-4): the library's loop does not expose eps",
                      "quick preset: 128 px, subnet width 256, 2 training and 4 test rotations, 6 epochs"))
class DifferNet(FeatureDetector):
    """One flow on pooled multi-scale features; score over rotations; gradient map."""

    default_strides = (32,)
    needs_grad = True
    predict_batch_size = 2  # each image becomes n_transforms_test views, kept for the backward pass ...
    views_per_pass = 8  # ... 8 rotations of each at a time (_score)
    coupling_blocks = Param(8, int, low=1, high=64, help="permutation + coupling blocks (official: 8)")
    fc_internal = Param(2048, int, low=1, help="hidden units of each subnet layer (paper: 2048)")
    clamp = Param(3.0, float, low=0, low_open=True, high=20, help="soft clamp a of eq. 2 (clamp_alpha = 3)")
    n_transforms = Param(4, int, low=1, help="random rotations of each training image per step (4)")
    n_transforms_test = Param(64, int, low=1, help="rotations T averaged in the score, eq. 4 (64)")
    sigma = Param.sigma(4.0)
    epochs = Param.epochs(192)  # official: 24 meta-epochs x 8 sub-epochs
    batch_size = Param.batch_size(24)
    lr = Param.lr(2e-4)
    weight_decay = Param.weight_decay(1e-5)
    image_size = Param.image_size(448, low=32)

    def _build(self, shapes: dict) -> None:
        super()._build(shapes)
        dim = 3 * sum(self.extractor_.channels[name] for name in self.layers_)
        self.shapes_["dim"] = dim
        self.flow_ = glow_flow(dim, self.coupling_blocks, fc_subnet(self.fc_internal), self.clamp)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Item 1: y = f_ex(x), the pooled taps of x at full, half and quarter size, [B, 3C]."""
        h, w = x.shape[-2:]
        out = []
        for s in range(3):
            xs = x if s == 0 else F.interpolate(x, size=(max(1, h // 2**s), max(1, w // 2**s)), mode="bilinear",
                                                align_corners=False, antialias=True)
            feats = self.extractor_(xs)
            out += [feats[name].mean((2, 3)) for name in self.layers_]
        return torch.cat(out, 1)

    def _fit(self, x: torch.Tensor) -> None:
        def step(batch, ctx):  # item 3: n_transforms random rotations of each image
            views = batch.repeat_interleave(self.n_transforms, 0)
            angles = torch.rand(len(views), generator=ctx.generator) * 360
            with torch.no_grad():
                y = self.features(rotate(views, angles.to(views.device)))
            return differnet_loss(*self.flow_(y))

        # One CPU thread: on a shared 2-core machine a second thread spun and used 3-4x the CPU time
        # for the same fit (measured in the chapter: 307 s of CPU vs 82 s for the whole page).
        with one_thread_on_cpu(self.device_):
            self._train(step, x, module=self.flow_, betas=(0.8, 0.8))

    def view_scores(self, x: torch.Tensor, angles: torch.Tensor) -> torch.Tensor:
        """mean(z^2) of each image of ``x`` rotated by each of ``angles``, [B, len(angles)]."""
        views = x.repeat_interleave(len(angles), 0)
        z, _ = self.flow_(self.features(rotate(views, angles.repeat(len(x)))))
        return z.pow(2).mean(1).view(len(x), len(angles))

    def _score(self, x: torch.Tensor):
        """Eq. (4): tau(x), the mean over T evenly spaced rotations of mean(z^2), and item 5's map |d tau / d x|.
        The rotations go through the network ``views_per_pass`` at a time, each pass's gradient added up (tau is
        a sum over them): the full preset's 64 rotations of a 448 px image, all kept for one backward pass, need
        more than 24 GB."""
        t = self.n_transforms_test
        angles = torch.arange(t, device=x.device, dtype=x.dtype) * 360 / t
        scores, grad = x.new_zeros(len(x)), torch.zeros_like(x)
        with one_thread_on_cpu(x.device):
            for part in angles.split(self.views_per_pass):
                xi = x.detach().clone().requires_grad_(True)
                s = self.view_scores(xi, part).sum(1) / t
                (g,) = torch.autograd.grad(s.sum(), xi)  # each image's score depends on it alone
                scores, grad = scores + s.detach(), grad + g
        maps = gaussian_blur(grad.abs().mean(1), self.sigma)
        return scores.detach(), maps.detach()
