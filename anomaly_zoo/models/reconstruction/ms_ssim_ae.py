"""The MS-SSIM auto-encoder used as a downstream detector by CCD (Tian et al., MICCAI 2021, eq. 7).

CCD pre-trains an encoder and then plugs it into three detectors; the simplest is an
auto-encoder trained with the multi-scale SSIM (Wang et al. 2003) and scored, as in
IGD (Chen et al. 2022), by a *global* and a *local* MS-SSIM between an image ``x`` and
its reconstruction ``x~ = g(f(x))``:

    s_MSI(x) = 1 - ( nu * m_G(x, x~) + (1 - nu) * m_L(x, x~) )                  (CCD eq. 7)

* ``m_G``: the MS-SSIM of the whole image (``anomaly_zoo.ssim.ms_ssim``);
* ``m_L``: the mean MS-SSIM over the image's local patches (a ``patch_size`` grid,
  non-overlapping), so that a small defect is not averaged away by a large clean image;
* ``nu`` in [0, 1] balances the two (0.5 here: the paper does not give its value).

Training minimises the same quantity, ``1 - (nu m_G + (1 - nu) m_L)`` on normal
images ("we train it with the MS-SSIM loss"). Localisation: "performed with
``s_MSI(x_omega)`` at image regions ``x_omega``": a window of ``patch_size`` slides over the
image with ``stride``; each window gets ``1 - MS-SSIM(x_omega, x~_omega)`` (inside one region
global and local coincide: a region is already local, and its sub-patches would be
smaller than the 11x11 SSIM window) and every pixel the mean over the windows that
cover it.

Network: ``ae``'s ``ConvAutoEncoder`` (Bergmann et al. 2019). CCD's own contribution,
the self-supervised pre-training of the encoder, is a separate method (family ``ssl``);
here the encoder is trained from scratch, which is the baseline CCD improves on.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ...params import Param
from ...registry import register
from ...ssim import ms_ssim
from ...utils import AnomalyZooError
from .ae import ReconstructionDetector


def patches(x: torch.Tensor, size: int, stride: int) -> torch.Tensor:
    """``[B, C, H, W]`` -> ``[B, L, C, size, size]``: the ``L`` windows of ``size`` px every ``stride`` px."""
    b, c = x.shape[:2]
    cols = F.unfold(x, size, stride=stride)  # [B, C*size*size, L]
    return cols.transpose(1, 2).reshape(b, -1, c, size, size)


def local_ms_ssim(x: torch.Tensor, y: torch.Tensor, size: int, stride: int | None = None) -> torch.Tensor:
    """MS-SSIM of every ``size`` window (``stride`` defaults to ``size``: a grid) ``[B, L]``."""
    px, py = patches(x, size, stride or size), patches(y, size, stride or size)
    b, n = px.shape[:2]
    return ms_ssim(px.flatten(0, 1), py.flatten(0, 1), reduction="none").view(b, n)


def region_map(x: torch.Tensor, y: torch.Tensor, size: int, stride: int) -> torch.Tensor:
    """Per-pixel mean of ``1 - MS-SSIM(x_omega, y_omega)`` over the windows ``omega`` covering it ``[B, H, W]``."""
    hw = x.shape[-2:]
    s = 1 - local_ms_ssim(x, y, size, stride)  # [B, L]
    ones = torch.ones_like(s)[:, None].expand(-1, size * size, -1)
    num = F.fold(s[:, None].expand(-1, size * size, -1), hw, size, stride=stride)
    den = F.fold(ones, hw, size, stride=stride)
    return (num / den.clamp_min(1))[:, 0]


@register("ms_ssim_ae", family="reconstruction", paper="Constrained Contrastive Distribution Learning for "
          "Unsupervised Anomaly Detection and Localisation in Medical Images (MS-SSIM AE, eq. 7)", year=2021,
          bibkey="tian2021ccd", localizes=True, trains=True, quick=dict(image_size=64, epochs=60, batch_size=8))
class MSSSIMAutoEncoder(ReconstructionDetector):
    """Auto-encoder trained and scored with global + local MS-SSIM (CCD eq. 7); region-wise maps."""

    nu = Param(0.5, float)
    patch_size = Param(None, int, none=True)
    stride = Param(None, int, none=True)
    latent_dim = Param(100, int)
    width = Param(32, int)
    image_size = Param.image_size(128)
    epochs = Param.epochs(200)
    batch_size = Param.batch_size(16)
    lr = Param.lr(2e-4)
    weight_decay = Param.weight_decay(1e-5)

    def _geometry(self) -> tuple[int, int]:
        """Region size (default: a quarter of the image side, at least the 11 px SSIM window) and stride."""
        side = self.meta_["input_hw"][0]
        size = self.patch_size or max(11, side // 4)
        return size, self.stride or max(1, size // 4)

    def msi(self, x: torch.Tensor, x_hat: torch.Tensor) -> torch.Tensor:
        """``s_MSI`` per image ``[B]`` (eq. 7): ``1 - (nu m_G + (1 - nu) m_L)``."""
        size, _ = self._geometry()
        m_g = ms_ssim(x, x_hat, reduction="none")
        m_l = local_ms_ssim(x, x_hat, size).mean(1)
        return 1 - (self.nu * m_g + (1 - self.nu) * m_l)

    def _fit(self, x: torch.Tensor) -> None:
        if not 0 <= self.nu <= 1:
            raise AnomalyZooError(f"nu must lie in [0, 1], got {self.nu}")
        size, _ = self._geometry()
        if not 11 <= size <= min(x.shape[-2:]):
            raise AnomalyZooError(f"patch_size must lie between 11 (the SSIM window) and the image size, got {size}")
        self._train(x, lambda b: self.msi(b, self.net_(b)).mean(), "ms_ssim_ae")

    def _score(self, x: torch.Tensor):
        x_hat = self.net_(x)
        size, stride = self._geometry()
        return self.msi(x, x_hat), region_map(x, x_hat, size, stride)
