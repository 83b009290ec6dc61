"""Perlin-noise masks, procedural textures and DRAEM's anomaly simulation (Zavrtanik et al., ICCV 2021, Sec. 3.3).

DRAEM makes a training anomaly in four moves (the paper's Fig. 4):

1. a 2-D Perlin noise image P (Perlin 1985/2002: random unit gradients on a lattice, a quintic fade
   6t^5 - 15t^4 + 10t^3 between them), at a random lattice scale 2^i x 2^j, i, j in {0, ..., 5}, rotated
   by a random angle in [-90, 90] degrees, thresholded at 0.5 into the anomaly mask M_a
   (:func:`perlin_noise`, :func:`perlin_masks`);
2. an anomaly source image A, a texture unrelated to the training images. The paper draws it from the
   Describable Textures Dataset (DTD); nothing may be downloaded here, so :func:`procedural_textures`
   generates DTD-like textures (marbled fractal noise, warped stripes, checks, dots, cells) from the
   seeded generator alone, with random palettes. None of the images the test sets are cut from
   (scikit-image's brick, grass, gravel, retina, or the phantoms) is used;
3. A is altered by three augmentations drawn without replacement from a set of ten (gamma contrast,
   brightness multiply-and-add, sharpness, hue and saturation, solarize, posterize, invert, autocontrast,
   equalize, rotation: :func:`augment_source`);
4. the blend (the paper's eq. 4): I_a = (1 - M_a) * I + (1 - beta) (M_a * I) + beta (M_a * A), with the
   opacity beta uniform in [0.1, 1] (:func:`draem_anomaly`).

Everything is torch, batched where it can be, and draws its random numbers from the given
``torch.Generator`` on the CPU, so a seeded run repeats exactly on any device.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..ops import gaussian_blur


def fade(t: torch.Tensor) -> torch.Tensor:
    """Perlin's quintic interpolant 6t^5 - 15t^4 + 10t^3 (zero first and second derivative at 0 and 1)."""
    return t * t * t * (t * (t * 6 - 15) + 10)


def perlin_noise(h: int, w: int, res: tuple[int, int], generator: torch.Generator, n: int = 1) -> torch.Tensor:
    """``n`` images ``[n, h, w]`` of 2-D gradient (Perlin) noise with ``res = (ry, rx)`` lattice cells.

    Lattice corners carry random unit gradients (angle uniform in [0, 2 pi)); a pixel at lattice
    coordinates (u, v) = (y ry / h, x rx / w) takes the dot products of the four surrounding
    corners' gradients with its offsets from them, interpolated with :func:`fade`; scaled by
    sqrt(2) so the values lie in [-1, 1]. The value is 0 on every lattice corner."""
    ry, rx = int(res[0]), int(res[1])
    angles = 2 * math.pi * torch.rand(n, ry + 1, rx + 1, generator=generator)
    grad = torch.stack((torch.cos(angles), torch.sin(angles)), -1)  # [n, ry+1, rx+1, 2]
    u = torch.arange(h, dtype=torch.float32) * ry / h
    v = torch.arange(w, dtype=torch.float32) * rx / w
    iy, ix = u.floor().long(), v.floor().long()
    fy, fx = (u - iy)[:, None], (v - ix)[None, :]  # [h, 1], [1, w]

    def corner(dy: int, dx: int) -> torch.Tensor:
        g = grad[:, iy + dy][:, :, ix + dx]  # [n, h, w, 2]
        return g[..., 0] * (fy - dy) + g[..., 1] * (fx - dx)

    ty, tx = fade(fy), fade(fx)
    top = torch.lerp(corner(0, 0), corner(0, 1), tx)
    bottom = torch.lerp(corner(1, 0), corner(1, 1), tx)
    return math.sqrt(2) * torch.lerp(top, bottom, ty)


def rotate(x: torch.Tensor, degrees: torch.Tensor, fill: float = 0.0) -> torch.Tensor:
    """Rotate images ``[n, c, h, w]`` (or ``[n, h, w]``) about their centre by ``degrees [n]``;
    bilinear, what comes in from outside the image is ``fill``."""
    squeeze = x.ndim == 3
    x = x[:, None] if squeeze else x
    t = degrees.to(x) * math.pi / 180
    cos, sin, zero = torch.cos(t), torch.sin(t), torch.zeros_like(t)
    theta = torch.stack((torch.stack((cos, -sin, zero), -1), torch.stack((sin, cos, zero), -1)), 1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    out = F.grid_sample(x - fill, grid, mode="bilinear", padding_mode="zeros", align_corners=False) + fill
    return out[:, 0] if squeeze else out


def perlin_masks(n: int, h: int, w: int, generator: torch.Generator, max_exponent: int = 6,
                 threshold: float = 0.5, rotation: float = 90.0) -> torch.Tensor:
    """DRAEM's anomaly masks M_a ``[n, h, w]`` in {0, 1}: Perlin noise with 2^i x 2^j lattice cells
    (i, j uniform in {0, ..., max_exponent - 1}, each axis on its own), rotated by an angle uniform in
    [-rotation, rotation] degrees (zeros come in at the corners), thresholded at ``threshold``.
    A mask may come out empty (the noise stays below the threshold): that image is then not anomalous."""
    out = torch.empty(n, h, w)
    for i in range(n):
        ey, ex = torch.randint(0, max_exponent, (2,), generator=generator).tolist()
        out[i] = perlin_noise(h, w, (2**ey, 2**ex), generator)[0]
    angles = (torch.rand(n, generator=generator) * 2 - 1) * rotation
    return (rotate(out, angles) > threshold).float()


# ------------------------------------------------------------------ the anomaly sources (DTD's stand-in)

TEXTURE_KINDS = ("marble", "stripes", "checks", "dots", "cells")


def fractal_noise(h: int, w: int, res: int, octaves: int, generator: torch.Generator, n: int = 1) -> torch.Tensor:
    """Sum of ``octaves`` Perlin layers, each at twice the frequency and half the amplitude of the last."""
    out = torch.zeros(n, h, w)
    for o in range(octaves):
        out += 0.5**o * perlin_noise(h, w, (res * 2**o, res * 2**o), generator, n)
    return out


def _palette(values: torch.Tensor, generator: torch.Generator, k: int = 3) -> torch.Tensor:
    """Map values in [0, 1] ``[h, w]`` to colours ``[3, h, w]`` by interpolating ``k`` random colours."""
    colours = torch.rand(k, 3, generator=generator)
    pos = values.clamp(0, 1) * (k - 1)
    lo = pos.floor().long().clamp(max=k - 2)
    t = (pos - lo)[None]
    return torch.lerp(colours[lo].permute(2, 0, 1), colours[lo + 1].permute(2, 0, 1), t)


def _texture(kind: str, size: int, g: torch.Generator) -> torch.Tensor:
    """One procedural texture ``[3, size, size]`` in [0, 1]."""
    s = size
    yy, xx = torch.meshgrid(torch.arange(s, dtype=torch.float32) / s, torch.arange(s, dtype=torch.float32) / s,
                            indexing="ij")
    warp = fractal_noise(s, s, 2, 4, g)[0]
    if kind == "marble":  # turbulent sine bands, as in Perlin's marble
        freq, amp = 2 + 6 * float(torch.rand(1, generator=g)), 2 + 4 * float(torch.rand(1, generator=g))
        v = 0.5 + 0.5 * torch.sin(2 * math.pi * freq * (xx + yy) + amp * warp)
    elif kind == "stripes":  # straight or wavy stripes at any angle
        a = math.pi * float(torch.rand(1, generator=g))
        freq = 4 + 20 * float(torch.rand(1, generator=g))
        v = (torch.sin(2 * math.pi * freq * (xx * math.cos(a) + yy * math.sin(a)) + 1.5 * warp) > 0).float()
    elif kind == "checks":  # a (slightly warped) chequerboard or grid
        freq = 3 + int(torch.randint(0, 12, (1,), generator=g))
        u, v0 = xx * freq + 0.1 * warp, yy * freq + 0.1 * warp
        v = ((u.floor() + v0.floor()) % 2).float()
    elif kind == "dots":  # random disks on a noisy background
        v = 0.3 * (warp - warp.min()) / (warp.max() - warp.min() + 1e-6)
        for _ in range(int(torch.randint(5, 40, (1,), generator=g))):
            cy, cx, r = torch.rand(3, generator=g).tolist()
            v = torch.where((yy - cy) ** 2 + (xx - cx) ** 2 < (0.02 + 0.08 * r) ** 2, 0.6 + 0.4 * r, v)
    elif kind == "cells":  # Worley (cellular) noise: distance to the nearest random seed point
        pts = torch.rand(int(torch.randint(8, 48, (1,), generator=g)), 2, generator=g)
        d = ((yy[..., None] - pts[:, 0]) ** 2 + (xx[..., None] - pts[:, 1]) ** 2).amin(-1).sqrt()
        v = d / (d.max() + 1e-6)
    else:
        raise ValueError(f"unknown texture kind {kind!r}; use one of {', '.join(TEXTURE_KINDS)}")
    grain = 0.08 * fractal_noise(s, s, 8, 2, g)[0]  # fine grain, as real textures have
    return (_palette(v, g) + grain[None]).clamp(0, 1)


def procedural_textures(n: int, size: int, generator: torch.Generator, kinds=TEXTURE_KINDS) -> torch.Tensor:
    """``n`` textures ``[n, 3, size, size]`` in [0, 1], each of a random kind among ``kinds``
    (marbled fractal noise, warped stripes, chequerboards, dots, Worley cells) with a random palette:
    the library's stand-in for DTD, generated from the seeded generator alone."""
    picks = torch.randint(0, len(kinds), (n,), generator=generator).tolist()
    return torch.stack([_texture(kinds[k], size, generator) for k in picks])


# ------------------------------------------------------------------ DRAEM's augmentations of the source


def _equalize(x: torch.Tensor) -> torch.Tensor:
    """Histogram equalisation per channel: each value replaced by its rank / (number of pixels - 1)."""
    c, h, w = x.shape
    flat = x.reshape(c, -1)
    ranks = flat.argsort(1).argsort(1).float()
    return (ranks / max(1, h * w - 1)).reshape(c, h, w)


def _hue_saturation(x: torch.Tensor, hue: float, sat: float) -> torch.Tensor:
    """Rotate the hue by ``hue`` radians (about the grey axis, in YIQ) and scale the saturation by ``sat``."""
    yiq = torch.tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])
    c, s = math.cos(hue), math.sin(hue)
    rot = torch.tensor([[1.0, 0, 0], [0, c * sat, -s * sat], [0, s * sat, c * sat]])
    m = torch.linalg.inv(yiq) @ rot @ yiq
    return torch.einsum("ij,jhw->ihw", m, x)


def _augment_one(x: torch.Tensor, op: int, g: torch.Generator) -> torch.Tensor:
    """The ``op``-th of DRAEM's ten augmentations on one image ``[3, h, w]`` in [0, 1]."""
    u = lambda lo, hi, k=1: lo + (hi - lo) * torch.rand(k, generator=g)  # noqa: E731
    if op == 0:  # gamma contrast, gamma in [0.5, 2] per channel
        return x.clamp_min(0) ** u(0.5, 2.0, 3).view(3, 1, 1)
    if op == 1:  # multiply (0.8-1.2) and add (-30..30 of 255) to the brightness
        return x * float(u(0.8, 1.2)) + float(u(-30, 30)) / 255
    if op == 2:  # sharpness: blend with an unsharp-masked copy
        blurred = gaussian_blur(x[None], 1.0)[0]
        return x + float(u(0.0, 2.0)) * (x - blurred)
    if op == 3:  # hue and saturation, +-50 of 255 on imgaug's scales
        return _hue_saturation(x, float(u(-50, 50)) / 255 * 2 * math.pi, 1 + float(u(-50, 50)) / 128)
    if op == 4:  # solarize: invert the values above a threshold in [32, 128] of 255, half of the time
        if float(torch.rand(1, generator=g)) < 0.5:
            t = float(u(32, 128)) / 255
            return torch.where(x >= t, 1 - x, x)
        return x
    if op == 5:  # posterize: keep 1-8 bits
        levels = 2 ** int(torch.randint(1, 9, (1,), generator=g))
        return torch.floor(x * (levels - 1e-6)) / (levels - 1)
    if op == 6:  # invert
        return 1 - x
    if op == 7:  # autocontrast: stretch each channel to [0, 1]
        lo, hi = x.amin((1, 2), keepdim=True), x.amax((1, 2), keepdim=True)
        return (x - lo) / (hi - lo).clamp_min(1e-6)
    if op == 8:  # equalize
        return _equalize(x)
    # op == 9: rotate by [-45, 45] degrees (reflected, so no black corners)
    return rotate(F.pad(x[None], (x.shape[-1] // 2,) * 4, mode="reflect"), u(-45, 45))[0][
        :, x.shape[-2] // 2 : x.shape[-2] // 2 + x.shape[-2], x.shape[-1] // 2 : x.shape[-1] // 2 + x.shape[-1]]


N_AUGMENTATIONS = 10


def augment_source(a: torch.Tensor, generator: torch.Generator, k: int = 3) -> torch.Tensor:
    """DRAEM's alteration of the anomaly source: for each image ``[n, 3, h, w]``, ``k`` of the ten
    augmentations (see the module docstring), drawn without replacement, applied in the drawn order."""
    out = []
    for img in a:
        for op in torch.randperm(N_AUGMENTATIONS, generator=generator)[:k].tolist():
            img = _augment_one(img, op, generator).clamp(0, 1)
        out.append(img)
    return torch.stack(out)


def blend(x: torch.Tensor, a: torch.Tensor, m: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
    """The paper's eq. (4): I_a = (1 - M_a) I + (1 - beta)(M_a I) + beta (M_a A), per image ``beta [n]``."""
    m = m[:, None]
    b = beta.view(-1, 1, 1, 1)
    return (1 - m) * x + (1 - b) * (m * x) + b * (m * a)


def draem_anomaly(x: torch.Tensor, generator: torch.Generator, sources: torch.Tensor | None = None,
                  beta: tuple[float, float] = (0.1, 1.0), max_exponent: int = 6, threshold: float = 0.5,
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """DRAEM's simulated anomalies for images ``x [n, 3, H, W]``: Perlin masks (:func:`perlin_masks`) filled
    with an augmented anomaly source (``sources``: a bank ``[k, 3, H, W]`` to draw from; None: fresh
    procedural textures) blended with opacity beta uniform in ``beta`` (eq. 4). Returns ``(images, masks)``."""
    n, _, h, w = x.shape
    masks = perlin_masks(n, h, w, generator, max_exponent, threshold)
    if sources is None:
        a = procedural_textures(n, h, generator)
        a = F.interpolate(a, size=(h, w), mode="bilinear", align_corners=False) if w != h else a
    else:
        a = sources[torch.randint(0, len(sources), (n,), generator=generator)]
    a = augment_source(a, generator)
    b = beta[0] + (beta[1] - beta[0]) * torch.rand(n, generator=generator)
    dev = x.device
    return blend(x, a.to(dev), masks.to(dev), b.to(dev)).clamp(0, 1), masks.to(dev)


def perlin_blend(x: torch.Tensor, generator: torch.Generator, **kw) -> tuple[torch.Tensor, torch.Tensor]:
    """``synthesize(x, "perlin")``: :func:`draem_anomaly` with fresh procedural textures."""
    return draem_anomaly(x, generator, **kw)


#: the synthesis kinds this module adds to :data:`anomaly_zoo.synthesis.KINDS`
KINDS: dict = {"perlin": perlin_blend}
