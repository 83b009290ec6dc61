"""Tensor operations that several methods and families share, written once, here.

* smoothing and resizing of maps: :func:`gaussian_kernel1d`, :func:`gaussian_kernel2d`,
  :func:`gaussian_blur`, :func:`upsample`;
* patches and windows: :func:`window_mean` (patch scores -> pixel maps, each pixel the mean
  of the windows that cover it: Patch SVDD, region-wise MS-SSIM, any sliding-window score);
* neighbours: :func:`sq_dists`, :func:`knn` (exact, memory-bounded chunks: PatchCore, SPADE,
  Patch SVDD, ...);
* batched extraction without autograd: :func:`extract`; long sequential CPU loops on one
  thread: :func:`one_thread_on_cpu`;
* linear algebra: :func:`explained_variance_rank` (how many principal components explain a
  share of the variance: DFM, DFR).
"""
from __future__ import annotations

import math
from collections.abc import Callable
from contextlib import contextmanager

import torch
import torch.nn.functional as F

#: the default budget of one chunk of a distance matrix: 2**24 float32 numbers = 64 MB
MAX_ELEMENTS = 2**24
#: Rec. 601 luma weights of R, G, B: the one grey level of the library
LUMA = (0.299, 0.587, 0.114)


def luma(x: torch.Tensor) -> torch.Tensor:
    """Grey level of RGB images, channels at dim -3: ``[..., 3, H, W] -> [..., 1, H, W]``."""
    return (x * x.new_tensor(LUMA).view(3, 1, 1)).sum(-3, keepdim=True)


def gaussian_kernel1d(sigma: float, truncate: float = 4.0, device=None, dtype=torch.float32) -> torch.Tensor:
    """Normalised 1-D Gaussian, radius ``ceil(truncate * sigma)`` (scipy's ``gaussian_filter`` default)."""
    radius = max(1, int(math.ceil(truncate * sigma)))
    t = torch.arange(-radius, radius + 1, device=device, dtype=dtype)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    return k / k.sum()


def gaussian_blur(maps: torch.Tensor, sigma: float, truncate: float = 4.0) -> torch.Tensor:
    """Separable Gaussian smoothing of ``[N, H, W]`` (or ``[N, C, H, W]``) maps, reflect padding.

    Matches ``scipy.ndimage.gaussian_filter(mode="reflect")`` up to float error
    when the map is larger than the kernel radius.
    """
    if sigma <= 0:
        return maps
    squeeze = maps.ndim == 3
    x = maps[:, None] if squeeze else maps
    n, c, h, w = x.shape
    k = gaussian_kernel1d(sigma, truncate, x.device, x.dtype)
    r = len(k) // 2
    x = x.reshape(n * c, 1, h, w)
    # scipy's "reflect" is torch's "symmetric"; torch only has "reflect" (= scipy "mirror"),
    # which differs by one pixel at the border: close enough for anomaly maps, and exact inside.
    mode = "reflect" if r < min(h, w) else "replicate"
    x = F.conv2d(F.pad(x, (r, r, 0, 0), mode=mode), k.view(1, 1, 1, -1))
    x = F.conv2d(F.pad(x, (0, 0, r, r), mode=mode), k.view(1, 1, -1, 1))
    x = x.reshape(n, c, h, w)
    return x[:, 0] if squeeze else x


def upsample(maps: torch.Tensor, size) -> torch.Tensor:
    """Bilinear upsampling of ``[N, h, w]`` maps to ``size`` (int or (H, W))."""
    hw = (size, size) if isinstance(size, int) else tuple(size)
    return F.interpolate(maps[:, None], size=hw, mode="bilinear", align_corners=False)[:, 0]


def gaussian_kernel2d(size: int, std: float) -> torch.Tensor:
    """The 2-D Gaussian ``[size, size]`` centred on the middle of the window, normalised to sum 1."""
    t = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-0.5 * (t / std) ** 2)
    k = g[:, None] * g[None, :]
    return (k / k.sum()).float()


def window_mean(scores: torch.Tensor, size, k: int, stride: int) -> torch.Tensor:
    """Window scores ``[B, gh, gw]`` (window (i, j) covers ``k x k`` pixels from ``(i*stride, j*stride)``)
    -> pixel maps ``[B, H, W]`` (``size = (H, W)``): each pixel gets the mean score of the windows
    that cover it; pixels no window reaches (right/bottom border) take the nearest covered value."""
    ones = torch.ones(1, 1, k, k, device=scores.device, dtype=scores.dtype)
    total = F.conv_transpose2d(scores[:, None], ones, stride=stride)
    count = F.conv_transpose2d(torch.ones_like(scores[:1, None]), ones, stride=stride)
    m = total / count.clamp_min(1)
    h, w = size
    covered_h, covered_w = min(h, m.shape[-2]), min(w, m.shape[-1])
    m = m[..., :covered_h, :covered_w]
    return F.pad(m, (0, w - covered_w, 0, h - covered_h), mode="replicate")[:, 0]


def explained_variance_rank(variances: torch.Tensor, level: float) -> int:
    """Smallest k whose first k (descending) variances explain at least ``level`` of the total;
    ``level >= 1`` is read as the number of components itself."""
    if level >= 1:
        return int(min(int(level), len(variances)))
    ratio = torch.cumsum(variances, 0) / variances.sum()
    return int(min(int((ratio < level).sum()) + 1, len(variances)))


@contextmanager
def one_thread_on_cpu(device):
    """Run a loop of many small tensor operations on one CPU thread (restored afterwards).

    A sequential loop such as the greedy coreset does thousands of memory-bound steps: a
    second OpenMP thread gains nothing (measured on 2 quiet cores: 7.6 vs 7.7 ms per step
    for 204,800 patches), and when the cores are shared every step's synchronisation makes
    it several times slower (7x measured on a busy 2-core VM). GPUs are left alone.
    """
    if torch.device(device).type != "cpu":
        yield
        return
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def extract(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, batch_size: int, device,
            out_device="cpu") -> torch.Tensor:
    """``torch.cat([fn(batch) for batch in x])`` without autograd, batches moved to ``device``."""
    parts = []
    with torch.no_grad():
        for i in range(0, len(x), batch_size):
            parts.append(fn(x[i : i + batch_size].to(device)).to(out_device))
    return torch.cat(parts)


def sq_dists(x: torch.Tensor, y: torch.Tensor, y_sq: torch.Tensor | None = None) -> torch.Tensor:
    """Squared Euclidean distances ``[len(x), len(y)]`` by ``|x|^2 - 2 x.y + |y|^2`` (one matmul), >= 0."""
    y_sq = (y * y).sum(1) if y_sq is None else y_sq
    d = torch.addmm(y_sq[None, :], x, y.T, alpha=-2.0)
    d += (x * x).sum(1, keepdim=True)
    return d.clamp_min_(0)


def knn(query: torch.Tensor, bank: torch.Tensor, k: int = 1, *, squared: bool = False,
        max_elements: int = MAX_ELEMENTS, bank_sq: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` nearest rows of ``bank`` for each row of ``query``: ``(distances [Q, k], indices [Q, k])``.

    Exact (brute force), ascending, Euclidean (``squared=True``: squared Euclidean). The
    queries are processed in chunks of ``max(1, max_elements // len(bank))`` rows, so the
    distance matrix held at any time has at most ``max(max_elements, len(bank))`` entries;
    the answer does not depend on the chunk size.
    """
    if query.ndim != 2 or bank.ndim != 2 or query.shape[1] != bank.shape[1]:
        raise ValueError(f"knn needs [Q, d] queries and a [M, d] bank, got {tuple(query.shape)} and {tuple(bank.shape)}")
    k = min(k, len(bank))
    bank_sq = (bank * bank).sum(1) if bank_sq is None else bank_sq
    rows = max(1, int(max_elements) // max(1, len(bank)))
    dists, idx = [], []
    for i in range(0, len(query), rows):
        d = sq_dists(query[i : i + rows], bank, bank_sq)
        if k == 1:
            v, j = d.min(dim=1, keepdim=True)
        else:
            v, j = d.topk(k, dim=1, largest=False, sorted=True)
        dists.append(v)
        idx.append(j)
    dist = torch.cat(dists) if dists else query.new_zeros(0, k)
    index = torch.cat(idx) if idx else torch.zeros(0, k, dtype=torch.long, device=query.device)
    return (dist if squared else dist.sqrt()), index
