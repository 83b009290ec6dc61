"""Training-time anomaly synthesis: fake anomalies that self-supervised and outlier-exposed methods train on.

Several methods learn "normal versus not normal" without ever seeing a real anomaly, by
corrupting normal training images on the fly: FCDD's *confetti noise* (Liznerski et al.
2021, Sec. 4.2: "a simple noise model that inserts colored blobs into images"; built as
its reference code does: rotated squares, smoothed, added to the image), CutPaste's
cut-and-paste patches and scars (Li et al. 2021), DRAEM's Perlin-masked foreign textures
(Zavrtanik et al. 2021), NSA's Poisson-blended patches of other normal images (Schlueter et al.
2022). They all live in this package, one module per kind, in torch, batched and driven by a
``torch.Generator`` so a seeded fit repeats exactly:

* :mod:`.patches`: ``confetti``, ``cutpaste``, ``cutpaste_scar``, ``noise_blend``;
* :mod:`.perlin`: Perlin noise, procedural textures (the stand-in for DTD), ``perlin`` (DRAEM);
* :mod:`.blend`: Poisson blending, ``nsa`` and its per-pixel targets;
* :mod:`.masks`: pretext masks, not anomalies: RIAD's random-grid masks, Puzzle-AE's jigsaw.

::

    from anomaly_zoo.synthesis import synthesize
    g = torch.Generator().manual_seed(0)
    x_bad, masks, labels = synthesize(x, kind="confetti", generator=g, p=0.5)
    # x_bad [N, 3, H, W] in [0, 1]; masks [N, H, W] float in {0, 1}; labels [N] (1 = synthetic anomaly)

This module is deliberately *separate code* from the test-set defects of
:mod:`anomaly_zoo.data.defects` (and imports nothing from there): a method trained on the
very corruption it is tested on would be graded on memorising the generator, not on
detecting anomalies. The generators differ too: the test defects are scratches, stains,
holes, cuts, colour blobs and foreign patches blended into the image; the training
anomalies here are smoothed, rotated squares of random colour or white added to the image
(confetti), copied patches and thin rotated strips (cutpaste, scar), smooth Perlin blobs
filled with generated textures (perlin), seamlessly blended patches of other training images
(nsa), and smoothed-noise regions filled with a random other image of the batch (``noise_blend``).

Every function takes and returns float images ``[N, 3, H, W]`` in ``[0, 1]`` on any device;
random numbers are drawn on the CPU from the given generator, so results do not depend on
the device.
"""
from __future__ import annotations

import torch

from . import blend, masks, patches, perlin
from .patches import confetti, cutpaste, noise_blend

__all__ = ["KINDS", "confetti", "cutpaste", "noise_blend", "synthesize"]

#: name -> function(x [N, 3, H, W], generator, **kw) -> (images, masks [N, H, W]); each module lists its own
KINDS = {**patches.KINDS, **perlin.KINDS, **blend.KINDS, **masks.KINDS}


def synthesize(x: torch.Tensor, kind: str = "confetti", generator: torch.Generator | None = None, p: float = 1.0,
               **kw) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Corrupt a random fraction ``p`` of the images in ``x`` with the synthesis ``kind``.

    Returns ``(images [N, 3, H, W], masks [N, H, W] float {0, 1}, labels [N] float {0, 1})``;
    images left clean have an all-zero mask and label 0. A corrupted image whose mask came
    out empty (possible for ``noise_blend``) is labelled 0 as well.
    """
    if kind not in KINDS:
        raise ValueError(f"unknown synthesis {kind!r}; use one of {', '.join(KINDS)}")
    g = generator if generator is not None else torch.Generator().manual_seed(0)
    chosen = (torch.rand(len(x), generator=g) < p).to(x.device)
    out, masks = x.clone(), torch.zeros(len(x), *x.shape[-2:], device=x.device)
    idx = chosen.nonzero().flatten()
    if len(idx):
        bad, m = KINDS[kind](x[idx], g, **kw)
        out[idx], masks[idx] = bad, m
    labels = (masks.flatten(1).amax(1) > 0).float()
    return out, masks, labels
