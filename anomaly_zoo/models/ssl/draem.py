"""DRAEM: a discriminatively trained reconstruction embedding for surface anomaly detection
(Zavrtanik, Kristan & Skocaj, ICCV 2021), with the optional SSPCAB block (Ristea et al., CVPR 2022).

A reconstruction auto-encoder alone must *fail* on anomalies to find them, and often does not.
DRAEM adds a second network that learns where an image and its reconstruction disagree, trained
on simulated anomalies whose masks are known, so the map needs no hand-made post-processing.

* Simulated anomalies (Sec. 3.3, the blend is eq. 4): Perlin-noise masks M_a filled with an
  augmented texture A at opacity beta, I_a = (1 - M_a) I + (1 - beta)(M_a I) + beta (M_a A); half of
  the training images are left clean (the reference code's rule). The textures come from
  :mod:`anomaly_zoo.synthesis.perlin` (procedural stand-ins for DTD), never from the test defects.
* Reconstructive sub-network (Sec. 3.1): an encoder-decoder *without* skip connections (five
  blocks of two conv 3x3 / BN / ReLU with four 2x2 max-pools, base width 128; a decoder of four
  bilinear up-sampling steps, each a conv / BN / ReLU and two more, to a 3-channel conv), trained
  to give back the clean I from I_a. Loss (eq. 1-2): L_rec(I, I_r) = lambda L_SSIM(I, I_r) +
  l2(I, I_r), with L_SSIM = 1/N_p sum_{i,j} (1 - SSIM(I, I_r)_{ij}) over all N_p pixels (the
  library's one SSIM, :mod:`anomaly_zoo.ssim`; 11x11 Gaussian window) and lambda = 1.
* Discriminative sub-network (Sec. 3.2): a U-Net (six encoder blocks, base width 64, skip
  connections) on the channel concatenation of I_r and I_a, with two output channels; its softmax
  is the anomaly map M_o. Loss: the focal loss (Lin et al. 2017, gamma = 2) between M_o and M_a,
  L_seg. Total (eq. 3): L = L_rec + L_seg, one Adam optimiser over both networks.
* Scores (Sec. 3.4): the map is M_o's anomaly channel; the image score (eq. 5) is
  eta = max(M_o * f_{s_f x s_f}), the maximum of the map after a mean filter of side s_f = 21 px
  at 256 px (scaled to the image size here).
* ``sspcab=True``: the encoder's last block (its fifth) becomes an :class:`~.sspcab.SSPCAB`, and
  lambda_S L_SSPCAB (lambda_S = 0.1) joins the loss (SSPCAB's eq. 2), as in its DRAEM experiments;
  the block keeps its own He initialisation over its unmasked inputs (not N(0, 0.02)).

Default preset: the paper's, 256 px, 700 epochs, batch 8, Adam lr 1e-4 multiplied by 0.2 at 80 %
and 90 % of the epochs, the networks initialised with N(0, 0.02) convolutions (the reference code).
Quick: 64 px, narrow networks (widths 8 / 8), 20 epochs, batch 8, lr 3e-3, 32 textures. Epochs, lr and batch
were chosen on training data only (:mod:`anomaly_zoo.validation`: a quarter of the normal training images held
out, half of those given thin scars or Poisson-blended patches, never DRAEM's own Perlin anomalies; mean AUPRO
over 5 splits of brick and 3 of grass): lr 3e-3 0.400, lr 1e-3 0.332, 30 epochs 0.334 (at lr 1e-3; 0.365 at
3e-3), lr 6e-3 0.311; on 3 brick splits 10 and 40 epochs, lr 3e-4 and batch 4 fell further behind.
Measured afterwards, once, on the quick brick test sets (data seeds 0 / 1 / 2, one thread, about 26 s of CPU
per fit): image AUROC 0.934 / 0.941 / 0.944, pixel AUROC 0.926 / 0.984 / 0.938, AUPRO 0.803 / 0.917 / 0.812;
the untrained networks (lr 1e-12, one epoch): image 0.475, pixel 0.480 (seed 0). With ``sspcab=True`` (quick,
seeds 0 / 1 / 2): image 0.964 / 0.972 / 0.911, pixel 0.959 / 0.984 / 0.900, AUPRO 0.851 / 0.901 / 0.808.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ...base import Detector
from ...params import Param, bad
from ...registry import register
from ...ssim import ssim_map
from ...synthesis.perlin import draem_anomaly, procedural_textures
from .sspcab import SSPCAB


# ------------------------------------------------------------------------------ networks
def double_conv(cin: int, cout: int, mid: int | None = None) -> nn.Sequential:
    """conv 3x3 / BN / ReLU, twice."""
    mid = cout if mid is None else mid
    return nn.Sequential(nn.Conv2d(cin, mid, 3, padding=1), nn.BatchNorm2d(mid), nn.ReLU(inplace=True),
                         nn.Conv2d(mid, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


def up_conv(cin: int, cout: int) -> nn.Sequential:
    """Bilinear 2x up-sampling, then conv 3x3 / BN / ReLU."""
    return nn.Sequential(nn.Upsample(scale_factor=2, mode="bilinear", align_corners=True),
                         nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class ReconstructiveNet(nn.Module):
    """Sec. 3.1: encoder (5 blocks, 4 max-pools) and decoder (4 up-sampling blocks), no skip connections."""

    def __init__(self, width: int = 128, sspcab: bool = False):
        super().__init__()
        w = width
        chans = [(3, w), (w, 2 * w), (2 * w, 4 * w), (4 * w, 8 * w)]
        self.encoder = nn.ModuleList([double_conv(a, b) for a, b in chans])
        self.block5 = SSPCAB(8 * w) if sspcab else double_conv(8 * w, 8 * w)
        steps = [(8 * w, 8 * w, 4 * w), (4 * w, 4 * w, 2 * w), (2 * w, 2 * w, w), (w, w, w)]
        self.decoder = nn.ModuleList([nn.Sequential(up_conv(a, b), double_conv(b, c, mid=b)) for a, b, c in steps])
        self.out = nn.Conv2d(w, 3, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, block in enumerate(self.encoder):
            x = block(x if i == 0 else F.max_pool2d(x, 2))
        x = self.block5(F.max_pool2d(x, 2))
        for block in self.decoder:
            x = block(x)
        return self.out(x)


class DiscriminativeNet(nn.Module):
    """Sec. 3.2: a U-Net with six encoder blocks (five max-pools) and skip connections; 2 output channels."""

    def __init__(self, width: int = 64, cin: int = 6):
        super().__init__()
        w = width
        enc = [(cin, w), (w, 2 * w), (2 * w, 4 * w), (4 * w, 8 * w), (8 * w, 8 * w), (8 * w, 8 * w)]
        self.encoder = nn.ModuleList([double_conv(a, b) for a, b in enc])
        # decoder step k: up-sample from `a` channels to `b`, concatenate the skip (`s` channels), two convs to `b`
        dec = [(8 * w, 8 * w, 8 * w), (8 * w, 4 * w, 8 * w), (4 * w, 2 * w, 4 * w), (2 * w, w, 2 * w), (w, w, w)]
        self.ups = nn.ModuleList([up_conv(a, b) for a, b, _ in dec])
        self.fuse = nn.ModuleList([double_conv(b + s, b) for _, b, s in dec])
        self.out = nn.Conv2d(w, 2, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = []
        for i, block in enumerate(self.encoder):
            x = block(x if i == 0 else F.max_pool2d(x, 2))
            skips.append(x)
        for up, fuse, skip in zip(self.ups, self.fuse, reversed(skips[:-1])):
            x = fuse(torch.cat((up(x), skip), 1))
        return self.out(x)


def init_normal_(module: nn.Module) -> None:
    """The reference code's initialisation: conv weights N(0, 0.02), BN weights N(1, 0.02), BN biases 0."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.normal_(m.weight, 0.0, 0.02)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.normal_(m.weight, 1.0, 0.02)
            nn.init.zeros_(m.bias)


# ------------------------------------------------------------------------------ losses and scores
def ssim_loss(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Eq. (2): L_SSIM = 1/N_p sum over all pixels (and channels) of 1 - SSIM(I, I_r)."""
    return (1 - ssim_map(x, y)).mean()


def reconstruction_loss(x: torch.Tensor, rec: torch.Tensor, lam: float = 1.0) -> torch.Tensor:
    """Eq. (1): L_rec = lambda L_SSIM(I, I_r) + l2(I, I_r) (l2: the mean squared error)."""
    return lam * ssim_loss(x, rec) + F.mse_loss(rec, x)


def focal_loss(logits: torch.Tensor, target: torch.Tensor, gamma: float = 2.0) -> torch.Tensor:
    """L_seg: the focal loss (Lin et al. 2017) -(1 - p_t)^gamma log p_t, averaged over pixels, where p_t is
    the softmax probability of the true class (``target [B, H, W]`` in {0, 1}) of ``logits [B, 2, H, W]``."""
    logp = F.log_softmax(logits.float(), 1)
    logp_t = logp.gather(1, target.long()[:, None])[:, 0]
    return (-(1 - logp_t.exp()) ** gamma * logp_t).mean()


def image_score(anomaly_map: torch.Tensor, size: int) -> torch.Tensor:
    """Eq. (5): eta = max(M_o * f_{s x s}), the mean filter zero-padded as in the reference code."""
    f = F.avg_pool2d(anomaly_map[:, None], size, stride=1, padding=size // 2, count_include_pad=True)
    return f.flatten(1).amax(1)


@register("draem", family="ssl", paper="DRAEM: A Discriminatively Trained Reconstruction Embedding for Surface "
          "Anomaly Detection", year=2021, bibkey="zavrtanik2021draem", localizes=True, trains=True,
          quick=dict(image_size=64, width=8, disc_width=8, epochs=20, batch_size=8, lr=3e-3, n_textures=32),
          deviations=("anomaly sources: procedural textures generated from the seed (marble, stripes, checks, dots, "
                      "Worley cells) instead of the Describable Textures Dataset, which cannot be downloaded here",
                      "the source augmentations are torch re-implementations of imgaug's ten (hue and saturation "
                      "by a rotation in YIQ, sharpness by unsharp masking); the reference code's random rotation "
                      "of the normal training image (30 % of the time) is left out",
                      "a bank of n_textures textures is generated once per fit (DTD: 5640 images)",
                      "mean filter side s_f = 21 px at 256 px, scaled to image_size",
                      "sspcab=True: the block's masked convolution is He-initialised over its unmasked inputs (the "
                      "papers do not say; on the proxy validation set of the quick preset, N(0, 0.02) gave saturated "
                      "maps, every image score equal, on 2 of 8 splits, and a lower mean AUPRO, 0.33 against 0.36)",
                      "quick preset: 64 px, widths 8 / 8 instead of 128 / 64, 20 epochs at lr 3e-3, 32 textures; "
                      "epochs, lr and batch chosen by AUPRO on a proxy validation set of synthetic anomalies (thin "
                      "scars and Poisson-blended patches, not DRAEM's Perlin blobs) made from held-out brick and "
                      "grass *training* images (anomaly_zoo.validation), never on test metrics"))
class DRAEM(Detector):
    """Reconstructive + discriminative sub-networks trained on Perlin-masked synthetic anomalies."""

    image_size = Param.image_size(256, low=32)
    width = Param(128, int, low=1, help="base width of the reconstructive sub-network (Sec. 3.1)")
    disc_width = Param(64, int, low=1, help="base width of the discriminative sub-network (Sec. 3.2)")
    epochs = Param.epochs(700)
    batch_size = Param(8, int, low=2, help="images per step (the paper: 8)")
    lr = Param.lr(1e-4)
    ssim_weight = Param(1.0, float, low=0, help="lambda of eq. (1)")
    gamma = Param(2.0, float, low=0, help="the focal loss's focusing parameter")
    p_anomalous = Param(0.5, float, low=0, high=1, low_open=True, help="share of training images given an anomaly")
    beta = Param((0.1, 1.0), tuple, item=float, help="(low, high) of the opacity beta of eq. (4), within [0, 1]")
    n_textures = Param(128, int, low=1, help="procedural anomaly-source textures generated per fit")
    filter_size = Param(21, int, low=1, help="mean filter side s_f of eq. (5) at 256 px (scaled to image_size)")
    sspcab = Param(False, bool, help="put SSPCAB in the encoder's last block and add its loss (Ristea et al. 2022)")
    sspcab_weight = Param(0.1, float, low=0, help="lambda of SSPCAB's eq. (2)")

    def _check_params(self) -> None:
        if self.image_size is not None and self.image_size % 32:
            raise bad(self.name, "image_size", self.image_size, "a multiple of 32 (the U-Net halves it five times)")
        if len(self.beta) != 2 or not 0 <= self.beta[0] <= self.beta[1] <= 1:
            raise bad(self.name, "beta", self.beta, "(low, high) with 0 <= low <= high <= 1")

    def _build(self, shapes: dict) -> None:
        h, w = shapes["input_hw"]
        if h % 32 or w % 32:
            raise bad(self.name, "image_size", self.image_size, f"images whose sides are multiples of 32 "
                      f"(they are {h}x{w}: set image_size)")
        self.rec_ = ReconstructiveNet(self.width, self.sspcab)
        self.disc_ = DiscriminativeNet(self.disc_width)
        init_normal_(self.rec_)
        init_normal_(self.disc_)
        if self.sspcab:  # its own initialisation (see SSPCAB.reset_parameters)
            self.rec_.block5.reset_parameters()

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(I_r, logits [B, 2, H, W])`` for images ``x``."""
        rec = self.rec_(x)
        return rec, self.disc_(torch.cat((rec, x), 1))

    def _step(self, x: torch.Tensor, ctx):
        xa, m = draem_anomaly(x, ctx.generator, sources=self.textures_, beta=tuple(self.beta))
        keep = (torch.rand(len(x), generator=ctx.generator) < self.p_anomalous).to(x.device)
        xa = torch.where(keep[:, None, None, None], xa, x)
        m = m * keep[:, None, None]
        rec, logits = self(xa)
        l_rec = reconstruction_loss(x, rec, self.ssim_weight)
        l_seg = focal_loss(logits, m, self.gamma)
        loss = l_rec + l_seg  # eq. (3)
        logs = {"rec": l_rec.detach(), "seg": l_seg.detach()}
        if self.sspcab:
            loss = loss + self.sspcab_weight * self.rec_.block5.loss
            logs["sspcab"] = self.rec_.block5.loss.detach()
        return loss, logs

    def _fit(self, x: torch.Tensor) -> None:
        g = torch.Generator().manual_seed(self.seed)
        self.textures_ = procedural_textures(self.n_textures, x.shape[-1], g)  # not saved: predict needs none
        if x.shape[-2] != x.shape[-1]:
            self.textures_ = F.interpolate(self.textures_, size=x.shape[-2:], mode="bilinear", align_corners=False)
        milestones = sorted({int(self.epochs * 0.8), int(self.epochs * 0.9)})
        self._train(self._step, x, schedule="multistep", milestones=milestones, gamma=0.2)
        del self.textures_

    def anomaly_map(self, x: torch.Tensor) -> torch.Tensor:
        """M_o: the softmax probability of 'anomalous' per pixel, ``[B, H, W]``."""
        return self(x)[1].float().softmax(1)[:, 1]

    def _score(self, x: torch.Tensor):
        m = self.anomaly_map(x)
        s = max(1, round(self.filter_size * x.shape[-1] / 256))
        s += 1 - s % 2  # odd, so the filter is centred
        return image_score(m, s), m

    def reconstruct(self, images) -> torch.Tensor:
        """I_r for ``images`` (at ``image_size``), on the CPU: what the reconstructive sub-network gives back."""
        x = self._prepare(images, "images").to(self.device_)
        self.eval()
        with torch.no_grad():
            return self.rec_(x).cpu()


__all__ = ["DRAEM", "DiscriminativeNet", "ReconstructiveNet", "focal_loss", "image_score", "reconstruction_loss",
           "ssim_loss"]
