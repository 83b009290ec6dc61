"""PaDiM: a Patch Distribution Modeling Framework (Defard et al., ICPR workshops 2021).

Each position (i, j) of a pretrained CNN's feature grid gets its own multivariate
Gaussian, fitted on the normal training images; a test patch is scored by its
Mahalanobis distance to the Gaussian of its position.

1. Embedding (Sec. III-A): the taps of three stages (ResNet layers 1-3 in the
   paper; here the EfficientNet-Lite0 stages at strides 4, 8, 16) are upsampled
   to the finest tap's grid and concatenated. A random subset of ``n_features``
   channels is kept (Sec. III-C, "random dimensionality reduction": 100 of 448
   for ResNet18 in the paper).
2. Learning (Sec. III-B, eq. 1): per position, mean mu_ij and covariance
   Sigma_ij = 1/(N-1) sum_k (x^k_ij - mu_ij)(x^k_ij - mu_ij)^T + eps I,  eps = 0.01.
3. Inference (eq. 2): M(x_ij) = sqrt((x_ij - mu_ij)^T Sigma_ij^{-1} (x_ij - mu_ij)).
   The map M is upsampled to the input size (bilinear) and smoothed with a
   Gaussian of sigma = 4; the image score is the maximum of the map.

Simplification: the paper resizes to 256 and centre-crops 224; here images are
resized to ``image_size`` without a crop (the quick preset uses 128 px).
The covariance is computed for all positions at once (batched outer products,
accumulated in float64) and inverted in one batched call.
"""
from __future__ import annotations

import torch

from ...base import FeatureDetector
from ...ops import gaussian_blur, upsample
from ...params import Param, bad
from ...registry import register
from .common import embed


@register("padim", family="feature", paper="PaDiM: a Patch Distribution Modeling Framework for Anomaly "
          "Detection and Localization", year=2021, bibkey="defard2021padim", localizes=True, trains=False,
          quick=dict(image_size=128),
          deviations=("backbone: EfficientNet-Lite0 taps at strides 4, 8, 16 (stage2/3/5, 176 channels) instead "
                      "of ResNet18 layers 1-3 (448 channels) or WRN50-2",
                      "images resized to image_size without the paper's 256 -> 224 centre crop"))
class PaDiM(FeatureDetector):
    """Per-position Gaussian of pretrained CNN features; Mahalanobis distance map."""

    n_features = Param(100, int, low=1, help="channels kept at random (Sec. III-C)")
    eps = Param(0.01, float, low=0, low_open=True, help="ridge added to each covariance (eq. 1)")
    sigma = Param.sigma(4.0)
    image_size = Param.image_size(256)

    @torch.no_grad()
    def _embed(self, x: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] -> [B, d, h*w]: the randomly reduced multi-scale embedding."""
        e = embed(self.extractor_(x), self.layers_)
        return e.index_select(1, self.channel_idx_).flatten(2)

    # learning: eq. (1)
    def _fit(self, x: torch.Tensor) -> None:
        total = sum(self.extractor_.channels[name] for name in self.layers_)
        if self.n_features > total:
            raise bad(self.name, "n_features", self.n_features, f"an integer from 1 to {total} (the channels of "
                      f"the taps {', '.join(self.layers_)})")
        gen = torch.Generator().manual_seed(self.seed)
        idx = torch.randperm(total, generator=gen)[: self.n_features].sort().values
        self.register_buffer("channel_idx_", idx.to(self.device_))
        if len(x) < 2:
            raise bad(self.name, "train images", len(x), "at least 2 images (a covariance needs two)")
        # first and second moments, accumulated in float64 over batches: [d, P] and [P, d, d]
        s, ss = 0.0, 0.0
        for i in range(0, len(x), self.predict_batch_size):
            e = self._embed(x[i : i + self.predict_batch_size].to(self.device_)).double()  # [B, d, P]
            s = s + e.sum(0)
            ss = ss + torch.einsum("bdp,bep->pde", e, e)
        n = len(x)
        mean = s / n
        cov = (ss - n * torch.einsum("dp,ep->pde", mean, mean)) / (n - 1)
        cov += self.eps * torch.eye(self.n_features, dtype=cov.dtype, device=cov.device)
        h, w = self.extractor_(x[:1].to(self.device_))[self.layers_[0]].shape[-2:]
        self.shapes_["grid"] = [int(h), int(w)]
        self.register_buffer("mean_", mean.float())
        self.register_buffer("cov_inv_", torch.linalg.inv(cov).float())  # [P, d, d]

    # inference: eq. (2), upsampling and smoothing
    def _score(self, x: torch.Tensor):
        delta = self._embed(x) - self.mean_  # [B, d, P]
        dist = torch.einsum("bdp,pde,bep->bp", delta, self.cov_inv_, delta).clamp_min(0).sqrt()
        maps = dist.view(len(x), *self.shapes_["grid"])
        maps = gaussian_blur(upsample(maps, x.shape[-2:]), self.sigma)
        return maps.flatten(1).amax(1), maps
