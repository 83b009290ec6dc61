"""Skip-GANomaly: skip-connected, adversarially trained encoder-decoder (Akcay et al., IJCNN 2019).

GANomaly's generator squeezes every image through one code vector. Skip-GANomaly replaces it
by a U-Net (Ronneberger et al. 2015; the pix2pix ``UnetGenerator`` of the authors' code,
``define_G(netG='unet')``): the encoder halves the image down to 1x1, the decoder doubles it
back, and each decoder level also receives the encoder's feature map of the same size (a skip
connection), so fine detail need not pass the bottleneck. A DCGAN discriminator ``D`` (the
pyramid of ``blocks``) judges ``x`` against ``x^ = G(x)``. Equation numbers are the paper's:

* adversarial loss (eq. 1): the binary cross-entropy game, ``D`` tells ``x`` (1) from ``x^`` (0),
  ``G`` wants ``D(x^) = 1``;
* contextual loss (eq. 2): ``L_con = E || x - x^ ||_1``;
* latent loss (eq. 3): ``L_lat = E || f(x) - f(x^) ||_2``, ``f`` the last hidden layer of ``D``
  (feature matching, ``blocks.feature_matching``);
* generator objective (eq. 4): ``L = w_adv L_adv + w_con L_con + w_lat L_lat`` with
  ``(1, 40, 1)`` (Sec. IV); ``G`` updates first, then ``D`` (the authors' ``optimize_params``),
  ``D`` re-initialised when its loss falls below 1e-5;
* anomaly score (eq. 5): ``A(x) = lambda R(x) + (1 - lambda) L(x)`` with ``R`` the mean squared
  reconstruction error, ``L`` the mean squared difference of ``D``'s features and ``lambda = 0.9``:
  the authors' ``test()`` computes ``0.9 * rec + 0.1 * lat`` on per-image means. Their min-max
  scaling over the test set (eq. 6) is not applied: it is an increasing map per test set,
  which changes no ranking and would make a score depend on the other test images.

The map is the reconstruction error ``(x - x^)^2`` (channel mean, optionally smoothed), the
pixel-level counterpart of ``R(x)``. Adam lr 2e-4, betas (0.5, 0.999), batches of 64, 15
epochs (the authors' defaults).

Quick preset: 32 px, width 16, 30 epochs in batches of 16 (about 5 s of one CPU core). Measured,
data seeds 0 / 1 / 2: brick pixel AUROC 0.881 / 0.872 / 0.894 (the mean training image:
0.73-0.76), image AUROC 0.620 / 0.618 / 0.740; digits, ten-class mean image AUROC 0.950 (seed 0).
(100 epochs lower the held-out reconstruction
error of brick's training crops from 0.0064 to 0.0017, at 2.4 times the time; not adopted, to keep
the chapter under its time budget.)
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ...ops import gaussian_blur
from ...params import Param
from ...registry import register
from ...training import Player
from .blocks import Discriminator, GANDetector, _levels, dcgan_init_, feature_matching, to_signed


class UNet(nn.Module):
    """The pix2pix U-Net: ``log2(S)`` stride-2 4x4 convolutions down to 1x1 (LeakyReLU 0.2, BatchNorm
    except on the outermost and innermost layers), and transposed convolutions back up (ReLU,
    BatchNorm, tanh on the output), each up level concatenated with the down level of its size."""

    def __init__(self, image_size: int, width: int, channels: int = 3):
        super().__init__()
        n = _levels(image_size) + 2  # down to 1x1
        c = [width * min(2**i, 8) for i in range(n)]
        self.down, self.up = nn.ModuleList(), nn.ModuleList()
        for i in range(n):
            cin = channels if i == 0 else c[i - 1]
            conv = nn.Conv2d(cin, c[i], 4, 2, 1, bias=False)
            layers = [conv] if i == 0 else [nn.LeakyReLU(0.2), conv]
            if 0 < i < n - 1:
                layers.append(nn.BatchNorm2d(c[i]))
            self.down.append(nn.Sequential(*layers))
            cin_up = c[i] if i == n - 1 else 2 * c[i]
            cout = channels if i == 0 else c[i - 1]
            last = [nn.Tanh()] if i == 0 else [nn.BatchNorm2d(cout)]
            self.up.append(nn.Sequential(nn.ReLU(), nn.ConvTranspose2d(cin_up, cout, 4, 2, 1, bias=False), *last))

    def forward(self, x):
        skips = []
        for down in self.down:
            x = down(x)
            skips.append(x)
        for i in reversed(range(len(self.up))):
            x = self.up[i](x)
            if i > 0:
                x = torch.cat([skips[i - 1], x], 1)
        return x


@register("skip_ganomaly", family="gan", paper="Skip-GANomaly: Skip Connected and Adversarially Trained "
          "Encoder-Decoder Anomaly Detection", year=2019, bibkey="akcay2019skipganomaly", localizes=True,
          trains=True, quick=dict(image_size=32, width=16, epochs=30, batch_size=16),
          deviations=("scores are not min-max scaled over the test set (eq. 6): that scaling changes no ranking and "
                      "would make a score depend on the other test images",
                      "the map (x - G(x))^2 is the library's addition: the paper scores images only",
                      "default image_size 64 (the paper's experiments use 32x32 CIFAR/UBA/FFOB images)"))
class SkipGANomaly(GANDetector):
    """U-Net generator against a DCGAN discriminator; score 0.9 reconstruction + 0.1 feature error."""

    w_adv = Param(1.0, float, low=0, help="weight of the adversarial loss (eq. 4)")
    w_con = Param(40.0, float, low=0, help="weight of the contextual L1 loss (eq. 4)")
    w_lat = Param(1.0, float, low=0, help="weight of the latent (feature matching) loss (eq. 4)")
    lam = Param(0.9, float, low=0, high=1, help="lambda of the score (eq. 5): lambda R + (1 - lambda) L")
    sigma = Param.sigma(0.0)

    def _build(self, shapes: dict) -> None:
        s = self._side(shapes)
        self.generator_ = dcgan_init_(UNet(s, self.width))
        self.discriminator_ = dcgan_init_(Discriminator(s, self.width))

    # ------------------------------------------------------------ training
    def _g_step(self, x, ctx):
        x = to_signed(x)
        x_hat = self.generator_(x)
        self._fake = x_hat.detach()  # D's step on this batch reuses it
        logit, f_fake = self.discriminator_(x_hat)
        with torch.no_grad():
            f_real = self.discriminator_(x)[1]
        adv = F.binary_cross_entropy_with_logits(logit, torch.ones_like(logit))
        con = F.l1_loss(x_hat, x)
        lat = feature_matching(f_real, f_fake).mean()
        loss = self.w_adv * adv + self.w_con * con + self.w_lat * lat
        return loss, {"adv": adv.detach(), "con": con.detach(), "lat": lat.detach()}

    def _d_step(self, x, ctx):
        real, _ = self.discriminator_(to_signed(x))
        fake, _ = self.discriminator_(self._fake)
        loss = F.binary_cross_entropy_with_logits(real, torch.ones_like(real)) + \
            F.binary_cross_entropy_with_logits(fake, torch.zeros_like(fake))
        if float(loss.detach()) < 1e-5:  # the authors' rule, applied before the next batch
            dcgan_init_(self.discriminator_, ctx.generator)
        return loss

    def _fit(self, x: torch.Tensor) -> None:
        betas = (0.5, 0.999)
        self._train([Player("generator", self._g_step, self.generator_.parameters(), betas=betas),
                     Player("discriminator", self._d_step, self.discriminator_.parameters(), betas=betas)], x)
        self._fake = None

    # ------------------------------------------------------------- scoring
    def terms(self, x: torch.Tensor):
        """``(R [B], L [B], x^ in [-1, 1])`` for ``x`` in [0, 1] on the device (eq. 5's two terms)."""
        xs = to_signed(x)
        x_hat = self.generator_(xs)
        rec = (xs - x_hat).pow(2).flatten(1).mean(1)
        lat = feature_matching(self.discriminator_(xs)[1], self.discriminator_(x_hat)[1])
        return rec, lat, x_hat

    def _score(self, x: torch.Tensor):
        rec, lat, x_hat = self.terms(x)
        maps = gaussian_blur((to_signed(x) - x_hat).pow(2).mean(1), self.sigma)
        return self.lam * rec + (1 - self.lam) * lat, maps

    @torch.no_grad()
    def reconstruct(self, images) -> torch.Tensor:
        """``G(x)`` in ``[0, 1]`` (CPU), for figures."""
        x = self._prepare(images, "images").to(self.device_)
        return ((self.terms(x)[2] + 1) / 2).clamp(0, 1).cpu()
