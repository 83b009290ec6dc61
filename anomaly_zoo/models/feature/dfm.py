"""DFM: deep feature modeling with PCA and a Gaussian (Ahuja et al., 2019).

Model the distribution of a pretrained CNN's features of normal images with a
multivariate Gaussian in a PCA subspace; a test image whose features are unlikely
under it, or that the subspace cannot reconstruct, is anomalous. Ahuja et al. model the
outputs of a network's layers with parametric densities (Gaussian, or a mixture) and
score a sample by its likelihood; in anomaly detection there is one class, the normal one.

1. Features: the output of one mid-level stage (a ResNet-50's ``layer3`` in anomalib's
   implementation of DFM; here EfficientNet-Lite0's ``stage5``, also at stride 16), average
   pooled with a ``pooling_kernel_size`` window (4) to shrink it, and flattened to one
   vector x in R^D per image (the pooled grid keeps a coarse layout of the image).
2. PCA: the mean mu and the principal directions W (k x D, orthonormal rows) of the N
   training vectors, with k the smallest number of components that explains
   ``pca_level`` (97 %) of the variance; lambda_1..lambda_k are their variances (the
   eigenvalues of the sample covariance, 1/(N-1) normalisation), and

       z = W (x - mu)                                                                (M1)

3. Scores, both options (``score_type``):

   * ``"nll"``: the Gaussian negative log-likelihood of z. In the PCA basis the sample
     covariance is diag(lambda), so

         -log p(z) = 1/2 sum_i z_i^2 / lambda_i + 1/2 sum_i log lambda_i + k/2 log(2 pi)   (M2)

   * ``"fre"``: the feature reconstruction error, the energy of x outside the principal
     subspace (the score the same group studies in Ndiour, Ahuja & Tickoo 2020, and
     anomalib's default for DFM):

         FRE(x) = ||x - (mu + W^T z)||^2                                             (M3)

   The map (for both options) is the reconstruction error per pooled cell, summed over
   channels, upsampled (bilinear) to the image and smoothed with a Gaussian of sigma = 4:
   the NLL has no per-position decomposition (every component mixes all positions), the
   residual of (M3) does. On the 2 x 2 (quick, 128 px) or 4 x 4 (256 px) pooled grid it is
   coarse: DFM is a detection method first.

Labels M1-M3 are this file's (the paper's derivation was not checked offline for its
numbering). Fitting is closed form (an SVD in float64); nothing is trained.

Measured with the quick preset (mean image AUROC over data seeds 0-4): FRE 0.89 on brick,
0.63 on grass, 0.73 on gravel, 0.93 on the phantom scans; NLL 0.69, 0.58, 0.66, 0.82 (FRE is
the default, as in anomalib). On grass a random backbone does as well (0.66): whole-image statistics
of a busy texture are caught by random filters too.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ...base import FeatureDetector
from ...ops import explained_variance_rank, extract, gaussian_blur, upsample
from ...params import Param, bad
from ...registry import register
from .common import embed

SCORE_TYPES = ("fre", "nll")


def gaussian_nll(z: torch.Tensor, variances: torch.Tensor) -> torch.Tensor:
    """-log N(z; 0, diag(variances)) for the rows of ``z [B, k]`` (M2)."""
    k = z.shape[1]
    return 0.5 * (z * z / variances).sum(1) + 0.5 * torch.log(variances).sum() + 0.5 * k * math.log(2 * math.pi)


@register("dfm", family="feature", paper="Probabilistic Modeling of Deep Features for Out-of-Distribution and "
          "Adversarial Detection", year=2019, bibkey="ahuja2019dfm", localizes=True, trains=False,
          quick=dict(image_size=128),
          deviations=("backbone: EfficientNet-Lite0 stage5 (stride 16, 112 channels) instead of the ResNet-50 "
                      "layer3 of anomalib's DFM (the paper models the layers of classification networks)",
                      "the default score is the feature reconstruction error (M3, anomalib's default, from Ndiour "
                      "et al. 2020), not the paper's Gaussian likelihood (score_type='nll')",
                      "one Gaussian in a PCA subspace of pooled features keeping 97 % of the variance (anomalib's "
                      "settings), not the paper's per-layer densities or mixtures",
                      "the anomaly map (the per-cell residual of M3) is the library's addition: the paper only "
                      "scores whole images"))
class DFM(FeatureDetector):
    """PCA + Gaussian of pooled deep features; NLL or feature-reconstruction-error score."""

    predict_batch_size = 16
    default_strides = (16,)  # one mid-level tap (anomalib: ResNet-50 layer3)

    pooling_kernel_size = Param(4, int, low=1, help="average-pooling window that shrinks the feature map")
    pca_level = Param(0.97, float, low=0, low_open=True,
                      help="share of variance the PCA keeps (< 1), or the number of components (>= 1)")
    score_type = Param("fre", str, choices=SCORE_TYPES,
                       help="'fre': feature reconstruction error (M3); 'nll': Gaussian negative log-likelihood (M2)")
    sigma = Param.sigma(4.0)
    image_size = Param.image_size(256)

    @torch.no_grad()
    def pooled_features(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, 3, H, W]`` -> pooled feature maps ``[B, C, h, w]`` (flatten for the vector x)."""
        e = embed(self.extractor_(x), self.layers_, mode="bilinear")
        k = self.pooling_kernel_size
        return F.avg_pool2d(e, k) if k > 1 else e

    def _fit(self, x: torch.Tensor) -> None:
        if len(x) < 2:
            raise bad(self.name, "train images", len(x), "at least 2 images (a PCA needs two)")
        stride = self.extractor_.strides[self.layers_[0]]
        grid = [math.ceil(n / stride) for n in self.shapes_["input_hw"]]  # the first tap's grid
        if self.pooling_kernel_size > min(grid):
            raise bad(self.name, "pooling_kernel_size", self.pooling_kernel_size,
                      f"an integer from 1 to {min(grid)} (the side of the {grid[0]}x{grid[1]} feature grid)")
        feats = extract(self.pooled_features, x, self.predict_batch_size, self.device_, out_device=self.device_)
        v = feats.flatten(1).double().cpu()  # float64 SVD on the CPU (MPS has no float64)
        mean = v.mean(0)
        _, s, vh = torch.linalg.svd(v - mean, full_matrices=False)
        variances = s**2 / (len(v) - 1)
        k = explained_variance_rank(variances, self.pca_level)  # M1: the principal subspace
        self.shapes_.update(feature_shape=list(feats.shape[1:]), n_components=k)
        self.register_buffer("mean_", mean.float())
        self.register_buffer("components_", vh[:k].float().contiguous())  # W, [k, D]
        self.register_buffer("variances_", variances[:k].float().clamp_min(1e-12))  # lambda, [k]

    def project(self, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``v [B, D]`` -> (PCA coordinates z ``[B, k]`` (M1), reconstruction mu + W^T z ``[B, D]``)."""
        z = (v - self.mean_) @ self.components_.T
        return z, self.mean_ + z @ self.components_

    def _score(self, x: torch.Tensor):
        feats = self.pooled_features(x)
        v = feats.flatten(1)
        z, recon = self.project(v)
        residual = (v - recon).pow(2)
        scores = gaussian_nll(z, self.variances_) if self.score_type == "nll" else residual.sum(1)  # M2 or M3
        maps = residual.view_as(feats).sum(1)
        maps = gaussian_blur(upsample(maps, x.shape[-2:]), self.sigma)
        return scores, maps
