"""Pieces the knowledge-distillation family shares: discrepancies, a trainable student backbone,
and the generic photographs that stand in for ImageNet.

* :func:`channel_normalize`, :func:`sq_discrepancy` (STPM's eq. 1-2: half the squared distance
  of channel-normalised features per position), :func:`cosine_distance` (1 - cosine per
  position: Reverse Distillation's eq. 2, MKD's direction loss when flattened);
* :class:`StudentBackbone`: a backbone architecture with *trainable* weights (from random
  initialisation), read at the same taps and after the same input normalisation as the frozen
  teacher of :func:`anomaly_zoo.backbones.create_backbone` (whose ``FeatureExtractor`` freezes
  everything and stays in eval mode, so it cannot be a student);
* :func:`generic_images`: random crops of scikit-image's bundled photographs (astronaut,
  coffee, a cat, a rocket, coins, the Hubble deep field, ...), the library's offline stand-in
  for the ImageNet images that Uninformed Students and EfficientAD distil their teacher on and
  that EfficientAD's student is penalised on. The textures, the retina and the phantom, from
  which the test sets are built, are left out, so no method sees the test distribution there.
"""
from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ...backbones import create_backbone

# ------------------------------------------------------------------ discrepancies


def channel_normalize(f: torch.Tensor) -> torch.Tensor:
    """``f [B, C, h, w]`` divided by its L2 norm over channels at each position (STPM, Sec. 3.1)."""
    return F.normalize(f, dim=1, eps=1e-12)


def sq_discrepancy(t: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """STPM eq. (1): ``1/2 || t/|t| - s/|s| ||^2`` per position, ``[B, h, w]`` (in [0, 2])."""
    return 0.5 * (channel_normalize(t) - channel_normalize(s)).pow(2).sum(1)


def cosine_distance(t: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """``1 - cos(t_hw, s_hw)`` per position, ``[B, h, w]`` (Reverse Distillation eq. 2)."""
    return 1 - F.cosine_similarity(t, s, dim=1, eps=1e-8)


# ------------------------------------------------------------------ a trainable backbone


class StudentBackbone(nn.Module):
    """The architecture of backbone ``name`` with trainable, randomly initialised weights.

    ``forward(x)`` takes [0, 1] images, normalises them as the teacher does and returns
    ``{tap: feature map}`` for ``layers``; BatchNorm follows ``train()``/``eval()`` as usual.
    Only the layers up to the deepest tap take part: the classifier head never gets a gradient,
    and the optimisers skip parameters without one.
    """

    def __init__(self, name: str, layers):
        super().__init__()
        fx = create_backbone(name, pretrained=False, layers=list(layers))  # random weights, frozen
        self.layers = tuple(fx.layers)
        self.model = fx.model
        for p in self.model.parameters():
            p.requires_grad_(True)
        self.register_buffer("mean", fx.mean.clone(), persistent=False)
        self.register_buffer("std", fx.std.clone(), persistent=False)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.model.forward_taps((x - self.mean) / self.std, self.layers)


# ------------------------------------------------------------------ generic images

#: scikit-image photographs bundled with the package (no download); none is a test-set source
GENERIC_SOURCES = ("astronaut", "coffee", "chelsea", "rocket", "camera", "coins", "moon", "page", "text",
                   "hubble_deep_field", "immunohistochemistry", "clock", "horse", "colorwheel")


@lru_cache(maxsize=1)
def _generic_photos() -> tuple[torch.Tensor, ...]:
    import skimage.data as skd

    out = []
    for name in GENERIC_SOURCES:
        a = np.asarray(getattr(skd, name)())
        if a.dtype == bool:
            a = a.astype(np.uint8) * 255
        a = a.astype(np.float32)
        a = a / 255.0 if a.max() > 1.5 else a
        if a.ndim == 2:
            a = np.repeat(a[..., None], 3, axis=2)
        out.append(torch.from_numpy(np.ascontiguousarray(a[..., :3])).permute(2, 0, 1).contiguous())
    return tuple(out)


def generic_images(n: int, size: int, generator: torch.Generator, min_side: float = 0.25) -> torch.Tensor:
    """``n`` random square crops ``[n, 3, size, size]`` in [0, 1] of the generic photographs,
    each crop a random photo, side a random fraction in ``[min_side, 1]`` of its shorter side,
    randomly flipped, resized to ``size``. Drawn from ``generator`` only (seeded runs repeat)."""
    photos = _generic_photos()
    crops = []
    for _ in range(n):
        img = photos[int(torch.randint(len(photos), (1,), generator=generator))]
        h, w = img.shape[-2:]
        frac = min_side + (1 - min_side) * float(torch.rand(1, generator=generator))
        side = max(8, int(min(h, w) * frac))
        top = int(torch.randint(h - side + 1, (1,), generator=generator))
        left = int(torch.randint(w - side + 1, (1,), generator=generator))
        crop = img[:, top : top + side, left : left + side]
        if float(torch.rand(1, generator=generator)) < 0.5:
            crop = crop.flip(-1)
        crops.append(F.interpolate(crop[None], size=(size, size), mode="bilinear", align_corners=False,
                                   antialias=True)[0])
    return torch.stack(crops).clamp_(0, 1)
