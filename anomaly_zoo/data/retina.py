"""``retina``: crops of a real colour fundus photograph with lesions of diabetic retinopathy.

The photograph ships with scikit-image (``skimage.data.retina()``: 1411x1411 RGB, a
healthy retina), so the set needs no download. It is the library's stand-in for
retinal screening, the medical setting of P-Net, SQUID and DeScarGAN: a detector
learns the look of healthy fundus (vessel tree, background pigment, the optic disc
and the macula now and then) and must find the lesions a grader looks for.

* Normal images are crops from inside the field of view (the bright disc of the
  photograph; no crop touches the black rim): a random position, a random rotation
  (a fundus has no preferred orientation once the optic disc is out of view) and
  left-right flip, a +-8% scale jitter, and slight photometric variation (brightness,
  contrast and gamma, as between two exposures), plus faint sensor noise. Every crop
  covers ~320 photograph pixels (about a quarter of the fundus' diameter), resampled
  to the output size (96 px quick, 256 px full).
* All splits are drawn from the same photograph (one eye), so two crops may overlap
  in the photograph, but not with the same position, angle and exposure: like several
  photographs of one patient. Each split has its own random stream.

Test lesions (with pixel masks; about 20% subtle, i.e. low contrast):

* ``exudate``: a cluster of small, sharply bounded yellowish-white spots (hard exudates);
* ``haemorrhage``: an irregular dark red blot with a soft edge (blot haemorrhage);
* ``microaneurysm``: several tiny dark red dots scattered over a region;
* ``blur``: a local loss of sharpness, the vessels there smeared (a media opacity or a
  smudge on the lens; placed where there are vessels to smear).

Masks are the lesion's blend weight thresholded at 0.5, as in :mod:`.defects`.
These lesions are for evaluation only; training-time anomaly synthesis lives in
:mod:`anomaly_zoo.synthesis`.

The weakly labelled split (``weak/good``, ``weak/diseased``; images and labels, no
masks) holds new healthy crops and new crops with one lesion of a random type, for
weakly supervised methods (DeScarGAN).
"""
from __future__ import annotations

from collections.abc import Iterator
from functools import lru_cache

import numpy as np
from scipy import ndimage as ndi

from .core import DISEASED, GOOD, Sample, make_rng, to_uint8
from .defects import blob, soften
from .textures import _anti_alias, view

NAME = "retina"
VERSION = "1"
CATEGORIES = ("fundus",)
DEFAULT_CATEGORY = "fundus"
LESION_TYPES = ("exudate", "haemorrhage", "microaneurysm", "blur")
SUBTLE_FRACTION = 0.2

FIELD_OF_VIEW = 320  # photograph pixels across one crop (before scale jitter)
SCALE_JITTER = 0.08
EXUDATE = np.array([1.0, 0.88, 0.42], np.float32)  # yellowish white
BLOOD = np.array([0.36, 0.05, 0.04], np.float32)  # dark red


def config(category: str, quick: bool, seed: int) -> dict:
    """All parameters that determine the generated set (recorded in the manifest)."""
    n_per_type = 8 if quick else 22
    return {
        "category": category,
        "quick": quick,
        "seed": seed,
        "image_size": 96 if quick else 256,
        "n_train": 60 if quick else 200,
        "n_test_good": n_per_type * len(LESION_TYPES),
        "n_test_per_lesion": n_per_type,
        "lesion_types": list(LESION_TYPES),
        "n_weak_good": 40 if quick else 100,
        "n_weak_diseased": 40 if quick else 100,
        "field_of_view": FIELD_OF_VIEW,
        "noise": 0.006,
        "subtle_fraction": SUBTLE_FRACTION,
    }


@lru_cache(maxsize=4)
def photo(blur: float = 0.0) -> tuple[np.ndarray, tuple[float, float], float]:
    """The fundus photograph (float32 [H, W, 3] in [0, 1], pre-blurred per channel), the
    centre (row, col) and the radius of its field of view (the lit disc)."""
    from skimage import data

    img = data.retina().astype(np.float32) / 255.0
    lit = img.max(-1) > 0.1
    rows, cols = np.nonzero(lit)
    centre = (float(rows.mean()), float(cols.mean()))
    radius = float(np.sqrt(lit.sum() / np.pi))
    if blur > 0:
        img = np.stack([ndi.gaussian_filter(img[..., c], blur) for c in range(3)], -1)
    return img, centre, radius


def crop(src, centre, radius, size: int, nominal: float, rng: np.random.Generator, noise: float) -> np.ndarray:
    """A normal crop (float [size, size, 3]): random place inside the field of view, angle, flip,
    scale and exposure."""
    scale = nominal * rng.uniform(1 - SCALE_JITTER, 1 + SCALE_JITTER)
    reach = radius - size * scale / 2 * np.sqrt(2) - 8  # the rotated crop's corners stay in the lit disc
    r, phi = reach * np.sqrt(rng.uniform()), rng.uniform(0, 2 * np.pi)  # uniform over the allowed disc
    at = (centre[0] + r * np.sin(phi), centre[1] + r * np.cos(phi))
    angle, flip = rng.uniform(0, 2 * np.pi), bool(rng.random() < 0.5)
    out = np.stack([view(src[..., c], size, at, scale, angle, flip) for c in range(3)], -1)
    # exposure: brightness, contrast about the crop's mean, gamma
    out = out * rng.uniform(0.92, 1.08)
    mean = out.mean((0, 1), keepdims=True)
    out = np.clip(mean + (out - mean) * rng.uniform(0.9, 1.1), 0, 1) ** rng.uniform(0.9, 1.1)
    return np.clip(out + rng.normal(0, noise, out.shape), 0, 1).astype(np.float32)


# ---------------------------------------------------------------------------------------
# Lesions. Each returns (changed image [H, W, 3], alpha [H, W]).
# ---------------------------------------------------------------------------------------

def _spots(side: int, centre, spread: float, n: int, radius, rng, wobble: float) -> np.ndarray:
    """``n`` small blobs scattered around ``centre`` (within ``spread`` px), as one bool mask."""
    shape = np.zeros((side, side), bool)
    for _ in range(n):
        r, phi = spread * np.sqrt(rng.uniform()), rng.uniform(0, 2 * np.pi)
        at = (centre[0] + r * np.sin(phi), centre[1] + r * np.cos(phi))
        rad = rng.uniform(*radius)
        shape |= blob((side, side), at, (rad * rng.uniform(0.75, 1.0), rad), rng.uniform(0, np.pi), rng, wobble)
    return shape


def _site(side: int, margin: float, rng) -> tuple[float, float]:
    return rng.uniform(margin, side - margin), rng.uniform(margin, side - margin)


def exudate(img, strength, rng):
    """Hard exudates: 3-8 small yellowish-white spots with sharp margins, in one cluster."""
    side = img.shape[0]
    spread = side * rng.uniform(0.05, 0.13)
    shape = _spots(side, _site(side, spread + 3, rng), spread, int(rng.integers(3, 9)),
                   (max(1.3, side * 0.015), max(1.8, side * 0.04)), rng, wobble=0.35)
    alpha = soften(shape, 0.5)
    amount = strength * rng.uniform(0.55, 0.8)
    return img + (alpha * amount)[..., None] * (EXUDATE - img), alpha


def haemorrhage(img, strength, rng):
    """A blot haemorrhage: one irregular dark red blot, darker inside, with a soft edge."""
    side = img.shape[0]
    rad = side * (rng.uniform(0.04, 0.09) if strength < 0.5 else rng.uniform(0.05, 0.12))
    radii = (rad * rng.uniform(0.65, 1.0), rad)
    shape = blob((side, side), _site(side, rad + 2, rng), radii, rng.uniform(0, np.pi), rng, wobble=0.5)
    alpha = soften(shape, rad * 0.2 + 0.4)
    texture = 1 + 0.2 * ndi.gaussian_filter(rng.normal(0, 1, (side, side)), max(rad / 4, 1.0))
    amount = np.clip(alpha * texture * strength * rng.uniform(0.6, 0.85), 0, 1)
    return img + amount[..., None] * (BLOOD - img), alpha


def microaneurysm(img, strength, rng):
    """Microaneurysms: 3-8 tiny round dark red dots scattered over a region."""
    side = img.shape[0]
    spread = side * rng.uniform(0.12, 0.28)
    shape = _spots(side, _site(side, spread * 0.6 + 3, rng), spread, int(rng.integers(3, 9)),
                   (max(1.2, side * 0.013), max(1.6, side * 0.022)), rng, wobble=0.05)
    alpha = soften(shape, 0.45)
    amount = strength * rng.uniform(0.65, 0.9)
    return img + (alpha * amount)[..., None] * (BLOOD - img), alpha


def blur(img, strength, rng):
    """A local blur: the image inside a soft region replaced by a Gaussian-blurred copy,
    centred where the blur changes the image most (on vessels), so it is not invisible."""
    side = img.shape[0]
    sigma = side * rng.uniform(0.02, 0.035) * (0.4 + 0.6 * strength) + 0.5
    smeared = np.stack([ndi.gaussian_filter(img[..., c], sigma) for c in range(3)], -1)
    rad = side * rng.uniform(0.11, 0.2)
    change = ndi.uniform_filter(np.abs(smeared - img).mean(-1), int(rad))  # local amount of detail lost
    m = int(rad) + 2
    change[:m], change[-m:], change[:, :m], change[:, -m:] = 0, 0, 0, 0
    weight = change.ravel() ** 2 + 1e-12
    idx = rng.choice(weight.size, p=weight / weight.sum())
    centre = (idx // side + rng.uniform(-0.5, 0.5), idx % side + rng.uniform(-0.5, 0.5))
    radii = (rad * rng.uniform(0.7, 1.0), rad)
    shape = blob((side, side), centre, radii, rng.uniform(0, np.pi), rng, wobble=0.3)
    alpha = soften(shape, rad * 0.2 + 0.5)
    return img + alpha[..., None] * (smeared - img), alpha


LESIONS = {"exudate": exudate, "haemorrhage": haemorrhage, "microaneurysm": microaneurysm, "blur": blur}


def lesioned(base: np.ndarray, lesion: str, subtle: bool, rng) -> tuple[np.ndarray, np.ndarray]:
    """Apply one lesion to a normal crop; retry until its mask is not empty."""
    for _ in range(20):
        strength = rng.uniform(0.3, 0.45) if subtle else rng.uniform(0.75, 1.0)
        image, alpha = LESIONS[lesion](base, strength, rng)
        mask = alpha > 0.5
        if mask.sum() >= 4:
            return np.clip(image, 0, 1), mask
    raise RuntimeError(f"could not place a visible {lesion!r} lesion")  # pragma: no cover


def _subtle_flags(n: int, fraction: float, rng) -> np.ndarray:
    flags = np.zeros(n, bool)
    flags[rng.choice(n, int(round(fraction * n)), replace=False)] = True
    return flags


def generate(cfg: dict) -> Iterator[Sample]:
    """Yield the training crops, the test crops (normal first, then each lesion type) and
    the weakly labelled split (healthy, then diseased)."""
    size = cfg["image_size"]
    nominal = cfg["field_of_view"] / size
    src, centre, radius = photo(round(_anti_alias(nominal), 3))
    train_rng, test_rng, lesion_rng, weak_rng, weak_lesion_rng = (
        make_rng(cfg["seed"], NAME, cfg["category"], str(size), part)
        for part in ("train", "test", "lesions", "weak", "weak_lesions")
    )

    def normal(rng):
        return crop(src, centre, radius, size, nominal, rng, cfg["noise"])

    for _ in range(cfg["n_train"]):
        yield Sample("train", GOOD, to_uint8(normal(train_rng)))
    for _ in range(cfg["n_test_good"]):
        yield Sample("test", GOOD, to_uint8(normal(test_rng)))
    n, types = cfg["n_test_per_lesion"], cfg["lesion_types"]
    subtle = _subtle_flags(n * len(types), cfg["subtle_fraction"], lesion_rng)
    for t, lesion in enumerate(types):
        for i in range(n):
            image, mask = lesioned(normal(test_rng), lesion, bool(subtle[t * n + i]), lesion_rng)
            yield Sample("test", lesion, to_uint8(image), mask)

    for _ in range(cfg["n_weak_good"]):
        yield Sample("weak", GOOD, to_uint8(normal(weak_rng)))
    m = cfg["n_weak_diseased"]
    kinds = weak_lesion_rng.permutation(np.resize(np.arange(len(types)), m))  # balanced over lesion types
    subtle = _subtle_flags(m, cfg["subtle_fraction"], weak_lesion_rng)
    for i in range(m):
        image, _ = lesioned(normal(weak_rng), types[kinds[i]], bool(subtle[i]), weak_lesion_rng)
        yield Sample("weak", DISEASED, to_uint8(image))
