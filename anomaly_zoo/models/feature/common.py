"""What the deep-feature-modeling methods share: feature maps in, one grid of vectors out.

Every method of this family (PaDiM, SPADE, PatchCore, DFM, DFR) reads a frozen,
pretrained CNN at a few stages ("taps", :mod:`anomaly_zoo.backbones`; the backbone itself
comes from :class:`~anomaly_zoo.base.FeatureDetector`) and models the normal features it
sees there. The numerics they share with other families (nearest neighbours, batched
extraction, explained-variance rank, smoothing) live in :mod:`anomaly_zoo.ops`; what is
particular to this family is written once here:

* :func:`embed`: bring several taps to one grid and concatenate them (PaDiM, SPADE, PatchCore);
* :func:`pooled_head`: the globally pooled features the backbone's classifier sees (SPADE's
  image-level kNN).

Which taps a method reads is ``FeatureDetector._taps`` / ``_extra_taps`` (SPADE adds the deepest
stage, DFR reads every stage up to stride 16).
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from ...backbones import FeatureExtractor


def embed(features: dict[str, torch.Tensor], layers: Sequence[str], mode: str = "nearest",
          size: tuple[int, int] | None = None) -> torch.Tensor:
    """Concatenate the taps ``layers`` on one grid: ``size``, else the first (finest) tap's grid.

    ``mode="nearest"`` repeats each coarse cell (what PaDiM's reference code does with its
    unfold/fold ``embedding_concat``); ``"bilinear"`` interpolates (SPADE's and PatchCore's
    reference code).
    """
    size = tuple(size) if size is not None else tuple(features[layers[0]].shape[-2:])
    kw = {"align_corners": False} if mode == "bilinear" else {}
    parts = [f if tuple(f.shape[-2:]) == size else F.interpolate(f, size=size, mode=mode, **kw)
             for f in (features[name] for name in layers)]
    return torch.cat(parts, dim=1)


def pooled_head(extractor: FeatureExtractor, last: torch.Tensor) -> torch.Tensor:
    """The global-average-pooled features the ImageNet classifier reads, ``[B, C]``.

    ``last`` is the output of the deepest stage (``stage7``, ``layer4``). For EfficientNet-Lite0 the 1x1 head
    convolution (1280 channels, BN, ReLU6) comes first; for ResNets ``layer4`` is pooled
    directly (the ``avgpool`` output of torchvision's ResNet, as in SPADE).
    """
    model = extractor.model
    if hasattr(model, "_conv_head"):
        last = F.relu6(model._bn1(model._conv_head(last)))
    return last.mean(dim=(2, 3))
