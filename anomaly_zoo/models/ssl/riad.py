"""RIAD: reconstruction by inpainting (Zavrtanik, Kristan & Skocaj, Pattern Recognition 2021).

An auto-encoder with skip connections rebuilds anything, anomalies included (see ``unet_ae``).
RIAD keeps the U-Net but never lets it see the pixel it must produce: the image is cut into a grid
of ``k x k`` cells, the cells are dealt into ``n`` disjoint sets, and the network *inpaints* each
set from the image with that set hidden. A defect is then rebuilt from its normal surroundings,
as normal texture, and the difference lights it up.

* Masks (Sec. 3.1): :func:`anomaly_zoo.synthesis.masks.grid_masks`, ``n_masks`` disjoint sets of
  ``k x k`` cells that together cover the image; in training ``k`` is drawn per batch from
  ``k_values`` (the paper's {2, 4, 8, 16}).
* Inpainting (Sec. 3.1): ``I_r = sum_i M_i * f(I * (1 - M_i))`` with ``M_i`` the i-th hidden set:
  each pixel is taken from the output whose input hid it (:func:`inpaint`).
* Loss (Sec. 3.2): ``L = lambda_G L_G(I, I_r) + lambda_S L_SSIM(I, I_r) + L_2(I, I_r)`` with
  ``lambda_G = lambda_S = 1``: the multi-scale gradient magnitude similarity loss
  (:func:`anomaly_zoo.gms.msgms_loss`, 4 scales), 1 - SSIM (:mod:`anomaly_zoo.ssim`, 11x11 Gaussian
  window) and the mean squared error (:func:`riad_loss`).
* Map and score (Sec. 3.3): for every ``k`` in ``k_values`` the combined inpainting ``I_r,k`` and
  ``G_k = 1 - MSGMS(I, I_r,k)`` (:func:`anomaly_zoo.gms.msgms_map`); the map is the mean of the
  ``G_k`` smoothed by a ``filter_size`` mean filter (21 px at the paper's 256 px), and the image
  score its maximum. Test masks come from a generator seeded with ``seed``, so predictions repeat.

Measured with the quick preset (12 epochs) on brick, data seeds 0 / 1 / 2, one CPU thread, 20-24 s of
CPU per fit: image AUROC 0.597 / 0.611 / 0.681, pixel AUROC 0.863 / 0.851 / 0.770, AUPRO 0.561 / 0.510 /
0.559 (the mean training image: pixel AUROC 0.764 / 0.732 / 0.750, image 0.654 / 0.556 / 0.701). With
20 epochs (32-37 s): pixel AUROC 0.881 / 0.860 / 0.768. The quick run is short of converged.

The equations above are named by section; the library could not check the paper's own equation
numbers (the paper is not open access), which the card says.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ...base import Detector
from ...gms import msgms_loss, msgms_map
from ...nets import UNet
from ...params import Param, bad
from ...registry import register
from ...ssim import ssim_map
from ...synthesis.masks import grid_masks


def inpaint(net: nn.Module, x: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
    """``I_r = sum_i M_i * f(I * (1 - M_i))`` for images ``x [B, C, H, W]`` and disjoint hidden masks
    ``hidden [B, n, H, W]`` that cover the image: one forward pass over the ``B * n`` masked inputs."""
    b, n = hidden.shape[:2]
    m = hidden[:, :, None]  # [B, n, 1, H, W]
    inputs = (x[:, None] * (1 - m)).flatten(0, 1)
    out = torch.sigmoid(net(inputs)).view(b, n, *x.shape[1:])
    return (out * m).sum(1)


def riad_loss(x: torch.Tensor, x_r: torch.Tensor, weight_gms: float = 1.0, weight_ssim: float = 1.0) -> torch.Tensor:
    """RIAD's training loss: ``lambda_G * MSGMS loss + lambda_S * (1 - SSIM) + MSE`` (Sec. 3.2)."""
    return weight_gms * msgms_loss(x, x_r) + weight_ssim * (1 - ssim_map(x, x_r).mean()) + F.mse_loss(x_r, x)


def mean_filter(maps: torch.Tensor, size: int) -> torch.Tensor:
    """``size x size`` mean filter of ``[B, H, W]`` maps (edges replicated)."""
    if size <= 1:
        return maps
    r = size // 2
    return F.avg_pool2d(F.pad(maps[:, None], (r, r, r, r), mode="replicate"), size, stride=1)[:, 0]


@register("riad", family="ssl", paper="Reconstruction by inpainting for visual anomaly detection", year=2021,
          bibkey="zavrtanik2021riad", localizes=True, trains=True,
          quick=dict(image_size=64, width=8, depth=3, epochs=12, batch_size=8, lr=1e-3, filter_size=5),
          deviations=("equations named by section: the paper's own equation numbers were not checked (not open "
                      "access); the loss weights (1, 1) and k in {2, 4, 8, 16} are the paper's",
                      "the U-Net: the library's (BatchNorm, ReLU, 64 channels doubling over 4 poolings), not "
                      "necessarily the paper's exact layer list; Adam at lr 1e-4 for 300 epochs in batches of 8",
                      "GMS on the grey level (channel mean), as the public re-implementations do",
                      "quick preset: 64 px images, a 3-level U-Net of width 8, 12 epochs at lr 1e-3 and a 5 px mean "
                      "filter (the paper's 21 px at 256 px, scaled with the image)"))
class RIAD(Detector):
    """RIAD: a U-Net inpaints disjoint random-grid masks; map = 1 - MSGMS of the inpainting."""

    k_values = Param((2, 4, 8, 16), tuple, item=int, help="mask cell sides, px (Sec. 3.1: {2, 4, 8, 16})")
    n_masks = Param(3, int, low=2, help="disjoint masks per image; each hides 1/n of the cells")
    weight_gms = Param(1.0, float, low=0, help="lambda_G, weight of the MSGMS loss (1)")
    weight_ssim = Param(1.0, float, low=0, help="lambda_S, weight of the SSIM loss (1)")
    filter_size = Param(21, int, low=1, help="side of the mean filter on the map, px (odd)")
    width = Param(64, int, low=1, help="channels of the U-Net's first level")
    depth = Param(4, int, low=1, high=6, help="2x2 poolings of the U-Net")
    image_size = Param.image_size(256)
    epochs = Param.epochs(300)
    batch_size = Param.batch_size(8)
    lr = Param.lr(1e-4)
    weight_decay = Param.weight_decay(0.0)

    def _check_params(self) -> None:
        if any(k < 1 for k in self.k_values):
            raise bad(self.name, "k_values", self.k_values, "cell sides >= 1")
        if self.filter_size % 2 == 0:
            raise bad(self.name, "filter_size", self.filter_size, "an odd number")
        if self.image_size is not None and self.image_size % 2**self.depth:
            raise bad(self.name, "image_size", self.image_size, f"a multiple of 2**depth = {2**self.depth}")

    def _build(self, shapes: dict) -> None:
        self.net_ = UNet(3, 3, self.width, self.depth)

    def _step(self, x: torch.Tensor, ctx) -> torch.Tensor:
        k = self.k_values[int(torch.randint(len(self.k_values), (1,), generator=ctx.generator))]
        hidden = grid_masks(len(x), *x.shape[-2:], k, self.n_masks, ctx.generator, x.device)
        return riad_loss(x, inpaint(self.net_, x, hidden), self.weight_gms, self.weight_ssim)

    def _fit(self, x: torch.Tensor) -> None:
        self._train(self._step, x)

    def inpainting(self, x: torch.Tensor, k: int) -> torch.Tensor:
        """The combined inpainting ``I_r,k`` of a batch on the device, with the test masks for ``k``."""
        g = torch.Generator().manual_seed(self.seed * 1000 + k)
        hidden = grid_masks(len(x), *x.shape[-2:], k, self.n_masks, g, x.device)
        return inpaint(self.net_, x, hidden)

    def _score(self, x: torch.Tensor):
        maps = torch.stack([1 - msgms_map(x, self.inpainting(x, k)) for k in self.k_values]).mean(0)
        maps = mean_filter(maps, self.filter_size)
        return maps.flatten(1).amax(1), maps
