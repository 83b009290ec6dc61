"""NSA: natural synthetic anomalies (Schlueter, Tan, Hou & Kainz, ECCV 2022).

A network learns to *find* fake anomalies in normal images, and the fakes are made to look natural:
patches of other normal images, rescaled and moved, are blended in by Poisson image editing, so the
network cannot win by spotting sharp rectangle edges (CutPaste's giveaway). Each pixel's target says
how visible the change is, not merely whether it is inside a patch.

* Synthesis (Sec. 3.1): :func:`anomaly_zoo.synthesis.blend.nsa`, 1 to 4 patches per image from another
  training image, half-width ``(0.03 + Gamma(2, 0.05))`` of the side clipped to [0.03, 0.4], rescaled
  by ``clip(N(1, 0.5), 0.5, 2)``, Poisson-blended (Perez et al. 2003, eq. 7-8) at a random place
  (the authors' settings for textures).
* Targets (Sec. 3.2, "logistic"): :func:`anomaly_zoo.synthesis.blend.nsa_targets`,
  ``y = 1 / (1 + exp(-k (d - x0)))`` on the median-filtered mean absolute intensity change ``d``
  (0-255 units), zero where nothing visibly changed; k = 1/3, x0 = 7, the authors' values for textures.
* Network and loss (Sec. 3.3): an encoder-decoder of ResNet basic blocks trained from scratch
  (:class:`ResEncoderDecoder`; the paper: a ResNet-18 encoder with a decoder, also from scratch), one
  sigmoid output per pixel, binary cross-entropy against ``y``; Adam, lr 1e-3 cosine-annealed,
  batches of 64, 320 epochs.
* Map and score: the map is the network's output on the test image; the image score is the mean of
  the map (:func:`nsa_score`; the library did not find this stated in a text it could check, the card says so).

Measured with the quick preset (22 epochs) on brick, data seeds 0 / 1 / 2, one CPU thread, 20-21 s of
CPU per fit: image AUROC 0.674 / 0.653 / 0.607, pixel AUROC 0.906 / 0.899 / 0.773, AUPRO 0.670 / 0.571 /
0.517 (the mean training image: pixel AUROC 0.764 / 0.732 / 0.750, image AUROC 0.654 / 0.556 / 0.701).
The maps beat the mean image; the image score hardly does.

The training anomalies are not the test defects of ``az.data`` (different code, different shapes):
the network is graded on defects it never saw.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ...base import Detector
from ...params import Param, bad
from ...registry import register
from ...synthesis.blend import nsa, nsa_targets


class BasicBlock(nn.Module):
    """ResNet's basic block (He et al. 2016): two 3x3 conv-BN, ReLU, identity or 1x1 projection shortcut."""

    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout),
                                  nn.ReLU(inplace=True), nn.Conv2d(cout, cout, 3, 1, 1, bias=False),
                                  nn.BatchNorm2d(cout))
        self.skip = (nn.Identity() if stride == 1 and cin == cout else
                     nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)))

    def forward(self, x):
        return F.relu(self.body(x) + self.skip(x))


def _stage(cin: int, cout: int, blocks: int, stride: int) -> nn.Sequential:
    return nn.Sequential(BasicBlock(cin, cout, stride), *[BasicBlock(cout, cout) for _ in range(blocks - 1)])


class ResEncoderDecoder(nn.Module):
    """ResNet-18-shaped encoder (``stages`` stages of ``blocks`` basic blocks, channels doubling from
    ``width``, each after the first halving the resolution) and a mirrored decoder (bilinear x2, the
    encoder's map of that size added, a stage of basic blocks); a 1x1 convolution gives one logit per pixel."""

    def __init__(self, width: int = 64, blocks: int = 2, stages: int = 4):
        super().__init__()
        chans = [width * 2**i for i in range(stages)]
        self.stem = nn.Sequential(nn.Conv2d(3, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True))
        self.enc = nn.ModuleList([_stage(chans[max(i - 1, 0)], c, blocks, 1 if i == 0 else 2)
                                  for i, c in enumerate(chans)])
        self.dec = nn.ModuleList([_stage(chans[i + 1], chans[i], blocks, 1) for i in reversed(range(stages - 1))])
        self.head = nn.Conv2d(width, 1, 1)

    def forward(self, x):
        x = self.stem(x)
        feats = []
        for stage in self.enc:
            x = stage(x)
            feats.append(x)
        for stage, skip in zip(self.dec, feats[-2::-1]):
            x = stage(F.interpolate(x, size=skip.shape[-2:], mode="bilinear", align_corners=False))
            x = x + skip
        return self.head(x)[:, 0]


def nsa_score(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(scores [B], maps [B, H, W])``: the map is the network's sigmoid output, the score its mean."""
    maps = torch.sigmoid(logits.float())
    return maps.flatten(1).mean(1), maps


@register("nsa", family="ssl", paper="Natural Synthetic Anomalies for Self-Supervised Anomaly Detection and "
          "Localization", year=2022, bibkey="schlueter2022nsa", localizes=True, trains=True,
          quick=dict(image_size=64, width=8, blocks=1, epochs=22, batch_size=16),
          deviations=("network: an encoder-decoder of ResNet basic blocks (ResNet-18's 2 blocks per stage, 4 "
                      "stages) with additive skips and a 3x3 stem without the 7x7 stride-2 stem and max pool, "
                      "trained from scratch as in the paper; not the authors' exact decoder",
                      "no skip-background object masks (textures need none) and no random flips or crops of the "
                      "training images",
                      "the cosine schedule anneals to 0, not to 1e-6",
                      "Poisson blending solved exactly on each rectangle (discrete sine transform) instead of "
                      "OpenCV's seamlessClone, which also keeps the rectangle's border",
                      "image score: the mean of the output map, which the library could not check against the "
                      "paper's text",
                      "quick preset: 64 px images, width 8, one block per stage, 22 epochs in batches of 16"))
class NSA(Detector):
    """NSA: a network localises Poisson-blended patches of other normal images; map = its output."""

    n_patches = Param(4, int, low=1, help="most patches per image (the first always, each further one with p 1/2)")
    half_width = Param((0.03, 0.4), tuple, item=float, help="(min, max) patch half-width, fraction of the side")
    resize = Param((0.5, 2.0), tuple, item=float, help="(min, max) rescaling of a patch (textures: 0.5-2)")
    logistic_k = Param(1 / 3, float, low=0, low_open=True, help="k of the logistic target, per 0-255 unit")
    logistic_x0 = Param(7.0, float, low=0, help="x0 of the logistic target, 0-255 units")
    width = Param(64, int, low=1, help="channels of the first stage (64, as ResNet-18)")
    blocks = Param(2, int, low=1, help="basic blocks per stage (2, as ResNet-18)")
    stages = Param(4, int, low=1, high=6, help="stages; all but the first halve the resolution")
    image_size = Param.image_size(256)
    epochs = Param.epochs(320)
    batch_size = Param.batch_size(64)
    lr = Param.lr(1e-3)
    weight_decay = Param.weight_decay(0.0)

    def _check_params(self) -> None:
        for key in ("half_width", "resize"):
            lo_hi = getattr(self, key)
            if len(lo_hi) != 2 or not 0 < lo_hi[0] <= lo_hi[1]:
                raise bad(self.name, key, lo_hi, "(min, max) with 0 < min <= max")
        if self.half_width[1] >= 0.5:
            raise bad(self.name, "half_width", self.half_width, "a max half-width below 0.5 of the side")

    def _build(self, shapes: dict) -> None:
        self.net_ = ResEncoderDecoder(self.width, self.blocks, self.stages)

    def synthesize(self, x: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """``(anomalous images, per-pixel targets)`` for a batch of normal images (for figures and training)."""
        x_bad, region = nsa(x, generator, n_patches=self.n_patches, half_width=tuple(self.half_width),
                            resize=tuple(self.resize))
        return x_bad, nsa_targets(x, x_bad, region, self.logistic_k, self.logistic_x0)

    def _step(self, x: torch.Tensor, ctx) -> torch.Tensor:
        x_bad, y = self.synthesize(x, ctx.generator)
        return F.binary_cross_entropy_with_logits(self.net_(x_bad).float(), y)

    def _fit(self, x: torch.Tensor) -> None:
        self._train(self._step, x, schedule="cosine")

    def _score(self, x: torch.Tensor):
        return nsa_score(self.net_(x))
