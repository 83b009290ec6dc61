"""The memory module of MemAE (Gong et al., ICCV 2019), written once for any method that needs it.

An encoder's output ``z`` is not passed to the decoder directly. It is used as a
*query* into a learned memory ``M`` of ``N`` items (rows ``m_i``, same size as ``z``), and
the decoder receives a combination of memory items instead (Gong et al. 2019, Sec. 3.3):

* addressing, eq. (4)-(5): ``w_i = softmax_i(d(z, m_i))`` with the cosine similarity
  ``d(z, m_i) = z m_i^T / (||z|| ||m_i||)`` (``similarity="cosine"``). The cosines lie in
  ``[-1, 1]`` before the exponential, so with ``N`` = 100 items no softmax weight can exceed
  ``e^2 / (e^2 + N - 1)`` ~ 0.07 and none falls below ``1 / (1 + (N - 1) e^2)`` ~ 0.0014: the
  weights are nearly flat, whatever the query. The shrinkage of eq. (7) at ``lambda = 1/N`` then
  keeps every above-average item, tens of them per query, never one or a handful
  (tests/test_reconstruction.py checks both). The authors' released code uses the plain dot
  product ``z m_i^T`` (``similarity="dot"``), whose scale the network learns, so that one item
  can take almost all the weight; that is what makes eq. (7) and (9) bite;
* read-out, eq. (3): ``z_hat = w M = sum_i w_i m_i``;
* hard shrinkage, eq. (7): ``w_hat_i = max(w_i - lambda, 0) * w_i / (|w_i - lambda| + eps)``
  (a differentiable form of "keep ``w_i`` if it exceeds ``lambda``, else 0"), followed by
  renormalisation ``w_hat / ||w_hat||_1``; the paper sets ``lambda`` in ``[1/N, 3/N]``;
* entropy loss, eq. (9): ``E(w_hat) = sum_i -w_hat_i log w_hat_i``, added to the
  reconstruction loss with weight ``alpha`` (0.0002 in the paper), pushes each query
  to use few items.

Because the memory is learned on normal data only, an anomalous query can only be
rebuilt from normal items: the reconstruction of an anomaly looks normal, and the
residual is large. A feature map ``[B, C, h, w]`` is ``h*w`` queries of size ``C``.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

EPS = 1e-12


def hard_shrink(w: torch.Tensor, threshold: float, eps: float = EPS) -> torch.Tensor:
    """Eq. (7) then the L1 renormalisation: weights below ``threshold`` become 0, the rest sum to 1."""
    shrunk = F.relu(w - threshold) * w / ((w - threshold).abs() + eps)
    return shrunk / shrunk.sum(-1, keepdim=True).clamp_min(eps)


def addressing_entropy(w: torch.Tensor) -> torch.Tensor:
    """Eq. (9): mean over queries of ``sum_i -w_i log w_i`` (``0 log 0 = 0``)."""
    return -(w * torch.log(w + EPS)).sum(-1).mean()


class Memory(nn.Module):
    """``n_items`` learned memory items of size ``dim``, addressed by attention (see the module docstring).

    ``threshold=None`` uses ``1 / n_items``, the lower end of the paper's range;
    ``similarity``: ``"dot"`` (the authors' code) or ``"cosine"`` (eq. 5 as printed).
    """

    def __init__(self, n_items: int, dim: int, threshold: float | None = None, similarity: str = "dot"):
        super().__init__()
        if similarity not in ("dot", "cosine"):
            raise ValueError(f"similarity must be 'dot' or 'cosine', got {similarity!r}")
        self.items = nn.Parameter(torch.empty(n_items, dim).uniform_(-1 / math.sqrt(dim), 1 / math.sqrt(dim)))
        self.threshold = 1.0 / n_items if threshold is None else float(threshold)
        self.similarity = similarity

    def address(self, z: torch.Tensor) -> torch.Tensor:
        """Addressing weights ``[Q, N]`` of queries ``z [Q, dim]``: softmax of the similarity, shrunk."""
        m = self.items
        if self.similarity == "cosine":
            z, m = F.normalize(z, dim=-1), F.normalize(m, dim=-1)
        w = torch.softmax(z @ m.T, dim=-1)
        return hard_shrink(w, self.threshold) if self.threshold > 0 else w

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``z [B, C, h, w]`` (or ``[B, C]``) -> (``z_hat`` of the same shape, weights ``[B*h*w, N]``)."""
        shape = z.shape
        q = z.flatten(2).transpose(1, 2).reshape(-1, shape[1]) if z.ndim == 4 else z
        w = self.address(q)
        out = w @ self.items
        if z.ndim == 4:
            out = out.view(shape[0], -1, shape[1]).transpose(1, 2).reshape(shape)
        return out, w
