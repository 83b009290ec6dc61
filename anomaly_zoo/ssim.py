"""The library's one SSIM (Wang, Bovik, Sheikh & Simoncelli 2004) and MS-SSIM (Wang,
Simoncelli & Bovik 2003), both differentiable.

For two images x, y and a Gaussian window (11x11, sigma 1.5), local statistics
mu, sigma^2 and the covariance sigma_xy give, per pixel (Wang et al. 2004, eq. 13):

    SSIM(x, y) = ((2 mu_x mu_y + C1)(2 sigma_xy + C2)) / ((mu_x^2 + mu_y^2 + C1)(sigma_x^2 + sigma_y^2 + C2))

with C1 = (K1 L)^2, C2 = (K2 L)^2, K1 = 0.01, K2 = 0.03 and data range L = 1.
Auto-encoders use ``1 - SSIM`` as a loss and the per-pixel ``1 - SSIM`` map as a
residual map (Bergmann et al. 2019). The mean over the valid interior matches
``skimage.metrics.structural_similarity(gaussian_weights=True, sigma=1.5,
use_sample_covariance=False, data_range=1)`` (tested).

MS-SSIM (``ms_ssim``, ``ms_ssim_map``) evaluates the contrast-structure term at five
scales (each a 2x2-averaged half of the previous one) and the luminance at the coarsest,
and multiplies them with exponents fitted to human judgements (Wang et al. 2003, eq. 7).
It is tested against a NumPy/SciPy composition of the same per-scale terms.
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


def _full_precision(x: torch.Tensor, y: torch.Tensor):
    """SSIM subtracts E[x]^2 from E[x^2]: in bf16/fp16 (autocast on a GPU) that cancels to noise.
    Compute in float32 (float64 stays float64) with autocast off; the result is cast by the caller's ops."""
    if x.dtype in (torch.float16, torch.bfloat16) or y.dtype in (torch.float16, torch.bfloat16):
        x, y = x.float(), y.float()
    return x, y, torch.autocast(device_type=x.device.type, enabled=False)


def ssim_map(x: torch.Tensor, y: torch.Tensor, data_range: float = 1.0, sigma: float = WIN_SIGMA,
             radius: int = WIN_RADIUS) -> torch.Tensor:
    """Per-pixel, per-channel SSIM ``[N, C, H, W]`` (reflect-padded, so the map has the input size)."""
    x, y, no_autocast = _full_precision(x, y)
    with no_autocast:
        return _ssim_map(x, y, data_range, sigma, radius)


def _ssim_map(x, y, data_range, sigma, radius):
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


# --------------------------------------------------------------------------- MS-SSIM
#: Wang, Simoncelli & Bovik (2003), Table/Sec. 3: the exponents beta_j (= gamma_j, and alpha_M
#: at the coarsest scale), fitted to human judgements; finest scale first.
MS_WEIGHTS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)
_EPS = 1e-6  # contrast-structure terms can be <= 0 for anti-correlated patches; a fractional power needs > 0


def _terms(x: torch.Tensor, y: torch.Tensor, data_range: float, pad: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Luminance ``l`` and contrast-structure ``cs`` maps (Wang et al. 2004, eq. 6 and 9-10 with C3 = C2/2).

    ``pad=False``: only the valid interior (a window fits entirely), as scikit-image and
    the MS-SSIM reference code average; ``pad=True``: reflect-padded, maps of the input size.
    """
    x, y, no_autocast = _full_precision(x, y)
    with no_autocast:
        return _lum_cs(x, y, data_range, pad)


def _lum_cs(x, y, data_range, pad):
    k = gaussian_kernel1d(WIN_SIGMA, truncate=WIN_RADIUS / WIN_SIGMA, device=x.device, dtype=x.dtype)
    if pad:
        mode = "reflect" if min(x.shape[-2:]) > WIN_RADIUS else "replicate"
        p = (WIN_RADIUS,) * 4
        x, y = F.pad(x, p, mode=mode), F.pad(y, p, mode=mode)
    mu_x, mu_y = _filter(x, k), _filter(y, k)
    sxx = _filter(x * x, k) - mu_x**2
    syy = _filter(y * y, k) - mu_y**2
    sxy = _filter(x * y, k) - mu_x * mu_y
    c1, c2 = (K1 * data_range) ** 2, (K2 * data_range) ** 2
    lum = (2 * mu_x * mu_y + c1) / (mu_x**2 + mu_y**2 + c1)
    cs = (2 * sxy + c2) / (sxx + syy + c2)
    return lum, cs


def ms_levels(size: int, n_weights: int = len(MS_WEIGHTS)) -> int:
    """How many scales fit an image side ``size``: each scale halves it, and the 11x11 window must fit."""
    win = 2 * WIN_RADIUS + 1
    if size < win:
        raise ValueError(f"MS-SSIM needs images of at least {win} px, got {size}")
    levels = 1
    while levels < n_weights and size // 2**levels >= win:
        levels += 1
    return levels


def _ms_weights(size: int, weights, device, dtype) -> torch.Tensor:
    """The paper's exponents where all scales fit; fewer scales -> the first ones, rescaled to sum 1."""
    levels = ms_levels(size, len(weights))
    w = torch.tensor(weights[:levels], device=device, dtype=dtype)
    return w if levels == len(weights) else w / w.sum()


def ms_ssim(x: torch.Tensor, y: torch.Tensor, data_range: float = 1.0, weights=MS_WEIGHTS,
            reduction: str = "mean") -> torch.Tensor:
    """Multi-scale SSIM (Wang, Simoncelli & Bovik 2003, eq. 7), differentiable.

        MS-SSIM(x, y) = l_M(x, y)^alpha_M * prod_{j=1..M} cs_j(x, y)^beta_j

    Scale 1 is the input; scale j+1 is scale j low-pass filtered and halved (2x2 mean).
    ``cs_j`` is the mean contrast-structure term over the valid interior at scale j; at
    the coarsest scale M the luminance enters too, as the mean of ``l * cs`` (the SSIM
    there), as in the authors' reference code. Exponents: ``MS_WEIGHTS`` (M = 5). An
    image too small for five scales (the 11x11 window must fit the coarsest one, so
    176 px are needed) uses the first scales that fit, with their exponents rescaled to
    sum to 1 (``ms_levels``). Colour images: the mean over channels.
    ``reduction="none"`` gives one value per image ``[N]``.
    """
    x, y, _ = _full_precision(x, y)
    w = _ms_weights(min(x.shape[-2:]), weights, x.device, x.dtype)
    out = torch.ones(x.shape[:2], device=x.device, dtype=x.dtype)
    for j, wj in enumerate(w):
        lum, cs = _terms(x, y, data_range, pad=False)
        term = (lum * cs if j == len(w) - 1 else cs).flatten(2).mean(2)
        out = out * term.clamp_min(_EPS) ** wj
        if j < len(w) - 1:
            x, y = F.avg_pool2d(x, 2), F.avg_pool2d(y, 2)
    per_image = out.mean(1)
    return per_image if reduction == "none" else per_image.mean()


def ms_ssim_map(x: torch.Tensor, y: torch.Tensor, data_range: float = 1.0, weights=MS_WEIGHTS) -> torch.Tensor:
    """Per-pixel, per-channel MS-SSIM ``[N, C, H, W]``: each scale's (reflect-padded) map is
    brought back to the input size (bilinear) and the maps are combined with the exponents of
    ``ms_ssim``. Used as ``1 - MS-SSIM`` residual map; its mean is close to, not equal to,
    ``ms_ssim`` (which averages first and takes powers after)."""
    x, y, _ = _full_precision(x, y)
    hw = x.shape[-2:]
    w = _ms_weights(min(hw), weights, x.device, x.dtype)
    out = torch.ones_like(x)
    for j, wj in enumerate(w):
        lum, cs = _terms(x, y, data_range, pad=True)
        term = lum * cs if j == len(w) - 1 else cs
        if j:
            term = F.interpolate(term, size=hw, mode="bilinear", align_corners=False)
        out = out * term.clamp_min(_EPS) ** wj
        if j < len(w) - 1:
            x, y = F.avg_pool2d(x, 2), F.avg_pool2d(y, 2)
    return out
