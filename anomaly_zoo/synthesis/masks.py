"""Masks and permutations that are not anomalies but pretext tasks: disjoint random-grid inpainting
masks (RIAD) and jigsaw permutations of patches (Puzzle-AE).

Neither makes a fake defect: the network sees a *normal* image with part of it hidden (RIAD) or
shuffled (Puzzle-AE) and must give the whole normal image back. So :data:`KINDS` stays empty
(``synthesize`` labels what it returns as anomalies); methods call these functions directly.

* :func:`grid_masks` (RIAD, Zavrtanik et al. 2021, Sec. 3.1): the image is cut into a grid of
  ``k x k`` pixel cells; the cells are shuffled and dealt into ``n`` disjoint sets of (nearly) equal
  size. Mask ``i`` hides the cells of set ``i``; together the ``n`` masks hide every pixel exactly
  once, so every pixel is inpainted from an input where it was hidden.
* :func:`jigsaw` (Puzzle-AE, Salehi et al. 2020, Sec. 3): the image is cut into a ``grid x grid``
  array of equal tiles that are put back in a random order.

Random numbers come from the given ``torch.Generator`` on the CPU, so a seeded run repeats exactly.
"""
from __future__ import annotations

import math

import torch

#: the synthesis kinds this module adds to :data:`anomaly_zoo.synthesis.KINDS`: none (pretext tasks, not anomalies)
KINDS: dict = {}


def grid_masks(n: int, h: int, w: int, k: int, n_masks: int, generator: torch.Generator,
               device=None) -> torch.Tensor:
    """RIAD's masks: ``[n, n_masks, h, w]`` float, 1 where mask ``i`` *hides* the pixel.

    Per image, the ``ceil(h/k) x ceil(w/k)`` cells (the last row/column cut by the border) are
    shuffled and dealt round-robin into ``n_masks`` sets: the masks are disjoint and cover the image.
    """
    gh, gw = math.ceil(h / k), math.ceil(w / k)
    cells = gh * gw
    order = torch.stack([torch.randperm(cells, generator=generator) for _ in range(n)])  # [n, cells]
    owner = torch.empty(n, cells, dtype=torch.long)
    owner.scatter_(1, order, (torch.arange(cells) % n_masks).expand(n, cells).contiguous())
    owner = owner.view(n, 1, gh, gw)
    sets = (owner == torch.arange(n_masks).view(1, -1, 1, 1)).float()  # [n, n_masks, gh, gw]
    masks = sets.repeat_interleave(k, -2).repeat_interleave(k, -1)[..., :h, :w]
    return masks.to(device) if device is not None else masks


def jigsaw(x: torch.Tensor, generator: torch.Generator, grid: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    """Puzzle-AE's pretext input: each image cut into ``grid x grid`` tiles put back in a random order.

    ``x`` ``[N, C, H, W]`` with H and W multiples of ``grid``. Returns ``(shuffled, perms [N, grid^2])``,
    where tile ``j`` of the output (row-major) is tile ``perms[i, j]`` of the input image ``i``.
    """
    n, c, h, w = x.shape
    if h % grid or w % grid:
        raise ValueError(f"jigsaw: the image side ({h}x{w}) must be a multiple of grid={grid}")
    th, tw = h // grid, w // grid
    tiles = x.reshape(n, c, grid, th, grid, tw).permute(0, 2, 4, 1, 3, 5).reshape(n, grid * grid, c, th, tw)
    perms = torch.stack([torch.randperm(grid * grid, generator=generator) for _ in range(n)])
    shuffled = tiles[torch.arange(n)[:, None], perms.to(x.device)]
    out = shuffled.reshape(n, grid, grid, c, th, tw).permute(0, 3, 1, 4, 2, 5).reshape(n, c, h, w)
    return out, perms
