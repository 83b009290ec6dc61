"""Deep SVDD: Deep One-Class Classification (Ruff et al., ICML 2018).

Learn a network phi(.; W) that maps the normal data into a hypersphere of minimum
volume around a centre c; anomalies land far from c.

* One-class Deep SVDD (their eq. 4):
      min_W  1/n sum_i ||phi(x_i; W) - c||^2 + lambda/2 sum_l ||W^l||_F^2
  (the weight decay term is the optimiser's ``weight_decay``).
* Soft-boundary Deep SVDD (eq. 3), ``objective="soft-boundary"``:
      min_{R, W}  R^2 + 1/(nu n) sum_i max(0, ||phi(x_i; W) - c||^2 - R^2) + weight decay,
  with R updated every epoch after ``warm_up`` epochs to the (1 - nu)-quantile of the
  training distances (the paper solves for R by line search; its reference code uses
  this quantile, which is the line search's solution).
* Score (eq. 5): s(x) = ||phi(x; W*) - c||^2 (minus R^2 for soft-boundary).

Why the paper's network looks the way it does (Sec. 3.3, "properties"), the two ways
the objective collapses to the trivial solution phi = c for every input:

* Prop. 1: c = 0 (or a learned c) admits W = 0 -> every output equals c. Remedy: fix c
  to the mean of an initial forward pass, and push coordinates too close to 0 out to
  +-eps (eps = 0.1 in the reference code).
* Prop. 2: bias terms let the network output a constant c and set all weights to 0.
  Remedy: no bias terms anywhere, and BatchNorm without affine parameters.
* Prop. 3: bounded activations (sigmoid) saturate to a constant; use (leaky) ReLU.

``bias=True, learn_center=True`` switch both remedies off: the chapter shows the loss
drop to ~0 while the AUROC falls to chance (the hypersphere collapse).

Network: the paper's LeNet-type CNN for MNIST: conv(5x5, 8) - BN - LeakyReLU(0.1) -
maxpool 2 - conv(5x5, 4) - BN - LeakyReLU - maxpool 2 - linear(rep_dim = 32), all
bias-free, BN with ``affine=False, eps=1e-4``. Paper settings (default preset):
Adam, lr 1e-4, weight decay 5e-7, batch 200, 150 epochs, after 250 epochs of
auto-encoder pretraining whose encoder initialises phi (the paper's initialisation).
Simplification: the paper's global-contrast normalisation of the inputs is left out
(our images are already in [0, 1]); ``image_size`` 32 (the quick digits) instead of 28.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ...base import Detector
from ...params import Param
from ...registry import register
from ...training import fit_loop
from ...utils import AnomalyZooError

OBJECTIVES = ("one-class", "soft-boundary")


class LeNetEncoder(nn.Module):
    """phi: the paper's bias-free LeNet-type CNN, ``[B, 3, S, S] -> [B, rep_dim]`` (S divisible by 4)."""

    def __init__(self, image_size: int = 32, channels=(8, 4), rep_dim: int = 32, bias: bool = False):
        super().__init__()
        c1, c2 = channels
        self.conv1 = nn.Conv2d(3, c1, 5, padding=2, bias=bias)
        self.bn1 = nn.BatchNorm2d(c1, eps=1e-4, affine=bias)
        self.conv2 = nn.Conv2d(c1, c2, 5, padding=2, bias=bias)
        self.bn2 = nn.BatchNorm2d(c2, eps=1e-4, affine=bias)
        self.fc = nn.Linear(c2 * (image_size // 4) ** 2, rep_dim, bias=bias)

    def forward(self, x):
        x = F.max_pool2d(F.leaky_relu(self.bn1(self.conv1(x)), 0.1), 2)
        x = F.max_pool2d(F.leaky_relu(self.bn2(self.conv2(x)), 0.1), 2)
        return self.fc(x.flatten(1))


class LeNetDecoder(nn.Module):
    """The mirrored decoder used only for pretraining (bias-free too, as in the reference code)."""

    def __init__(self, image_size: int = 32, channels=(8, 4), rep_dim: int = 32, bias: bool = False):
        super().__init__()
        c1, c2 = channels
        self.g = image_size // 4
        self.c2 = c2
        self.fc = nn.Linear(rep_dim, c2 * self.g * self.g, bias=bias)
        self.deconv1 = nn.ConvTranspose2d(c2, c1, 5, padding=2, bias=bias)
        self.bn1 = nn.BatchNorm2d(c1, eps=1e-4, affine=bias)
        self.deconv2 = nn.ConvTranspose2d(c1, 3, 5, padding=2, bias=bias)

    def forward(self, z):
        x = F.leaky_relu(self.fc(z).view(len(z), self.c2, self.g, self.g), 0.1)
        x = F.interpolate(x, scale_factor=2)
        x = F.interpolate(F.leaky_relu(self.bn1(self.deconv1(x)), 0.1), scale_factor=2)
        return torch.sigmoid(self.deconv2(x))


def init_center(z: torch.Tensor, eps: float = 0.1) -> torch.Tensor:
    """c = mean of the initial embeddings; coordinates with |c_j| < eps are set to +-eps (Prop. 1's remedy)."""
    c = z.mean(0)
    c[(c.abs() < eps) & (c < 0)] = -eps
    c[(c.abs() < eps) & (c >= 0)] = eps
    return c


@register("deep_svdd", family="one_class", paper="Deep One-Class Classification", year=2018,
          bibkey="ruff2018deepsvdd", localizes=False, trains=True,
          quick=dict(image_size=32, epochs=30, pretrain_epochs=30, lr=1e-3, batch_size=32))
class DeepSVDD(Detector):
    """Deep SVDD: bias-free CNN, fixed centre, squared distance to the centre."""

    objective = Param("one-class", str)
    nu = Param(0.1, float)
    rep_dim = Param(32, int)
    channels = Param((8, 4), tuple)
    image_size = Param.image_size(32)
    epochs = Param.epochs(150)
    pretrain_epochs = Param(250, int)
    batch_size = Param.batch_size(200)
    lr = Param.lr(1e-4)
    weight_decay = Param.weight_decay(5e-7)
    warm_up = Param(10, int)
    eps = Param(0.1, float)
    bias = Param(False, bool)
    learn_center = Param(False, bool)

    def _build(self, meta: dict) -> None:
        h, w = meta["input_hw"]
        if h != w or h % 4:
            raise AnomalyZooError(f"Deep SVDD's LeNet needs square images with a side divisible by 4, got {h}x{w}")
        self.net_ = LeNetEncoder(h, tuple(self.channels), self.rep_dim, self.bias)
        # c and R live in the state dict; c is a parameter only in the collapse demonstration
        c = torch.zeros(self.rep_dim)
        if self.learn_center:
            self.center_ = nn.Parameter(c)
        else:
            self.register_buffer("center_", c)
        self.register_buffer("radius_", torch.zeros(()))

    def _dist(self, x: torch.Tensor) -> torch.Tensor:
        return (self.net_(x) - self.center_).pow(2).sum(1)

    def _loss(self, x: torch.Tensor) -> torch.Tensor:
        dist = self._dist(x)
        if self.objective == "one-class":
            return dist.mean()  # eq. (4); the weight decay term is the optimiser's
        r2 = self.radius_ ** 2
        return r2 + F.relu(dist - r2).mean() / self.nu  # eq. (3)

    def _update_radius(self, x: torch.Tensor, epoch: int) -> None:
        if self.objective == "soft-boundary" and epoch >= self.warm_up:
            with torch.no_grad():
                self.net_.eval()
                d = torch.cat([self._dist(x[i : i + 256].to(self.device_)) for i in range(0, len(x), 256)])
                self.net_.train()
            self.radius_.fill_(float(torch.quantile(d.sqrt().double(), 1 - self.nu)))

    def _fit(self, x: torch.Tensor) -> None:
        if self.objective not in OBJECTIVES:
            raise AnomalyZooError(f"unknown objective {self.objective!r}; use one of {', '.join(OBJECTIVES)}")
        if not 0 < self.nu <= 1:
            raise AnomalyZooError(f"nu must lie in (0, 1], got {self.nu}")
        self._build(self.meta_)
        self.to(self.device_)
        common = dict(batch_size=self.batch_size, lr=self.lr, weight_decay=self.weight_decay,
                      device=self.device_, seed=self.seed)
        if self.pretrain_epochs:  # the paper's initialisation: the encoder of a trained auto-encoder
            ae = nn.Sequential(self.net_, LeNetDecoder(x.shape[-1], tuple(self.channels), self.rep_dim, self.bias))
            self.meta_["pretrain_history"] = fit_loop(ae, lambda b: F.mse_loss(ae(b), b), x,
                                                      epochs=self.pretrain_epochs, desc="deep_svdd[ae]", **common)
        # c: mean of an initial forward pass (eval mode: BN running statistics), near-zero coordinates pushed out
        self.net_.eval()
        with torch.no_grad():
            z = torch.cat([self.net_(x[i : i + 256].to(self.device_)) for i in range(0, len(x), 256)])
        self.center_.data.copy_(init_center(z, self.eps))
        self.meta_["history"] = fit_loop(self, self._loss, x, epochs=self.epochs, desc="deep_svdd",
                                         checkpoint=self.checkpoint,
                                         on_epoch_end=lambda e: self._update_radius(x, e), **common)

    def embed(self, images) -> torch.Tensor:
        """phi(x) for images, on CPU (for figures)."""
        x = self._prepare(images, "images").to(self.device_)
        with torch.no_grad():
            return self.net_(x).cpu()

    def _score(self, x: torch.Tensor):
        dist = self._dist(x)
        if self.objective == "soft-boundary":
            dist = dist - self.radius_ ** 2
        return dist, None
