"""What the deep-feature-modeling methods share: feature maps in, distances out.

Every method of this family (PaDiM, SPADE, PatchCore, DFM, DFR) reads a frozen,
pretrained CNN at a few stages ("taps", :mod:`anomaly_zoo.backbones`) and models the
normal features it sees there. The pieces below are written once:

* :func:`extract`: run a function of image batches over a whole set, batch by batch
  (memory stays bounded at 256 px), and concatenate on the CPU or the device;
* :func:`embed`: bring several taps to one grid and concatenate them (PaDiM, SPADE, PatchCore);
* :func:`pooled_head`: the globally pooled features the backbone's classifier sees (SPADE's
  image-level kNN);
* :func:`knn`: exact k-nearest neighbours by Euclidean distance, computed in chunks of
  queries so that the ``[queries, bank]`` distance matrix held at once has at most
  ``max(max_elements, len(bank))`` numbers (PatchCore, SPADE);
* :func:`one_thread_on_cpu`: run a long sequential loop (PatchCore's coreset) on one thread.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import contextmanager

import torch
import torch.nn.functional as F

from ...backbones import FeatureExtractor

#: the default budget of one chunk of the distance matrix: 2**24 float32 numbers = 64 MB
MAX_ELEMENTS = 2**24


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
