"""The library's one SSIM (Wang, Bovik, Sheikh & Simoncelli 2004), differentiable.

For two images x, y and a Gaussian window (11x11, sigma 1.5), local statistics
mu, sigma^2 and the covariance sigma_xy give, per pixel (Wang et al. 2004, eq. 13):

    SSIM(x, y) = ((2 mu_x mu_y + C1)(2 sigma_xy + C2)) / ((mu_x^2 + mu_y^2 + C1)(sigma_x^2 + sigma_y^2 + C2))

with C1 = (K1 L)^2, C2 = (K2 L)^2, K1 = 0.01, K2 = 0.03 and data range L = 1.
Auto-encoders use ``1 - SSIM`` as a loss and the per-pixel ``1 - SSIM`` map as a
residual map (Bergmann et al. 2019). The mean over the valid interior matches
``skimage.metrics.structural_similarity(gaussian_weights=True, sigma=1.5,
use_sample_covariance=False, data_range=1)`` (tested).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .ops import gaussian_kernel1d

WIN_SIGMA = 1.5
WIN_RADIUS = 5  # 11x11 window, as in the paper
K1, K2 = 0.01, 0.03


def _filter(x: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    c = x.shape[1]
    x = F.conv2d(x, k.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)
    return F.conv2d(x, k.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)


def ssim_map(x: torch.Tensor, y: torch.Tensor, data_range: float = 1.0, sigma: float = WIN_SIGMA,
             radius: int = WIN_RADIUS) -> torch.Tensor:
    """Per-pixel, per-channel SSIM ``[N, C, H, W]`` (reflect-padded, so the map has the input size)."""
    k = gaussian_kernel1d(sigma, truncate=radius / sigma, device=x.device, dtype=x.dtype)
    pad = (radius, radius, radius, radius)
    mode = "reflect" if min(x.shape[-2:]) > radius else "replicate"
    xp, yp = F.pad(x, pad, mode=mode), F.pad(y, pad, mode=mode)
    mu_x, mu_y = _filter(xp, k), _filter(yp, k)
    sxx = _filter(xp * xp, k) - mu_x**2
    syy = _filter(yp * yp, k) - mu_y**2
    sxy = _filter(xp * yp, k) - mu_x * mu_y
    c1, c2 = (K1 * data_range) ** 2, (K2 * data_range) ** 2
    return ((2 * mu_x * mu_y + c1) * (2 * sxy + c2)) / ((mu_x**2 + mu_y**2 + c1) * (sxx + syy + c2))


def ssim(x: torch.Tensor, y: torch.Tensor, data_range: float = 1.0, reduction: str = "mean") -> torch.Tensor:
    """Mean SSIM over the valid interior (the border of half a window excluded, as scikit-image does).

    ``reduction="none"`` gives one value per image ``[N]``.
    """
    m = ssim_map(x, y, data_range)[..., WIN_RADIUS:-WIN_RADIUS, WIN_RADIUS:-WIN_RADIUS]
    per_image = m.flatten(1).mean(1)
    return per_image if reduction == "none" else per_image.mean()
