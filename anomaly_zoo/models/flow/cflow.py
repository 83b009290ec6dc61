"""CFLOW-AD: Real-Time Unsupervised Anomaly Detection with Localization via Conditional
Normalizing Flows (Gudovskiy, Ishizaka and Kozuka, WACV 2022).

A frozen CNN encoder is read at L = 3 scales; at every scale, every position's feature vector
("fiber") z_i in R^C is a sample of one density, and a *conditional* normalizing flow g_l models
it, conditioned on a positional encoding c_i of where the fiber sits (Sec. 4.2):

1. Positional encoding (Sec. 4.2, the 2-D sinusoidal encoding of the official
   ``positionalencoding2d``): P = 128 channels, the first half sin/cos of the column, the second
   half sin/cos of the row, frequencies 1 / 10000^(2k / (P/2)).
2. Decoder (Sec. 4.2, Fig. 2; official ``conditional_flow_model``): 8 FrEIA ``AllInOneBlock``s per
   scale, each an affine coupling whose subnet (Linear(c, 2c) -> ReLU -> Linear(2c, C); c = input
   + P) also reads c_i, soft clamp ``1.9 tanh`` (``clamp_alpha = 1.9``), a softplus global affine and a
   random rotation (``permute_soft=True``); see :mod:`.coupling`.
3. Likelihood and loss (Sec. 4.1-4.2, eqs. 3-7 of the paper: change of variables with a standard
   normal base): log p(z_i | c_i) = -C/2 log 2 pi - 1/2 ||u_i||^2 + log |det J|, u_i = g^-1(z_i, c_i).
   The official code trains on the likelihood per dimension through a log-sigmoid,
   loss = -log sigmoid(log p / C), averaged over a random batch of N = 256 fibers; the library does
   the same (the paper's text writes the plain negative log-likelihood).
4. Anomaly map (Sec. 4.3): per scale, the per-dimension log-likelihood is shifted by its maximum,
   exponentiated to a probability in (0, 1], upsampled (bilinear) to the input and summed over
   scales; anomaly = max - sum. The image score is the maximum of the map (the official code).

Differences (also on the model card): EfficientNet-Lite0 taps at strides 8, 16, 32 (stage3,
stage5, stage7; 40, 112, 320 channels) replace WRN50-2 layers 2-4 (the official L = 3 choice);
fibers are shuffled over all training images rather than within one image batch; the maximum
that normalises each scale is the maximum over the *training* fibers (the official code takes
it over the whole test set, which makes one image's score depend on the others); no learning-rate
warm-up (cosine decay only); images are resized to ``image_size`` without a centre crop.

Measured (quick preset, brick, data seeds 0 / 1 / 2, CPU): image AUROC 0.883 / 0.793 / 0.875,
pixel AUROC 0.981 / 0.966 / 0.957, AUPRO 0.870 / 0.758 / 0.867; random backbone (seed 0): 0.671,
0.806, 0.472. The localisation is good but the image score falls short of the issue's 0.95 (and
AUPRO of 0.85 on seed 1). The reason is in item 4: exp(per-dimension log-likelihood - max)
saturates, since a drop of a few nats per dimension already gives a probability near 0, so many
normal positions reach almost the same anomaly value as a defect, and the *maximum* of the map
separates images poorly (the chapter shows the saturated maps). Finer taps (strides 4, 8, 16)
localised no better and scored images worse (0.717); this is the method as published, on a
small backbone and a short CPU schedule.
On grass (seeds 0 / 1 / 2) the map is weak: AUPRO 0.410 / 0.449 / 0.467 against the issue's 0.70,
pixel AUROC 0.700 / 0.791 / 0.708 (grass varies at every position, the saturated map with it).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ...base import FeatureDetector
from ...ops import one_thread_on_cpu, upsample
from ...params import Param, bad
from ...registry import register
from .common import extract_taps
from .coupling import all_in_one_flow, mlp


def positional_encoding_2d(dim: int, h: int, w: int) -> torch.Tensor:
    """CFLOW's 2-D sinusoidal encoding ``[dim, h, w]`` (``dim`` a multiple of 4): channels
    ``0:dim/2`` alternate sin/cos of the column index, ``dim/2:`` sin/cos of the row index."""
    half = dim // 2
    freq = torch.exp(torch.arange(0, half, 2, dtype=torch.float32) * -(math.log(10000.0) / half))  # [dim/4]
    col = torch.arange(w, dtype=torch.float32)[:, None] * freq  # [w, dim/4]
    row = torch.arange(h, dtype=torch.float32)[:, None] * freq  # [h, dim/4]
    pe = torch.zeros(dim, h, w)
    pe[0:half:2] = torch.sin(col).t()[:, None, :].expand(-1, h, -1)
    pe[1:half:2] = torch.cos(col).t()[:, None, :].expand(-1, h, -1)
    pe[half::2] = torch.sin(row).t()[:, :, None].expand(-1, -1, w)
    pe[half + 1 :: 2] = torch.cos(row).t()[:, :, None].expand(-1, -1, w)
    return pe


def log_likelihood(u: torch.Tensor, logdet: torch.Tensor) -> torch.Tensor:
    """log p(z | c) per fiber: -C/2 log 2 pi - ||u||^2 / 2 + log |det J| (the change of variables)."""
    c = u.shape[1]
    return -0.5 * c * math.log(2 * math.pi) - 0.5 * u.pow(2).sum(1) + logdet


@register("cflow", family="flow", paper="CFLOW-AD: Real-Time Unsupervised Anomaly Detection with Localization "
          "via Conditional Normalizing Flows", year=2022, bibkey="gudovskiy2022cflow", localizes=True, trains=True,
          quick=dict(image_size=128, epochs=12, coupling_blocks=4, batch_size=1024, lr=4e-4),
          deviations=("backbone: EfficientNet-Lite0 taps at strides 8, 16, 32 (stage3/5/7: 40, 112, 320 channels) "
                      "instead of WRN50-2 layers 2-4",
                      "fibers are shuffled over all training images (official: within each image batch)",
                      "each scale's likelihood is normalised by its maximum over the training fibers, not over "
                      "the test set, so one image's score never depends on the other test images",
                      "cosine learning-rate decay without the official 2-epoch warm-up",
                      "images resized to image_size without a centre crop",
                      "quick preset: 128 px, 4 coupling blocks, 12 epochs of 1024-fiber batches at lr 4e-4 (fewer, larger "
                      "steps: a CPU runs them faster)"))
class CFlow(FeatureDetector):
    """Conditional flows on pretrained feature fibers, one per scale; likelihood map."""

    default_strides = (8, 16, 32)
    coupling_blocks = Param(8, int, low=1, high=64, help="AllInOneBlocks per scale (official: 8)")
    clamp = Param(1.9, float, low=0, low_open=True, high=20, help="soft clamp of the log-scale, a tanh(s) (1.9)")
    condition_dim = Param(128, int, low=4, high=1024, help="positional-encoding channels P, a multiple of 4 (128)")
    epochs = Param.epochs(200)  # official: 25 meta-epochs x 8 sub-epochs
    batch_size = Param(256, int, low=2, help="fibers N per step (Sec. 4.2: 256)")
    lr = Param.lr(2e-4)
    image_size = Param.image_size(256, low=32)
    predict_batch_size = 16

    def _check_params(self) -> None:
        super()._check_params()
        if self.condition_dim % 4:
            raise bad(self.name, "condition_dim", self.condition_dim, "a multiple of 4 from 4 to 1024")

    def _build(self, shapes: dict) -> None:
        super()._build(shapes)
        self.flows_ = nn.ModuleList(
            all_in_one_flow(self.extractor_.channels[name], self.coupling_blocks, mlp(factor=2), self.clamp,
                            cond_channels=self.condition_dim, soft_permutation=True, seed=1000 * i)
            for i, name in enumerate(self.layers_))
        self.register_buffer("logp_max_", torch.zeros(len(self.layers_)))

    def _fibers_logp(self, flow: nn.Module, feat: torch.Tensor) -> torch.Tensor:
        """Per-dimension log-likelihood of every fiber of ``feat`` [B, C, h, w] -> [B, h, w]."""
        b, c, h, w = feat.shape
        pe = positional_encoding_2d(self.condition_dim, h, w).to(feat.device)
        fibers = feat.permute(0, 2, 3, 1).reshape(-1, c)
        cond = pe.permute(1, 2, 0).reshape(1, h * w, -1).expand(b, -1, -1).reshape(-1, self.condition_dim)
        u, logdet = flow(fibers, cond)
        return (log_likelihood(u, logdet) / c).view(b, h, w)

    def _fit(self, x: torch.Tensor) -> None:
        feats = extract_taps(self.extractor_, self.layers_, x, self.predict_batch_size, self.device_)
        self.shapes_["grids"] = {name: list(f.shape[-2:]) for name, f in feats.items()}
        for i, name in enumerate(self.layers_):
            f = feats[name]
            n, c, h, w = f.shape
            fibers = f.permute(0, 2, 3, 1).reshape(-1, c)
            where = torch.arange(h * w).repeat(n)  # each fiber's position, for its condition c_i
            pe = positional_encoding_2d(self.condition_dim, h, w).flatten(1).t().to(self.device_)  # [h*w, P]
            flow = self.flows_[i]

            def step(batch, ctx, flow=flow, pe=pe, c=c):
                z, pos = batch
                u, logdet = flow(z, pe[pos])
                return -F.logsigmoid(log_likelihood(u, logdet) / c).mean()  # official loss (item 3)

            with one_thread_on_cpu(self.device_):  # many small ops: see fastflow.py
                self._train(step, (fibers, where), module=flow, key=f"loss_{name}", schedule="cosine")
            with torch.no_grad():  # the training maximum that normalises this scale's map (item 4)
                logp = torch.cat([self._fibers_logp(flow, f[j : j + 8].to(self.device_)).flatten()
                                  for j in range(0, n, 8)])
                self.logp_max_[i] = logp.max()

    def _score(self, x: torch.Tensor):
        feats = self.extractor_(x)
        total = 0.0
        for i, name in enumerate(self.layers_):
            logp = self._fibers_logp(self.flows_[i], feats[name].float())
            total = total + upsample(torch.exp(logp - self.logp_max_[i]), x.shape[-2:])
        maps = len(self.layers_) - total  # max - sum: each term is at most ~1 on normal data
        return maps.flatten(1).amax(1), maps
