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

``bias=True, learn_center=True`` switch both remedies off. The constant map is then a
minimum with loss 0 and a useless detector (built by hand in the tests and the chapter),
but in the measured runs training does not walk into it: on digits (quick preset, normal
class 1) the loss falls from 5.4 to 0.04 after 30 epochs and to 0.004 after 300 (also with
weight decay 1e-3), while the image AUROC stays 0.98 (0.97 for the bias-free network);
class 8: 0.96 after 30 epochs. Gradient descent only approaches the constant solution
asymptotically. The remedies' point is structural: without bias and with a fixed c the
constant map is not a minimum at all.

Network: the paper's LeNet-type CNN for MNIST: conv(5x5, 8) - BN - LeakyReLU - maxpool 2 -
conv(5x5, 4) - BN - LeakyReLU - maxpool 2 - linear(rep_dim = 32), all bias-free, BN with
``affine=False, eps=1e-4``; the LeakyReLU slope is the reference code's 0.01 (PyTorch's
default; the paper does not give one).

Default preset (the paper's Sec. 4 and its reference code): Adam, batch 200, the two-phase
learning rate ("searching + fine-tuning"): lr 1e-4, then 1e-5; Deep SVDD 150 + 100 epochs
with weight decay lambda = 5e-7, after an auto-encoder pretraining of 250 + 100 epochs with
weight decay 5e-4 and the summed squared reconstruction error (the reference code's), whose
encoder initialises phi (the reference code's README example instead trains 150 epochs
with the drop at epoch 50, and pretrains 150 epochs with the same drop). Differences from
the paper (data, input normalisation, ...) are
listed in the model card's ``deviations``. The quick preset: 30 + 30 epochs, batch 32, lr
1e-3, no lr drop.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ...base import Detector
from ...params import Param, bad
from ...registry import register

#: LeakyReLU slope of the reference code (``F.leaky_relu``'s default); the paper does not state one
SLOPE = 0.01


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
        x = F.max_pool2d(F.leaky_relu(self.bn1(self.conv1(x)), SLOPE), 2)
        x = F.max_pool2d(F.leaky_relu(self.bn2(self.conv2(x)), SLOPE), 2)
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
        x = F.leaky_relu(self.fc(z).view(len(z), self.c2, self.g, self.g), SLOPE)
        x = F.interpolate(x, scale_factor=2)
        x = F.interpolate(F.leaky_relu(self.bn1(self.deconv1(x)), SLOPE), scale_factor=2)
        return torch.sigmoid(self.deconv2(x))


def init_center(z: torch.Tensor, eps: float = 0.1) -> torch.Tensor:
    """c = mean of the initial embeddings; coordinates with |c_j| < eps are set to +-eps (Prop. 1's remedy)."""
    c = z.mean(0)
    c[(c.abs() < eps) & (c < 0)] = -eps
    c[(c.abs() < eps) & (c >= 0)] = eps
    return c


def two_phase(milestone: int | None) -> dict:
    """The two-phase learning rate (Sec. 4: "searching + fine-tuning"): lr, then lr / 10 from ``milestone``."""
    return dict(schedule="multistep", milestones=[milestone], gamma=0.1) if milestone else {}


@register("deep_svdd", family="one_class", paper="Deep One-Class Classification", year=2018,
          bibkey="ruff2018deepsvdd", localizes=False, trains=True,
          quick=dict(image_size=32, epochs=30, pretrain_epochs=30, lr=1e-3, batch_size=32, lr_milestone=None,
                     pretrain_milestone=None),
          deviations=("data: scikit-learn's 8x8 digits upsampled to 32 px, three channels, instead of 28 px MNIST; "
                      "the first layer and the linear layer follow from that size",
                      "no global contrast normalisation (l1) and min-max scaling of the inputs: images stay in [0, 1]",
                      "soft-boundary: R is set once per epoch from the distances of the whole training set "
                      "(the reference code sets it after every batch from that batch's distances)",
                      "pretraining decoder: a linear layer to the 8x8 grid and two transposed convolutions, not "
                      "the reference's reshape of the code to 2x4x4 followed by three transposed convolutions"))
class DeepSVDD(Detector):
    """Deep SVDD: bias-free CNN, fixed centre, squared distance to the centre."""

    objective = Param("one-class", str, choices=("one-class", "soft-boundary"),
                      help="eq. 4 (one-class) or eq. 3 (soft-boundary, radius R and nu)")
    nu = Param(0.1, float, low=0, high=1, low_open=True,
               help="soft-boundary: the share of training points allowed outside the sphere (eq. 3)")
    rep_dim = Param(32, int, low=1, help="size of the embedding phi(x)")
    channels = Param((8, 4), tuple, item=int, help="widths of the two conv layers (two positive integers)")
    image_size = Param(32, int, low=4, help="images are resized to this side, px (a multiple of 4)")
    epochs = Param.epochs(250)
    lr_milestone = Param(150, int, low=1, none=True,
                         help="epoch from which the lr is divided by 10 (two-phase schedule); None: constant lr")
    pretrain_epochs = Param(350, int, low=0, help="auto-encoder pretraining epochs (0: random initialisation)")
    pretrain_milestone = Param(250, int, low=1, none=True,
                               help="pretraining epoch from which the lr is divided by 10; None: constant lr")
    pretrain_weight_decay = Param(5e-4, float, low=0, help="weight decay of the auto-encoder pretraining")
    batch_size = Param.batch_size(200)
    lr = Param.lr(1e-4)
    weight_decay = Param(5e-7, float, low=0, help="lambda of eq. 4: L2 weight decay of the optimiser")
    warm_up = Param(10, int, low=0, help="soft-boundary: epochs before R is first updated")
    eps = Param(0.1, float, low=0, low_open=True, help="centre coordinates nearer 0 than eps are pushed to +-eps")
    bias = Param(False, bool, help="bias terms and affine BN (True breaks Prop. 2's remedy: the collapse demo)")
    learn_center = Param(False, bool, help="learn c with the weights (True breaks Prop. 1's remedy)")

    def _check_params(self) -> None:
        if self.image_size % 4:
            raise bad(self.name, "image_size", self.image_size, "a multiple of 4 (two 2x2 max-poolings)")
        if len(self.channels) != 2 or min(self.channels) < 1:
            raise bad(self.name, "channels", self.channels, "two positive integers")

    def _build(self, shapes: dict) -> None:
        h, _ = shapes["input_hw"]
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

    def _loss(self, x: torch.Tensor, ctx=None) -> torch.Tensor:
        dist = self._dist(x)
        if self.objective == "one-class":
            return dist.mean()  # eq. (4); the weight decay term is the optimiser's
        r2 = self.radius_ ** 2
        return r2 + F.relu(dist - r2).mean() / self.nu  # eq. (3)

    @torch.no_grad()
    def _train_dists(self, x: torch.Tensor) -> torch.Tensor:
        """Squared distances of the training images to c, eval mode (BN running statistics)."""
        was = self.net_.training
        self.net_.eval()
        d = torch.cat([self._dist(x[i : i + 256].to(self.device_)) for i in range(0, len(x), 256)])
        self.net_.train(was)
        return d

    def _update_radius(self, x: torch.Tensor, epoch: int) -> None:
        """Soft-boundary: R = the (1 - nu)-quantile of the training distances (the line search's solution)."""
        if self.objective == "soft-boundary" and epoch >= self.warm_up:
            self.radius_.fill_(float(torch.quantile(self._train_dists(x).sqrt().double(), 1 - self.nu)))

    def _fit(self, x: torch.Tensor) -> None:
        h, w = x.shape[-2:]
        if h != w or h % 4:
            raise bad(self.name, "image_size", self.image_size, f"a multiple of 4 giving square images (got {h}x{w})")
        if self.pretrain_epochs:  # the paper's initialisation: the encoder of a trained auto-encoder
            ae = nn.Sequential(self.net_, LeNetDecoder(h, tuple(self.channels), self.rep_dim, self.bias))

            def reconstruction(b, ctx):  # the reference code's loss: squared error summed over pixels
                return (ae(b) - b).pow(2).flatten(1).sum(1).mean()

            self._train(reconstruction, x, module=ae, key="pretrain", epochs=self.pretrain_epochs,
                        weight_decay=self.pretrain_weight_decay, desc="deep_svdd[ae]",
                        **two_phase(self.pretrain_milestone))
        # c: mean of an initial forward pass (eval mode: BN running statistics), near-zero coordinates pushed out
        self.net_.eval()
        with torch.no_grad():
            z = torch.cat([self.net_(x[i : i + 256].to(self.device_)) for i in range(0, len(x), 256)])
        self.center_.data.copy_(init_center(z, self.eps))
        self._train(self._loss, x, on_epoch_end=lambda ctx: self._update_radius(x, ctx.epoch),
                    **two_phase(self.lr_milestone))

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
