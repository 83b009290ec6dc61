"""SPADE: Sub-Image Anomaly Detection with Deep Pyramid Correspondences (Cohen & Hoshen, 2020).

Two nearest-neighbour searches in the features of a pretrained CNN, first over whole
images, then over pixels of the retrieved images only.

1. Image level (eq. 1): every image is described by the globally pooled
   features f = F(x) that the ImageNet classifier reads (ResNet's ``avgpool`` output in
   the paper; here EfficientNet-Lite0's 1280-channel head, pooled). A test image y is as
   anomalous as its mean squared distance to its K nearest normal images:

       d(y) = 1/K  sum_{f in N_K(f_y)} ||f - f_y||^2                       (eq. 1)

2. Pixel level (eq. 2): each position p of y is described by its feature
   pyramid F(y, p), the concatenation of the outputs of the first three blocks (strides
   4, 8, 16; upsampled bilinearly to the stride-4 grid). The gallery G holds the pyramid
   features of *all positions* of the K nearest normal images x_1..x_K found in step 1,
   and the anomaly of position p is its mean squared distance to its kappa nearest
   gallery features:

       d(y, p) = 1/kappa  sum_{f in N_kappa(F(y, p))} ||f - F(y, p)||^2     (eq. 2)

   Searching all positions of the retrieved images (not only position p) is what makes
   SPADE robust to misalignment; restricting the gallery to K images keeps it affordable.
   The map is upsampled (bilinear) to the input size and smoothed with a Gaussian of
   sigma = 4.

Paper settings: K = 50, kappa = 1, sigma = 4; a Wide-ResNet50x2 at 224 px. Here:
EfficientNet-Lite0 taps ``stage2``, ``stage3``, ``stage5`` (strides 4, 8, 16, the analogue of
the paper's three blocks) and the default preset at 256 px without a centre crop. The quick
preset uses 128 px and K = 10 nearest images (the pixel-level search costs K x h x w
distances per test position; 60 quick training images leave K = 50 meaningless anyway).
Distances are exact and computed in chunks, so memory stays bounded. The pixel search is
SPADE's cost: at 256 px (a 64 x 64 grid) and K = 50 it is about 1.5e11 multiply-adds per test
image, minutes per image on a CPU and well under a second on a GPU; the training pyramids
(the gallery) take N x 176 x 64 x 64 floats (580 MB for 200 images).

``image_score="knn"`` (default) is the paper's image score, eq. 1. ``"max"`` scores an image
by the maximum of its pixel map instead (the rule of PaDiM and PatchCore). Pooling a whole
image into one vector dilutes a defect that covers a few percent of it: on the quick brick
sets (seeds 0-2) eq. 1 gives an image AUROC of 0.80-0.88 and the map's maximum 0.85-0.95;
on the busier grass and gravel, where the map itself is noisy, neither wins consistently.
The weakness is the paper's: eq. 1 averages 85.5 % image AUROC on MVTec AD in Cohen & Hoshen's
experiments, below the pixel-map-based detectors of this family.
"""
from __future__ import annotations

import torch

from ...backbones import taps_at
from ...base import FeatureDetector
from ...ops import MAX_ELEMENTS, gaussian_blur, knn, upsample
from ...params import Param
from ...registry import register
from .common import embed, pooled_head

IMAGE_SCORES = ("knn", "max")


@register("spade", family="feature", paper="Sub-Image Anomaly Detection with Deep Pyramid Correspondences",
          year=2020, bibkey="cohen2020spade", localizes=True, trains=False,
          quick=dict(image_size=128, k_images=10),
          deviations=("backbone: EfficientNet-Lite0 (pyramid taps at strides 4, 8, 16; image features from its "
                      "pooled 1280-channel head) instead of a Wide-ResNet50x2",
                      "images resized to image_size (256) and not centre-cropped to the paper's 224 px"))
class SPADE(FeatureDetector):
    """kNN over whole images (pooled features), then kNN over the pixels of the K retrieved images."""

    predict_batch_size = 16

    k_images = Param(50, int, low=1, help="K: nearest normal images retrieved by eq. 1 (capped at the training set)")
    k_pixels = Param(1, int, low=1, help="kappa: nearest gallery features averaged in eq. 2")
    image_score = Param("knn", str, choices=IMAGE_SCORES,
                        help="'knn': eq. 1 on pooled features (the paper); 'max': the maximum of the map")
    sigma = Param.sigma(4.0)
    image_size = Param.image_size(256)
    max_elements = Param(MAX_ELEMENTS, int, low=1, help="distance-matrix entries computed at once (memory bound)")

    # the network: the frozen pyramid taps (FeatureDetector) plus the deepest stage for the pooled head
    def _extra_taps(self) -> list[str]:
        self.last_ = taps_at(self.backbone, (32,))[-1]  # stage7 / layer4: what the classifier pools
        return [self.last_]

    @torch.no_grad()
    def features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``[B, 3, H, W]`` -> (image features f ``[B, G]``, feature pyramid F ``[B, C, h, w]``)."""
        taps = self.extractor_(x)
        return pooled_head(self.extractor_, taps[self.last_]), embed(taps, self.layers_, mode="bilinear")

    def _fit(self, x: torch.Tensor) -> None:
        glob, pyr = [], []
        for i in range(0, len(x), self.predict_batch_size):
            g, p = self.features(x[i : i + self.predict_batch_size].to(self.device_))
            glob.append(g)
            pyr.append(p)
        self.register_buffer("train_features_", torch.cat(glob))  # the image-level gallery, [N, G]
        self.register_buffer("train_pyramids_", torch.cat(pyr))  # the pixel-level galleries, [N, C, h, w]
        self.shapes_["grid"] = list(self.train_pyramids_.shape[-2:])

    def nearest_images(self, f: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Eq. 1's neighbours: squared distances ``[B, K]`` and indices of the K nearest training images."""
        return knn(f, self.train_features_, self.k_images, squared=True, max_elements=self.max_elements)

    def pixel_scores(self, pyramid: torch.Tensor, neighbours: torch.Tensor) -> torch.Tensor:
        """Eq. 2 for one image: ``pyramid [C, h, w]``, the indices of its K nearest images -> ``[h, w]``."""
        c, h, w = pyramid.shape
        gallery = self.train_pyramids_[neighbours].permute(0, 2, 3, 1).reshape(-1, c)  # all positions of K images
        query = pyramid.permute(1, 2, 0).reshape(-1, c)
        d, _ = knn(query, gallery, self.k_pixels, squared=True, max_elements=self.max_elements)
        return d.mean(1).view(h, w)

    def _score(self, x: torch.Tensor):
        f, pyr = self.features(x)
        d_img, neighbours = self.nearest_images(f)
        maps = torch.stack([self.pixel_scores(pyr[i], neighbours[i]) for i in range(len(x))])  # eq. 2
        maps = gaussian_blur(upsample(maps, x.shape[-2:]), self.sigma)
        scores = d_img.mean(1) if self.image_score == "knn" else maps.flatten(1).amax(1)  # eq. 1, or the map's max
        return scores, maps
