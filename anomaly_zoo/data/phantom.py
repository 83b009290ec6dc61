"""``phantom``: synthetic head "scans" (Shepp-Logan-style phantoms) with inserted lesions.

A stand-in for brain MRI anomaly detection (the medical setting of the survey) that
needs no patient data. Each image is rendered from a table of ellipses, the geometry
of the modified Shepp-Logan phantom (Shepp & Logan 1974; Toft 1996) with our own,
MRI-like grey levels (bright scalp/skull, mid-grey brain, dark ventricles). Every
image is a different "patient": each ellipse's centre, axes, angle and grey level is
jittered, and the whole head is scaled, rotated and shifted a little. A smooth bias
field, a slight blur and Gaussian noise make it look acquired rather than drawn.

Anatomy is aligned across images, as after registration in a real pipeline, so
*position matters*: a detector that knows where each structure belongs can notice
that something is out of place, not just that a patch looks unusual.

Test lesions, always centred in brain tissue (never on the skull, in the air or in a
ventricle, where a dark lesion would be invisible):

* ``bright_lesion``: a soft-edged irregular hyperintense blob (like an enhancing lesion);
* ``dark_lesion``: a hypointense blob (like an infarct or a cyst);
* ``mass_effect``: a mass that pushes the surrounding anatomy outwards (the ventricles
  bend away from it); the mask marks the mass, the displacement around it is context.

About 20% of the lesions are subtle (low contrast). Masks are the lesion's blend
weight thresholded at 0.5.

The weakly labelled split (``weak/good``, ``weak/diseased``: image labels, no masks) holds
new scans, healthy or with one lesion of a random type, for weakly supervised methods
(DeScarGAN). It has its own random streams, so the train and test scans are the same
with or without it.
"""
from __future__ import annotations

from collections.abc import Iterator

import numpy as np
from scipy import ndimage as ndi

from .core import DISEASED, GOOD, Sample, make_rng, to_uint8
from .defects import blob, soften

NAME = "phantom"
VERSION = "1"
CATEGORIES = ("head",)
DEFAULT_CATEGORY = "head"
LESION_TYPES = ("bright_lesion", "dark_lesion", "mass_effect")
SUBTLE_FRACTION = 0.2

# (structure, additive grey level, semi-axis a (x), semi-axis b (y), centre x, centre y, angle in degrees)
# Geometry of the modified Shepp-Logan phantom; x to the right, y upwards, head within [-1, 1].
ANATOMY = (
    ("scalp_skull", 0.90, 0.69, 0.92, 0.0, 0.0, 0.0),
    ("brain", -0.42, 0.6624, 0.874, 0.0, -0.0184, 0.0),
    ("right_ventricle", -0.28, 0.11, 0.31, 0.22, 0.0, -18.0),
    ("left_ventricle", -0.28, 0.16, 0.41, -0.22, 0.0, 18.0),
    ("upper_region", 0.10, 0.21, 0.25, 0.0, 0.35, 0.0),
    ("nucleus_1", 0.12, 0.046, 0.046, 0.0, 0.1, 0.0),
    ("nucleus_2", 0.12, 0.046, 0.046, 0.0, -0.1, 0.0),
    ("posterior_1", 0.15, 0.046, 0.023, -0.08, -0.605, 0.0),
    ("posterior_2", 0.15, 0.023, 0.023, 0.0, -0.606, 0.0),
    ("posterior_3", 0.15, 0.023, 0.046, 0.06, -0.605, 0.0),
)
BRAIN = 1  # index of the brain ellipse: lesions go inside it


def config(category: str, quick: bool, seed: int) -> dict:
    """All parameters that determine the generated set (recorded in the manifest)."""
    n_per_type = 8 if quick else 22
    return {
        "category": category,
        "quick": quick,
        "seed": seed,
        "image_size": 128 if quick else 256,
        "n_train": 60 if quick else 200,
        "n_test_good": n_per_type * len(LESION_TYPES),
        "n_test_per_lesion": n_per_type,
        "lesion_types": list(LESION_TYPES),
        "noise": 0.015,
        "subtle_fraction": SUBTLE_FRACTION,
        "n_weak_good": 40 if quick else 100,
        "n_weak_diseased": 40 if quick else 100,
    }


def random_anatomy(rng: np.random.Generator) -> dict:
    """One patient: jittered ellipses plus a global pose (scale, rotation, shift)."""
    ellipses = []
    head = rng.uniform(0.95, 1.05, 2)  # head width and height, shared by skull and brain
    for i, (_, value, a, b, x0, y0, deg) in enumerate(ANATOMY):
        if i < 2:  # skull and brain: the head's shape, with a skull thickness that varies a little
            sa, sb = head * rng.uniform(0.99, 1.01, 2)
            ellipses.append((value * rng.uniform(0.97, 1.03), a * sa, b * sb, x0, y0, np.deg2rad(deg + rng.normal(0, 1))))
            continue
        shift = 0.008 if max(a, b) < 0.1 else 0.02
        ellipses.append((
            value * rng.uniform(0.9, 1.1),
            a * rng.uniform(0.9, 1.1),
            b * rng.uniform(0.9, 1.1),
            x0 + rng.normal(0, shift),
            y0 + rng.normal(0, shift),
            np.deg2rad(deg + rng.normal(0, 4)),
        ))
    return {
        "ellipses": ellipses,
        "scale": rng.uniform(0.9, 1.0),
        "rotation": np.deg2rad(rng.normal(0, 4)),
        "shift": rng.normal(0, 0.02, 2),
    }


def model_coords(size: int, anatomy: dict, supersample: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """Phantom coordinates (x right, y up) of every (sub)pixel, after the patient's pose."""
    n = size * supersample
    t = ((np.arange(n) + 0.5) / n * 2 - 1).astype(np.float32)
    y, x = np.meshgrid(-t, t, indexing="ij")
    f32 = np.float32
    x, y = x - f32(anatomy["shift"][0]), y - f32(anatomy["shift"][1])
    c, s, k = f32(np.cos(anatomy["rotation"])), f32(np.sin(anatomy["rotation"])), f32(anatomy["scale"])
    return (c * x + s * y) / k, (c * y - s * x) / k


def pixel_to_model(pixel, size: int, anatomy: dict) -> tuple[float, float]:
    """Phantom coordinates of the centre of output pixel ``(row, col)``."""
    x = (pixel[1] + 0.5) / size * 2 - 1 - anatomy["shift"][0]
    y = -((pixel[0] + 0.5) / size * 2 - 1) - anatomy["shift"][1]
    c, s = np.cos(anatomy["rotation"]), np.sin(anatomy["rotation"])
    return (c * x + s * y) / anatomy["scale"], (-s * x + c * y) / anatomy["scale"]


def inside(x, y, ellipse) -> np.ndarray:
    _, a, b, x0, y0, phi = (np.float32(v) for v in ellipse)
    c, s = np.cos(phi), np.sin(phi)
    dx, dy = x - x0, y - y0
    u, v = (dx * c + dy * s) / a, (dy * c - dx * s) / b
    return u * u + v * v <= 1


def render(x, y, anatomy: dict, supersample: int = 2, inner=None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Grey levels, the brain's soft mask and the ventricles' soft mask at output resolution.

    Sub-pixels are averaged (``supersample`` per pixel side), which anti-aliases the edges.

    ``inner``: other coordinates ``(x, y)`` for the structures inside the brain (a mass
    effect moves them; the skull and the brain's outline stay where they are).
    """
    img = np.zeros(x.shape, np.float32)
    for i, e in enumerate(anatomy["ellipses"]):
        img += e[0] * (inside(x, y, e) if i <= BRAIN or inner is None else inside(*inner, e))
    brain = inside(x, y, anatomy["ellipses"][BRAIN]).astype(np.float32)
    csf = np.zeros_like(brain)
    for e in anatomy["ellipses"][BRAIN + 1 : BRAIN + 3]:
        csf = np.maximum(csf, inside(*(inner or (x, y)), e))
    k = supersample

    def down(a):
        return a.reshape(a.shape[0] // k, k, a.shape[1] // k, k).mean((1, 3))

    return down(img), down(brain), down(csf)


def push(x, y, centre, radius: float, amount: float):
    """Mass effect: sample the anatomy closer to ``centre``, so tissue appears pushed outwards.

    Radial map rho -> rho * (1 - amount * exp(-rho^2 / (2 s^2))); monotone for amount < 1.
    """
    dx, dy = x - centre[0], y - centre[1]
    s = 1.6 * radius
    f = 1 - amount * np.exp(-(dx**2 + dy**2) / (2 * s**2))
    return centre[0] + dx * f, centre[1] + dy * f


def acquire(img: np.ndarray, rng: np.random.Generator, noise: float) -> np.ndarray:
    """Scanner effects: a smooth multiplicative bias field, a slight blur, Gaussian noise."""
    size = img.shape[0]
    t = np.linspace(-1, 1, size, dtype=np.float32)
    y, x = np.meshgrid(t, t, indexing="ij")
    a = rng.normal(0, 1, 5).astype(np.float32)
    field = a[0] * x + a[1] * y + a[2] * x * y + a[3] * (x * x - 0.5) + a[4] * (y * y - 0.5)  # low-order, smooth
    img = img * (1 + 0.04 * field / (np.abs(field).max() + 1e-6))
    img = ndi.gaussian_filter(img, 0.5 * size / 128)
    return np.clip(img + rng.normal(0, noise, img.shape), 0, 1)


def _lesion_site(brain: np.ndarray, csf: np.ndarray, radius_px: float, rng) -> tuple[float, float]:
    """A random pixel in brain tissue (not in a ventricle), deep enough for a lesion of ``radius_px``."""
    core = ndi.binary_erosion(brain > 0.99, iterations=max(int(radius_px) + 2, 1)) & (csf < 0.01)
    if not core.any():
        core = (brain > 0.99) & (csf < 0.01)
    ys, xs = np.nonzero(core)
    i = rng.integers(len(ys))
    return float(ys[i]), float(xs[i])


def scan(cfg: dict, rng: np.random.Generator, lesion: str | None = None, subtle: bool = False):
    """One image (float [H, W]) and, for a lesion, its mask (bool [H, W])."""
    size = cfg["image_size"]
    k = 2 if size < 256 else 1  # sub-pixels per pixel; at 256 px the acquisition blur anti-aliases enough
    anatomy = random_anatomy(rng)
    x, y = model_coords(size, anatomy, k)
    img, brain, csf = render(x, y, anatomy, k)
    if lesion is None:
        return acquire(img, rng, cfg["noise"]), None

    strength = rng.uniform(0.3, 0.45) if subtle else rng.uniform(0.75, 1.0)
    diameter = size * (rng.uniform(0.05, 0.12) if subtle else rng.uniform(0.07, 0.18))
    centre = _lesion_site(brain, csf, diameter / 2, rng)
    radii = (diameter / 2 * rng.uniform(0.7, 1.0), diameter / 2 * rng.uniform(0.7, 1.0))
    shape = blob(img.shape, centre, radii, rng.uniform(0, np.pi), rng, wobble=0.3)
    alpha = soften(shape, max(radii) * 0.2 + 0.5) * brain
    texture = 1 + 0.25 * ndi.gaussian_filter(rng.normal(0, 1, img.shape), 1.5)  # heterogeneous interior

    if lesion == "bright_lesion":
        img = img + alpha * texture * strength * rng.uniform(0.3, 0.4)
    elif lesion == "dark_lesion":
        img = img - alpha * texture * strength * rng.uniform(0.25, 0.35)
    elif lesion == "mass_effect":
        # re-render the anatomy pushed away from the mass, then draw the mass on top
        centre_model = pixel_to_model(centre, size, anatomy)
        radius_model = diameter / size / anatomy["scale"]  # image spans 2 units over `size` px
        px, py = push(x, y, centre_model, radius_model, rng.uniform(0.55, 0.8) * (0.5 + 0.5 * strength))
        pushed = render(x, y, anatomy, k, inner=(px, py))[0]
        rim = soften(shape ^ ndi.binary_erosion(shape, iterations=max(int(diameter / 10), 1)), 0.8) * brain
        tissue = float(np.median(img[(brain > 0.99) & (csf < 0.01)]))
        mass = tissue + strength * 0.12 * (texture - 1) + 0.1 * strength
        img = pushed + alpha * (mass - pushed) + rim * strength * 0.25
    else:  # pragma: no cover - guarded by config
        raise ValueError(lesion)
    return acquire(img, rng, cfg["noise"]), alpha > 0.5


def _lesion_scan(cfg: dict, rng, lesion: str, subtle: bool):
    for _ in range(20):
        image, mask = scan(cfg, rng, lesion, subtle)
        if mask.sum() >= 4:
            break
    return image, mask


def generate(cfg: dict) -> Iterator[Sample]:
    """Yield the training scans, the test scans (normal first, then each lesion type), then the
    weakly labelled split (healthy, then diseased)."""
    train_rng, test_rng, lesion_rng = (
        make_rng(cfg["seed"], NAME, cfg["category"], str(cfg["image_size"]), part) for part in ("train", "test", "lesions")
    )
    for _ in range(cfg["n_train"]):
        yield Sample("train", GOOD, to_uint8(scan(cfg, train_rng)[0]))
    for _ in range(cfg["n_test_good"]):
        yield Sample("test", GOOD, to_uint8(scan(cfg, test_rng)[0]))
    n, types = cfg["n_test_per_lesion"], cfg["lesion_types"]
    subtle = np.zeros(n * len(types), bool)
    subtle[lesion_rng.choice(len(subtle), int(round(cfg["subtle_fraction"] * len(subtle))), replace=False)] = True
    for t, lesion in enumerate(types):
        for i in range(n):
            image, mask = _lesion_scan(cfg, test_rng, lesion, bool(subtle[t * n + i]))
            yield Sample("test", lesion, to_uint8(image), mask)

    # the weak split: its own streams, so the scans above do not depend on it
    weak_rng, weak_lesion_rng = (
        make_rng(cfg["seed"], NAME, cfg["category"], str(cfg["image_size"]), part) for part in ("weak", "weak_lesions")
    )
    for _ in range(cfg["n_weak_good"]):
        yield Sample("weak", GOOD, to_uint8(scan(cfg, weak_rng)[0]))
    m = cfg["n_weak_diseased"]
    kinds = weak_lesion_rng.permutation(np.resize(np.arange(len(types)), m))  # balanced over lesion types
    subtle = np.zeros(m, bool)
    subtle[weak_lesion_rng.choice(m, int(round(cfg["subtle_fraction"] * m)), replace=False)] = True
    for i in range(m):
        image, _ = _lesion_scan(cfg, weak_rng, types[kinds[i]], bool(subtle[i]))
        yield Sample("weak", DISEASED, to_uint8(image))
