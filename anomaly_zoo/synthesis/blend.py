"""Natural synthetic anomalies (NSA, Schlueter et al., ECCV 2022): patches of *other* normal images,
rescaled, moved and blended in seamlessly by Poisson image editing, with per-pixel targets from the
local intensity change.

* :func:`poisson_blend` (Perez, Gangnet & Blake, SIGGRAPH 2003, eq. 7-8, with the source gradient
  as guidance field, OpenCV's ``NORMAL_CLONE``): inside a rectangle, find the image f whose
  discrete Laplacian equals the source patch's and whose border equals the destination. Writing
  ``f = src + u`` reduces it to a Laplace equation for ``u`` with border values ``dest - src``; on a
  rectangle the 5-point Laplacian is diagonalised by the type-I discrete sine transform, so the
  system is solved exactly with four small matrix products (no iteration, no OpenCV).
* :func:`nsa` (NSA Sec. 3.1, as the authors' code sets it for textures): 1 to ``n_patches`` patches
  per image (the first always, each further one with probability 1/2); half-widths of
  ``(0.03 + Gamma(2, 0.05))`` times the side, clipped to ``half_width``; each patch cut from another
  image of the batch, rescaled by ``clip(N(1, 0.5), *resize)`` (aspect kept), blended at a random place.
  The returned mask is every pixel the blending may have changed (the rectangles' insides; their
  one-pixel borders keep the destination by construction), so pixels outside it are untouched.
* :func:`nsa_targets` (NSA Sec. 3.2, "logistic" labels): the mean absolute intensity change over
  the colour channels (0-255 units), thresholded at ``tol`` and cleaned by a 5x5 median to a label
  mask (kept inside the blended region: the authors' majority filter can spill a pixel past a concave
  corner of two overlapping patches), median-filtered over a disk of radius 5, then squashed by
  ``1 / (1 + exp(-k (d - x0)))``:
  faint changes get targets near 0, clear ones near 1, so the network is asked for how visible
  each change is rather than for a hard rectangle.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .patches import _randint


def _dst_matrix(m: int, dtype, device) -> torch.Tensor:
    i = torch.arange(1, m + 1, dtype=dtype, device=device)
    return torch.sin(math.pi * i[:, None] * i[None, :] / (m + 1))


def poisson_blend(dest: torch.Tensor, src: torch.Tensor) -> torch.Tensor:
    """Poisson-blend ``src`` into ``dest`` (both ``[C, h, w]``, h, w >= 3): the result keeps ``dest`` on the
    one-pixel border and has the discrete Laplacian of ``src`` inside (Perez et al. 2003, eq. 7-8)."""
    c, h, w = dest.shape
    m, n = h - 2, w - 2
    dt = torch.float64
    b = (dest - src).to(dt)
    ring = b.clone()
    ring[:, 1:-1, 1:-1] = 0
    # r_p = sum of the border values next to interior pixel p (the Dirichlet data moved to the right side)
    r = ring[:, :-2, 1:-1] + ring[:, 2:, 1:-1] + ring[:, 1:-1, :-2] + ring[:, 1:-1, 2:]
    sm, sn = _dst_matrix(m, dt, dest.device), _dst_matrix(n, dt, dest.device)
    jm = torch.arange(1, m + 1, dtype=dt, device=dest.device)
    jn = torch.arange(1, n + 1, dtype=dt, device=dest.device)
    eig = 4 - 2 * torch.cos(math.pi * jm / (m + 1))[:, None] - 2 * torch.cos(math.pi * jn / (n + 1))[None, :]
    u = sm @ ((sm @ r @ sn) / eig) @ sn * (4.0 / ((m + 1) * (n + 1)))  # (4 - L) u = r, solved by DST-I
    out = dest.clone()
    out[:, 1:-1, 1:-1] = (src[:, 1:-1, 1:-1].to(dt) + u).to(dest.dtype)
    return out


def _gamma2(scale: float, g: torch.Generator) -> float:
    """One draw of Gamma(shape 2, ``scale``): the sum of two exponentials."""
    u = torch.rand(2, generator=g).clamp_min(1e-12)
    return float(-scale * u.log().sum())


def _patch_side(side: int, half_width, gamma, g) -> int:
    lo, hi = max(1, round(half_width[0] * side)), max(2, round(half_width[1] * side))
    half = int(min(max((gamma[2] + _gamma2(gamma[1], g)) * side, lo), hi))
    return 2 * half


def nsa(x: torch.Tensor, generator: torch.Generator, source: torch.Tensor | None = None, n_patches: int = 4,
        half_width: tuple[float, float] = (0.03, 0.4), gamma: tuple[float, float, float] = (2, 0.05, 0.03),
        resize: tuple[float, float] = (0.5, 2.0)) -> tuple[torch.Tensor, torch.Tensor]:
    """NSA's natural synthetic anomalies (module docstring). ``source``: the images patches are cut from
    (default: the batch itself, each image taking its patches from another one). Returns
    ``(images [N, 3, H, W], masks [N, H, W])``; ``gamma`` is (shape 2 only, scale, offset)."""
    n, c, h, w = x.shape
    if source is None:
        shift = _randint(1, n - 1, generator) if n > 1 else 0
        source = x.roll(shift, 0)
    out, masks = x.clone(), torch.zeros(n, h, w, device=x.device)
    for i in range(n):
        for p in range(n_patches):
            if p > 0 and float(torch.rand(1, generator=generator)) < 0.5:
                continue
            ph, pw = _patch_side(h, half_width, gamma, generator), _patch_side(w, half_width, gamma, generator)
            ph, pw = min(max(ph, 3), h - 2), min(max(pw, 3), w - 2)
            sy, sx = _randint(0, h - ph, generator), _randint(0, w - pw, generator)
            patch = source[i, :, sy : sy + ph, sx : sx + pw]
            scale = float(min(max(1 + 0.5 * float(torch.randn(1, generator=generator)), resize[0]), resize[1]))
            nh = int(min(max(round(ph * scale), 3), h - 2))
            nw = int(min(max(round(nh / ph * pw), 3), w - 2))
            patch = F.interpolate(patch[None], size=(nh, nw), mode="bilinear", align_corners=False,
                                  antialias=scale < 1)[0]
            ty, tx = _randint(0, h - nh, generator), _randint(0, w - nw, generator)
            block = out[i, :, ty : ty + nh, tx : tx + nw]
            out[i, :, ty : ty + nh, tx : tx + nw] = poisson_blend(block, patch).clamp(0, 1)
            masks[i, ty + 1 : ty + nh - 1, tx + 1 : tx + nw - 1] = 1.0
    return out, masks


def _window_values(x: torch.Tensor, radius: int, disk: bool) -> torch.Tensor:
    """``[N, H, W]`` -> ``[N, K, H, W]``: the values in each pixel's square (or disk) window, edges replicated."""
    k = 2 * radius + 1
    cols = F.unfold(F.pad(x[:, None], (radius,) * 4, mode="replicate"), k)  # [N, k*k, H*W]
    if disk:
        t = torch.arange(-radius, radius + 1)
        keep = ((t[:, None] ** 2 + t[None, :] ** 2) <= radius**2).flatten().to(x.device)
        cols = cols[:, keep]
    return cols.view(x.shape[0], -1, *x.shape[-2:])


def median_filter(x: torch.Tensor, radius: int, disk: bool = False) -> torch.Tensor:
    """Median of ``[N, H, W]`` over a ``(2r+1)^2`` square or a disk of radius ``r`` (edges replicated;
    of an even count, the lower middle value)."""
    return _window_values(x, radius, disk).median(1).values


def nsa_targets(clean: torch.Tensor, blended: torch.Tensor, masks: torch.Tensor, k: float = 1 / 3, x0: float = 7.0,
                tol: float = 1.0) -> torch.Tensor:
    """NSA's logistic per-pixel targets ``[N, H, W]`` in [0, 1) (module docstring); ``k``, ``x0``, ``tol``
    in 0-255 intensity units (the authors' values for textures: k = 1/3, x0 = 7, tol = 1)."""
    diff = (clean - blended).abs().mean(1) * 255 * masks
    label = median_filter((diff > tol).float(), 2)  # 5x5 median of a binary mask: the majority
    label = label * masks  # the majority filter may spill past a concave corner: keep targets where pixels changed
    d = median_filter(diff * label, 5, disk=True)
    return label * torch.sigmoid(k * (d - x0))


#: the synthesis kinds this module adds to :data:`anomaly_zoo.synthesis.KINDS`
KINDS: dict = {"nsa": nsa}
