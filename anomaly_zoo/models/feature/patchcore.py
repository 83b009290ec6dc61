"""PatchCore: Towards Total Recall in Industrial Anomaly Detection (Roth et al., CVPR 2022).

A memory bank of *every* normal patch feature, thinned to a representative coreset;
a test patch is as anomalous as it is far from its nearest neighbour in the bank.

1. Locally aware patch features (Sec. 3.1, eqs. 1-3). Two mid-level stages j of a
   pretrained CNN (ResNet/WRN-50 ``layer2`` and ``layer3`` in the paper: not the first,
   too local, nor the last, too ImageNet-specific). Each position (h, w) is replaced by
   the average over its p x p neighbourhood N_p^(h,w) (eq. 1; f_agg = average pooling,
   eq. 2; p = 3, stride s = 1 of eq. 3); the deeper stage is upsampled (bilinear) to the
   finer one's grid and the two are concatenated. For EfficientNet-Lite0 the two
   mid-level taps at strides 8 and 16 are ``stage3`` and ``stage5`` (the paper's layers
   2 and 3 are at strides 8 and 16 too).
2. Memory bank M (eq. 4): the patch features of all training images.
3. Coreset (Sec. 3.2, eq. 5, Algorithm 1): greedy k-center selection of
   ``coreset_ratio * |M|`` patches, run on a random projection psi of the features to
   d* = 128 dimensions (Johnson-Lindenstrauss): start from a random patch, then add, one
   at a time, the patch farthest from the current selection. This approximately solves
   the minimax facility location of eq. 5 (greedy k-center is a 2-approximation of the
   optimal covering radius; Gonzalez 1985). See :func:`greedy_coreset` for how the loop
   is vectorised and what it costs.
4. Scoring (Sec. 3.3, eqs. 6-7): for each test patch the distance to its nearest bank
   patch. The image score takes the test patch m^test,* with the largest such distance
   s* (eq. 6) and re-weights it by how isolated its nearest bank patch m* is (eq. 7):

       s = (1 - exp||m^test,* - m*|| / sum_{m in N_b(m*)} exp||m^test,* - m||) * s*

   where N_b(m*) are the b nearest bank patches of m* (m* itself included). The map is
   the nearest-neighbour distance of every patch, upsampled (bilinear) to the image and
   smoothed with a Gaussian of sigma = 4.

Choices the paper leaves open: b = 9 (``num_neighbors``, as in anomalib's implementation);
the random projection is Gaussian; average pooling pads with zeros (the reference code's
unfold does too). Distances are exact and computed in chunks (``max_elements`` numbers of
the distance matrix at a time), so memory stays bounded whatever the bank size.
Simplification: images are resized to ``image_size`` (256) without the paper's centre crop
to 224. The quick preset feeds 224 px, the size the paper's network sees after its crop (at
128 px the stride-8 grid would be only 16 x 16 patches, coarser than the 32 x 32 grid of
PaDiM's quick preset), and thins the bank to 1 %, the paper's "PatchCore-1%" (its Table 1:
within a few tenths of a point of 10 % and 25 % on MVTec AD), so that the coreset takes
seconds on a CPU; the default keeps 10 %.
"""
from __future__ import annotations

import math
import time

import torch
import torch.nn.functional as F

from ...base import FeatureDetector
from ...ops import MAX_ELEMENTS, extract, gaussian_blur, knn, one_thread_on_cpu, upsample
from ...params import Param
from ...registry import register
from .common import embed


def random_projection(features: torch.Tensor, dim: int | None, seed: int = 0) -> torch.Tensor:
    """psi: a Gaussian random projection to ``dim`` dimensions (none if ``dim`` is None or >= d)."""
    d = features.shape[1]
    if not dim or dim >= d:
        return features
    g = torch.Generator().manual_seed(seed)
    proj = torch.randn(d, dim, generator=g, dtype=torch.float64) / math.sqrt(dim)
    return features @ proj.to(features.device, features.dtype)


@torch.no_grad()
def greedy_coreset(features: torch.Tensor, n: int, proj_dim: int | None = 128, seed: int = 0,
                   start: int | None = None) -> torch.Tensor:
    """Algorithm 1 of PatchCore: indices of ``n`` rows chosen by greedy k-center selection.

    ``M_C = {m_start}``; then ``n - 1`` times: add ``argmax_{m in M} min_{c in M_C} ||psi(m) - psi(c)||``,
    where psi is :func:`random_projection` to ``proj_dim`` dimensions. ``start`` is the first
    index (random, from ``seed``, when None).

    Vectorised: one step is one matrix-vector product and three passes over a vector of
    ``len(features)`` running minima, never a Python loop over candidates. Squared distances
    suffice (the square root changes neither a minimum nor an argmax). The cost is
    O(N n d*): quadratic in the bank size N at a fixed ratio, about 4-5 ms per step for the
    204,800 patches of the full preset on one CPU core (memory-bound: a second thread does
    not help, so the loop runs on one, see
    :func:`~anomaly_zoo.ops.one_thread_on_cpu`).

    Two designs were measured and rejected: (1) skipping, by the triangle inequality, the rows
    whose nearest centre a has ||c - a|| >= 2 min_d (Elkan 2003): on PatchCore features 15 to
    60 % of the rows still pass the bound at most steps, and gathering them costs more than
    the full product; (2) bfloat16/float16 storage: no faster on a CPU. Keeping the projected
    bank transposed ([d*, N]) made the product 3x faster than the row-major layout.
    """
    N = len(features)
    if N == 0 or n <= 0:
        return torch.zeros(0, dtype=torch.long, device=features.device)
    n = min(int(n), N)
    zt = random_projection(features.float(), proj_dim, seed).T.contiguous()  # psi(M), [d*, N]
    if start is None:
        start = int(torch.randint(N, (1,), generator=torch.Generator().manual_seed(seed + 1)))
    selected = torch.empty(n, dtype=torch.long)
    with one_thread_on_cpu(zt.device):
        _greedy_loop(zt, n, start, selected)
    return selected.to(features.device)


def _greedy_loop(zt: torch.Tensor, n: int, j: int, selected: torch.Tensor) -> None:
    """The steps of Algorithm 1 on the projected bank ``zt [d*, N]``, filling ``selected`` in place.

    The per-row vectors are allocated once and written with ``out=``: a fresh 1 MB tensor per
    operation and step would be returned to the system and page-faulted back at the next step.
    """
    z_sq = (zt * zt).sum(0)  # |psi(m)|^2
    min_d = torch.full_like(z_sq, float("inf"))  # squared distance of every row to the selection
    d = torch.empty_like(z_sq)
    for t in range(n):
        selected[t] = j
        c = zt[:, j].contiguous()  # the new centre (a strided vector would make the product 1.5x slower)
        torch.addmv(z_sq, zt.T, c, alpha=-2, out=d)  # |m|^2 - 2 m.c ...
        d.add_(z_sq[j])  # ... + |c|^2 = ||m - c||^2 for every row m
        torch.minimum(min_d, d, out=min_d)
        min_d[j] = float("-inf")  # never selected twice (rounding could leave a tiny positive value)
        j = int(min_d.argmax())


def reweight(s_star: torch.Tensor, neighbour_dists: torch.Tensor) -> torch.Tensor:
    """Eq. 7: ``(1 - exp(s*) / sum_b exp(d_b)) * s*`` for ``s* [B]`` and ``d [B, b]`` (the distances
    from m^test,* to the b bank patches N_b(m*)), computed stably with log-sum-exp."""
    w = 1 - torch.exp(s_star - torch.logsumexp(neighbour_dists, dim=1))
    return w * s_star


@register("patchcore", family="feature", paper="Towards Total Recall in Industrial Anomaly Detection", year=2022,
          bibkey="roth2022patchcore", localizes=True, trains=False,
          quick=dict(image_size=224, coreset_ratio=0.01),
          deviations=("backbone: EfficientNet-Lite0 taps stage3 + stage5 (strides 8 and 16, 152 channels) instead "
                      "of Wide-ResNet50-2 layer2 + layer3 (1536 channels)",
                      "images resized to image_size (256) without the paper's centre crop to 224",
                      "the paper leaves b of eq. 7 open: b = 9 here (anomalib's choice)"))
class PatchCore(FeatureDetector):
    """Coreset memory bank of locally aware patch features; nearest-neighbour distance map."""

    predict_batch_size = 16  # 256 px backbone activations stay well under a GB
    default_strides = (8, 16)  # the paper's layer2 + layer3: two mid-level taps

    patch_size = Param(3, int, low=1, help="p: the p x p neighbourhood averaged into each patch feature (eq. 1)")
    coreset_ratio = Param(0.1, float, low=0, high=1, low_open=True,
                          help="share of the memory bank kept by the greedy coreset (Algorithm 1)")
    proj_dim = Param(128, int, low=1, none=True,
                     help="d*: random projection used by the coreset search (None: the full features)")
    num_neighbors = Param(9, int, low=1, help="b: bank neighbours of m* in the re-weighting (eq. 7)")
    sigma = Param.sigma(4.0)
    image_size = Param.image_size(256)
    max_elements = Param(MAX_ELEMENTS, int, low=1, help="distance-matrix entries computed at once (memory bound)")

    @torch.no_grad()
    def patch_features(self, x: torch.Tensor) -> torch.Tensor:
        """Eqs. 1-3: ``[B, 3, H, W]`` -> locally aware patch features ``[B, C, h, w]``."""
        taps = self.extractor_(x)
        p = self.patch_size
        taps = {k: F.avg_pool2d(v, p, stride=1, padding=p // 2) if p > 1 else v for k, v in taps.items()}
        return embed(taps, self.layers_, mode="bilinear")

    # memory bank and coreset: eqs. 4-5, Algorithm 1
    def _fit(self, x: torch.Tensor) -> None:
        feats = extract(self.patch_features, x, self.predict_batch_size, self.device_, out_device=self.device_)
        self.shapes_["grid"] = list(feats.shape[-2:])
        bank = feats.permute(0, 2, 3, 1).reshape(-1, feats.shape[1])
        del feats
        n_total = len(bank)
        n = max(1, round(self.coreset_ratio * n_total))
        t0 = time.perf_counter()
        if n < n_total:
            bank = bank[greedy_coreset(bank, n, self.proj_dim, seed=self.seed)]
        self.diagnostics_.update(n_patches=int(n_total), coreset_size=int(len(bank)),
                                 coreset_seconds=round(time.perf_counter() - t0, 3))
        self.register_buffer("memory_bank_", bank.contiguous())

    def nearest(self, query: torch.Tensor, k: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        """Euclidean distances and indices of the k nearest bank patches of ``query [Q, C]`` (chunked)."""
        return knn(query, self.memory_bank_, k, max_elements=self.max_elements)

    # scoring: eqs. 6-7, upsampling and smoothing
    def _score(self, x: torch.Tensor):
        e = self.patch_features(x)
        b, c, h, w = e.shape
        q = e.permute(0, 2, 3, 1).reshape(b, h * w, c)
        dist, idx = self.nearest(q.reshape(-1, c))
        dist, idx = dist.view(b, h * w), idx.view(b, h * w)
        s_star, where = dist.max(dim=1)  # eq. 6
        rows = torch.arange(b, device=x.device)
        m_test = q[rows, where]  # m^test,*  [B, C]
        m_star = self.memory_bank_[idx[rows, where]]  # m*  [B, C]
        _, support = self.nearest(m_star, self.num_neighbors)  # N_b(m*)  [B, b]
        d_support = (m_test[:, None, :] - self.memory_bank_[support]).norm(dim=2)
        scores = reweight(s_star, d_support)  # eq. 7
        maps = gaussian_blur(upsample(dist.view(b, h, w), x.shape[-2:]), self.sigma)
        return scores, maps
