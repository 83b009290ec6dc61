"""Test-set defects for the generated datasets: shapes, soft blending, six defect types.

Every defect is made the same way: draw a *shape* (an irregular blob, a curve, a
rotated rectangle), soften it into a blend weight ``alpha`` in [0, 1] with a Gaussian
blur (real defects rarely have pixel-sharp edges, and sharp edges would make them too
easy), and blend the image towards a *changed* version of itself with that weight.
The ground-truth mask is ``alpha > 0.5``: the region where the defect changes the image.

Each defect takes ``strength`` in (0, 1]: 1 is a clearly visible defect, ~0.35 a
subtle one that a good detector should still find but a weak one will miss. The
intensity-changing defects also take ``contrast``, the surface's own contrast relative
to a calm one (brick): a stain that stands out on brick vanishes in busy grass.

This module is for *evaluation* only. Self-supervised methods (CutPaste, DRAEM, ...)
synthesise their own training anomalies elsewhere: a method must never be tested on
the very augmentation it was trained on.
"""
from __future__ import annotations

import numpy as np
from scipy import ndimage as ndi

# Tints for the ``colour`` defect (RGB directions; the grey level is kept roughly).
TINTS = {
    "red": (1.0, -0.45, -0.55),
    "green": (-0.5, 0.8, -0.3),
    "blue": (-0.55, -0.2, 1.0),
    "yellow": (0.7, 0.55, -1.0),
    "purple": (0.55, -0.7, 0.6),
}


# ---------------------------------------------------------------------------------------
# Shapes
# ---------------------------------------------------------------------------------------

def _grid(shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    return yy.astype(np.float32), xx.astype(np.float32)


def blob(shape, centre, radii, angle: float, rng: np.random.Generator, wobble: float = 0.25) -> np.ndarray:
    """An ellipse whose boundary wobbles with a few random low-frequency harmonics (bool mask)."""
    yy, xx = _grid(shape)
    dy, dx = yy - centre[0], xx - centre[1]
    c, s = np.cos(angle), np.sin(angle)
    u = (dx * c + dy * s) / max(radii[1], 0.5)
    v = (-dx * s + dy * c) / max(radii[0], 0.5)
    r = np.hypot(u, v)
    theta = np.arctan2(v, u)
    edge = np.ones_like(r)
    for k in range(2, 6):
        edge += wobble * rng.uniform(0, 1) / k * np.cos(k * theta + rng.uniform(0, 2 * np.pi))
    return r < edge


def rectangle(shape, centre, half_sides, angle: float) -> np.ndarray:
    """A rotated rectangle (bool mask)."""
    yy, xx = _grid(shape)
    dy, dx = yy - centre[0], xx - centre[1]
    c, s = np.cos(angle), np.sin(angle)
    u, v = dx * c + dy * s, -dx * s + dy * c
    return (np.abs(u) <= half_sides[1]) & (np.abs(v) <= half_sides[0])


def curve(shape, start, length: float, width: float, rng: np.random.Generator, bend: float = 0.08) -> np.ndarray:
    """A smooth random curve (a bent line of ``width`` px) of about ``length`` px (bool mask)."""
    n = max(int(length / 0.5), 2)
    turn = ndi.gaussian_filter1d(rng.normal(0, bend, n), sigma=n / 8 + 1) * np.sqrt(n / 8 + 1)
    heading = rng.uniform(0, 2 * np.pi) + np.cumsum(turn)
    pts = np.asarray(start, dtype=np.float64)[None] + 0.5 * np.cumsum(
        np.stack([np.sin(heading), np.cos(heading)], 1), 0
    )
    pts = np.round(pts).astype(int)
    keep = (pts[:, 0] >= 0) & (pts[:, 0] < shape[0]) & (pts[:, 1] >= 0) & (pts[:, 1] < shape[1])
    seed = np.zeros(shape, bool)
    seed[pts[keep, 0], pts[keep, 1]] = True
    if not seed.any():
        return seed
    return ndi.distance_transform_edt(~seed) <= width / 2


def soften(mask: np.ndarray, sigma: float) -> np.ndarray:
    """Blur a bool mask into a blend weight in [0, 1] (soft edges)."""
    return np.clip(ndi.gaussian_filter(mask.astype(np.float32), sigma), 0, 1)


def _place(side: int, extent: float, rng: np.random.Generator) -> tuple[float, float]:
    """A centre that keeps an object of ``extent`` px mostly inside the image."""
    m = min(extent / 2, side / 2 - 1)
    return rng.uniform(m, side - m), rng.uniform(m, side - m)


# ---------------------------------------------------------------------------------------
# Defect types. Each returns (changed image [H, W] or [H, W, 3], alpha [H, W]).
# ---------------------------------------------------------------------------------------

def scratch(img, size, strength, rng, contrast: float = 1.0):
    """A thin curved line, darker or lighter than the surface."""
    side = img.shape[0]
    width = max(1.3, side * rng.uniform(0.011, 0.024) * (0.6 + 0.4 * strength))
    length = size * rng.uniform(1.5, 2.5)
    shape = curve(img.shape, _place(side, size, rng), length, width, rng)
    alpha = soften(shape, 0.35 * width)
    delta = rng.choice([-1, 1]) * strength * contrast * rng.uniform(0.3, 0.45)
    return img + alpha * delta, alpha


def stain(img, size, strength, rng, contrast: float = 1.0):
    """A soft-edged irregular blob that shifts the intensity and flattens the texture a little."""
    side = img.shape[0]
    radii = (size / 2 * rng.uniform(0.7, 1.0), size / 2 * rng.uniform(0.7, 1.0))
    shape = blob(img.shape, _place(side, size, rng), radii, rng.uniform(0, np.pi), rng, wobble=0.35)
    alpha = soften(shape, max(radii) * rng.uniform(0.15, 0.3))
    delta = rng.choice([-1, 1]) * strength * contrast * rng.uniform(0.18, 0.32)
    flatten = strength * rng.uniform(0.2, 0.6)
    changed = img + delta + flatten * (img.mean() - img)
    return img + alpha * (changed - img), alpha


def hole(img, size, strength, rng):
    """A dark, roughly elliptical pit, deepest in the middle, with a slightly sharper edge."""
    side = img.shape[0]
    centre = _place(side, size, rng)
    radii = (size / 2 * rng.uniform(0.65, 1.0), size / 2 * rng.uniform(0.65, 1.0))
    angle = rng.uniform(0, np.pi)
    shape = blob(img.shape, centre, radii, angle, rng, wobble=0.15)
    alpha = soften(shape, max(radii) * rng.uniform(0.06, 0.12) + 0.5)
    # depth: 1 at the centre, 0 at the rim (an elliptical bowl), so the pit looks shaded
    yy, xx = _grid(img.shape)
    depth = 1 - np.clip(((yy - centre[0]) ** 2 + (xx - centre[1]) ** 2) / max(radii) ** 2, 0, 1)
    floor = img.mean() * (1 - strength * rng.uniform(0.75, 0.95))
    changed = floor * (1 - 0.4 * depth) + 0.25 * (img - img.mean())
    return img + alpha * (changed - img), alpha


def cut(img, size, strength, rng, patch, contrast: float = 1.0):
    """A rotated patch of the same texture pasted in (``patch``: the rotated texture, full size).

    Clear cuts also shift the patch's brightness and leave a dark seam along the edge;
    subtle ones are only the rotated texture, which orientation-free textures hide well.
    """
    side = img.shape[0]
    half = (size / 2 * rng.uniform(0.7, 1.0), size / 2 * rng.uniform(0.7, 1.0))
    centre = _place(side, size, rng)
    angle = rng.uniform(0, np.pi)
    if rng.random() < 0.5:
        shape = rectangle(img.shape, centre, half, angle)
    else:
        shape = blob(img.shape, centre, half, angle, rng, wobble=0.2)
    alpha = soften(shape, 0.8)
    offset = rng.choice([-1, 1]) * contrast * rng.uniform(0.06, 0.15) * (strength > 0.5)
    changed = img + alpha * (patch + offset - img)
    if strength > 0.5:
        seam = soften(shape ^ ndi.binary_erosion(shape, iterations=2), 0.7)
        changed = changed - seam * contrast * rng.uniform(0.15, 0.3)
        alpha = np.maximum(alpha, seam)
    return changed, alpha


def colour(img, size, strength, rng):
    """A tinted region: the three channels drift apart (normal images are grey)."""
    side = img.shape[0]
    radii = (size / 2 * rng.uniform(0.7, 1.0), size / 2 * rng.uniform(0.7, 1.0))
    shape = blob(img.shape, _place(side, size, rng), radii, rng.uniform(0, np.pi), rng, wobble=0.3)
    alpha = soften(shape, max(radii) * rng.uniform(0.1, 0.25))
    tint = np.asarray(TINTS[rng.choice(sorted(TINTS))], np.float32)
    amount = strength * rng.uniform(0.3, 0.45)
    rgb = img[..., None] * (1 + amount * alpha[..., None] * tint) + 0.08 * amount * alpha[..., None] * tint
    return rgb, alpha


def foreign(img, size, strength, rng, patch):
    """A patch of another texture (``patch``, full size), blended in with a soft edge.

    Subtle ones are matched to the surface's mean and contrast, so only the texture differs.
    """
    side = img.shape[0]
    radii = (size / 2 * rng.uniform(0.7, 1.0), size / 2 * rng.uniform(0.7, 1.0))
    shape = blob(img.shape, _place(side, size, rng), radii, rng.uniform(0, np.pi), rng, wobble=0.3)
    alpha = soften(shape, max(radii) * rng.uniform(0.08, 0.18))
    matched = (patch - patch.mean()) / (patch.std() + 1e-6) * img.std() + img.mean()
    changed = strength * patch + (1 - strength) * matched
    return img + alpha * (changed - img), alpha


DEFECTS = {"scratch": scratch, "stain": stain, "hole": hole, "cut": cut, "colour": colour, "foreign": foreign}
