"""Convolutional auto-encoder with an L2, SSIM or MS-SSIM loss (Bergmann et al., VISAPP 2019).

An auto-encoder trained on normal images only learns to reconstruct normal
appearance through a narrow bottleneck; where a test image cannot be
reconstructed, the residual is large (the survey's reconstruction family).

* Network (Bergmann et al. 2019, Table 1): ``anomaly_zoo.nets.ConvAutoEncoder``, strided 4x4 /
  3x3 convolutions with LeakyReLU(0.2) down to an ``image_size/16`` grid, a last convolution to a
  ``latent_dim`` vector (100 in the paper), and the mirrored decoder with transposed
  convolutions; a sigmoid keeps the output in [0, 1]. He initialisation for the LeakyReLU
  (the paper does not say; with PyTorch's default the code vanishes, see ``nets.he_init_``).
* Loss: ``loss="l2"``: the per-pixel squared error ||x - D(E(x))||^2 (their eq. 1);
  ``loss="ssim"``: 1 - SSIM(x, D(E(x))) averaged over pixels (their eq. 2-5,
  the library's one SSIM in ``anomaly_zoo.ssim``); ``loss="ms_ssim"``:
  1 - MS-SSIM(x, D(E(x))), the multi-scale SSIM of Wang et al. (2003, eq. 7), which
  compares structure at five scales instead of one 11x11 window; ``loss="msgms"``: the
  multi-scale gradient magnitude similarity loss of RIAD (``anomaly_zoo.gms``), the survey's AE-MSGMS.
* Residual map: for L2 the squared error, for SSIM the per-pixel 1 - SSIM, for
  MS-SSIM the per-pixel 1 - MS-SSIM (``ssim.ms_ssim_map``), averaged over colour
  channels; for MSGMS the per-pixel 1 - MSGMS (``gms.msgms_map``, on the grey level).
  ``residual=`` picks a map other than the loss's (e.g. an L2-trained network read with an
  SSIM map). Image score: the mean of the map (the
  reconstruction error, ``image_score="mean"``) or its maximum after Gaussian
  smoothing (``"max"``).

The quick preset uses 64 px images and 60 epochs in batches of 8 (the paper's lr 2e-4 and
weight decay 1e-5); chosen on the training error alone: on brick's 60 quick training crops it
falls to 0.0029, less than half the error of the mean training image (0.0066). The method is the same.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ...base import Detector
from ...gms import msgms_loss, msgms_map
from ...nets import ConvAutoEncoder, check_side
from ...ops import gaussian_blur
from ...params import Param
from ...registry import register
from ...ssim import ms_ssim, ms_ssim_map, ssim_map

LOSSES = ("l2", "ssim", "ms_ssim", "msgms")


def residual_map(x: torch.Tensor, x_hat: torch.Tensor, kind: str) -> torch.Tensor:
    """Per-pixel reconstruction residual ``[B, H, W]``: squared error, 1 - SSIM or 1 - MS-SSIM, channel mean."""
    if kind == "l2":
        return (x - x_hat).pow(2).mean(1)
    if kind == "ssim":
        return (1 - ssim_map(x, x_hat)).mean(1)
    if kind == "ms_ssim":
        return (1 - ms_ssim_map(x, x_hat)).mean(1)
    if kind == "msgms":
        return 1 - msgms_map(x, x_hat)
    raise ValueError(f"unknown residual {kind!r}; use one of {', '.join(LOSSES)}")


class ReconstructionDetector(Detector):
    """What every auto-encoder of this family shares (``ae``, ``unet_ae``, ``ms_ssim_ae``, ``memae``).

    The hyperparameters of the network and of its training (Bergmann et al.'s: lr 2e-4, weight
    decay 1e-5), the network ``self.net_`` (an instance of ``network``, built from ``latent_dim``,
    ``width`` and the training image side, which must be square and a multiple of 16), and
    ``reconstruct()`` for figures. A subclass supplies its loss step and its score;
    ``_reconstruct`` is the forward pass from input to reconstruction.
    """

    network: type[nn.Module] = ConvAutoEncoder

    latent_dim = Param(100, int, low=1, help="size of the code, one vector per image (100 in Bergmann et al.)")
    width = Param(32, int, low=1, help="channels of the first layer; the others are 1, 2 or 4 times it (32)")
    image_size = Param.image_size(128)
    epochs = Param.epochs(200)
    batch_size = Param.batch_size(16)
    lr = Param.lr(2e-4)
    weight_decay = Param.weight_decay(1e-5)

    def _check_params(self) -> None:
        super()._check_params()
        check_side(self.name, self.image_size)

    def _build(self, shapes: dict) -> None:
        h, w = shapes["input_hw"]
        check_side(self.name, self.image_size, (h, w))
        self.net_ = self.network(h, self.latent_dim, self.width)

    def _reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        return self.net_(x)

    def reconstruct(self, images) -> torch.Tensor:
        """The reconstruction of ``images`` at the detector's image size, on CPU (for figures)."""
        x = self._prepare(images, "images").to(self.device_)
        with torch.no_grad():
            return self._reconstruct(x).cpu()


@register("ae", family="reconstruction", paper="Improving Unsupervised Defect Segmentation by Applying "
          "Structural Similarity to Autoencoders", year=2019, bibkey="bergmann2019ssim", localizes=True,
          trains=True, quick=dict(image_size=64, epochs=60, batch_size=8),
          deviations=("He initialisation of every convolution (the paper does not state one; with PyTorch's "
                      "default the code vanishes and the network learns the mean image)",
                      "trained on whole images resized to image_size (128 px), not on the paper's 10,000 random "
                      "128 px patches of the training images, scored on whole images, not patch by patch",
                      "loss='l2' by default; the paper's SSIM auto-encoder is loss='ssim'",
                      "image score: the mean of the residual map (the paper segments and reports no image score)"))
class AutoEncoder(ReconstructionDetector):
    """Convolutional auto-encoder (L2, SSIM or MS-SSIM loss); residual map."""

    loss = Param("l2", str, choices=LOSSES, help="training loss: squared error (eq. 1), 1 - SSIM (eq. 2-5), 1 - MS-SSIM, or MSGMS (RIAD)")
    residual = Param(None, str, choices=LOSSES, none=True, help="the residual map; None: the loss's own")
    image_score = Param("mean", str, choices=("mean", "max"), help="mean of the map, or max of the smoothed map")
    sigma = Param.sigma(4.0)

    def _loss(self, x: torch.Tensor, ctx=None) -> torch.Tensor:
        x_hat = self._reconstruct(x)
        if self.loss == "l2":
            return F.mse_loss(x_hat, x)
        if self.loss == "ms_ssim":
            return 1 - ms_ssim(x, x_hat)
        if self.loss == "msgms":
            return msgms_loss(x, x_hat)
        return 1 - ssim_map(x, x_hat).mean()

    def _fit(self, x: torch.Tensor) -> None:
        self._train(self._loss, x, desc=f"{self.name}[{self.loss}]")

    def _score(self, x: torch.Tensor):
        maps = residual_map(x, self._reconstruct(x), self.residual or self.loss)
        if self.image_score == "mean":
            return maps.flatten(1).mean(1), maps
        return gaussian_blur(maps, self.sigma).flatten(1).amax(1), maps
