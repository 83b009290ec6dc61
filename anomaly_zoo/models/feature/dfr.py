"""DFR: Unsupervised Anomaly Segmentation via Deep Feature Reconstruction (Yang, Shi & Qi, Neurocomputing 2021).

An auto-encoder that reconstructs *features*, not pixels: trained on the multi-scale
regional features of normal images, it reconstructs normal regions well and
anomalous ones badly, so the feature reconstruction error is the anomaly map.

1. The multi-scale regional feature generator: the maps phi_l(x) of L layers of a
   pretrained CNN (VGG19's ``relu1_1`` .. ``relu4_4``, 12 layers, in the authors' code) are
   each resized (bilinear) to the image size H x W and average-filtered with an r x r
   window at stride r (r = 4), so that every r x r region of the image gets one vector per
   layer; the vectors of all layers are concatenated:

       f(x) = concat_l AvgPool_r(Resize_{H x W}(phi_l(x)))  in  R^{C x H/r x W/r},  C = sum_l C_l   (D1)

   Shallow layers describe the region itself, deep layers its context at growing scales.
   For EfficientNet-Lite0 the analogue of VGG19 blocks 1-4 (everything but the deepest,
   most ImageNet-specific stages) is ``stage1`` .. ``stage5`` (strides 2 to 16, C = 272).
2. The deep yet efficient convolutional auto-encoder: 1 x 1 convolutions only, so each
   region is encoded on its own: C -> (C + 2c)/2 -> 2c -> c -> 2c -> (C + 2c)/2 -> C, with
   BatchNorm and ReLU between layers. The latent size c is estimated by PCA: the number of
   principal components that explain 90 % of the variance of the regional features (of
   the first ten training images, as the authors' code does).
3. Training: the mean squared error over regions and channels,

       L = 1 / (C h w)  sum_{i,j} ||f_ij(x) - CAE(f(x))_ij||^2                                      (D2)

   with Adam (lr 1e-4) and batches of 4 images, through the library's one training loop.
   The authors' code trains 150 epochs (700 in some of their runs). The quick preset
   trains 10 epochs on 128 px images with 8 x 8 regions (a 16 x 16 grid, 4x fewer regions
   to reconstruct than 4 x 4) and lr 1e-3, chosen on the training loss: after 10-20 epochs
   lr 1e-4 leaves it about 3x higher than lr 1e-3 does (17 against 5.9 on quick brick).
4. Anomaly map: the reconstruction error of each region, averaged over channels,

       A_ij(x) = 1/C ||f_ij(x) - CAE(f(x))_ij||^2                                                 (D3)

   upsampled (bilinear) to the input; the image score is the maximum of the map (the
   authors' detection protocol). No smoothing (``sigma=0``), as in their code.

Equation labels D1-D3 are this file's (the settings above were checked against the
authors' published code, github.com/YoungGod/DFR, not against the paper's numbering).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ...backbones import stages
from ...base import FeatureDetector
from ...ops import explained_variance_rank, extract, gaussian_blur, upsample
from ...params import Param, bad
from ...registry import register


class FeatureCAE(nn.Module):
    """DFR's auto-encoder: 1x1 convolutions C -> (C+2c)/2 -> 2c -> c and back, BN + ReLU between."""

    def __init__(self, channels: int, latent_dim: int):
        super().__init__()
        mid, c = (channels + 2 * latent_dim) // 2, latent_dim

        def layer(cin, cout, last=False):
            return [nn.Conv2d(cin, cout, 1)] + ([] if last else [nn.BatchNorm2d(cout), nn.ReLU()])

        self.encoder = nn.Sequential(*layer(channels, mid), *layer(mid, 2 * c), *layer(2 * c, c, last=True))
        self.decoder = nn.Sequential(*layer(c, 2 * c), *layer(2 * c, mid), *layer(mid, channels, last=True))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.encoder(x))


def pca_dimension(features: torch.Tensor, level: float = 0.9) -> int:
    """Number of principal components of the rows of ``features [n, C]`` that explain ``level`` of the variance."""
    s = torch.linalg.svdvals(features.double() - features.double().mean(0))
    return explained_variance_rank(s**2, level)


@register("dfr", family="feature", paper="Unsupervised Anomaly Segmentation via Deep Feature Reconstruction",
          year=2021, bibkey="yang2021dfr", localizes=True, trains=True,
          quick=dict(image_size=128, region_size=8, epochs=10, lr=1e-3),
          deviations=("backbone: EfficientNet-Lite0 stages 1-5 (strides 2 to 16, 272 channels) instead of the "
                      "12 VGG19 layers relu1_1 .. relu4_4 of the authors' code",
                      "the training settings (Adam, lr 1e-4, batch 4, 150 epochs) and the latent size (PCA at 90 % "
                      "on the first ten images) are those of the authors' code, not checked against the paper's text",
                      "the equation labels D1-D3 are the library's, not the paper's numbering"))
class DFR(FeatureDetector):
    """1x1-convolution auto-encoder on multi-scale regional features; feature reconstruction error map."""

    predict_batch_size = 8  # the resized maps of 256 px images are large
    default_strides = (4, 8, 16)  # then widened to every stage up to the coarsest of them (see _build)

    region_size = Param(4, int, low=1, help="r: side of the r x r regions averaged into one vector (D1)")
    latent_dim = Param(None, int, low=1, none=True, help="c: the CAE's code size (None: by PCA, pca_level)")
    pca_level = Param(0.9, float, low=0, high=1, low_open=True,
                      help="share of variance that sets c when latent_dim is None")
    epochs = Param.epochs(150)
    batch_size = Param.batch_size(4)
    lr = Param.lr(1e-4)
    sigma = Param.sigma(0.0)
    image_size = Param.image_size(256)

    # the networks: a frozen extractor read at every stage up to stride 16, and the CAE once its sizes are known
    def _taps(self) -> list[str]:
        if self.layers:
            return list(self.layers)
        # every stage up to stride 16, as the paper reads every VGG19 layer up to relu4_4
        return [tap for tap, (_, s) in stages(self.backbone).items() if s <= max(self.default_strides)]

    def _build(self, shapes: dict) -> None:
        super()._build(shapes)
        if "latent_dim" in shapes:  # az.load: the CAE of the saved sizes
            self.net_ = FeatureCAE(shapes["channels"], shapes["latent_dim"])

    @torch.no_grad()
    def regional_features(self, x: torch.Tensor) -> torch.Tensor:
        """Eq. D1: ``[B, 3, H, W]`` -> ``[B, sum C_l, H / r, W / r]`` (resize to H x W, r x r average, concat)."""
        taps = self.extractor_(x)
        r = self.region_size
        parts = []
        for name in self.layers_:  # one layer at a time: the full-size maps are large
            f = F.interpolate(taps[name], size=x.shape[-2:], mode="bilinear", align_corners=True)
            parts.append(F.avg_pool2d(f, r, stride=r) if r > 1 else f)
        return torch.cat(parts, dim=1)

    def _step(self, feats: torch.Tensor, ctx) -> torch.Tensor:
        """Eq. D2: the mean squared error of the CAE's reconstruction of a batch of regional features."""
        return F.mse_loss(self.net_(feats), feats)

    def _fit(self, x: torch.Tensor) -> None:
        h, w = self.shapes_["input_hw"]
        if h % self.region_size or w % self.region_size:
            raise bad(self.name, "region_size", self.region_size, f"a divisor of the image size {h}x{w}")
        feats = extract(self.regional_features, x, self.predict_batch_size, self.device_)  # CPU, [N, C, h, w]
        channels = feats.shape[1]
        latent = self.latent_dim
        if latent is None:  # the PCA estimate of c, on the regions of the first ten images (authors' code)
            first = feats[:10].permute(0, 2, 3, 1).reshape(-1, channels)
            latent = pca_dimension(first, self.pca_level)
        self.shapes_.update(channels=int(channels), latent_dim=int(latent), grid=list(feats.shape[-2:]))
        self.net_ = FeatureCAE(channels, latent).to(self.device_)
        self._train(self._step, feats, module=self.net_)

    def _score(self, x: torch.Tensor):
        feats = self.regional_features(x)
        maps = (feats - self.net_(feats)).pow(2).mean(1)  # eq. D3
        maps = gaussian_blur(upsample(maps, x.shape[-2:]), self.sigma)
        return maps.flatten(1).amax(1), maps
