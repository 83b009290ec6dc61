"""The building blocks of every flow in this family, written once: affine coupling with soft
clamping, fixed permutations, a learned global affine ("ActNorm"), conditional coupling and the
log-determinant bookkeeping.

A normalizing flow is an invertible map ``f`` from data ``x`` to a latent ``z = f(x)`` whose
density is a standard normal. The change of variables gives the exact likelihood::

    log p_X(x) = log p_Z(f(x)) + log |det J_f(x)|                                    (1)
               = -1/2 ||z||^2 - D/2 log(2 pi) + sum_k log |det J_k|

where ``f = f_K o ... o f_1`` and ``J_k`` is the Jacobian of block ``k`` at its input. Every block
here returns its output *and* its ``log |det J_k|`` per sample, so (1) is a sum, never a
determinant of a D x D matrix.

The affine coupling layer (Real NVP, Dinh et al. 2017) splits the channels into ``x1, x2``,
keeps ``x1`` and transforms ``x2`` with a scale and a shift that a free network (the "subnet")
computes from ``x1`` (and from a condition ``c`` in a *conditional* coupling, CFLOW)::

    y1 = x1,   y2 = x2 * exp(s(x1, c)) + t(x1, c),   log |det J| = sum s(x1, c)           (2)

Its Jacobian is triangular, so the log-determinant is the sum of the log-scales; its inverse is
``x2 = (y2 - t) * exp(-s)`` with the same subnet, which never has to be inverted. Two details
from the papers' code keep training stable:

* soft clamping of the log-scale (DifferNet eq. 2, CS-Flow eq. 4): ``s -> 0.636 a atan(s / a)``,
  so ``|s| < a``; the official DifferNet and CS-Flow code use ``a = 3`` and the constant 0.636
  (~2/pi). FrEIA's ``AllInOneBlock`` (used by the CFLOW-AD and FastFlow code) clamps with
  ``a tanh(s)`` after scaling the subnet output by 0.1 (CFLOW: a = 1.9, FastFlow: a = 2).
* a fixed random permutation (or a random rotation, FrEIA's ``permute_soft``) between couplings,
  so that every channel is transformed by some block; its ``|det|`` is 1, so it adds nothing to (1).

Blocks act on dimension 1 of tensors of any rank: ``[B, C]`` vectors (DifferNet, CFLOW) or
``[B, C, H, W]`` maps (FastFlow, CS-Flow); the log-determinant sums over every other dimension.
"""
from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

#: the constant of the soft clamp in the official DifferNet and CS-Flow code (~2/pi)
ATAN_FACTOR = 0.636


def soft_clamp(s: torch.Tensor, clamp: float, kind: str = "atan") -> torch.Tensor:
    """Bound a raw log-scale to ``(-clamp, clamp)`` smoothly: ``"atan"`` as DifferNet/CS-Flow,
    ``"tanh"`` as FrEIA's AllInOneBlock (CFLOW, FastFlow). ``clamp <= 0``: no clamping."""
    if clamp <= 0:
        return s
    if kind == "atan":
        return clamp * ATAN_FACTOR * torch.atan(s / clamp)
    return clamp * torch.tanh(s)


def _sum_but_batch(x: torch.Tensor) -> torch.Tensor:
    return x.flatten(1).sum(1)


def affine(x: torch.Tensor, log_s: torch.Tensor, t: torch.Tensor, inverse: bool = False):
    """Eq. (2) on one half: ``(x * exp(log_s) + t, sum log_s)`` forward, ``((x - t) * exp(-log_s),
    -sum log_s)`` backward. ``log_s`` is already clamped."""
    if inverse:
        return (x - t) * torch.exp(-log_s), -_sum_but_batch(log_s)
    return x * torch.exp(log_s) + t, _sum_but_batch(log_s)


def _split(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    c1 = x.shape[1] // 2
    return x[:, :c1], x[:, c1:]


def _cat(*parts: torch.Tensor | None) -> torch.Tensor:
    return torch.cat([p for p in parts if p is not None], dim=1)


class AffineCoupling(nn.Module):
    """Affine coupling, eq. (2), optionally conditional and optionally two-sided.

    ``subnet(c_in, c_out)`` builds the free network; it reads ``x1`` (plus ``cond_channels`` of a
    condition, concatenated on dimension 1) and outputs ``2 * len(x2)`` channels (log-scale, shift).
    ``two_sided=True`` is GLOW's coupling as FrEIA's ``glow_coupling_layer`` writes it (DifferNet):
    a second coupling then transforms ``x1`` from the new ``y2``, so one block moves every channel.
    ``out_scale`` multiplies the subnet output before the clamp (FrEIA's AllInOneBlock: 0.1).
    """

    def __init__(self, channels: int, subnet: Callable[[int, int], nn.Module], clamp: float = 3.0,
                 clamp_kind: str = "atan", cond_channels: int = 0, two_sided: bool = False,
                 out_scale: float = 1.0):
        super().__init__()
        self.c1, self.c2 = channels // 2, channels - channels // 2
        self.clamp, self.clamp_kind, self.out_scale, self.two_sided = clamp, clamp_kind, out_scale, two_sided
        self.net2 = subnet(self.c1 + cond_channels, 2 * self.c2)  # x1 -> (s, t) for x2
        self.net1 = subnet(self.c2 + cond_channels, 2 * self.c1) if two_sided else None  # y2 -> (s, t) for x1

    def _st(self, net: nn.Module, x: torch.Tensor, cond: torch.Tensor | None):
        a = net(_cat(x, cond)) * self.out_scale
        s, t = a.chunk(2, dim=1)
        return soft_clamp(s, self.clamp, self.clamp_kind), t

    def forward(self, x: torch.Tensor, cond: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        x1, x2 = _split(x)
        y2, logdet = affine(x2, *self._st(self.net2, x1, cond))
        if self.two_sided:
            x1, ld = affine(x1, *self._st(self.net1, y2, cond))
            logdet = logdet + ld
        return torch.cat([x1, y2], dim=1), logdet

    def inverse(self, y: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        y1, y2 = _split(y)
        if self.two_sided:
            y1, _ = affine(y1, *self._st(self.net1, y2, cond), inverse=True)
        x2, _ = affine(y2, *self._st(self.net2, y1, cond), inverse=True)
        return torch.cat([y1, x2], dim=1)


class Permutation(nn.Module):
    """A fixed channel mixing drawn once from ``seed``: a permutation (``soft=False``) or a random
    rotation, an orthogonal matrix with determinant +1 (``soft=True``, FrEIA's ``permute_soft``).
    ``|det| = 1``: it adds nothing to the log-determinant. (A rotation stored in float32 is
    orthogonal only to ~1e-7; the inverse is computed from the stored matrix and its ``log |det|`` kept,
    so that the bookkeeping stays exact to float tolerance: a correction of order 1e-8.)"""

    def __init__(self, channels: int, seed: int, soft: bool = False):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        if soft:
            q, r = torch.linalg.qr(torch.randn(channels, channels, generator=g, dtype=torch.float64))
            q = q * torch.sign(torch.diagonal(r))  # a uniformly random orthogonal matrix
            if torch.linalg.det(q) < 0:
                q[:, 0] = -q[:, 0]
            w = q.float()
        else:
            w = torch.eye(channels)[torch.randperm(channels, generator=g)]
        exact = w.double()
        self.register_buffer("weight", w)  # y[:, i] = sum_j w[i, j] x[:, j]
        self.register_buffer("logabsdet", torch.linalg.slogdet(exact)[1].float())

    @staticmethod
    def _mix(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return torch.einsum("ij,bj...->bi...", w, x)

    def forward(self, x: torch.Tensor, cond: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        positions = x[0, 0].numel()
        return self._mix(x, self.weight), (positions * self.logabsdet).expand(len(x))

    def inverse(self, y: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        return self._mix(y, torch.linalg.inv(self.weight))  # in the working precision


class GlobalAffine(nn.Module):
    """A learned per-channel scale and offset (ActNorm), as FrEIA's AllInOneBlock has it with
    ``global_affine_type="SOFTPLUS"``: scale = 0.1 softplus(g; beta = 0.5), initialised to 1.
    ``log |det J| = (number of positions) * sum_c log scale_c``."""

    def __init__(self, channels: int):
        super().__init__()
        init = 2.0 * math.log(math.exp(0.5 * 10.0) - 1.0)  # 0.1 * softplus(init, beta=0.5) == 1
        self.g = nn.Parameter(torch.full((channels,), init))
        self.offset = nn.Parameter(torch.zeros(channels))

    def _shape(self, v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return v.view(1, -1, *([1] * (x.ndim - 2)))

    def scale(self) -> torch.Tensor:
        return 0.1 * F.softplus(self.g, beta=0.5)

    def forward(self, x: torch.Tensor, cond: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        s = self.scale()
        positions = x[0, 0].numel()
        logdet = positions * torch.log(s).sum()
        return x * self._shape(s, x) + self._shape(self.offset, x), logdet.expand(len(x))

    def inverse(self, y: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        return (y - self._shape(self.offset, y)) / self._shape(self.scale(), y)


class SequenceFlow(nn.Module):
    """Blocks in a row; the log-determinants add up (the sum in eq. 1). ``cond`` reaches every block."""

    def __init__(self, blocks: list[nn.Module]):
        super().__init__()
        self.blocks = nn.ModuleList(blocks)

    def forward(self, x: torch.Tensor, cond: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        logdet = x.new_zeros(len(x))
        for block in self.blocks:
            x, ld = block(x, cond)
            logdet = logdet + ld
        return x, logdet

    def inverse(self, z: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        for block in reversed(self.blocks):
            z = block.inverse(z, cond)
        return z


def all_in_one_flow(channels: int, blocks: int, subnet: Callable[[int, int], nn.Module], clamp: float,
                    cond_channels: int = 0, soft_permutation: bool = False, seed: int = 0,
                    subnets: list[Callable[[int, int], nn.Module]] | None = None) -> SequenceFlow:
    """FrEIA's ``AllInOneBlock`` chain (the CFLOW-AD and FastFlow code): per block, a one-sided
    coupling (subnet output x 0.1, ``clamp * tanh``), a global affine, then a fixed permutation
    (a rotation when ``soft_permutation``). ``subnets``: one constructor per block (FastFlow
    alternates kernels); otherwise ``subnet`` for all."""
    parts: list[nn.Module] = []
    for k in range(blocks):
        make = subnets[k] if subnets is not None else subnet
        parts += [AffineCoupling(channels, make, clamp, "tanh", cond_channels, out_scale=0.1),
                  GlobalAffine(channels), Permutation(channels, seed + k, soft=soft_permutation)]
    return SequenceFlow(parts)


def glow_flow(channels: int, blocks: int, subnet: Callable[[int, int], nn.Module], clamp: float,
              seed: int = 0) -> SequenceFlow:
    """DifferNet's chain (FrEIA's ``permute_layer`` + ``glow_coupling_layer``): per block, a fixed
    permutation (seed k) then a two-sided coupling with the atan soft clamp."""
    parts: list[nn.Module] = []
    for k in range(blocks):
        parts += [Permutation(channels, seed + k), AffineCoupling(channels, subnet, clamp, "atan", two_sided=True)]
    return SequenceFlow(parts)


def gaussian_nll(z: torch.Tensor, logdet: torch.Tensor) -> torch.Tensor:
    """``-log p_X(x)`` per sample, eq. (1) with a standard-normal ``p_Z``, constant included."""
    d = z[0].numel()
    return 0.5 * _sum_but_batch(z**2) + 0.5 * d * math.log(2 * math.pi) - logdet


def mlp(hidden: int | None = None, factor: int = 2) -> Callable[[int, int], nn.Module]:
    """Subnet for vectors: Linear -> ReLU -> Linear, ``hidden`` units (default ``factor * c_in``:
    CFLOW-AD's ``subnet_fc``; DifferNet's ``F_fully_connected`` uses ``fc_internal`` units)."""
    def make(c_in: int, c_out: int) -> nn.Module:
        h = hidden or factor * c_in
        return nn.Sequential(nn.Linear(c_in, h), nn.ReLU(), nn.Linear(h, c_out))
    return make


def conv_subnet(hidden_ratio: float = 1.0, kernel: int = 3) -> Callable[[int, int], nn.Module]:
    """Subnet for maps (FastFlow): conv k x k -> ReLU -> conv k x k, ``hidden_ratio * c_in`` channels,
    padding that keeps the grid."""
    def make(c_in: int, c_out: int) -> nn.Module:
        h = max(1, int(c_in * hidden_ratio))
        return nn.Sequential(nn.Conv2d(c_in, h, kernel, padding=kernel // 2), nn.ReLU(),
                             nn.Conv2d(h, c_out, kernel, padding=kernel // 2))
    return make
