"""f-AnoGAN: fast unsupervised anomaly detection with GANs (Schlegl et al., Medical Image Analysis 2019).

AnoGAN (``anogan``) searches, for every test image, the latent code whose generated image is
closest: hundreds of back-propagation steps per image. f-AnoGAN learns that search once: an
encoder ``E`` maps an image to its code in one pass. Training has two stages, each a call to
the one training loop:

1. **WGAN-GP** (Sec. 2.1; Gulrajani et al. 2017): a generator ``G`` (z ~ N(0, I)) against a critic
   ``D`` with the Wasserstein loss ``E[D(G(z))] - E[D(x)]`` plus the gradient penalty (their eq. 3,
   ``blocks.gradient_penalty``, lambda = 10); the critic takes ``n_critic = 5`` steps per
   generator step (``Player(..., every=5)``), Adam lr 1e-4, betas (0, 0.9) (the authors'
   ``wgangp_64x64.py``). The critic has no BatchNorm (per-sample LayerNorm, as in that code).
2. **izi_f encoder training** (the paper's "izi_f" architecture): with ``G`` and ``D`` frozen, ``E`` is trained
   so that ``G(E(x))`` reproduces ``x`` in image space *and* in the critic's feature space ``f``
   (its last hidden layer)::

       L_izi_f(x) = 1/n ||x - G(E(x))||^2 + kappa / n_d ||f(x) - f(G(E(x)))||^2,   kappa = 1

   (n pixels, n_d features; the authors' ``z_encoding_izif.py`` trains it with RMSProp at lr 5e-5).

Anomaly score (the paper's A(x), "Anomaly score" section), the same two terms for the trained encoder::

    A(x) = A_R(x) + kappa A_D(x),  A_R = 1/n ||x - G(E(x))||^2,  A_D = 1/n_d ||f(x) - f(G(E(x)))||^2

and the map is the pixel residual ``|x - G(E(x))|`` (the paper's "residual image"), the channel mean.
(Equations are cited by name: their numbers were not checked against the journal version.)
This is also the downstream detector of the CCD paper (Tian et al., MICCAI 2021, Sec. 2.3), which
writes the score as ``s_FAN(x) = |x - g_phi(f_theta(x))| + kappa |f_theta(x) - f_theta(g_phi(f_theta(x)))|``
with ``f_theta`` its (CCD-pre-trained) encoder and ``g_phi`` the generator: in CCD's notation the second
residual is taken in the *encoder's* representation space, where f-AnoGAN's A_D uses the critic's
features. The library follows f-AnoGAN (the critic's features, squared and averaged), the paper
whose detector this is.

Network: the DCGAN pyramid of ``blocks`` (the paper uses residual blocks, 64x64 grey images,
``z`` of 128 dimensions). Images enter in ``[-1, 1]``; ``A_R`` and the map are computed in that
range, as in the authors' code. Scoring draws no randomness.

Quick preset (32 px, width 16, z of 64, 150 GAN epochs at lr 3e-4, 100 encoder epochs at lr 1e-3;
about 20 s of one CPU core), chosen on the training images only: on a 48/12 split of brick's 60
training crops, the held-out A_R falls from 0.0197 (lr 1e-4) to 0.0143 (lr 3e-4; 300 epochs:
0.0115 at 1.6 times the time). Measured, data seeds 0 / 1 / 2: brick pixel AUROC 0.796 / 0.750 /
0.785 (the mean training image: 0.73-0.76), image AUROC 0.559 / 0.585 / 0.631; digits, ten-class
one-vs-rest mean image AUROC 0.988 (seed 0). The phantom is **not** detected at this size: image
AUROC 0.521 / 0.366 / 0.602 (the issue's target 0.70 is missed), pixel AUROC 0.34-0.40: the
lesions of the 128 px phantom shrink to a few pixels at 32 px, and a GAN trained for seconds
reproduces the anatomy's variation no better than the lesions.
"""
from __future__ import annotations

import torch

from ...ops import gaussian_blur
from ...params import Param
from ...registry import register
from ...training import Player
from .blocks import Decoder, Discriminator, Encoder, GANDetector, dcgan_init_, gradient_penalty, to_signed


def izif_terms(x, x_hat, f_x, f_hat) -> tuple[torch.Tensor, torch.Tensor]:
    """``(A_R, A_D)`` per image: the mean squared residual in pixel and in critic-feature space (L_izi_f, A(x))."""
    return (x - x_hat).pow(2).flatten(1).mean(1), (f_x - f_hat).pow(2).flatten(1).mean(1)


@register("f_anogan", family="gan", paper="f-AnoGAN: Fast unsupervised anomaly detection with generative "
          "adversarial networks", year=2019, bibkey="schlegl2019fanogan", localizes=True, trains=True,
          quick=dict(image_size=32, width=16, latent_dim=64, epochs=150, lr=3e-4, batch_size=16, encoder_epochs=100,
                     encoder_lr=1e-3),
          deviations=("DCGAN convolution pyramid (He et al. residual blocks in the paper) for G, D and E",
                      "the encoder is trained with Adam (the authors' code: RMSProp, lr 5e-5)",
                      "training length in epochs (the paper: 100k generator iterations, 50k encoder iterations)"))
class FAnoGAN(GANDetector):
    """WGAN-GP, then an encoder to its latent space (izi_f); score: image + critic-feature residual."""

    latent_dim = Param(128, int, low=1, help="dimension of z (128 in the paper)")
    n_critic = Param(5, int, low=1, help="critic steps per generator step (WGAN-GP)")
    gp_weight = Param(10.0, float, low=0, help="lambda of the gradient penalty (Gulrajani et al. eq. 3)")
    kappa = Param(1.0, float, low=0, help="weight of the feature residual in L_izi_f and in A(x)")
    encoder_epochs = Param(100, int, low=1, help="epochs of stage 2 (encoder training)")
    encoder_lr = Param(5e-5, float, low=0, low_open=True, help="learning rate of the encoder")
    sigma = Param.sigma(0.0)
    epochs = Param.epochs(400)
    lr = Param.lr(1e-4)

    # CCD's hook (``ssl/ccd.py`` pre-trains this detector's encoder E, then fits it): the encoder, whether it
    # reads [-1, 1] images, and ``encoder_init``: a state dict ``_build`` loads into E when set (CCD sets it
    # for one ``fit``; None, the default, changes nothing)
    ccd_encoder, ccd_signed, encoder_init = "encoder_", True, None

    def _build(self, shapes: dict) -> None:
        s = self._side(shapes)
        self.generator_ = dcgan_init_(Decoder(s, self.latent_dim, self.width))
        self.critic_ = dcgan_init_(Discriminator(s, self.width, norm="layer"))
        self.encoder_ = dcgan_init_(Encoder(s, self.latent_dim, self.width))
        if self.encoder_init is not None:  # CCD's hook: start from a pre-trained encoder
            self.encoder_.load_state_dict(self.encoder_init)

    # ------------------------------------------------------ stage 1: WGAN-GP
    def _noise(self, n: int, ctx) -> torch.Tensor:
        return torch.randn(n, self.latent_dim, generator=ctx.generator).to(ctx.device)

    def _critic_step(self, x, ctx):
        x = to_signed(x)
        with torch.no_grad():
            fake = self.generator_(self._noise(len(x), ctx))
        wasserstein = self.critic_(fake)[0].mean() - self.critic_(x)[0].mean()
        gp = gradient_penalty(self.critic_, x, fake, ctx.generator, self.gp_weight)
        return wasserstein + gp, {"w_dist": -wasserstein.detach()}

    def _generator_step(self, x, ctx):
        return -self.critic_(self.generator_(self._noise(len(x), ctx)))[0].mean()

    # ------------------------------------------------- stage 2: izi_f encoder
    def _encoder_step(self, x, ctx):
        x = to_signed(x)
        x_hat = self.generator_(self.encoder_(x))
        a_r, a_d = izif_terms(x, x_hat, self.critic_(x)[1], self.critic_(x_hat)[1])
        return (a_r + self.kappa * a_d).mean(), {"A_R": a_r.mean().detach(), "A_D": a_d.mean().detach()}

    def _fit(self, x: torch.Tensor) -> None:
        betas = (0.0, 0.9)
        self._train([Player("critic", self._critic_step, self.critic_.parameters(), betas=betas),
                     Player("generator", self._generator_step, self.generator_.parameters(), betas=betas,
                            every=self.n_critic)], x, module=self)
        self.eval()
        frozen = [*self.generator_.parameters(), *self.critic_.parameters()]
        for p in frozen:
            p.requires_grad_(False)
        try:  # G and D stay in eval mode (fixed BatchNorm statistics); only E trains
            self._train(self._encoder_step, x, module=self.encoder_, key="encoder", epochs=self.encoder_epochs,
                        lr=self.encoder_lr, params=self.encoder_.parameters())
        finally:
            for p in frozen:
                p.requires_grad_(True)

    # -------------------------------------------------------------- scoring
    def terms(self, x: torch.Tensor):
        """``(A_R [B], A_D [B], G(E(x)) in [-1, 1])`` for images ``x`` in [0, 1] on the device (A(x)'s terms)."""
        xs = to_signed(x)
        x_hat = self.generator_(self.encoder_(xs))
        a_r, a_d = izif_terms(xs, x_hat, self.critic_(xs)[1], self.critic_(x_hat)[1])
        return a_r, a_d, x_hat

    def _score(self, x: torch.Tensor):
        a_r, a_d, x_hat = self.terms(x)
        maps = (to_signed(x) - x_hat).abs().mean(1)
        return a_r + self.kappa * a_d, gaussian_blur(maps, self.sigma)

    @torch.no_grad()
    def reconstruct(self, images) -> torch.Tensor:
        """``G(E(x))`` in ``[0, 1]`` (CPU), for figures."""
        x = self._prepare(images, "images").to(self.device_)
        return ((self.terms(x)[2] + 1) / 2).clamp(0, 1).cpu()

    @torch.no_grad()
    def sample(self, n: int, seed: int = 0) -> torch.Tensor:
        """``n`` images ``G(z)``, ``z ~ N(0, I)`` (CPU, [0, 1])."""
        z = torch.randn(n, self.latent_dim, generator=torch.Generator().manual_seed(seed)).to(self.device_)
        return ((self.generator_(z) + 1) / 2).clamp(0, 1).cpu()
