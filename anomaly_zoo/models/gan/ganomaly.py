"""GANomaly: semi-supervised anomaly detection via adversarial training (Akcay et al., ACCV 2018).

The generator is an encoder-decoder-encoder: ``G_E`` maps an image to a code ``z``, ``G_D``
decodes it to ``x^ = G_D(z)``, and a second encoder ``E`` maps the reconstruction back to
``z^ = E(x^)``. Trained on normal images only, the two codes agree on normal images; on an
anomaly ``G_D`` produces a normal-looking ``x^`` whose code ``z^`` is far from ``z``. A DCGAN
discriminator ``D`` judges ``x`` against ``x^``. Equation numbers are the paper's:

* adversarial loss (eq. 1), feature matching on ``D``'s last hidden layer ``f``:
  ``L_adv = E || f(x) - f(G(x)) ||_2`` (mean squared difference, ``blocks.feature_matching``);
* contextual loss (eq. 2): ``L_con = E || x - G(x) ||_1``;
* encoder loss (eq. 3): ``L_enc = E || G_E(x) - E(G(x)) ||_2`` (mean squared difference);
* generator objective (eq. 4): ``L = w_adv L_adv + w_con L_con + w_enc L_enc``, weights
  ``(1, 50, 1)`` (Sec. 4);
* the discriminator minimises the binary cross-entropy of real against reconstructed images,
  and is re-initialised when its loss falls below 1e-5, as the authors' code does
  (``lib/model.py``, ``reinitialize_netd``); the players update in that order, D then G;
* anomaly score (eq. 5): ``A(x) = || G_E(x) - E(G(x)) ||``, here the mean squared difference over
  the code, as the authors' code computes it (``torch.mean(torch.pow(latent_i - latent_o, 2), 1)``);
* score scaling (eq. 6): ``s' = (s - min) / (max - min)``. The authors' code takes min and max
  over the **test set** it is evaluating, so one image's score depends on the other test
  images. Here min and max are those of the **training** scores (``score_min_``/``score_max_``,
  learned in ``fit``): an increasing affine map, the same for every batch, so the ranking (and
  the AUROC) is that of the raw score and a test image's score is its own.
* the networks are in eval mode at test time (``Detector.predict``): BatchNorm uses its running
  statistics. The authors' ``test()`` never calls ``.eval()``, so BatchNorm normalises each
  test batch by its own statistics; chapter 8 measures what both habits change.

Networks: the DCGAN pyramid of ``blocks`` (``ngf = ndf = 64``, ``nz = 100``), Adam lr 2e-4,
betas (0.5, 0.999), batches of 64, 15 epochs at 32x32 (the authors' ``options.py``). GANomaly
does not localise: there is no map.

Quick preset: 32 px, width 16, 100 epochs in batches of 16 (about 9 s of one CPU core). The
paper's 15 epochs are 15 passes over thousands of images; over the quick sets' 60-80 images they
are 60-75 steps, and the held-out contextual error (mean |x - x^| on a 64/16 split of digit 1's
training images, [-1, 1] units) is 0.74 after 15 epochs, 0.24 after 50 and 0.12 after 100 (digit 4:
0.67, 0.23, 0.13): chosen on training images only. Measured: digits, ten-class one-vs-rest mean
image AUROC 0.996 (data seed 0; 0.833 with 15 epochs); digit 8: 0.99 / 0.977 (seeds 0 / 1). Brick:
image AUROC 0.49-0.64 (a defect of a few pixels barely moves the code of a 32 px image).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ...params import Param
from ...registry import register
from ...training import Player
from .blocks import Decoder, Discriminator, Encoder, GANDetector, dcgan_init_, feature_matching, to_signed


class EncoderDecoderEncoder(nn.Module):
    """GANomaly's generator: ``x -> (x^, z, z^)`` with ``z = G_E(x)``, ``x^ = G_D(z)``, ``z^ = E(x^)``."""

    def __init__(self, image_size: int, latent_dim: int, width: int):
        super().__init__()
        self.encoder1 = Encoder(image_size, latent_dim, width)
        self.decoder = Decoder(image_size, latent_dim, width)
        self.encoder2 = Encoder(image_size, latent_dim, width)

    def forward(self, x):
        z = self.encoder1(x)
        x_hat = self.decoder(z)
        return x_hat, z, self.encoder2(x_hat)


def generator_loss(x, x_hat, z, z_hat, f_real, f_fake, w_adv: float, w_con: float, w_enc: float):
    """Eq. (4): ``w_adv L_adv + w_con L_con + w_enc L_enc`` (eqs. 1-3), batch means; returns (loss, terms)."""
    adv = feature_matching(f_real, f_fake).mean()
    con = F.l1_loss(x_hat, x)
    enc = (z - z_hat).pow(2).mean()
    return w_adv * adv + w_con * con + w_enc * enc, {"adv": adv.detach(), "con": con.detach(), "enc": enc.detach()}


@register("ganomaly", family="gan", paper="GANomaly: Semi-Supervised Anomaly Detection via Adversarial Training",
          year=2018, bibkey="akcay2018ganomaly", localizes=False, trains=True,
          quick=dict(image_size=32, width=16, epochs=100, batch_size=16),
          deviations=("anomaly score: the mean squared code difference of the authors' code, not the norm of eq. 5",
                      "scores scaled by the min and max of the training scores, not of the test set (eq. 6 and the "
                      "authors' code), so that a score does not depend on the other test images",
                      "networks in eval mode when scoring (the authors' test() leaves BatchNorm in train mode)",
                      "default image_size 64 (the paper's experiments use 32x32 CIFAR/MNIST)"))
class GANomaly(GANDetector):
    """Encoder-decoder-encoder GAN; score: distance between the code of x and the code of its reconstruction."""

    w_adv = Param(1.0, float, low=0, help="weight of the adversarial feature loss (eq. 4)")
    w_con = Param(50.0, float, low=0, help="weight of the contextual L1 loss (eq. 4)")
    w_enc = Param(1.0, float, low=0, help="weight of the encoder (latent) loss (eq. 4)")
    epochs = Param.epochs(15)

    def _build(self, shapes: dict) -> None:
        s = self._side(shapes)
        self.generator_ = dcgan_init_(EncoderDecoderEncoder(s, self.latent_dim, self.width))
        self.discriminator_ = dcgan_init_(Discriminator(s, self.width))
        self.register_buffer("score_min_", torch.zeros(()))
        self.register_buffer("score_max_", torch.ones(()))

    # ------------------------------------------------------------ training
    def _d_step(self, x, ctx):
        x = to_signed(x)
        self._cache = self.generator_(x)  # the generator's forward, reused by _g_step on this batch
        real, _ = self.discriminator_(x)
        fake, _ = self.discriminator_(self._cache[0].detach())
        loss_real = F.binary_cross_entropy_with_logits(real, torch.ones_like(real))
        loss_fake = F.binary_cross_entropy_with_logits(fake, torch.zeros_like(fake))
        self._reinit = max(float(loss_real.detach()), float(loss_fake.detach())) < 1e-5
        return loss_real + loss_fake

    def _g_step(self, x, ctx):
        if self._reinit:  # the authors' rule: a discriminator that wins outright starts again
            dcgan_init_(self.discriminator_, ctx.generator)
            self.diagnostics_["d_reinitialised"] = self.diagnostics_.get("d_reinitialised", 0) + 1
        x = to_signed(x)
        x_hat, z, z_hat = self._cache
        _, f_real = self.discriminator_(x)
        _, f_fake = self.discriminator_(x_hat)
        return generator_loss(x, x_hat, z, z_hat, f_real.detach(), f_fake, self.w_adv, self.w_con, self.w_enc)

    def _fit(self, x: torch.Tensor) -> None:
        self._train([Player("discriminator", self._d_step, self.discriminator_.parameters(), betas=(0.5, 0.999)),
                     Player("generator", self._g_step, self.generator_.parameters(), betas=(0.5, 0.999))], x)
        self._cache = None
        self.eval()
        raw = torch.cat([self.raw_score(x[i : i + 64].to(self.device_)) for i in range(0, len(x), 64)])
        self.score_min_.fill_(float(raw.min()))
        self.score_max_.fill_(float(raw.max()))

    # ------------------------------------------------------------- scoring
    @torch.no_grad()
    def raw_score(self, x: torch.Tensor) -> torch.Tensor:
        """Eq. (5): the mean squared difference of ``G_E(x)`` and ``E(G(x))`` per image (x in [0, 1])."""
        _, z, z_hat = self.generator_(to_signed(x))
        return (z - z_hat).pow(2).mean(1)

    def _score(self, x: torch.Tensor):
        """Eq. (6) with the training scores' min and max (see the module docstring); no map."""
        span = (self.score_max_ - self.score_min_).clamp_min(1e-12)
        return (self.raw_score(x) - self.score_min_) / span, None

    @torch.no_grad()
    def reconstruct(self, images) -> torch.Tensor:
        """``G(x)`` in ``[0, 1]`` (CPU), for figures."""
        x = self._prepare(images, "images").to(self.device_)
        return ((self.generator_(to_signed(x))[0] + 1) / 2).clamp(0, 1).cpu()
