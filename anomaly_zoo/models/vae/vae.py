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
* ``nll_map``: ``-log p(x|z)`` per pixel. ``likelihood="gaussian"`` (the default):
  ``(x - x_hat)^2 / (2 s^2) + 1/2 log(2 pi s^2)`` per pixel, summed over the pixels, with a
  **fixed** variance ``s^2 = x_var`` (0.05) for every pixel and image. This is the library's
  choice, not the paper's: Kingma & Welling's Gaussian decoder (Appendix C.2, for the
  real-valued Frey faces) outputs a mean *and* a log-variance per pixel and learns both. A fixed
  ``s^2`` makes ``-log p(x|z)`` a scaled squared error plus a constant, so the reconstruction map
  is the residual and ``x_var`` sets the weight of the reconstruction term against the KL term
  (a learned variance can shrink without bound on pixels that never change, such as a black
  background, where the likelihood then diverges). ``"bernoulli"`` (Appendix C.1, the paper's
  choice for binarised MNIST): the binary cross-entropy. Our images are grey levels in [0, 1],
  not binary: for them the Bernoulli likelihood is misspecified, and its gradient with respect
  to a pixel, ``d BCE / d x = -logit(x_hat)``, does not depend on the pixel's value at all (a map
  of the decoder's confidence, not of the error; chapter 6 measures it);
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

Network: the convolutional encoder/decoder of ``anomaly_zoo.nets.ConvAutoEncoder`` (Bergmann et
al. 2019) with a last encoder layer giving ``(mu, log sigma^2)``, initialised as He et al. (2015)
prescribe for LeakyReLU layers (``init="he"``, ``nets.he_init_``). On a GPU, training runs under the shared
loop's bf16 autocast; ``predict`` (and so the gradient map) runs in float32.

Posterior collapse, and what caused it here. A VAE whose decoder ignores the code has
``q(z|x) = p(z)`` for every ``x`` (KL 0) and decodes one image, the mean training image.
Count the **active units** with ``encode``: latent dimension ``u`` is active if
``Cov_x( E_q[z_u] ) > 0.01`` over the training images (Burda et al., ICLR 2016). With
PyTorch's default initialisation (now ``init="pytorch"``) the earlier quick preset (60 epochs,
lr 5e-4) had 0 of 32 active units on the quick textures (brick) and phantom sets, KL 0, and
every reconstruction was the mean image. Diagnosed on training images only (held-out -ELBO
on a 48/12 split of the 60 training images), the KL term was not the cause: the fit
collapsed just as much with ``beta=0`` (no KL term at all) and with a KL warm-up. The 18
LeakyReLU layers at PyTorch's default initialisation shrink the signal's variance several-fold
per layer: before training, ``mu(x)`` varies over the brick images with a variance of 8e-11
and the decoder's output varies with ``z`` by 3e-10 (He initialisation: 4e-4 and 9e-3), so
the gradient that could teach the network to use its code is as small. With He initialisation
and 100 epochs at lr 1e-3 (the quick preset; a brick fit takes 8 to 10 s on one CPU core) the
quick brick and phantom models have 32 of 32 active units (seeds 0 to 2), KL 6 to 11 nats per
image, and reconstructions that differ from image to image; held-out -ELBO goes from -1654
(collapsed, seed 0) to -1684.5 nats on brick (mean of seeds 0 to 2) and from -1592 to -1674.7
on the phantom. Held-out -ELBO still improves with more epochs (150 epochs, seed 0: -1689 on
brick, -1683 on the phantom) at 1.5 times the time. With the new budget but PyTorch's
initialisation, chapter 6 shows brick with a weak code at ``beta=1`` and none with warm-up or
with ``beta=0``: the initialisation, not the KL term, decides.

KL warm-up (``warmup``, off by default): the "KL cost annealing" of Bowman et al. (CoNLL 2016)
and the "warm-up" of Sønderby et al. (NeurIPS 2016): in epoch ``t`` (from 0) training minimises
``-E_q[log p(x|z)] + w_t KL(q(z|x) || p(z))`` with ``w_t = beta min(1, t / warmup)``
(``VAE.kl_weight``, read from the training loop's ``ctx.epoch``), so the network first learns as an auto-encoder and meets the full KL
term from epoch ``warmup`` on; from then on the loss is the paper's -ELBO (``beta=1``).
Scoring always uses the full -ELBO. With He initialisation it is not needed here: with
``warmup=50`` of 100 epochs, held-out -ELBO is -1686.3 on brick (-1684.5 without, a difference
within the spread over seeds) and -1670.5 on the phantom (-1674.7 without), means of seeds 0
to 2, all units active either way. Free bits (Kingma et al. 2016) was not adopted: it changes
the objective for the whole run, so training would not end on the ELBO.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ...base import Detector
from ...nets import INITS, ConvAutoEncoder, check_side, init_convs_
from ...ops import gaussian_blur
from ...params import Param
from ...registry import register
from ...utils import AnomalyZooError

LIKELIHOODS = ("gaussian", "bernoulli")


class ConvVAE(nn.Module):
    """Encoder to ``(mu, logvar)`` and decoder to likelihood logits, ``nets.ConvAutoEncoder``'s layers."""

    def __init__(self, image_size: int, latent_dim: int, width: int = 32, channels: int = 3, init: str = "he"):
        super().__init__()
        self.latent_dim = latent_dim
        self.encoder = ConvAutoEncoder(image_size, 2 * latent_dim, width, channels, init="pytorch").encoder
        self.decoder = ConvAutoEncoder(image_size, latent_dim, width, channels, init="pytorch").decoder[:-1]  # logits
        init_convs_(self, init)

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
    """Per-pixel, per-channel ``-log p(x|z)`` ``[B, C, H, W]`` (the constant of the Gaussian is per pixel)."""
    if likelihood == "bernoulli":
        return F.binary_cross_entropy_with_logits(logits, x, reduction="none")
    if likelihood == "gaussian":
        return (x - torch.sigmoid(logits)).pow(2) / (2 * x_var) + 0.5 * math.log(2 * math.pi * x_var)
    raise AnomalyZooError(f"likelihood must be one of {', '.join(LIKELIHOODS)}, got {likelihood!r}")


@register("vae", family="vae", paper="Auto-Encoding Variational Bayes", year=2014, bibkey="kingma2014vae",
          localizes=True, trains=True, quick=dict(image_size=32, epochs=100, lr=1e-3),
          deviations=("Gaussian decoder with a fixed variance x_var = 0.05 for every pixel (the library's choice); "
                      "the paper's Gaussian decoder (App. C.2) learns a variance per pixel",
                      "convolutional encoder/decoder (Bergmann et al.'s auto-encoder, He initialisation) instead of "
                      "the paper's one-hidden-layer MLPs; latent_dim 32",
                      "Adam (lr 5e-4, batches of 16, 200 epochs) instead of the paper's Adagrad with weight decay "
                      "on minibatches of 100",
                      "anomaly scores and maps (-ELBO, reconstruction term, the gradient map of Dehaene et al.) are "
                      "not in the paper, which is about density modelling",
                      "scoring uses score_samples = 4 Monte Carlo samples, the same noise for every image"))
class VAE(Detector):
    """Variational auto-encoder: score -ELBO (or its reconstruction term); reconstruction or gradient maps."""

    latent_dim = Param(32, int, low=1, help="dimension of the code z")
    likelihood = Param("gaussian", str, choices=LIKELIHOODS, help="p(x|z): fixed-variance Gaussian or Bernoulli")
    x_var = Param(0.05, float, low=0, low_open=True, help="s^2, the fixed variance of the Gaussian likelihood")
    beta = Param(1.0, float, low=0, help="weight of the KL term (1: the ELBO; 0: an auto-encoder)")
    warmup = Param(0, int, low=0, help="epochs of linear KL warm-up (Bowman et al. 2016); 0: none")
    init = Param("he", str, choices=INITS, help="'he' (He et al. 2015) or PyTorch's default, to show the collapse")
    score = Param("elbo", str, choices=("elbo", "recon"), help="image score: -ELBO or its reconstruction term")
    map = Param("recon", str, choices=("recon", "grad"), help="map: per-pixel -log p(x|z), or |d(-ELBO)/dx|")
    score_samples = Param(4, int, low=0, help="Monte Carlo samples of z per image when scoring; 0: z = mu")
    sigma = Param.sigma(2.0)
    width = Param(32, int, low=1, help="channels of the first layer; the others are 1, 2 or 4 times it")
    image_size = Param.image_size(128)
    epochs = Param.epochs(200)
    batch_size = Param.batch_size(16)
    lr = Param.lr(5e-4)
    weight_decay = Param.weight_decay(0.0)

    @property
    def needs_grad(self) -> bool:  # gradient maps need autograd inside predict
        return self.map == "grad"

    def _check_params(self) -> None:
        super()._check_params()
        check_side(self.name, self.image_size)

    def _build(self, shapes: dict) -> None:
        h, w = shapes["input_hw"]
        check_side(self.name, self.image_size, (h, w))
        self.net_ = ConvVAE(h, self.latent_dim, self.width, init=self.init)

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

    def kl_weight(self, epoch: int) -> float:
        """The KL term's weight in training epoch ``epoch`` (0-based): the warm-up schedule.

        Linear from 0 (epoch 0) to ``beta`` (epoch ``warmup`` and after), Bowman et al. 2016 /
        Sønderby et al. 2016; ``warmup=0``: ``beta`` throughout.
        """
        if self.warmup <= 0:
            return float(self.beta)
        return float(self.beta) * min(1.0, epoch / self.warmup)

    def _loss(self, x: torch.Tensor, ctx) -> tuple[torch.Tensor, dict]:
        """One sample of z per image (eq. 10 with L = 1) from the loop's generator; the KL weight of ``ctx.epoch``."""
        eps = torch.randn(x.shape[0], self.latent_dim, generator=ctx.generator).to(x.device)
        nll, kl = self.elbo_terms(x, eps)
        rec, kl = nll.flatten(1).sum(1).mean(), kl.mean()
        w = self.kl_weight(ctx.epoch)
        return rec + w * kl, {"rec": rec.detach(), "kl": kl.detach(), "kl_weight": w}

    def _fit(self, x: torch.Tensor) -> None:
        self._train(self._loss, x, module=self.net_)

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
