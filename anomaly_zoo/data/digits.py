"""``digits``: one-class classification on scikit-learn's 8x8 handwritten digits.

The classic *semantic* anomaly setting (one class is normal, every other class is an
anomaly), in contrast to the *sensory* defects of ``textures`` and ``phantom``: an
anomalous "7" is a perfectly clean image of the wrong kind, so there is nothing to
localise and the set has image-level labels only (no masks).

``load_digits()`` ships with scikit-learn (1797 images, values 0..16, about 180 per
class). Images are upsampled bicubically to 32 px (quick) or 64 px (full) so that
CNN backbones have something to work with, and scaled to [0, 1] (white strokes on
black). Train: a fixed, seeded part of the normal class. Test: the rest of the normal
class plus, quick, a few of each other class, full, all of them. Anomalous test
images are filed under ``test/digit_<j>/``.
"""
from __future__ import annotations

from collections.abc import Iterator

import numpy as np
from skimage.transform import resize

from .core import GOOD, Sample, make_rng, to_uint8

NAME = "digits"
VERSION = "1"
CATEGORIES = tuple(f"class_{k}" for k in range(10))
DEFAULT_CATEGORY = "class_0"


def config(category: str, quick: bool, seed: int) -> dict:
    """All parameters that determine the generated set (recorded in the manifest)."""
    return {
        "category": category,
        "normal_class": int(category.split("_")[1]),
        "quick": quick,
        "seed": seed,
        "image_size": 32 if quick else 64,
        "n_train": 80 if quick else 120,
        "n_test_good": 30 if quick else None,  # None: the rest of the normal class
        "n_test_per_other_class": 4 if quick else None,  # None: all of them
    }


def generate(cfg: dict) -> Iterator[Sample]:
    """Yield the training images (normal class), then the test images (normal, then each other class)."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images, targets = digits.images.astype(np.float32) / 16.0, digits.target
    size, k = cfg["image_size"], cfg["normal_class"]
    rng = make_rng(cfg["seed"], NAME, cfg["category"], str(size))

    def up(img: np.ndarray) -> np.ndarray:
        return to_uint8(np.clip(resize(img, (size, size), order=3, mode="edge", anti_aliasing=False), 0, 1))

    normal = rng.permutation(np.flatnonzero(targets == k))
    train, rest = normal[: cfg["n_train"]], normal[cfg["n_train"] :]
    if cfg["n_test_good"] is not None:
        rest = rest[: cfg["n_test_good"]]
    for i in train:
        yield Sample("train", GOOD, up(images[i]))
    for i in rest:
        yield Sample("test", GOOD, up(images[i]))
    for j in range(10):
        if j == k:
            continue
        idx = np.flatnonzero(targets == j)
        if cfg["n_test_per_other_class"] is not None:
            idx = np.sort(rng.choice(idx, cfg["n_test_per_other_class"], replace=False))
        for i in idx:
            yield Sample("test", f"digit_{j}", up(images[i]))
