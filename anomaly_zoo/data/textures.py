"""``textures``: crops of real photographs (brick, grass, gravel) with synthetic defects.

The photographs ship with scikit-image (``skimage.data.brick()``, ``grass()``,
``gravel()``: 512x512 grayscale), so the set needs no download. It plays the role of
MVTec AD's texture categories: a detector learns what the surface looks like from
normal crops and must find scratches, stains, holes, cuts, discolouration and
foreign material in the test crops.

* Normal images are crops at a random position with a small scale jitter (+-8%)
  and random horizontal flips; never rotated by 90 degrees, since the brick wall
  has an orientation. Every crop covers ~200x200 photo pixels, resampled to the
  output size (128 px quick, 256 px full), so quick and full sets show the same
  field of view.
* Train crops come from the top rows of the photograph and test crops from the
  bottom rows (disjoint regions), so no test image repeats a training image.
* About half of the test set is normal; the rest is split evenly over the six
  defect types of :mod:`anomaly_zoo.data.defects`. Defect sizes are ~6-25% of the
  image side (one in six is larger, up to 40%); about 20% of the defects are subtle.
"""
from __future__ import annotations

from collections.abc import Iterator
from functools import lru_cache

import numpy as np
from scipy import ndimage as ndi

from .core import GOOD, Sample, make_rng, to_uint8
from .defects import DEFECTS

NAME = "textures"
VERSION = "2"
CATEGORIES = ("brick", "grass", "gravel")
DEFAULT_CATEGORY = "brick"
DEFECT_TYPES = tuple(DEFECTS)

FIELD_OF_VIEW = 200  # photo pixels across one crop (before scale jitter)
SCALE_JITTER = 0.08
TRAIN_ROWS = (0, 296)  # photo rows that train crops may cover
TEST_ROWS = (296, 512)  # ... and test crops (216 rows: room for the largest crop)
SUBTLE_FRACTION = 0.2
REFERENCE_STD = 0.10  # grey-level spread of the brick photo: defects on busier surfaces get more contrast
ISOTROPIC = ("grass", "gravel")  # no preferred direction: crops may also be turned by quarter turns


def config(category: str, quick: bool, seed: int) -> dict:
    """All parameters that determine the generated set (recorded in the manifest)."""
    n_per_defect = 6 if quick else 11  # quick: 36 good + 36 defective, enough for a stable AUROC
    return {
        "category": category,
        "quick": quick,
        "seed": seed,
        "image_size": 128 if quick else 256,
        "n_train": 60 if quick else 200,
        "n_test_good": n_per_defect * len(DEFECT_TYPES),
        "n_test_per_defect": n_per_defect,
        "defect_types": list(DEFECT_TYPES),
        "field_of_view": FIELD_OF_VIEW,
        "quarter_turns": category in ISOTROPIC,
        "subtle_fraction": SUBTLE_FRACTION,
    }


@lru_cache(maxsize=8)
def photo(name: str, blur: float = 0.0) -> np.ndarray:
    """The scikit-image photograph as float32 [512, 512] in [0, 1], optionally pre-blurred."""
    from skimage import data

    img = getattr(data, name)().astype(np.float32) / 255.0
    if img.ndim == 3:
        img = img[..., :3].mean(-1)
    return ndi.gaussian_filter(img, blur) if blur > 0 else img


def view(src: np.ndarray, size: int, centre, scale: float, angle: float = 0.0, flip: bool = False) -> np.ndarray:
    """Resample a ``size``x``size`` view of ``src`` around ``centre`` (row, col).

    ``scale`` is photo pixels per output pixel; ``angle`` rotates the view (radians);
    ``flip`` mirrors it left-right. Bilinear interpolation, reflecting at the borders.
    """
    t = (np.arange(size, dtype=np.float64) - (size - 1) / 2) * scale
    v, u = np.meshgrid(t, -t if flip else t, indexing="ij")
    c, s = np.cos(angle), np.sin(angle)
    rows = centre[0] + v * c + u * s
    cols = centre[1] - v * s + u * c
    return ndi.map_coordinates(src, [rows, cols], order=1, mode="reflect").astype(np.float32)


def _anti_alias(scale: float) -> float:
    """Gaussian pre-blur for downsampling by ``scale`` (0 when upsampling)."""
    return 0.5 * float(np.sqrt(max(scale**2 - 1, 0.0)))


def _crop(src, size, nominal, rows, rng, rotate: bool = False) -> np.ndarray:
    """A normal crop: random position inside ``rows``, scale jitter, random flip (and rotation)."""
    scale = nominal * rng.uniform(1 - SCALE_JITTER, 1 + SCALE_JITTER)
    half = size * scale / 2
    angle = rng.integers(4) * np.pi / 2 if rotate else 0.0  # quarter turns keep the crop inside its region
    r = rng.uniform(rows[0] + half, max(rows[1] - half, rows[0] + half))
    c = rng.uniform(half, src.shape[1] - half)
    return view(src, size, (r, c), scale, angle=angle, flip=bool(rng.random() < 0.5))


def generate(cfg: dict) -> Iterator[Sample]:
    """Yield the training crops, then the test crops (normal first, then each defect type)."""
    size, category = cfg["image_size"], cfg["category"]
    nominal = cfg["field_of_view"] / size
    turn = cfg["quarter_turns"]
    src = photo(category, _anti_alias(nominal))
    others = [photo(o, _anti_alias(nominal)) for o in CATEGORIES if o != category]
    train_rng, test_rng, defect_rng = (
        make_rng(cfg["seed"], NAME, category, str(size), part) for part in ("train", "test", "defects")
    )

    for _ in range(cfg["n_train"]):
        yield Sample("train", GOOD, to_uint8(_crop(src, size, nominal, TRAIN_ROWS, train_rng, turn)))
    for _ in range(cfg["n_test_good"]):
        yield Sample("test", GOOD, to_uint8(_crop(src, size, nominal, TEST_ROWS, test_rng, turn)))

    n = cfg["n_test_per_defect"]
    types = cfg["defect_types"]
    n_subtle = int(round(cfg["subtle_fraction"] * n * len(types)))
    subtle = np.zeros(n * len(types), bool)
    subtle[defect_rng.choice(len(subtle), n_subtle, replace=False)] = True
    for t, name in enumerate(types):
        for i in range(n):
            base = _crop(src, size, nominal, TEST_ROWS, test_rng, turn)
            image, mask = _defect(name, base, bool(subtle[t * n + i]), src, others, nominal, defect_rng)
            yield Sample("test", name, to_uint8(image), mask)


def _defect(name, base, subtle, src, others, nominal, rng):
    """Apply one defect to ``base``; retry until its mask is not empty."""
    side = base.shape[0]
    contrast = float(np.clip(src.std() / REFERENCE_STD, 1.0, 1.6))
    for _ in range(20):
        frac = rng.uniform(0.25, 0.4) if rng.random() < 1 / 6 else rng.uniform(0.08, 0.25)
        strength = rng.uniform(0.3, 0.45) if subtle else rng.uniform(0.75, 1.0)
        kw = {"contrast": contrast} if name in ("scratch", "stain", "cut") else {}
        if name == "cut":  # the same texture, rotated, from elsewhere in the test region
            r = rng.uniform(*TEST_ROWS)
            kw["patch"] = view(src, side, (r, rng.uniform(0, 512)), nominal, angle=rng.uniform(0.4, np.pi - 0.4))
        elif name == "foreign":  # another texture, at another scale
            other = others[rng.integers(len(others))]
            zoom = nominal * np.exp(rng.uniform(np.log(0.5), np.log(1.5)))
            kw["patch"] = view(other, side, (rng.uniform(0, 512), rng.uniform(0, 512)), zoom)
        image, alpha = DEFECTS[name](base, frac * side, strength, rng, **kw)
        mask = alpha > 0.5
        if mask.sum() >= 4:
            return np.clip(image, 0, 1), mask
    raise RuntimeError(f"could not place a visible {name!r} defect")  # pragma: no cover
