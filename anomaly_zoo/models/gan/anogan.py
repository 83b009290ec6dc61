"""AnoGAN: unsupervised anomaly detection with GANs to guide marker discovery (Schlegl et al., IPMI 2017).

A DCGAN learns the manifold of normal images: a generator ``G`` maps ``z ~ U[-1, 1]^d`` to images,
a discriminator ``D`` tells them from training images (eq. 1, the minimax game
``min_G max_D E[log D(x)] + E[log(1 - D(G(z)))]``; the generator takes the non-saturating step
``max log D(G(z))`` of Goodfellow et al. 2014). At test time there is no encoder: for each image
``x`` AnoGAN *searches* the latent space for the point whose image is closest (Sec. 2.2),

* residual loss (eq. 2): ``L_R(z) = sum |x - G(z)|``;
* discrimination loss (eq. 3, feature matching on an intermediate layer ``f`` of ``D``):
  ``L_D(z) = sum |f(x) - f(G(z))|``;
* the search minimises ``L(z) = (1 - lambda) L_R(z) + lambda L_D(z)`` (eq. 4), ``lambda = 0.1``,
  by ``Gamma = 500`` back-propagation steps on ``z`` only (G and D fixed);
* anomaly score (eq. 5): ``A(x) = (1 - lambda) R(x) + lambda D(x)``, the two losses at the last
  ``z_Gamma``; the map is the residual ``|x - G(z_Gamma)|`` (Sec. 2.3), the channel mean.

The optimiser of the search is our choice: Adam at ``search_lr`` on ``z``. Every
image starts from the same ``z_0``, drawn from a generator seeded with ``seed``, so a score is
reproducible and does not depend on the batch. The search runs inside ``_score`` with autograd
(``needs_grad``) and costs ``search_steps`` forward and backward passes of G and D per image: this
is the method's known weakness, and why f-AnoGAN (``f_anogan``) learns an encoder instead.
Training: Adam lr 2e-4, betas (0.5, 0.999), the DCGAN recipe the paper follows.

Quick preset (32 px, width 16, z of 64, 120 epochs, 40 search steps at lr 0.1; about 10 s of one
CPU core to fit, 20 ms per image to score), chosen on the training images only: on a 48/12 split
of brick's training crops the held-out residual (mean |x - G(z*)|, [-1, 1] units) is 0.124 after 60
epochs and 0.102 after 120; 100 search steps instead of 40 lower it by 1% only. Measured, data
seeds 0 / 1 / 2: brick pixel AUROC 0.807 / 0.776 / 0.790, image AUROC 0.633 / 0.559 / 0.667;
digits, ten-class one-vs-rest mean image AUROC 0.938 (seed 0).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ...params import Param
from ...registry import register
from ...training import Player
from .blocks import Decoder, Discriminator, GANDetector, dcgan_init_, to_signed


def anogan_losses(x, x_gen, f_x, f_gen) -> tuple[torch.Tensor, torch.Tensor]:
    """``(L_R, L_D)`` per image: summed absolute residual in pixel and in feature space (eq. 2, 3)."""
    return (x - x_gen).abs().flatten(1).sum(1), (f_x - f_gen).abs().flatten(1).sum(1)


@register("anogan", family="gan", paper="Unsupervised Anomaly Detection with Generative Adversarial Networks "
          "to Guide Marker Discovery", year=2017, bibkey="schlegl2017anogan", localizes=True, trains=True,
          quick=dict(image_size=32, width=16, latent_dim=64, epochs=120, batch_size=16, search_steps=40,
                     search_lr=0.1),
          deviations=("the latent search uses Adam at search_lr (our choice of optimiser)",
                      "every test image starts its search from the same seeded z_0",
                      "default image_size 64 (the paper: 64x64 OCT patches)"))
class AnoGAN(GANDetector):
    """DCGAN on normal images; at test time a latent search for the closest generated image."""

    needs_grad = True  # predict must allow autograd: the search differentiates through G and D

    lam = Param(0.1, float, low=0, high=1, help="lambda of eq. 4-5: weight of the discrimination loss")
    search_steps = Param(500, int, low=0, help="Gamma: back-propagation steps of the latent search")
    search_lr = Param(0.01, float, low=0, low_open=True, help="Adam step size of the latent search")
    epochs = Param.epochs(20)

    def _build(self, shapes: dict) -> None:
        s = self._side(shapes)
        self.generator_ = dcgan_init_(Decoder(s, self.latent_dim, self.width))
        self.discriminator_ = dcgan_init_(Discriminator(s, self.width))

    # ------------------------------------------------------------ training (eq. 1)
    def _d_step(self, x, ctx):
        z = torch.rand(len(x), self.latent_dim, generator=ctx.generator).to(ctx.device) * 2 - 1
        self._fake = self.generator_(z)  # reused by _g_step on this batch
        real, _ = self.discriminator_(to_signed(x))
        fake, _ = self.discriminator_(self._fake.detach())
        return F.binary_cross_entropy_with_logits(real, torch.ones_like(real)) + \
            F.binary_cross_entropy_with_logits(fake, torch.zeros_like(fake))

    def _g_step(self, x, ctx):
        logit, _ = self.discriminator_(self._fake)
        return F.binary_cross_entropy_with_logits(logit, torch.ones_like(logit))

    def _fit(self, x: torch.Tensor) -> None:
        betas = (0.5, 0.999)
        self._train([Player("discriminator", self._d_step, self.discriminator_.parameters(), betas=betas),
                     Player("generator", self._g_step, self.generator_.parameters(), betas=betas)], x)
        self._fake = None

    # ------------------------------------------------------ the latent search (eq. 2-5)
    def search(self, x: torch.Tensor, steps: int | None = None, every: int = 0):
        """Minimise eq. 4 over ``z`` for images ``x`` in [0, 1] on the device.

        Returns ``(z, L_R, L_D, frames)``; ``frames`` holds ``G(z)`` in [0, 1] (CPU) every ``every``
        steps (0: none), for the chapter's figure of the search.
        """
        steps = self.search_steps if steps is None else steps
        xs = to_signed(x)
        g = torch.Generator().manual_seed(self.seed)
        z0 = torch.rand(1, self.latent_dim, generator=g) * 2 - 1
        z = z0.expand(len(x), -1).clone().to(x.device).requires_grad_(True)
        opt = torch.optim.Adam([z], lr=self.search_lr)
        frames = []
        with torch.enable_grad():
            f_x = self.discriminator_(xs)[1].detach()
            for step in range(steps + 1):
                gen = self.generator_(z)
                l_r, l_d = anogan_losses(xs, gen, f_x, self.discriminator_(gen)[1])
                if every and step % every == 0:
                    frames.append(((gen.detach() + 1) / 2).clamp(0, 1).cpu())
                if step == steps:
                    break
                loss = ((1 - self.lam) * l_r + self.lam * l_d).sum()  # images are independent: one sum
                (z.grad,) = torch.autograd.grad(loss, z)  # parameters of G and D get no gradient
                opt.step()
        return z.detach(), l_r.detach(), l_d.detach(), frames

    def _score(self, x: torch.Tensor):
        z, l_r, l_d, _ = self.search(x)
        with torch.no_grad():
            maps = (to_signed(x) - self.generator_(z)).abs().mean(1)
        return (1 - self.lam) * l_r + self.lam * l_d, maps

    @torch.no_grad()
    def sample(self, n: int, seed: int = 0) -> torch.Tensor:
        """``n`` images ``G(z)``, ``z ~ U[-1, 1]^d`` (CPU, [0, 1])."""
        z = torch.rand(n, self.latent_dim, generator=torch.Generator().manual_seed(seed)) * 2 - 1
        return ((self.generator_(z.to(self.device_)) + 1) / 2).clamp(0, 1).cpu()
