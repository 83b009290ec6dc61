"""Patch-level synthetic anomalies: FCDD's confetti noise, CutPaste's copied patches and scars
(``cutpaste``, ``cutpaste_scar``), and a smooth-noise region filled with another image (``noise_blend``).
See the package docstring.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..ops import gaussian_blur, luma


def _uniform(n: int, lo: float, hi: float, g: torch.Generator) -> torch.Tensor:
    """``n`` floats uniform in [lo, hi), drawn from ``g``."""
    return lo + (hi - lo) * torch.rand(n, generator=g)


def _randint(lo: int, hi: int, g: torch.Generator) -> int:
    """An integer in [lo, hi] (inclusive)."""
    return int(torch.randint(lo, max(hi, lo) + 1, (1,), generator=g))


def _confetti_layer(h: int, w: int, p: float, sides: tuple[int, int], rotation: float, coloured: bool,
                    g: torch.Generator) -> torch.Tensor:
    """One layer of the reference ``confetti_noise``: blob centres where a uniform draw per pixel is < ``p``
    (at least one), each a square of a random integer side in ``sides``, rotated by up to +-``rotation``
    degrees, filled with a random colour (``coloured``) or with white. Returns ``[3, h, w]`` in [0, 1]."""
    centres = torch.zeros(0, 2, dtype=torch.long)
    while len(centres) == 0:  # the reference's "ensureblob"
        centres = (torch.rand(h, w, generator=g) < p).nonzero()
    layer = torch.zeros(3, h, w)
    ys, xs = torch.meshgrid(torch.arange(h, dtype=torch.float32), torch.arange(w, dtype=torch.float32), indexing="ij")
    for cy, cx in centres.tolist():
        half = _randint(*sides, g) / 2
        theta = float(_uniform(1, -rotation, rotation, g)) * torch.pi / 180
        cos, sin = torch.cos(torch.tensor(theta)), torch.sin(torch.tensor(theta))
        u, v = (ys - cy) * cos + (xs - cx) * sin, (xs - cx) * cos - (ys - cy) * sin
        inside = (u.abs() <= half) & (v.abs() <= half)
        colour = torch.rand(3, generator=g) if coloured else torch.ones(3)
        layer[:, inside] = colour[:, None]  # a later blob covers an earlier one, as in the reference
    return layer


def confetti(x: torch.Tensor, generator: torch.Generator, sides: tuple[float, float] = (8 / 224, 54 / 224),
             rotation: float = 45.0, density: tuple[float, float] = (0.000018, 0.000012),
             smooth: float = 5 / 224) -> tuple[torch.Tensor, torch.Tensor]:
    """FCDD's confetti noise, as its reference code builds it for MVTec AD (``noise_mode="confetti"``).

    Two layers of rotated squares (side 8-54 px at 224 px, rotation up to 45 degrees): coloured
    blobs (density 1.8e-5 blob centres per pixel at 224 px) and white blobs (1.2e-5), each layer
    with at least one blob; their sum is smoothed by a Gaussian (std 5 px at 224 px, kernel 25 px)
    and *added* to the image, clipped to [0, 1]. Where adding changes the image almost nowhere
    (a bright image), the noise is subtracted instead (the reference's inversion rule). Sizes,
    densities and the blur are given relative to a 224 px image and scale with the image.
    Returns ``(images, masks [N, H, W])``: the mask marks every pixel the noise touches.
    """
    n, _, h, w = x.shape
    scale = (h * w) / 224**2
    lo, hi = max(1, round(sides[0] * h)), max(1, round(sides[1] * h))
    noise = torch.stack([_confetti_layer(h, w, density[0] / scale, (lo, hi), rotation, True, generator)
                         + _confetti_layer(h, w, density[1] / scale, (lo, hi), rotation, False, generator)
                         for _ in range(n)])
    sigma = smooth * h
    noise = gaussian_blur(noise, sigma, truncate=12 / 5) if sigma > 0 else noise  # kernel 25 px for std 5
    noise = noise.to(x.device)
    plus = ((x + noise).clamp(0, 1) - x).flatten(1).mean(1).abs()
    minus = ((x - noise).clamp(0, 1) - x).flatten(1).mean(1).abs()
    invert = (plus < 0.025 / 255) & (minus > plus)
    noise = torch.where(invert.view(n, 1, 1, 1), -noise, noise)
    return (x + noise).clamp(0, 1), (noise != 0).any(1).float()


def colour_jitter(patch: torch.Tensor, strength: float, g: torch.Generator) -> torch.Tensor:
    """torchvision's ``ColorJitter(brightness=s, contrast=s, saturation=s, hue=s)`` on one patch ``[3, h, w]``:
    brightness factor in [1-s, 1+s] (multiply), contrast factor in [1-s, 1+s] (blend with the patch's mean
    grey), saturation factor in [1-s, 1+s] (blend with its grey version), hue shifted by up to +-s of a turn
    (rotation about the grey axis), in that fixed order (torchvision shuffles it)."""
    if strength <= 0:
        return patch
    f = 1 - strength + 2 * strength * torch.rand(4, generator=g)
    dev = patch.device
    x = patch * float(f[0])
    grey = luma(x).clamp(0, 1)
    x = (float(f[1]) * x + (1 - float(f[1])) * grey.mean()).clamp(0, 1)
    grey = luma(x)
    x = (float(f[2]) * x + (1 - float(f[2])) * grey).clamp(0, 1)
    theta = (float(f[3]) - 1) * 2 * torch.pi  # (f - 1) is uniform in [-s, s]: a share of a full turn
    c, s_ = float(torch.cos(torch.tensor(theta))), float(torch.sin(torch.tensor(theta)))
    k = (1 - c) / 3
    r = (1 / 3) ** 0.5 * s_
    rot = torch.tensor([[c + k, k - r, k + r], [k + r, c + k, k - r], [k - r, k + r, c + k]], device=dev)
    return torch.einsum("ij,jhw->ihw", rot, x).clamp(0, 1)


def _aspect(aspect: tuple[float, float], g: torch.Generator) -> float:
    """An aspect ratio from (aspect[0], 1) or (1, aspect[1]), each side with probability 1/2, uniform within."""
    lo, hi = (aspect[0], 1.0) if float(torch.rand(1, generator=g)) < 0.5 else (1.0, aspect[1])
    return float(_uniform(1, lo, hi, g))


def cutpaste(x: torch.Tensor, generator: torch.Generator, area: tuple[float, float] = (0.02, 0.15),
             aspect: tuple[float, float] = (0.3, 3.3), jitter: float = 0.1) -> tuple[torch.Tensor, torch.Tensor]:
    """CutPaste (Li et al. 2021, Sec. 2.1): cut a rectangle from the image and paste it back at a random
    place. As in the paper: the patch covers a share of the image uniform in ``area`` (0.02-0.15), its
    aspect ratio (width / height) is uniform in (0.3, 1) or (1, 3.3) (each range half of the time), the
    patch gets a colour jitter of ``jitter`` (brightness, contrast, saturation, hue 0.1), and the source
    and target places are independent and uniform. Returns ``(images, masks [N, H, W])``."""
    n, _, h, w = x.shape
    out, masks = x.clone(), torch.zeros(n, h, w, device=x.device)
    for i in range(n):
        a = float(_uniform(1, *area, generator)) * h * w
        r = _aspect(aspect, generator)
        pw = min(w - 1, max(2, int(round((a * r) ** 0.5))))
        ph = min(h - 1, max(2, int(round((a / r) ** 0.5))))
        sy, sx = _randint(0, h - ph, generator), _randint(0, w - pw, generator)
        ty, tx = _randint(0, h - ph, generator), _randint(0, w - pw, generator)
        patch = colour_jitter(x[i, :, sy : sy + ph, sx : sx + pw], jitter, generator)
        out[i, :, ty : ty + ph, tx : tx + pw] = patch
        masks[i, ty : ty + ph, tx : tx + pw] = 1.0
    return out, masks


def cutpaste_scar(x: torch.Tensor, generator: torch.Generator, width: tuple[float, float] = (2 / 256, 16 / 256),
                  height: tuple[float, float] = (10 / 256, 25 / 256), rotation: float = 45.0,
                  jitter: float = 0.1) -> tuple[torch.Tensor, torch.Tensor]:
    """CutPaste-Scar (Li et al. 2021, Sec. 2.1 and Appendix): a long, thin patch (width 2-16 px, height
    10-25 px at 256 px; here fractions of the image side) cut from the image, colour-jittered, rotated by an
    angle uniform in [-45, 45] degrees and pasted at a random place. The rotation samples the patch at
    the nearest pixel, so the mask is exactly the set of pixels that received the scar."""
    n, _, h, w = x.shape
    out, masks = x.clone(), torch.zeros(n, h, w, device=x.device)
    for i in range(n):
        pw = max(1, int(round(float(_uniform(1, *width, generator)) * w)))
        ph = max(2, int(round(float(_uniform(1, *height, generator)) * h)))
        pw, ph = min(pw, w - 1), min(ph, h - 1)
        sy, sx = _randint(0, h - ph, generator), _randint(0, w - pw, generator)
        patch = colour_jitter(x[i, :, sy : sy + ph, sx : sx + pw], jitter, generator)
        theta = float(_uniform(1, -rotation, rotation, generator)) * torch.pi / 180
        cos, sin = float(torch.cos(torch.tensor(theta))), float(torch.sin(torch.tensor(theta)))
        half = 0.5 * (pw**2 + ph**2) ** 0.5  # the rotated patch fits in a circle of this radius
        cy = float(_uniform(1, half, max(half, h - half), generator))
        cx = float(_uniform(1, half, max(half, w - half), generator))
        ys, xs = torch.meshgrid(torch.arange(h, dtype=torch.float32), torch.arange(w, dtype=torch.float32),
                                indexing="ij")
        dy, dx = ys - cy, xs - cx  # target offsets -> patch coordinates by the inverse rotation
        u = (cos * dx + sin * dy + pw / 2).floor().long()
        v = (-sin * dx + cos * dy + ph / 2).floor().long()
        inside = (u >= 0) & (u < pw) & (v >= 0) & (v < ph)
        if not inside.any():
            continue
        inside_dev = inside.to(x.device)
        out[i][:, inside_dev] = patch[:, v[inside].to(x.device), u[inside].to(x.device)]
        masks[i][inside_dev] = 1.0
    return out, masks


def _smooth_noise(n: int, h: int, w: int, cells: int, generator: torch.Generator) -> torch.Tensor:
    """Low-frequency noise ``[n, h, w]``: a coarse random grid upsampled bicubically, standardised."""
    coarse = torch.randn(n, 1, cells, cells, generator=generator)
    z = F.interpolate(coarse, size=(h, w), mode="bicubic", align_corners=False)[:, 0]
    return (z - z.mean((1, 2), keepdim=True)) / z.std((1, 2), keepdim=True).clamp_min(1e-6)


def noise_blend(x: torch.Tensor, generator: torch.Generator, threshold: float = 1.0,
                opacity: tuple[float, float] = (0.3, 1.0)) -> tuple[torch.Tensor, torch.Tensor]:
    """DRAEM-style: a thresholded smooth-noise region filled with a random other image of the batch,
    flipped and rolled (another texture), blended with a random opacity. Returns ``(images, masks)``."""
    n, _, h, w = x.shape
    region = (_smooth_noise(n, h, w, 4, generator) > threshold).float().to(x.device)
    other = torch.randperm(n, generator=generator).to(x.device)
    source = x[other].flip(-1).roll(shifts=(h // 3, w // 3), dims=(-2, -1))
    beta = _uniform(n, *opacity, generator).to(x.device).view(n, 1, 1, 1)
    a = region[:, None] * beta
    return x * (1 - a) + source * a, region


KINDS = {"confetti": confetti, "cutpaste": cutpaste, "cutpaste_scar": cutpaste_scar, "noise_blend": noise_blend}
