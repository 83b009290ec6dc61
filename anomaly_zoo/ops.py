"""Small tensor operations that several methods share (written once, here)."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def gaussian_kernel1d(sigma: float, truncate: float = 4.0, device=None, dtype=torch.float32) -> torch.Tensor:
    """Normalised 1-D Gaussian, radius ``ceil(truncate * sigma)`` (scipy's ``gaussian_filter`` default)."""
    radius = max(1, int(math.ceil(truncate * sigma)))
    t = torch.arange(-radius, radius + 1, device=device, dtype=dtype)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    return k / k.sum()


def gaussian_blur(maps: torch.Tensor, sigma: float, truncate: float = 4.0) -> torch.Tensor:
    """Separable Gaussian smoothing of ``[N, H, W]`` (or ``[N, C, H, W]``) maps, reflect padding.

    Matches ``scipy.ndimage.gaussian_filter(mode="reflect")`` up to float error
    when the map is larger than the kernel radius.
    """
    if sigma <= 0:
        return maps
    squeeze = maps.ndim == 3
    x = maps[:, None] if squeeze else maps
    n, c, h, w = x.shape
    k = gaussian_kernel1d(sigma, truncate, x.device, x.dtype)
    r = len(k) // 2
    x = x.reshape(n * c, 1, h, w)
    # scipy's "reflect" is torch's "symmetric"; torch only has "reflect" (= scipy "mirror"),
    # which differs by one pixel at the border: close enough for anomaly maps, and exact inside.
    mode = "reflect" if r < min(h, w) else "replicate"
    x = F.conv2d(F.pad(x, (r, r, 0, 0), mode=mode), k.view(1, 1, 1, -1))
    x = F.conv2d(F.pad(x, (0, 0, r, r), mode=mode), k.view(1, 1, -1, 1))
    x = x.reshape(n, c, h, w)
    return x[:, 0] if squeeze else x


def upsample(maps: torch.Tensor, size) -> torch.Tensor:
    """Bilinear upsampling of ``[N, h, w]`` maps to ``size`` (int or (H, W))."""
    hw = (size, size) if isinstance(size, int) else tuple(size)
    return F.interpolate(maps[:, None], size=hw, mode="bilinear", align_corners=False)[:, 0]
