"""Weak and strong augmentations for contrastive pre-training (CCD, Tian et al., MICCAI 2021, Sec. 2.1).

CCD's contrastive distribution loss (its eq. 2) uses two sets of image transformations:

* the **weak** set ``A_p``: two draws ``a, a'`` of it turn one image into a *positive pair*, two views of
  the same thing. :func:`weak_augment` is the SimCLR recipe of the authors' configuration
  (``configs/pretext/simclr_*.yml``): a random resized crop (area 0.2-1 of the image, aspect 3/4-4/3,
  resized back), a horizontal flip (p = 0.5), a colour jitter (p = 0.8: brightness, contrast, saturation
  0.4, hue 0.1), grey scale (p = 0.2) and one cutout hole (p = 0.5, a square of 0.3 of the side: 75 px at
  256 px), in that order; batched with ``grid_sample``, one draw per image.
* the **strong** set ``A_n = {a_j}``: a few fixed transformations that make an image look "not normal";
  each ``a_j(x)`` forms its own distribution, to be told apart from the others (eq. 2) and recognised
  (eq. 3). :data:`STRONG` holds the authors' choices (their ``CutPerm``, ``Rotation``,
  ``Gaussian_noise``), four transformations each, the first one the identity:

  - ``cutperm`` (the authors' default, "works best" in the UPD study that re-ran their code): ``j``'s
    two bits swap the top and bottom halves, and the left and right halves;
  - ``rotation``: ``j`` quarter turns;
  - ``noise``: Gaussian noise (variance 0.05), speckle noise (``x + x n``, variance 0.05), salt and
    pepper (5 % of the pixels, half white, half black; scikit-image's defaults), each clipped to [0, 1].

:func:`strong_augment` applies every ``a_j`` to every image: ``[N, ...] -> [N * K, ...]`` with labels ``j``.

These are pretext transformations of normal images, not anomaly syntheses: nothing here is added to
:data:`anomaly_zoo.synthesis.KINDS`, and none of it is the test-set defects of :mod:`anomaly_zoo.data`.
Random numbers come from the given ``torch.Generator`` on the CPU (a seeded fit repeats exactly).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..ops import luma
from ..utils import AnomalyZooError


def _u(n: int, lo: float, hi: float, g: torch.Generator) -> torch.Tensor:
    return lo + (hi - lo) * torch.rand(n, generator=g)


def resized_crop(x: torch.Tensor, g: torch.Generator, scale=(0.2, 1.0), ratio=(3 / 4, 4 / 3),
                 flip: float = 0.5) -> torch.Tensor:
    """torchvision's ``RandomResizedCrop`` + ``RandomHorizontalFlip`` for a batch: per image a crop of an area
    share uniform in ``scale`` and an aspect (width / height) log-uniform in ``ratio``, at a uniform place,
    resized back to the image size (bilinear), mirrored with probability ``flip``."""
    n = len(x)
    area = _u(n, *scale, g)
    aspect = torch.exp(_u(n, math.log(ratio[0]), math.log(ratio[1]), g))
    cw = torch.sqrt(area * aspect).clamp(max=1.0)  # crop width and height as shares of the side
    ch = torch.sqrt(area / aspect).clamp(max=1.0)
    cx = (1 - cw) * (2 * torch.rand(n, generator=g) - 1)  # the crop's centre in [-1, 1] coordinates
    cy = (1 - ch) * (2 * torch.rand(n, generator=g) - 1)
    sign = torch.where(torch.rand(n, generator=g) < flip, -1.0, 1.0)
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0], theta[:, 0, 2] = cw * sign, cx
    theta[:, 1, 1], theta[:, 1, 2] = ch, cy
    grid = F.affine_grid(theta.to(x.device, x.dtype), list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def colour_jitter(x: torch.Tensor, g: torch.Generator, brightness=0.4, contrast=0.4, saturation=0.4,
                  hue=0.1, p: float = 0.8) -> torch.Tensor:
    """torchvision's ``RandomApply([ColorJitter(b, c, s, h)], p)`` for a batch, the four in a fixed order:
    brightness (multiply by a factor in [1-b, 1+b]), contrast (blend with the image's mean grey), saturation
    (blend with its grey version), hue (a rotation about the grey axis by up to +-h of a turn)."""
    n = len(x)
    dev, dt = x.device, x.dtype
    apply = (torch.rand(n, generator=g) < p).to(dev).view(n, 1, 1, 1)
    fb, fc, fs = (_u(n, 1 - s, 1 + s, g).to(dev, dt).view(n, 1, 1, 1) for s in (brightness, contrast, saturation))
    turn = _u(n, -hue, hue, g).to(dev, dt) * 2 * math.pi
    y = (x * fb).clamp(0, 1)
    y = (fc * y + (1 - fc) * luma(y).mean((2, 3), keepdim=True)).clamp(0, 1)
    y = (fs * y + (1 - fs) * luma(y)).clamp(0, 1)
    c, s = torch.cos(turn), torch.sin(turn)
    k, r = (1 - c) / 3, s / math.sqrt(3)
    rot = torch.stack([torch.stack([c + k, k - r, k + r], -1), torch.stack([k + r, c + k, k - r], -1),
                       torch.stack([k - r, k + r, c + k], -1)], 1)  # [n, 3, 3]
    y = torch.einsum("nij,njhw->nihw", rot, y).clamp(0, 1)
    return torch.where(apply, y, x)


def cutout(x: torch.Tensor, g: torch.Generator, size: float = 0.3, p: float = 0.5) -> torch.Tensor:
    """One square hole of ``size`` times the side, set to 0, at a uniform centre (it may leave the image),
    with probability ``p`` per image."""
    n, _, h, w = x.shape
    half_h, half_w = size * h / 2, size * w / 2
    cy, cx = torch.rand(n, generator=g) * h, torch.rand(n, generator=g) * w
    apply = torch.rand(n, generator=g) < p
    ys, xs = torch.arange(h).view(1, h, 1) + 0.5, torch.arange(w).view(1, 1, w) + 0.5
    hole = ((ys - cy.view(n, 1, 1)).abs() < half_h) & ((xs - cx.view(n, 1, 1)).abs() < half_w) & apply.view(n, 1, 1)
    return x * (~hole).to(x.device, x.dtype)[:, None]


def weak_augment(x: torch.Tensor, g: torch.Generator, grey: float = 0.2) -> torch.Tensor:
    """One draw of CCD's weak set ``A_p`` per image (the authors' SimCLR recipe, see the module docstring)."""
    n = len(x)
    y = colour_jitter(resized_crop(x, g), g)
    to_grey = (torch.rand(n, generator=g) < grey).to(x.device).view(n, 1, 1, 1)
    y = torch.where(to_grey, luma(y).expand_as(y), y)
    return cutout(y, g)


# ------------------------------------------------------------------------------ strong set A_n
def cutperm(x: torch.Tensor, j: int, g: torch.Generator | None = None) -> torch.Tensor:
    """The authors' ``CutPerm``: bit 1 of ``j`` swaps the top and bottom halves, bit 0 the left and right."""
    h, w = x.shape[-2:]
    if j // 2 % 2:
        x = torch.cat([x[..., h // 2:, :], x[..., : h // 2, :]], -2)
    if j % 2:
        x = torch.cat([x[..., w // 2:], x[..., : w // 2]], -1)
    return x


def rotation(x: torch.Tensor, j: int, g: torch.Generator | None = None) -> torch.Tensor:
    """``j`` quarter turns (the authors' ``Rotation``; square images)."""
    return torch.rot90(x, j % 4, (-2, -1))


def noise(x: torch.Tensor, j: int, g: torch.Generator | None = None, var: float = 0.05,
          amount: float = 0.05) -> torch.Tensor:
    """The authors' ``Gaussian_noise``: 0 the image, 1 Gaussian noise, 2 speckle, 3 salt and pepper."""
    g = g if g is not None else torch.Generator().manual_seed(0)
    if j % 4 == 0:
        return x
    if j % 4 == 3:
        u = torch.rand(x.shape[0], 1, *x.shape[2:], generator=g).to(x.device)
        salt = (torch.rand(u.shape, generator=g) < 0.5).to(x.device, x.dtype)
        return torch.where(u < amount, salt.expand_as(x), x)
    n = torch.randn(x.shape, generator=g).to(x.device, x.dtype) * math.sqrt(var)
    return (x + n if j % 4 == 1 else x + x * n).clamp(0, 1)


#: name -> (transformation(x, j, generator) -> x, number of transformations K); j = 0 is the identity
STRONG = {"cutperm": (cutperm, 4), "rotation": (rotation, 4), "noise": (noise, 4)}


def strong_augment(x: torch.Tensor, kind: str = "cutperm",
                   generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Every transformation ``a_j`` of the strong set ``kind`` on every image: ``(images [N * K, C, H, W],
    labels [N * K])``, image-major (rows ``i K .. i K + K - 1`` are ``a_0(x_i) .. a_{K-1}(x_i)``)."""
    if kind not in STRONG:
        raise AnomalyZooError(f"unknown strong augmentation {kind!r}; use one of {', '.join(STRONG)}")
    fn, k = STRONG[kind]
    out = torch.stack([fn(x, j, generator) for j in range(k)], 1)  # [N, K, C, H, W]
    return out.flatten(0, 1), torch.arange(k).repeat(len(x)).to(x.device)
