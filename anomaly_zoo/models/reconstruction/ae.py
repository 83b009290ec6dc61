"""Convolutional auto-encoder with an L2, SSIM or MS-SSIM loss (Bergmann et al., VISAPP 2019).

An auto-encoder trained on normal images only learns to reconstruct normal
appearance through a narrow bottleneck; where a test image cannot be
reconstructed, the residual is large (the survey's reconstruction family).

* Network (Bergmann et al. 2019, Table 1): strided 4x4 / 3x3 convolutions with
  LeakyReLU(0.2) down to an ``image_size/16`` grid, a last convolution to a
  ``latent_dim`` vector (100 in the paper), and the mirrored decoder with
  transposed convolutions; a sigmoid keeps the output in [0, 1]. He initialisation for the
  LeakyReLU (the paper does not say; with PyTorch's default the code vanishes, see ``he_init_``).
* Loss: ``loss="l2"``: the per-pixel squared error ||x - D(E(x))||^2 (their eq. 1);
  ``loss="ssim"``: 1 - SSIM(x, D(E(x))) averaged over pixels (their eq. 2-5,
  the library's one SSIM in ``anomaly_zoo.ssim``); ``loss="ms_ssim"``:
  1 - MS-SSIM(x, D(E(x))), the multi-scale SSIM of Wang et al. (2003, eq. 7), which
  compares structure at five scales instead of one 11x11 window.
* Residual map: for L2 the squared error, for SSIM the per-pixel 1 - SSIM, for
  MS-SSIM the per-pixel 1 - MS-SSIM (``ssim.ms_ssim_map``), averaged over colour
  channels. ``residual=`` picks a map other than the loss's (e.g. an L2-trained
  network read with an SSIM map). Image score: the mean of the map (the
  reconstruction error, ``image_score="mean"``) or its maximum after Gaussian
  smoothing (``"max"``).

The quick preset uses 64 px images and 60 epochs in batches of 8 (the paper's lr 2e-4 and
weight decay 1e-5); chosen on the training error alone: on brick's 60 quick training crops it
falls to 0.0029, less than half the error of the mean training image (0.0066). The method is the same.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ...base import Detector
from ...ops import gaussian_blur
from ...params import Param
from ...registry import register
from ...ssim import ms_ssim, ms_ssim_map, ssim_map
from ...training import fit_loop
from ...utils import AnomalyZooError

LOSSES = ("l2", "ssim", "ms_ssim")


def _block(cin, cout, k, s, transpose=False):
    conv = nn.ConvTranspose2d if transpose else nn.Conv2d
    p = 1 if k == 4 else k // 2
    return nn.Sequential(conv(cin, cout, k, s, p), nn.LeakyReLU(0.2, inplace=True))


class ConvAutoEncoder(nn.Module):
    """Bergmann et al.'s encoder/decoder; ``width`` scales the channel counts (32 in the paper).

    ``init="he"``: He initialisation (``he_init_``); ``"pytorch"``: PyTorch's default, to show why not.
    """

    def __init__(self, image_size: int = 128, latent_dim: int = 100, width: int = 32, channels: int = 3,
                 init: str = "he"):
        super().__init__()
        if image_size % 16:
            raise AnomalyZooError(f"image_size must be a multiple of 16, got {image_size}")
        if init not in ("he", "pytorch"):
            raise AnomalyZooError(f"init must be 'he' or 'pytorch', got {init!r}")
        w, g = width, image_size // 16
        self.encoder = nn.Sequential(
            _block(channels, w, 4, 2), _block(w, w, 4, 2), _block(w, w, 3, 1),
            _block(w, 2 * w, 4, 2), _block(2 * w, 2 * w, 3, 1), _block(2 * w, 4 * w, 4, 2),
            _block(4 * w, 2 * w, 3, 1), _block(2 * w, w, 3, 1),
            nn.Conv2d(w, latent_dim, g),  # the bottleneck: one latent_dim vector per image
        )
        self.decoder = nn.Sequential(
            nn.ConvTranspose2d(latent_dim, w, g), nn.LeakyReLU(0.2, inplace=True),
            _block(w, 2 * w, 3, 1), _block(2 * w, 4 * w, 3, 1), _block(4 * w, 2 * w, 4, 2, True),
            _block(2 * w, 2 * w, 3, 1), _block(2 * w, w, 4, 2, True), _block(w, w, 3, 1),
            _block(w, w, 4, 2, True),
            nn.ConvTranspose2d(w, channels, 4, 2, 1), nn.Sigmoid(),
        )

        for m in self.modules():
            if init == "he" and isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
                he_init_(m)

    def forward(self, x):
        return self.decoder(self.encoder(x))


def he_init_(conv: nn.Conv2d | nn.ConvTranspose2d, slope: float = 0.2) -> None:
    """He et al. (2015) initialisation for LeakyReLU(``slope``): weights ``N(0, 2 / ((1 + slope^2) fan_in))``,
    zero bias, where ``fan_in`` is the number of inputs that reach one output (for a transposed
    convolution with stride ``s``: ``in_channels * k^2 / s^2``). It keeps the signal's variance
    constant through the layers. PyTorch's default (uniform, with the gain of a slope of sqrt(5))
    shrinks it about threefold per layer: through the nine encoder layers the code of every image is
    the same to 1e-5, the decoder learns the mean training image and the encoder never recovers
    (measured on the quick brick crops; the VAE's code collapses the same way).
    """
    k = conv.kernel_size[0] * conv.kernel_size[1]
    if isinstance(conv, nn.ConvTranspose2d):
        fan_in = conv.in_channels * k / (conv.stride[0] * conv.stride[1])
    else:
        fan_in = conv.in_channels * k
    nn.init.normal_(conv.weight, 0.0, math.sqrt(2.0 / ((1 + slope**2) * fan_in)))
    nn.init.zeros_(conv.bias)


def residual_map(x: torch.Tensor, x_hat: torch.Tensor, kind: str) -> torch.Tensor:
    """Per-pixel reconstruction residual ``[B, H, W]``: squared error, 1 - SSIM or 1 - MS-SSIM, channel mean."""
    if kind == "l2":
        return (x - x_hat).pow(2).mean(1)
    if kind == "ssim":
        return (1 - ssim_map(x, x_hat)).mean(1)
    if kind == "ms_ssim":
        return (1 - ms_ssim_map(x, x_hat)).mean(1)
    raise AnomalyZooError(f"unknown residual {kind!r}; use one of {', '.join(LOSSES)}")


class ReconstructionDetector(Detector):
    """What every auto-encoder of this family shares (``ae``, ``unet_ae``, ``ms_ssim_ae``, ``memae``).

    The network ``self.net_`` (an instance of ``network``, built from ``latent_dim``, ``width`` and
    the training image size), the square-image check, the call to the one training loop with
    the common hyperparameters, and ``reconstruct()`` for figures. A subclass supplies its
    loss step and its score; ``_reconstruct`` is the forward pass from input to reconstruction.
    """

    network: type[nn.Module] = ConvAutoEncoder

    def _build(self, meta: dict) -> None:
        self.net_ = self.network(meta["input_hw"][0], self.latent_dim, self.width)

    def _reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        return self.net_(x)

    def _train(self, x: torch.Tensor, step, desc: str) -> None:
        """Check ``x``, build the networks and minimise ``step(batch)`` with the shared loop."""
        if x.shape[-1] != x.shape[-2]:
            raise AnomalyZooError(f"the auto-encoder needs square images, got {tuple(x.shape[-2:])}")
        self._build(self.meta_)
        self.meta_["history"] = fit_loop(self, step, x, epochs=self.epochs, batch_size=self.batch_size,
                                         lr=self.lr, weight_decay=self.weight_decay, device=self.device_,
                                         seed=self.seed, desc=desc, checkpoint=self.checkpoint)

    def reconstruct(self, images) -> torch.Tensor:
        """The reconstruction of ``images`` at the detector's image size, on CPU (for figures)."""
        x = self._prepare(images, "images").to(self.device_)
        with torch.no_grad():
            return self._reconstruct(x).cpu()


@register("ae", family="reconstruction", paper="Improving Unsupervised Defect Segmentation by Applying "
          "Structural Similarity to Autoencoders", year=2019, bibkey="bergmann2019ssim", localizes=True,
          trains=True, quick=dict(image_size=64, epochs=60, batch_size=8))
class AutoEncoder(ReconstructionDetector):
    """Convolutional auto-encoder (L2, SSIM or MS-SSIM loss); residual map."""

    loss = Param("l2", str)
    residual = Param(None, str, none=True)
    latent_dim = Param(100, int)
    width = Param(32, int)
    image_size = Param.image_size(128)
    epochs = Param.epochs(200)
    batch_size = Param.batch_size(16)
    lr = Param.lr(2e-4)
    weight_decay = Param.weight_decay(1e-5)
    image_score = Param("mean", str)
    sigma = Param.sigma(4.0)

    def _loss(self, x: torch.Tensor) -> torch.Tensor:
        x_hat = self._reconstruct(x)
        if self.loss == "l2":
            return F.mse_loss(x_hat, x)
        if self.loss == "ms_ssim":
            return 1 - ms_ssim(x, x_hat)
        return 1 - ssim_map(x, x_hat).mean()

    def _fit(self, x: torch.Tensor) -> None:
        if self.loss not in LOSSES:
            raise AnomalyZooError(f"unknown loss {self.loss!r}; use one of {', '.join(LOSSES)}")
        if self.residual not in (None, *LOSSES):
            raise AnomalyZooError(f"unknown residual {self.residual!r}; use None (= the loss) or one of {', '.join(LOSSES)}")
        if self.image_score not in ("mean", "max"):
            raise AnomalyZooError(f"image_score must be 'mean' or 'max', got {self.image_score!r}")
        self._train(x, self._loss, f"{self.name}[{self.loss}]")

    def _score(self, x: torch.Tensor):
        maps = residual_map(x, self._reconstruct(x), self.residual or self.loss)
        if self.image_score == "mean":
            return maps.flatten(1).mean(1), maps
        return gaussian_blur(maps, self.sigma).flatten(1).amax(1), maps
