"""A validation set made from training images only: choose hyperparameters without touching the test set.

Unsupervised anomaly detection has no labelled anomalies to validate on, and choosing a preset by
comparing test metrics leaks the test set into the method. The honest substitute, used to choose
the library's quick presets where the paper gives none: hold out some *normal training* images,
turn half of them into synthetic anomalies (with :mod:`anomaly_zoo.synthesis`, whose masks are
known), fit on the rest, and score the fitted detector on that proxy set with the usual metrics.

::

    from anomaly_zoo.validation import proxy_split, proxy_score
    split = proxy_split(ds.train_images, kind=("cutpaste_scar", "nsa"), fraction=0.25, seed=0)
    report = proxy_score("draem", ds.train_images, preset="quick", epochs=10)   # fits on split.fit_images
    report["aupro"], report["pixel_auroc"], report["image_auroc"]

Which synthetic anomalies: never the kind the tuned method itself trains on, or the proxy grades it on
memorising its own generator (the reason the test-set defects are separate code). The default,
``("cutpaste_scar", "nsa")``, alternates two kinds (half of the corrupted images each); CutPaste (which
trains on scars) and NSA (on Poisson patches) must be validated on other kinds, e.g. ``"confetti"``:

* ``cutpaste_scar``: a thin, rotated, colour-jittered strip of the same image pasted with a hard edge
  (thin and long, like a scratch: a small region a map must find);
* ``nsa``: a patch of *another* normal image, resized and Poisson-blended in (seamless: no edge to see,
  only the content differs: a subtle, larger region).

DRAEM, for instance, trains on Perlin-shaped blobs filled with generated textures and alpha-blended
(``perlin``; ``noise_blend`` is its look-alike): both kinds above differ from it in shape (rectangles
and strips, not Perlin blobs), content (the image's own texture, not a foreign one) and blending.

Caveats: the proxy anomalies are not the real defects, and a method that fits on ``1 - fraction`` of
the images sees fewer of them; the proxy ranks settings, its numbers are not test numbers. With
tens of training images the proxy set is small: average over a few ``seed`` values to compare
settings whose scores are close.
"""
from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch

from .metrics import evaluate
from .synthesis import KINDS, synthesize
from .utils import AnomalyZooError, check_images

__all__ = ["DEFAULT_KINDS", "ProxySplit", "proxy_score", "proxy_split"]

#: the default proxy anomalies (module docstring): thin pasted scars and Poisson-blended foreign patches
DEFAULT_KINDS = ("cutpaste_scar", "nsa")


class ProxySplit(NamedTuple):
    """What :func:`proxy_split` returns: images to fit on, and a labelled proxy set with pixel masks."""

    fit_images: torch.Tensor  # [N_fit, 3, H, W], normal
    val_images: torch.Tensor  # [N_val, 3, H, W], about half of them with a synthetic anomaly
    val_labels: torch.Tensor  # [N_val] float {0, 1}: 1 where val_masks holds an anomalous pixel
    val_masks: torch.Tensor  # [N_val, H, W] float {0, 1}


def _kinds(kind) -> tuple[str, ...]:
    kinds = (kind,) if isinstance(kind, str) else tuple(kind) if isinstance(kind, (list, tuple)) else None
    if not kinds or any(not isinstance(k, str) or k not in KINDS for k in kinds):
        raise AnomalyZooError(f"proxy_split: kind={kind!r} is not a synthesis kind or a non-empty sequence of them; "
                              f"use one or more of {', '.join(KINDS)}")
    return kinds


def proxy_split(images, kind: str | Sequence[str] = DEFAULT_KINDS, fraction: float = 0.25,
                seed: int = 0) -> ProxySplit:
    """Hold out ``fraction`` of the normal ``images`` and give half of the held-out ones a synthetic anomaly.

    ``images``: normal training images ``[N, 3, H, W]`` in [0, 1] (tensor or numpy array). A seeded
    permutation picks ``n_val = round(fraction * N)`` images for the proxy set (the rest, in their original
    order, are ``fit_images``); ``n_val // 2`` of those are corrupted with :func:`anomaly_zoo.synthesis.synthesize`,
    the kinds of ``kind`` taken in turn (one kind, or a sequence: image ``i`` of the corrupted ones gets
    ``kind[i % len(kind)]``), all from one ``torch.Generator`` seeded with ``seed``. ``val_labels`` is 1
    exactly where ``val_masks`` marks a pixel (a synthesis whose mask came out empty leaves a normal image).
    The same ``images`` and ``seed`` give the same split. Needs at least 2 images held out and 2 left to fit.
    """
    x = check_images(images, "proxy_split images")
    kinds = _kinds(kind)
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 < fraction < 1:
        raise AnomalyZooError(f"proxy_split: fraction={fraction!r} must be a number in (0, 1), the share of the "
                              "images held out for the proxy set")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise AnomalyZooError(f"proxy_split: seed={seed!r} must be an integer")
    n = len(x)
    n_val = int(round(fraction * n))
    if n_val < 2 or n - n_val < 2:
        need = max(4, math.ceil(2 / min(fraction, 1 - fraction)))
        raise AnomalyZooError(f"proxy_split: {n} images with fraction={fraction} hold out {n_val} and leave "
                              f"{n - n_val} to fit; both must be >= 2 (give at least {need} images)")
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(n, generator=g)
    val_idx, fit_idx = order[:n_val], order[n_val:].sort().values
    val = x[val_idx].clone()
    masks = torch.zeros(n_val, *x.shape[-2:])
    n_bad = n_val // 2
    for j, k in enumerate(kinds):
        idx = torch.arange(j, n_bad, len(kinds))  # the corrupted ones are the first n_bad of the proxy set
        if len(idx):
            val[idx], masks[idx], _ = synthesize(val[idx], kind=k, generator=g, p=1.0)
    masks = (masks > 0).float()
    labels = (masks.flatten(1).amax(1) > 0).float()
    # shuffle, so that the anomalous images are not the first ones (a method must not see an order)
    mix = torch.randperm(n_val, generator=g)
    return ProxySplit(x[fit_idx], val[mix].clamp(0, 1), labels[mix], masks[mix])


def proxy_score(detector: str | Callable, images, *, kind: str | Sequence[str] = DEFAULT_KINDS,
                fraction: float = 0.25, seed: int = 0, preset: str | None = "quick", **params) -> dict[str, float]:
    """Fit a detector on a :func:`proxy_split` of ``images`` and return :func:`~anomaly_zoo.metrics.evaluate`'s
    metrics on the proxy set (``image_auroc``, ..., and ``pixel_auroc``, ``aupro`` for maps), plus ``fit_seconds``.

    ``detector``: a registry name (then ``az.create(detector, preset=preset, **params)``), or a callable
    with no arguments that returns a new, unfitted detector (then ``preset`` and ``params`` must be left out).
    """
    from .factory import create  # not at the top: factory imports every method

    if isinstance(detector, str):
        det = create(detector, **({"preset": preset} if preset else {}), **params)
    elif callable(detector):
        if params:
            raise AnomalyZooError(f"proxy_score: params {sorted(params)} are for a registry name; with a callable, "
                                  "build the detector with them inside the callable")
        det = detector()
    else:
        raise AnomalyZooError(f"proxy_score: detector must be a registry name or a callable returning a detector, "
                              f"got {type(detector).__name__}")
    split = proxy_split(images, kind=kind, fraction=fraction, seed=seed)
    if not split.val_labels.any() or split.val_labels.all():
        raise AnomalyZooError("proxy_score: the proxy set needs both normal and anomalous images; hold out more "
                              "(a larger fraction or more images)")
    start = time.process_time()
    det.fit(split.fit_images)
    seconds = time.process_time() - start
    report = evaluate(det.predict(split.val_images), split.val_labels, split.val_masks)
    report["fit_seconds"] = seconds
    return report
