"""The MS-SSIM auto-encoder used as a downstream detector by CCD (Tian et al., MICCAI 2021, Sec. 2.2).

CCD pre-trains an encoder and then plugs it into three detectors; the simplest is an
auto-encoder trained with the multi-scale SSIM (Wang et al. 2003) and scored, as in
IGD (Chen et al. 2022), by a *global* and a *local* MS-SSIM between an image ``x`` and
its reconstruction ``x~ = g(f(x))`` (CCD Sec. 2.2; an unnumbered formula in the text, after
the IGD and F-anoGAN scores):

    s_MSI(x) = 1 - ( nu * m_G(x, x~) + (1 - nu) * m_L(x, x~) )

* ``m_G``: the MS-SSIM of the whole image (``anomaly_zoo.ssim.ms_ssim``, with the scales
  the image side allows: ``ssim.ms_levels``, five from 176 px, the exponents renormalised);
* ``m_L``: the mean MS-SSIM over local patches of ``patch_size`` px, a grid that covers every
  pixel (``covering_starts``: ``ceil(side / patch_size)`` evenly spaced windows per side,
  overlapping where the side is not a multiple), so that a small defect is not averaged away
  by a large clean image. CCD defines ``m_L`` only by citing IGD;
* ``nu`` in [0, 1] balances the two (0.5 here: the paper does not give its value).

Training minimises the same quantity, ``1 - (nu m_G + (1 - nu) m_L)`` averaged over the
batch ("we train it with the MS-SSIM loss").

Localisation (``region_map``): "performed with ``s_MSI(x_omega)`` at image regions ``x_omega``".
Regions of ``region_size`` px slide over the image with ``stride``; each gets the full score
above, computed on the region: ``m_G`` the region's MS-SSIM, ``m_L`` the mean MS-SSIM of its
local patches, a covering 2x2 grid of ``region_size // 2`` px (so ``region_size >= 22``: the
11x11 SSIM window must fit a local patch). Each pixel gets the mean score of the regions that
cover it (``ops.window_mean``); the stride divides ``side - region_size``, so the regions reach
the right and bottom borders and every pixel is covered. The scales the sizes allow: at the
quick preset's 64 px the regions are 22 px, so ``m_G`` of a region uses two scales (22, 11 px)
and its local term one (single-scale SSIM on 11 px quadrants); at 128 px (regions of 32 px) two
and one; at 256 px (regions of 64 px) three and two. The reconstruction of a region is the
region of the whole image's reconstruction: the network takes whole images.

Network: ``anomaly_zoo.nets.ConvAutoEncoder`` (Bergmann et al. 2019). CCD's own contribution,
the self-supervised pre-training of the encoder, is a separate method (family ``ssl``);
here the encoder is trained from scratch, which is the baseline CCD improves on.

Measured with the quick preset on brick (data seeds 0, 1, 2): the region map's pixel AUROC is
0.611, 0.718, 0.591, no better than the mean training image used as the reconstruction and scored
the same way (0.671, 0.611, 0.663); larger regions do not help (32 px: 0.584, 0.694, 0.552; 44 px:
0.543, 0.663, 0.527). The blurred reconstructions of a sharp texture leave a structural residual
on every normal edge. On digits (normal class 0) the training s_MSI is 0.13, 0.12, 0.12 of the mean
image's and the image AUROC 1.0, which the mean image also reaches.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ...ops import window_mean
from ...params import Param, bad
from ...registry import register
from ...ssim import ms_ssim
from .ae import ReconstructionDetector

MIN_REGION = 22  # a region's local patches (half its side) must hold the 11 px SSIM window


def covering_starts(side: int, size: int) -> list[int]:
    """Starts of ``ceil(side / size)`` windows of ``size`` px, evenly spaced from 0 to ``side - size``:
    together they cover every pixel of the side (overlapping when ``size`` does not divide it)."""
    n = math.ceil(side / size)
    if n == 1:
        return [0]
    return [round(i * (side - size) / (n - 1)) for i in range(n)]


def local_ms_ssim(x: torch.Tensor, y: torch.Tensor, size: int) -> torch.Tensor:
    """MS-SSIM of each local patch of ``size`` px in a grid that covers the image: ``[B, L]``."""
    h, w = x.shape[-2:]
    spots = [(i, j) for i in covering_starts(h, size) for j in covering_starts(w, size)]
    px = torch.stack([x[..., i:i + size, j:j + size] for i, j in spots], 1)  # [B, L, C, size, size]
    py = torch.stack([y[..., i:i + size, j:j + size] for i, j in spots], 1)
    return ms_ssim(px.flatten(0, 1), py.flatten(0, 1), reduction="none").view(len(x), len(spots))


def s_msi(x: torch.Tensor, y: torch.Tensor, nu: float, local_size: int) -> torch.Tensor:
    """``s_MSI = 1 - (nu m_G + (1 - nu) m_L)`` per image ``[B]`` (CCD Sec. 2.2)."""
    m_g = ms_ssim(x, y, reduction="none")
    m_l = local_ms_ssim(x, y, local_size).mean(1)
    return 1 - (nu * m_g + (1 - nu) * m_l)


def region_stride(side: int, region: int) -> int:
    """The default stride: the divisor of ``side - region`` closest to a quarter of the region."""
    span = side - region
    if span == 0:
        return 1
    divisors = [d for d in range(1, span + 1) if span % d == 0]
    return min(divisors, key=lambda d: (abs(d - region / 4), d))


def region_map(x: torch.Tensor, y: torch.Tensor, nu: float, region: int, stride: int) -> torch.Tensor:
    """``s_MSI(x_omega, y_omega)`` of every region ``omega`` (``region`` px every ``stride`` px, local
    patches of ``region // 2`` px), spread to the pixels: each pixel the mean over its regions ``[B, H, W]``.
    ``stride`` must divide ``H - region`` and ``W - region`` (then every pixel is covered)."""
    b, c, h, w = x.shape
    cols = [F.unfold(t, region, stride=stride) for t in (x, y)]  # [B, C*R*R, L]
    gh, gw = (h - region) // stride + 1, (w - region) // stride + 1
    rx, ry = (t.transpose(1, 2).reshape(b * gh * gw, c, region, region) for t in cols)
    scores = s_msi(rx, ry, nu, region // 2).view(b, gh, gw)
    return window_mean(scores, (h, w), region, stride)


@register("ms_ssim_ae", family="reconstruction", paper="Constrained Contrastive Distribution Learning for "
          "Unsupervised Anomaly Detection and Localisation in Medical Images (MS-SSIM AE, Sec. 2.2)", year=2021,
          bibkey="tian2021ccd", localizes=True, trains=True, quick=dict(image_size=64, epochs=60, batch_size=8),
          deviations=("the encoder is trained from scratch: CCD's pre-training of it is a separate method, so "
                      "this is the baseline CCD improves on",
                      "network: Bergmann et al.'s convolutional auto-encoder with He initialisation, trained with "
                      "their Adam settings (lr 2e-4, weight decay 1e-5); CCD does not give its own",
                      "nu = 0.5 and the local patches (a covering grid of patch_size, a quarter of the side) are "
                      "the library's: CCD gives neither, it cites IGD for m_L",
                      "regions of region_size px (a quarter of the side, at least 22) every stride px; a region's "
                      "reconstruction is that region of the whole image's reconstruction, and its local term "
                      "uses a 2x2 grid of half-size patches; at small sizes MS-SSIM uses fewer scales "
                      "(ssim.ms_levels)"))
class MSSSIMAutoEncoder(ReconstructionDetector):
    """Auto-encoder trained and scored with global + local MS-SSIM (s_MSI, CCD Sec. 2.2); region-wise maps."""

    nu = Param(0.5, float, low=0, high=1, help="weight of the global MS-SSIM against the local one")
    patch_size = Param(None, int, low=11, none=True,
                       help="side of the local patches of m_L, px; None: a quarter of the image side, at least 11")
    region_size = Param(None, int, low=MIN_REGION, none=True,
                        help="side of the regions scored for the map, px; None: a quarter of the side, at least 22")
    stride = Param(None, int, low=1, none=True,
                   help="step between regions, px, a divisor of side - region_size; None: the one nearest region/4")
    predict_batch_size = 8  # every image is scored on ~50-170 regions
    # CCD's hook (``ssl/ccd.py`` pre-trains this detector's encoder, then fits it): the encoder, whether it
    # reads [-1, 1] images, and ``encoder_init``: a state dict ``_build`` loads into it when set (CCD sets it
    # for one ``fit``; None, the default, changes nothing)
    ccd_encoder, ccd_signed, encoder_init = "net_.encoder", False, None

    def geometry(self, side: int) -> tuple[int, int, int]:
        """``(patch_size, region_size, stride)`` for images of ``side`` px, each checked."""
        patch = self.patch_size or max(11, side // 4)
        region = self.region_size or max(MIN_REGION, side // 4)
        for key, value in (("patch_size", patch), ("region_size", region)):
            if value > side:
                raise bad(self.name, key, value, f"at most the image side, {side} px")
        stride = self.stride or region_stride(side, region)
        if (side - region) % stride:
            span = side - region
            raise bad(self.name, "stride", self.stride, f"a divisor of {span} (image side {side} - region_size "
                      f"{region}) so that the regions reach every pixel: "
                      f"{', '.join(str(d) for d in range(1, span + 1) if span % d == 0)}")
        return patch, region, stride

    def _check_params(self) -> None:
        super()._check_params()
        if self.image_size is not None:
            self.geometry(self.image_size)

    def _build(self, shapes: dict) -> None:
        super()._build(shapes)
        self.geometry(shapes["input_hw"][0])
        if self.encoder_init is not None:  # CCD's hook: start from a pre-trained encoder
            self.net_.encoder.load_state_dict(self.encoder_init)

    def msi(self, x: torch.Tensor, x_hat: torch.Tensor) -> torch.Tensor:
        """``s_MSI`` per image ``[B]``: ``1 - (nu m_G + (1 - nu) m_L)``."""
        return s_msi(x, x_hat, self.nu, self.geometry(x.shape[-1])[0])

    def _fit(self, x: torch.Tensor) -> None:
        self._train(lambda b, ctx: self.msi(b, self.net_(b)).mean(), x)

    def _score(self, x: torch.Tensor):
        x_hat = self.net_(x)
        _, region, stride = self.geometry(x.shape[-1])
        return self.msi(x, x_hat), region_map(x, x_hat, self.nu, region, stride)
