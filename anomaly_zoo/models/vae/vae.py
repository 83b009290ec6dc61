"""Variational auto-encoder (Kingma & Welling, ICLR 2014) as an anomaly detector, with
reconstruction maps and gradient maps (Dehaene et al., ICLR 2020).

A VAE is an auto-encoder whose code is a distribution. The encoder gives, for an
image ``x``, a Gaussian ``q(z|x) = N(mu(x), diag sigma^2(x))`` over a ``latent_dim``-vector;
the decoder gives a likelihood ``p(x|z)``; the prior is ``p(z) = N(0, I)``. Training
maximises the evidence lower bound; equation numbers are Kingma & Welling's:

    log p(x) = KL( q(z|x) || p(z|x) ) + ELBO(x)                          (eq. 1)
    ELBO(x)  = E_{q(z|x)}[ log p(x|z) ] - KL( q(z|x) || p(z) )          (eq. 3)

Where each part lives in this file:

* ``kl_divergence``: the KL term in closed form for two Gaussians (their Appendix B,
  the first sum of eq. 10): ``KL = 1/2 sum_j ( mu_j^2 + sigma_j^2 - 1 - log sigma_j^2 )``;
* ``VAE.elbo_terms``: the reparameterisation ``z = mu + sigma * eps``, ``eps ~ N(0, I)``
  (their eq. 4 and section 2.4), and the Monte Carlo mean over ``L`` samples of
  ``-log p(x|z)`` (the second sum of eq. 10; estimator B, eq. 7). Training draws one
  sample per image, as in the paper;
* ``nll_map``: ``-log p(x|z)`` per pixel (their Appendix C). ``likelihood="gaussian"``
  (the default; Appendix C.2, the paper's choice for the real-valued Frey faces):
  ``(x - x_hat)^2 / (2 s^2) + 1/2 log(2 pi s^2)`` with a fixed variance ``s^2 = x_var``;
  ``"bernoulli"`` (Appendix C.1, the paper's choice for binarised MNIST): the binary
  cross-entropy. Our images are grey levels in [0, 1], not binary: for them the Bernoulli
  likelihood is misspecified, and its gradient with respect to a pixel,
  ``d BCE / d x = -logit(x_hat)``, does not depend on the pixel's value at all (a map of
  the decoder's confidence, not of the error; chapter 6 measures it);
* ``VAE.negative_elbo``: ``-ELBO`` per image, ``beta`` on the KL term (``beta=1``: the paper).

Anomaly detection (as the survey describes it): ``-ELBO(x)`` is an upper bound on
``-log p(x)``, large for images the model finds unlikely. ``score="elbo"`` uses it,
``score="recon"`` only its reconstruction term. Maps (``VAE._score``):

* ``map="recon"``: the per-pixel reconstruction term ``-log p(x_ij | z)``;
* ``map="grad"``: the magnitude of the gradient of ``-ELBO`` with respect to the input,
  ``|d(-ELBO)/dx|``: the direction in which the image would have to move to become
  more normal, large where it is abnormal (the gradient-based VAE of Dehaene et al.
  2020, who iterate this step; here the single gradient, the survey's "gradient map").
  With the Gaussian likelihood its decoder path is the residual ``(x - x_hat) / s^2``;
  the encoder path adds how the code, and so the whole reconstruction, moves with ``x``.

Both maps are channel means, optionally smoothed (``sigma``). Scores use
``score_samples`` Monte Carlo samples: the same ``score_samples`` noise vectors, drawn
from a generator seeded with ``seed``, for every image (common random numbers), so that a
prediction is reproducible and an image's score does not depend on the batch it is in;
``score_samples=0`` decodes the mean ``z = mu``.

Network: ``ae``'s convolutional encoder/decoder (Bergmann et al. 2019) with a last
encoder layer giving ``(mu, log sigma^2)``. On a GPU, training runs under the shared
loop's bf16 autocast; ``predict`` (and so the gradient map) runs in float32.

The quick preset (32 px, 60 epochs) keeps a CPU fit in seconds and trades fit for time: on
digits (each class's quick training images split 64/16), the held-out ``-ELBO`` is still
falling at 60 epochs (mean over the ten classes: -735 nats at 60, -837 at 80). Posterior
collapse: on the quick textures and phantom sets (60 training images, 240 steps) the quick
preset learns no code at all (0 active latent units, KL 0: the decoder draws the mean image
and the maps are residuals to it); chapter 6 shows it. Count active units with ``encode``.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ...base import Detector
from ...ops import gaussian_blur
from ...registry import register
from ...training import fit_loop
from ...utils import AnomalyZooError
from ..reconstruction.ae import ConvAutoEncoder


class ConvVAE(nn.Module):
    """Encoder to ``(mu, logvar)`` and decoder to likelihood logits, ``ConvAutoEncoder``'s layers."""

    def __init__(self, image_size: int, latent_dim: int, width: int = 32, channels: int = 3):
        super().__init__()
        self.latent_dim = latent_dim
        self.encoder = ConvAutoEncoder(image_size, 2 * latent_dim, width, channels).encoder
        self.decoder = ConvAutoEncoder(image_size, latent_dim, width, channels).decoder[:-1]  # logits

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.encoder(x).flatten(1)
        mu, logvar = h.chunk(2, dim=1)
        return mu, logvar.clamp(-12, 8)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder(z[:, :, None, None])


def kl_divergence(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """``KL(N(mu, exp(logvar)) || N(0, I))`` per row ``[B]`` (Kingma & Welling 2014, App. B)."""
    return 0.5 * (mu.pow(2) + logvar.exp() - 1 - logvar).sum(1)


def nll_map(x: torch.Tensor, logits: torch.Tensor, likelihood: str, x_var: float) -> torch.Tensor:
    """Per-pixel, per-channel ``-log p(x|z)`` ``[B, C, H, W]``."""
    if likelihood == "bernoulli":
        return F.binary_cross_entropy_with_logits(logits, x, reduction="none")
    if likelihood == "gaussian":
        return (x - torch.sigmoid(logits)).pow(2) / (2 * x_var) + 0.5 * math.log(2 * math.pi * x_var)
    raise AnomalyZooError(f"likelihood must be 'bernoulli' or 'gaussian', got {likelihood!r}")


@register("vae", family="vae", paper="Auto-Encoding Variational Bayes", year=2014, bibkey="kingma2014vae",
          localizes=True, trains=True, quick=dict(image_size=32, epochs=60))
class VAE(Detector):
    """Variational auto-encoder: score -ELBO (or its reconstruction term); reconstruction or gradient maps."""

    def __init__(self, latent_dim: int = 32, likelihood: str = "gaussian", x_var: float = 0.05, beta: float = 1.0,
                 score: str = "elbo", map: str = "recon", score_samples: int = 4, sigma: float = 2.0,
                 width: int = 32, image_size: int | None = 128, epochs: int = 200, batch_size: int = 16,
                 lr: float = 5e-4, weight_decay: float = 0.0, checkpoint: str | None = None,
                 device: str = "auto", seed: int = 0):
        super().__init__()
        self.latent_dim = latent_dim
        self.likelihood = likelihood
        self.x_var = x_var
        self.beta = beta
        self.score = score
        self.map = map
        self.score_samples = score_samples
        self.sigma = sigma
        self.width = width
        self.image_size = image_size
        self.epochs = epochs
        self.batch_size = batch_size
        self.lr = lr
        self.weight_decay = weight_decay
        self.checkpoint = checkpoint
        self.device = device
        self.seed = seed

    @property
    def needs_grad(self) -> bool:  # gradient maps need autograd inside predict
        return self.map == "grad"

    def _build(self, meta: dict) -> None:
        self.net_ = ConvVAE(meta["input_hw"][0], self.latent_dim, self.width)

    # ---------------------------------------------------------------- the ELBO
    def elbo_terms(self, x: torch.Tensor, eps: torch.Tensor | None = None):
        """``(nll_map [B, C, H, W], kl [B])`` for ``z = mu + sigma * eps`` (``eps=None``: ``z = mu``).

        ``eps`` may carry a leading sample axis ``[L, B, latent_dim]``: the NLL map is then the
        mean over the ``L`` samples (the Monte Carlo estimate of the expectation).
        """
        mu, logvar = self.net_.encode(x)
        kl = kl_divergence(mu, logvar)
        if eps is None:
            return nll_map(x, self.net_.decode(mu), self.likelihood, self.x_var), kl
        eps = eps if eps.ndim == 3 else eps[None]
        z = (mu + (0.5 * logvar).exp() * eps).flatten(0, 1)  # [L*B, d]
        logits = self.net_.decode(z).unflatten(0, eps.shape[:2])
        return nll_map(x[None].expand_as(logits), logits, self.likelihood, self.x_var).mean(0), kl

    def negative_elbo(self, x: torch.Tensor, eps: torch.Tensor | None = None) -> torch.Tensor:
        """``-ELBO`` per image ``[B]`` (nats), with ``beta`` on the KL term."""
        nll, kl = self.elbo_terms(x, eps)
        return nll.flatten(1).sum(1) + self.beta * kl

    def _loss(self, x: torch.Tensor) -> tuple[torch.Tensor, dict]:
        nll, kl = self.elbo_terms(x, torch.randn(x.shape[0], self.latent_dim, device=x.device))
        rec = nll.flatten(1).sum(1).mean()
        return rec + self.beta * kl.mean(), {"rec": rec.detach(), "kl": kl.mean().detach()}

    def _fit(self, x: torch.Tensor) -> None:
        if self.likelihood not in ("bernoulli", "gaussian"):
            raise AnomalyZooError(f"likelihood must be 'bernoulli' or 'gaussian', got {self.likelihood!r}")
        if self.score not in ("elbo", "recon"):
            raise AnomalyZooError(f"score must be 'elbo' or 'recon', got {self.score!r}")
        if self.map not in ("recon", "grad"):
            raise AnomalyZooError(f"map must be 'recon' or 'grad', got {self.map!r}")
        if x.shape[-1] != x.shape[-2]:
            raise AnomalyZooError(f"the VAE needs square images, got {tuple(x.shape[-2:])}")
        self._build(self.meta_)
        self.meta_["history"] = fit_loop(self.net_, self._loss, x, epochs=self.epochs, batch_size=self.batch_size,
                                         lr=self.lr, weight_decay=self.weight_decay, device=self.device_,
                                         seed=self.seed, desc="vae", checkpoint=self.checkpoint)

    # ------------------------------------------------------------ scoring
    def _eps(self, n: int, device) -> torch.Tensor | None:
        """The scoring noise ``[L, n, d]``: ``score_samples`` draws seeded with ``seed``, shared by all images."""
        if self.score_samples <= 0:
            return None
        g = torch.Generator(device="cpu").manual_seed(self.seed)
        eps = torch.randn(self.score_samples, 1, self.latent_dim, generator=g)
        return eps.expand(-1, n, -1).to(device)  # the same draws for every image

    def _score(self, x: torch.Tensor):
        eps = self._eps(len(x), x.device)
        if self.map == "grad":
            x = x.detach().clone().requires_grad_(True)
            with torch.enable_grad():
                nll, kl = self.elbo_terms(x, eps)
                neg_elbo = nll.flatten(1).sum(1) + self.beta * kl
                (grad,) = torch.autograd.grad(neg_elbo.sum(), x)
            maps = grad.abs().mean(1)
        else:
            nll, kl = self.elbo_terms(x, eps)
            neg_elbo = nll.flatten(1).sum(1) + self.beta * kl
            maps = nll.mean(1)
        score = neg_elbo if self.score == "elbo" else nll.flatten(1).sum(1)
        return score.detach(), gaussian_blur(maps.detach(), self.sigma)

    # --------------------------------------------------------- for figures
    @torch.no_grad()
    def encode(self, images) -> tuple[torch.Tensor, torch.Tensor]:
        """``(mu, logvar)`` of ``q(z|x)`` on CPU."""
        mu, logvar = self.net_.encode(self._prepare(images, "images").to(self.device_))
        return mu.cpu(), logvar.cpu()

    @torch.no_grad()
    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Mean image of ``p(x|z)`` for codes ``z [N, latent_dim]`` (CPU)."""
        return torch.sigmoid(self.net_.decode(z.to(self.device_).float())).cpu()

    def reconstruct(self, images) -> torch.Tensor:
        """Decoded mean code ``D(mu(x))`` (CPU)."""
        return self.decode(self.encode(images)[0])

    def sample(self, n: int, seed: int = 0) -> torch.Tensor:
        """``n`` images decoded from the prior ``z ~ N(0, I)``."""
        g = torch.Generator().manual_seed(seed)
        return self.decode(torch.randn(n, self.latent_dim, generator=g))
