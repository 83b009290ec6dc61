"""Training-time anomaly synthesis: fake anomalies that self-supervised and outlier-exposed methods train on.

Several methods learn "normal versus not normal" without ever seeing a real anomaly, by
corrupting normal training images on the fly: FCDD's *confetti noise* (Liznerski et al.
2021, Sec. 4.2: "a simple noise model that inserts colored blobs into images"), CutPaste's
cut-and-paste patches (Li et al. 2021), DRAEM's blended foreign patches (Zavrtanik et al.
2021). They all live here, in torch, batched and driven by a ``torch.Generator`` so a seeded
fit repeats exactly::

    from anomaly_zoo.synthesis import synthesize
    g = torch.Generator().manual_seed(0)
    x_bad, masks, labels = synthesize(x, kind="confetti", generator=g, p=0.5)
    # x_bad [N, 3, H, W] in [0, 1]; masks [N, H, W] float in {0, 1}; labels [N] (1 = synthetic anomaly)

This module is deliberately *separate code* from the test-set defects of
:mod:`anomaly_zoo.data.defects` (and imports nothing from there): a method trained on the
very corruption it is tested on would be graded on memorising the generator, not on
detecting anomalies. The shapes differ too: the test defects are soft-edged blobs, curves
and rotated rectangles blended into the image; the training anomalies here are hard-edged
axis-aligned rectangles of random colour (confetti), copied patches (cutpaste), and
smoothed-noise regions filled with a random other texture (``noise_blend``).

Every function takes and returns float images ``[N, 3, H, W]`` in ``[0, 1]`` on any device;
random numbers are drawn on the CPU from the given generator, so results do not depend on
the device.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["KINDS", "confetti", "cutpaste", "noise_blend", "synthesize"]


def _uniform(n: int, lo: float, hi: float, g: torch.Generator) -> torch.Tensor:
    return lo + (hi - lo) * torch.rand(n, generator=g)


def _randint(lo: int, hi: int, g: torch.Generator) -> int:
    """An integer in [lo, hi] (inclusive)."""
    return int(torch.randint(lo, max(hi, lo) + 1, (1,), generator=g))


def confetti(x: torch.Tensor, generator: torch.Generator, n_blobs: tuple[int, int] = (1, 4),
             size: tuple[float, float] = (0.04, 0.2)) -> tuple[torch.Tensor, torch.Tensor]:
    """FCDD's confetti noise: a few hard-edged rectangles of one random colour each.

    ``size`` is a blob's side as a fraction of the image side (drawn per side, so blobs
    are rectangles of varied aspect). Returns ``(images, masks [N, H, W])``.
    """
    n, _, h, w = x.shape
    out, masks = x.clone(), torch.zeros(n, h, w, device=x.device)
    for i in range(n):
        for _ in range(_randint(*n_blobs, generator)):
            bh = max(1, int(h * float(_uniform(1, *size, generator))))
            bw = max(1, int(w * float(_uniform(1, *size, generator))))
            top, left = _randint(0, h - bh, generator), _randint(0, w - bw, generator)
            colour = torch.rand(3, generator=generator).to(x.device)
            out[i, :, top : top + bh, left : left + bw] = colour[:, None, None]
            masks[i, top : top + bh, left : left + bw] = 1.0
    return out, masks


def cutpaste(x: torch.Tensor, generator: torch.Generator, area: tuple[float, float] = (0.02, 0.15),
             aspect: tuple[float, float] = (0.3, 3.3), jitter: float = 0.1) -> tuple[torch.Tensor, torch.Tensor]:
    """CutPaste (Li et al. 2021): cut a rectangle of the image and paste it elsewhere, with a
    small brightness jitter per channel. Returns ``(images, masks [N, H, W])``."""
    n, _, h, w = x.shape
    out, masks = x.clone(), torch.zeros(n, h, w, device=x.device)
    for i in range(n):
        a = float(_uniform(1, *area, generator)) * h * w
        log_r = torch.empty(1).uniform_(float(torch.tensor(aspect[0]).log()), float(torch.tensor(aspect[1]).log()),
                                        generator=generator)
        r = float(log_r.exp())
        ph = min(h - 1, max(2, int(round((a / r) ** 0.5))))
        pw = min(w - 1, max(2, int(round((a * r) ** 0.5))))
        sy, sx = _randint(0, h - ph, generator), _randint(0, w - pw, generator)
        ty, tx = _randint(0, h - ph, generator), _randint(0, w - pw, generator)
        patch = x[i, :, sy : sy + ph, sx : sx + pw]
        shift = ((torch.rand(3, 1, 1, generator=generator) * 2 - 1) * jitter).to(x.device)
        out[i, :, ty : ty + ph, tx : tx + pw] = (patch + shift).clamp(0, 1)
        masks[i, ty : ty + ph, tx : tx + pw] = 1.0
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


KINDS = {"confetti": confetti, "cutpaste": cutpaste, "noise_blend": noise_blend}


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
