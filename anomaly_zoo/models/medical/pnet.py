"""P-Net: encoding the structure-texture relation for anomaly detection in retinal images
(Zhou, Xiao, Yang, Cheng, Liu, Luo, Gu, Liu & Gao, ECCV 2020).

Healthy retinas are highly structured (the vessel tree, the layers of an OCT scan) and lesions
break that structure. P-Net learns how texture goes with structure on normal images only, and
measures, on a new image, how far its structure and its appearance are from what that relation
predicts. Three modules, drawn as a "P":

1. **Structure extraction** ``S = G_s(I)``. In the paper ``G_s`` is a segmentation network trained
   on vessel labels of *another* data set (with adversarial domain adaptation) and then frozen. The library has no vessel labels, so ``G_s`` here is a fixed, differentiable
   multi-scale **Frangi vesselness filter** (Frangi et al., MICCAI 1998) written in torch
   (:func:`vesselness`): per scale ``s`` the eigenvalues ``|l1| <= |l2|`` of the scale-normalised
   Hessian ``s^2 H`` of the grey image give ``R_b = l1 / l2`` and ``T = sqrt(l1^2 + l2^2)``, and

       V_s = exp(-R_b^2 / (2 beta^2)) * (1 - exp(-T^2 / (2 c^2))),    S = max_s V_s   in [0, 1)

   (``beta = 0.5`` as Frangi; line-like structures answer, blobs and flat regions do not). ``c`` is
   Frangi's "half the maximum Hessian norm", taken once from the training images when ``fit``
   starts (the mean over images of the per-image maximum of ``T``, halved) and then frozen
   (``structure_c_``), so the extractor is one fixed function at test time, as the paper's frozen
   network. ``polarity="dark"`` keeps only dark ridges (fundus vessels), ``"both"`` both kinds.
   The official MVTec code (YutingXiao/P-Net_Mvtec_AD) likewise offers a fixed Canny detector
   instead of the trained network (``--use_canny``).
2. **Image reconstruction** ``I^ = G_r(I, S)``: two encoders and one decoder. The
   structure encoder ``En1`` reads ``S`` and passes skip connections to the decoder at every level;
   the image (texture) encoder ``En2`` reads ``I`` and gives only its *last* feature map, with no
   skips, so the image cannot be copied through and the reconstruction leans on the structure; the
   decoder reads both bottlenecks (concatenated) and the structure skips. Blocks: U-Net double
   convolutions (nets.double_conv).
3. **Structure from the reconstruction** ``S^ = G_s(I^)``, with the same frozen ``G_s``.

Losses, one generator / discriminator pair in the one training loop (two Players); equations are
cited by name (the paper's section and equation numbers were not checked here)::

    L_rec = ||I - I^||_1,    L_str = ||S - S^||_1,
    L_adv = E[log D(I)] + E[log(1 - D(G_r(I, S)))]                       (PatchGAN discriminator)
    L     = lambda_adv L_adv + lambda_rec L_rec + lambda_str L_str            (the objective function)

(L1 norms as means over pixels.) ``D`` is the PatchGAN of the official code
(CharlesKangZhou/P_Net_Anomaly_Detection, ``networks/discriminator.py``: 4x4 convolutions with
strides 2, 2, 2, 1, 1, spectral norm, LeakyReLU 0.2, a sigmoid per patch, BCE, the generator's
non-saturating loss). The official ``train_P_Net.py`` / ``utils/parser.py`` set the adversarial and
L1 weights to 1 and 100, Adam with lr 1e-3, betas (0.1, 0.9), weight decay 1e-4, the discriminator
at 0.1 times the generator's learning rate, batch 8, 800 epochs, 224 px; those are the defaults
here. The released code stops before the structure loss; ``lambda_str = 100`` (the same weight as
the image L1) is the library's choice (the paper's value could not be checked here).

Anomaly score ("anomaly detection for testing data"), the mix of the two differences::

    A(I) = (1 - lambda_f) ||I - I^||_1 + lambda_f ||S - S^||_1

and the map is the same mix per pixel, ``(1 - lambda_f)|I - I^| + lambda_f |S - S^|`` (the image
term averaged over the colour channels), smoothed by a Gaussian of ``sigma`` px (0: none, the paper).
``lambda_f = 0.5`` weighs both terms equally (the library's choice; see the card).

Quick preset (64 px, widths 8 / 8, four levels as the paper's U-Net, 30 epochs, batch 4, lr 3e-3, Frangi
scales 1 and 2 px, the map smoothed by a Gaussian of 2 px; about 50 s of one CPU core), chosen on the
training images only: fitted on 45 of the 60 quick training images, scored on the other 15 and on copies
with FCDD's confetti noise (full and 35 % opacity) and CutPaste patches (:mod:`anomaly_zoo.synthesis`).
There lr 3e-3 reached a lower training loss in 20 epochs (phantom 4.3) than 1e-3 in 30 (5.6); 30 epochs
beat 20; four levels beat three
(retina, confetti pixel AUROC 0.93 against 0.90); 96 px did not beat 64 px; of lambda_f in {0, 0.5, 1}
and smoothing {0, 2 px}, lambda_f = 0.5 with 2 px gave the best pixel AUROC averaged over both sets and
both kinds (0.876; lambda_f = 0: 0.868, 1: 0.839; no smoothing: 0.857).

Measured (quick, data seeds 0 / 1 / 2, one thread): phantom image AUROC 0.613 / 0.691 / 0.648 (the issue's
target 0.70 is missed), pixel AUROC 0.930 / 0.943 / 0.951, AUPRO 0.718 / 0.742 / 0.806 (the mean training
image: image 0.476, pixel 0.890, AUPRO 0.630 at seed 0). Retina pixel AUROC 0.635 / 0.535 / 0.590 (target
0.70 missed; mean image 0.659), AUPRO 0.790 / 0.792 / 0.726, image AUROC 0.650 / 0.630 / 0.693. On the
retina the miss is the ``blur`` lesions (seed 0: 61 % of all lesion pixels, pixel AUROC 0.43): a smeared
region has no vessels in ``S``, so the reconstruction is smooth there too and both differences are
*smaller* than on healthy, vessel-rich tissue. Against the healthy crops alone, exudates reach pixel
AUROC 0.995, haemorrhages 0.975, microaneurysms 0.952 (mean image 0.983 / 0.961 / 0.954).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ...base import Detector
from ...nets import double_conv
from ...ops import gaussian_blur, luma
from ...params import Param, bad
from ...registry import register
from ...training import Player
from ...utils import AnomalyZooError

POLARITIES = ("both", "dark", "bright")


# ------------------------------------------------------------------ G_s: the structure extractor
def _derivative_kernels(sigma: float, device, dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sampled Gaussian ``g`` (sum 1) and its first and second derivatives, radius ``ceil(3 sigma)``
    (scipy's ``gaussian_filter(order=...)`` kernels at ``truncate=3``). The sampled second derivative
    does not sum to 0 (-0.0024 at sigma = 1): its sum times ``g`` is taken off, so a flat region has
    no curvature (else a flat grey of 0.7 shows a faint vesselness everywhere)."""
    r = max(1, int(math.ceil(3 * sigma)))
    t = torch.arange(-r, r + 1, device=device, dtype=dtype)
    g = torch.exp(-0.5 * (t / sigma) ** 2)
    g = g / g.sum()
    d2 = (t**2 / sigma**4 - 1 / sigma**2) * g
    return g, -t / sigma**2 * g, d2 - d2.sum() * g


def _sep(x: torch.Tensor, kx: torch.Tensor, ky: torch.Tensor) -> torch.Tensor:
    """Separable convolution of ``[N, 1, H, W]`` (kernel ``kx`` along x, ``ky`` along y), replicate padding."""
    r = len(kx) // 2
    x = F.conv2d(F.pad(x, (r, r, 0, 0), mode="replicate"), kx.view(1, 1, 1, -1))
    return F.conv2d(F.pad(x, (0, 0, r, r), mode="replicate"), ky.view(1, 1, -1, 1))


def hessian_eigenvalues(grey: torch.Tensor, sigma: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigenvalues ``(l1, l2)``, ``|l1| <= |l2|``, of the scale-normalised Hessian ``sigma^2 H`` of
    ``grey`` ``[N, 1, H, W]`` (Gaussian derivatives at scale ``sigma``)."""
    g, d1, d2 = _derivative_kernels(sigma, grey.device, grey.dtype)
    hxx, hyy, hxy = (sigma**2 * _sep(grey, d2, g), sigma**2 * _sep(grey, g, d2), sigma**2 * _sep(grey, d1, d1))
    mean, root = (hxx + hyy) / 2, torch.sqrt(((hxx - hyy) / 2) ** 2 + hxy**2 + 1e-12)
    a, b = mean - root, mean + root
    swap = a.abs() > b.abs()
    return torch.where(swap, b, a), torch.where(swap, a, b)


def hessian_norm(x: torch.Tensor, sigmas) -> torch.Tensor:
    """``max_s sqrt(l1^2 + l2^2)`` per pixel ``[N, 1, H, W]``: Frangi's structureness before its ``c``."""
    return torch.stack([torch.sqrt(l1**2 + l2**2) for l1, l2 in
                        (hessian_eigenvalues(luma(x), s) for s in sigmas)]).amax(0)


def vesselness(x: torch.Tensor, sigmas, c: float, beta: float = 0.5, polarity: str = "both") -> torch.Tensor:
    """Multi-scale Frangi vesselness ``S = max_s V_s`` of images ``[N, 3, H, W]`` -> ``[N, 1, H, W]`` in [0, 1).

    ``V_s = exp(-R_b^2 / 2 beta^2) (1 - exp(-T^2 / 2 c^2))`` with ``R_b = l1 / l2``, ``T^2 = l1^2 + l2^2``;
    ``polarity="dark"`` keeps pixels with ``l2 > 0`` (dark lines on a bright background), ``"bright"``
    ``l2 < 0``, ``"both"`` all. Differentiable, so ``L_str`` trains ``G_r`` through it."""
    if polarity not in POLARITIES:
        raise AnomalyZooError(f"polarity must be one of {', '.join(map(repr, POLARITIES))}, got {polarity!r}")
    grey, out = luma(x), None
    for s in sigmas:
        l1, l2 = hessian_eigenvalues(grey, s)
        rb2 = l1**2 / (l2**2 + 1e-12)
        v = torch.exp(-rb2 / (2 * beta**2)) * (1 - torch.exp(-(l1**2 + l2**2) / (2 * c**2)))
        if polarity != "both":
            v = v * ((l2 > 0) if polarity == "dark" else (l2 < 0)).to(v.dtype)
        out = v if out is None else torch.maximum(out, v)
    return out


# ------------------------------------------------------------------ G_r and D
class StructureTextureNet(nn.Module):
    """``G_r(I, S)``: structure encoder En1 (skips to the decoder), image encoder En2 (bottleneck only),
    one decoder on ``[En1(S) ; En2(I)]`` and En1's skips; sigmoid output in (0, 1)."""

    def __init__(self, channels: int = 3, width: int = 64, levels: int = 4):
        super().__init__()
        ch = [width * 2**i for i in range(levels + 1)]
        self.en1 = nn.ModuleList([double_conv(1, ch[0])] + [double_conv(a, b) for a, b in zip(ch, ch[1:])])
        self.en2 = nn.ModuleList([double_conv(channels, ch[0])] + [double_conv(a, b) for a, b in zip(ch, ch[1:])])
        self.fuse = double_conv(2 * ch[-1], ch[-1])
        self.up = nn.ModuleList([double_conv(b + a, a) for a, b in zip(ch[:-1], ch[1:])][::-1])
        self.head = nn.Conv2d(ch[0], channels, 1)

    @staticmethod
    def _encode(blocks, x, keep: bool):
        skips = []
        for i, block in enumerate(blocks):
            x = block(x if i == 0 else F.max_pool2d(x, 2))
            if keep:
                skips.append(x)
        return x, skips

    def forward(self, image: torch.Tensor, structure: torch.Tensor) -> torch.Tensor:
        s, skips = self._encode(self.en1, structure, keep=True)
        t, _ = self._encode(self.en2, image, keep=False)  # texture: the last features only, no skips
        x = self.fuse(torch.cat([s, t], 1))
        for block, skip in zip(self.up, skips[-2::-1]):
            x = block(torch.cat([F.interpolate(x, size=skip.shape[-2:], mode="bilinear", align_corners=False),
                                 skip], 1))
        return torch.sigmoid(self.head(x))


class PatchDiscriminator(nn.Module):
    """The official code's PatchGAN: 4x4 convolutions (strides 2, 2, 2, 1, 1; widths w, 2w, 4w, 8w, 1),
    spectral norm, LeakyReLU(0.2); returns one logit per patch ``[B, 1, h, w]``."""

    def __init__(self, channels: int = 3, width: int = 64):
        super().__init__()
        sn = nn.utils.spectral_norm
        chans, layers = [channels, width, 2 * width, 4 * width, 8 * width], []
        for i, (a, b) in enumerate(zip(chans, chans[1:])):
            layers += [sn(nn.Conv2d(a, b, 4, 2 if i < 3 else 1, 1, bias=False)), nn.LeakyReLU(0.2, inplace=True)]
        self.net = nn.Sequential(*layers, sn(nn.Conv2d(chans[-1], 1, 4, 1, 1, bias=False)))

    def forward(self, x):
        return self.net(x)


def init_normal_(module: nn.Module, gain: float = 0.02) -> nn.Module:
    """The official code's ``init_weights('normal')``: convolutions N(0, 0.02), BatchNorm N(1, 0.02), biases 0."""
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
                w = m.weight_orig if hasattr(m, "weight_orig") else m.weight
                w.normal_(0.0, gain)
                if m.bias is not None:
                    m.bias.zero_()
            elif isinstance(m, nn.BatchNorm2d):
                m.weight.normal_(1.0, gain)
                m.bias.zero_()
    return module


def pnet_terms(x, x_hat, s, s_hat) -> tuple[torch.Tensor, torch.Tensor]:
    """``(||I - I^||_1, ||S - S^||_1)`` per image (means over pixels and channels): A(I)'s two terms."""
    return (x - x_hat).abs().flatten(1).mean(1), (s - s_hat).abs().flatten(1).mean(1)


# ------------------------------------------------------------------ the detector
@register("pnet", family="medical", paper="Encoding Structure-Texture Relation with P-Net for Anomaly Detection "
          "in Retinal Images", year=2020, bibkey="zhou2020pnet", localizes=True, trains=True,
          quick=dict(image_size=64, width=8, levels=4, disc_width=8, epochs=30, batch_size=4, lr=3e-3,
                     structure_sigmas=(1.0, 2.0), sigma=2.0),
          deviations=(
              "structure extractor: a fixed multi-scale Frangi vesselness filter (c from the training images) "
              "instead of a vessel segmentation network trained on another data set's labels with domain adaptation",
              "the structure-loss weight lambda_str = 100 and the score weight lambda_f = 0.5 are the library's "
              "choices (not in the released code; the paper's values were not checked)",
              "the generator's blocks are U-Net double convolutions with BatchNorm; the released code's "
              "generator is not public",
              "RGB images (the official fundus code works on grey images)",
              "training length in epochs of the library's small data sets (the paper: 800 epochs)"))
class PNet(Detector):
    """Structure (Frangi) + texture -> image -> structure again; score: image and structure differences."""

    image_size = Param.image_size(224)
    width = Param(64, int, low=1, high=512, help="channels of the first encoder level (U-Net: 64)")
    levels = Param(4, int, low=1, high=6, help="2x2 poolings of each encoder")
    disc_width = Param(64, int, low=1, high=512, help="channels of the PatchGAN's first layer (64 in the code)")
    epochs = Param.epochs(800)
    batch_size = Param.batch_size(8)
    lr = Param.lr(1e-3)
    weight_decay = Param.weight_decay(1e-4)
    d_lr_ratio = Param(0.1, float, low=0, low_open=True, help="discriminator / generator learning rate (code: 0.1)")
    lambda_adv = Param(1.0, float, low=0, help="weight of L_adv (code: lamd_gen = 1)")
    lambda_rec = Param(100.0, float, low=0, help="weight of L_rec = ||I - I^||_1 (code: lamd_p = 100)")
    lambda_str = Param(100.0, float, low=0, help="weight of L_str = ||S - S^||_1")
    lambda_f = Param(0.5, float, low=0, high=1, help="A(I) = (1 - lambda_f) image term + lambda_f structure term")
    structure_sigmas = Param((1.0, 2.0, 4.0), tuple, item=float, help="Frangi scales, px at image_size (floats)")
    frangi_beta = Param(0.5, float, low=0, low_open=True, help="Frangi's blob suppression beta")
    polarity = Param("both", str, choices=POLARITIES, help="ridges kept: 'both', 'dark' (vessels), 'bright'")
    sigma = Param.sigma(0.0)

    def _check_params(self) -> None:
        if any(s <= 0 for s in self.structure_sigmas):
            raise bad(self.name, "structure_sigmas", self.structure_sigmas, "a list of numbers > 0")
        if self.image_size is not None and self.image_size % 2**self.levels:
            raise bad(self.name, "image_size", self.image_size, f"a multiple of 2^levels = {2 ** self.levels}")

    def _build(self, shapes: dict) -> None:
        h, w = shapes["input_hw"]
        if h % 2**self.levels or w % 2**self.levels:
            raise bad(self.name, "image_size", self.image_size, f"images whose sides are multiples of "
                      f"2^levels = {2 ** self.levels} (the images are {h}x{w}: set image_size)")
        self.generator_ = init_normal_(StructureTextureNet(3, self.width, self.levels))
        self.discriminator_ = init_normal_(PatchDiscriminator(3, self.disc_width))
        self.register_buffer("structure_c_", torch.tensor(shapes.get("structure_c", 1.0)))

    # ------------------------------------------------------------ structure
    def structure(self, x: torch.Tensor) -> torch.Tensor:
        """``G_s``: the frozen Frangi map ``[B, 1, H, W]`` of images in [0, 1] on the device."""
        return vesselness(x, self.structure_sigmas, float(self.structure_c_), self.frangi_beta, self.polarity)

    def _fit(self, x: torch.Tensor) -> None:
        with torch.no_grad():  # Frangi's c: half the maximum Hessian norm, the mean over training images
            peak = torch.cat([hessian_norm(x[i : i + 16], self.structure_sigmas).flatten(1).amax(1)
                              for i in range(0, len(x), 16)])
        self.structure_c_.fill_(max(float(peak.mean()) / 2, 1e-6))
        self.shapes_["structure_c"] = float(self.structure_c_)
        s = torch.cat([self.structure(x[i : i + 16].to(self.device_)).cpu() for i in range(0, len(x), 16)])
        betas = (0.1, 0.9)  # the official parser's b1, b2
        self._train([Player("discriminator", self._d_step, self.discriminator_.parameters(),
                            lr=self.lr * self.d_lr_ratio, betas=betas),
                     Player("generator", self._g_step, self.generator_.parameters(), betas=betas)],
                    (x, s), module=self)

    def _d_step(self, batch, ctx):
        x, s = batch
        with torch.no_grad():
            fake = self.generator_(x, s)
        real_logit, fake_logit = self.discriminator_(x), self.discriminator_(fake)
        return (F.binary_cross_entropy_with_logits(real_logit, torch.ones_like(real_logit))
                + F.binary_cross_entropy_with_logits(fake_logit, torch.zeros_like(fake_logit))) / 2

    def _g_step(self, batch, ctx):
        x, s = batch
        x_hat = self.generator_(x, s)
        logit = self.discriminator_(x_hat)
        adv = F.binary_cross_entropy_with_logits(logit, torch.ones_like(logit))
        rec, st = pnet_terms(x, x_hat, s, self.structure(x_hat))
        loss = self.lambda_adv * adv + self.lambda_rec * rec.mean() + self.lambda_str * st.mean()
        return loss, {"L_rec": rec.mean().detach(), "L_str": st.mean().detach(), "L_adv": adv.detach()}

    # ------------------------------------------------------------ scoring
    def terms(self, x: torch.Tensor):
        """``(||I - I^||_1 [B], ||S - S^||_1 [B], I^, S, S^)`` for images in [0, 1] on the device."""
        s = self.structure(x)
        x_hat = self.generator_(x, s)
        s_hat = self.structure(x_hat)
        rec, st = pnet_terms(x, x_hat, s, s_hat)
        return rec, st, x_hat, s, s_hat

    def _score(self, x: torch.Tensor):
        rec, st, x_hat, s, s_hat = self.terms(x)
        lf = self.lambda_f
        maps = (1 - lf) * (x - x_hat).abs().mean(1) + lf * (s - s_hat).abs()[:, 0]
        return (1 - lf) * rec + lf * st, gaussian_blur(maps, self.sigma)

    @torch.no_grad()
    def reconstruct(self, images) -> dict[str, torch.Tensor]:
        """``{"image": I^, "structure": S, "structure_rec": S^}`` (CPU), for figures."""
        x = self._prepare(images, "images").to(self.device_)
        _, _, x_hat, s, s_hat = self.terms(x)
        return {"image": x_hat.cpu(), "structure": s[:, 0].cpu(), "structure_rec": s_hat[:, 0].cpu()}
