"""CutPaste: self-supervised learning for anomaly detection and localization (Li, Sohn, Yoon & Pfister, CVPR 2021).

Two stages: learn a representation by telling normal images from normal images with a piece
cut out and pasted elsewhere (a small irregularity, like a real defect), then model the normal
images' representations with a Gaussian and score new images by how unlikely they are.

* Proxy task (Sec. 2.1): the 3-way variant, eq. (2):
      L = E_{x in X} [ CE(g(x), 0) + CE(g(CP(x)), 1) + CE(g(CPScar(x)), 2) ]
  with CP the CutPaste augmentation (a rectangle of 2-15 % of the image, aspect ratio in
  (0.3, 1) or (1, 3.3), colour-jittered, pasted at a random place) and CPScar the scar (a thin
  rotated rectangle), both from the library's synthesis (:mod:`anomaly_zoo.synthesis.patches`),
  never the test defects. g is the network: the backbone (ImageNet-pretrained and fine-tuned, as
  in the paper's transfer setting), global average pooling, an MLP projection head and a linear
  classifier to the three classes. The paper does not spell the head out; the default is the
  8 x 512 + 128 MLP (batch norm, ReLU) of the authors' earlier one-class code, which public
  re-implementations also use.
* Score (Sec. 2.2, eq. 3): a Gaussian density estimator (GDE) of the normal training images'
  pooled representations f(x): log p(x) ∝ -1/2 (f(x) - mu)^T Sigma^-1 (f(x) - mu); the covariance
  is shrunk with Ledoit and Wolf's (2004) optimal coefficient. The image score is the Mahalanobis
  distance sqrt((f - mu)^T Sigma^-1 (f - mu)) (monotone in -log p).
* Localisation (the paper's patch-level representation, its Fig. 1b): a second network of the same form is
  trained on random patches (64 px of a 256 px image) with the same 3-way task applied inside the
  patch; a GDE is fitted to the patch representations of all normal training patches; every
  patch of a test image (stride 4 px at 256 px) gets its Mahalanobis score, and each pixel the mean
  score of the patches that cover it, smoothed by a Gaussian (sigma 4 px at 256 px): the paper's
  receptive-field upsampling.

Default preset: the paper's settings on the library's backbone: 256 px, patches of 64 px at
stride 4, SGD (momentum 0.9) with lr 0.03 and cosine decay, weight decay 3e-5, 32 images per
step (96 with their two augmented copies), the whole backbone fine-tuned. Quick: 64 px, 16 px
patches, stages 1-5 frozen, 8 epochs.

Measured on the quick brick set (data seeds 0 / 1 / 2, one thread, about 23 s of CPU per fit and 7 s per
predict): image AUROC 0.877 / 0.860 / 0.815, pixel AUROC 0.984 / 0.984 / 0.974, AUPRO 0.892 / 0.887 /
0.876; the random backbone (``pretrained=False``): image 0.548, pixel 0.846, AUPRO 0.508 (seed 0). The
quick run's 32 SGD steps barely move the pretrained network: the same detector untrained (lr 1e-12, one
epoch) scores image 0.862, pixel 0.983 (seed 0), so in quick mode the Gaussians on ImageNet features do
the work, and the proxy task's share shows only with the paper's long training.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ...backbones import create_backbone, stages
from ...base import FeatureDetector
from ...ops import gaussian_blur, window_mean
from ...params import Param, bad
from ...registry import register
from ...synthesis.patches import cutpaste, cutpaste_scar

N_CLASSES = 3  # normal, CutPaste, CutPaste-Scar


# ------------------------------------------------------------------------------ the network
class Backbone(nn.Module):
    """The backbone architecture with *trainable* weights (pretrained or random), read at one tap and
    average-pooled. Stages up to ``freeze`` (and the stem) keep their weights and batch-norm statistics."""

    def __init__(self, name: str, pretrained: bool, tap: str, freeze: str | None, weights=None):
        super().__init__()
        fx = create_backbone(name, pretrained=pretrained, layers=[tap], weights=weights)
        self.model, self.tap, self.channels = fx.model, tap, fx.channels[tap]
        self.register_buffer("mean", fx.mean.clone(), persistent=False)
        self.register_buffer("std", fx.std.clone(), persistent=False)
        for p in self.model.parameters():
            p.requires_grad_(True)
        self.frozen = nn.ModuleList(frozen_modules(self.model, freeze) if freeze else [])
        for m in self.frozen:
            for p in m.parameters():
                p.requires_grad_(False)

    def train(self, mode: bool = True):
        super().train(mode)
        for m in self.frozen:  # frozen stages keep their ImageNet batch-norm statistics
            m.train(False)
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.model.forward_taps((x - self.mean) / self.std, (self.tap,))[self.tap]
        return f.mean((2, 3))


def frozen_modules(model: nn.Module, stage: str) -> list[nn.Module]:
    """The stem and every stage up to and including ``stage`` (EfficientNet-Lite0 or ResNet)."""
    if hasattr(model, "stage_slices"):  # EfficientNet-Lite0
        _, hi = model.stage_slices[stage]
        return [model._conv_stem, model._bn0, *model._blocks[:hi]]
    order = list(model.stages)
    return [model.conv1, model.bn1, *[getattr(model, s) for s in order[: order.index(stage) + 1]]]


def projection_head(cin: int, dims) -> nn.Sequential:
    """The MLP projection head: Linear / BN / ReLU for every width but the last, then Linear to the last."""
    layers, c = [], cin
    for d in dims[:-1]:
        layers += [nn.Linear(c, d), nn.BatchNorm1d(d), nn.ReLU(inplace=True)]
        c = d
    layers.append(nn.Linear(c, dims[-1]))
    return nn.Sequential(*layers)


class CutPasteNet(nn.Module):
    """g: backbone -> pooled f(x) -> projection head -> linear classifier (3 classes)."""

    def __init__(self, backbone: Backbone, head_dims):
        super().__init__()
        self.backbone = backbone
        self.head = projection_head(backbone.channels, head_dims)
        self.classifier = nn.Linear(head_dims[-1], N_CLASSES)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(f(x) [B, C], logits [B, 3])``."""
        f = self.backbone(x)
        return f, self.classifier(self.head(f))


# ------------------------------------------------------------------------------ loss and density
def three_way_batch(x: torch.Tensor, g: torch.Generator, scar_scale: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Eq. (2)'s inputs: ``x``, CP(x) and CPScar(x) stacked, with labels 0, 1, 2. ``scar_scale`` is the
    image side over ``x``'s side (patches: the scar keeps its size in image pixels)."""
    cp, _ = cutpaste(x, g)
    w, h = (2 / 256 * scar_scale, 16 / 256 * scar_scale), (10 / 256 * scar_scale, 25 / 256 * scar_scale)
    scar, _ = cutpaste_scar(x, g, width=w, height=h)
    y = torch.arange(N_CLASSES).repeat_interleave(len(x)).to(x.device)
    return torch.cat((x, cp, scar)), y


def cutpaste_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Eq. (2): cross-entropy over the three classes, averaged over the stacked batch."""
    return F.cross_entropy(logits.float(), labels)


def ledoit_wolf(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Mean, Ledoit-Wolf shrunk covariance and shrinkage of the rows of ``x [n, d]`` (float64 inside).

    Sigma = (1 - s) S + s mu I with S the maximum-likelihood covariance, mu = tr(S) / d and s the
    estimated optimal shrinkage min(b^2, d^2) / d^2 (Ledoit & Wolf 2004; scikit-learn's formula)."""
    x = x.double()
    n, d = x.shape
    mean = x.mean(0)
    xc = x - mean
    s = xc.T @ xc / n
    mu = torch.trace(s) / d
    x2 = xc * xc
    beta_ = (x2.T @ x2).sum()
    delta_ = (s * s).sum()
    beta = (beta_ / n - delta_) / (d * n)
    delta = (delta_ - 2 * mu * torch.trace(s) + d * mu * mu) / d
    shrink = 0.0 if float(beta) == 0 else float(torch.minimum(beta, delta) / delta)
    cov = (1 - shrink) * s + shrink * mu * torch.eye(d, dtype=x.dtype, device=x.device)
    return mean, cov, shrink


def mahalanobis(f: torch.Tensor, mean: torch.Tensor, precision: torch.Tensor) -> torch.Tensor:
    """sqrt((f - mu)^T Sigma^-1 (f - mu)) per row of ``f [n, d]``: eq. (3)'s -log p up to constants, monotone."""
    z = f.double() - mean
    return ((z @ precision) * z).sum(1).clamp_min(0).sqrt().float()


@register("cutpaste", family="ssl", paper="CutPaste: Self-Supervised Learning for Anomaly Detection and Localization",
          year=2021, bibkey="li2021cutpaste", localizes=True, trains=True,
          quick=dict(image_size=64, patch_size=16, patch_stride=8, epochs=8, batch_size=16, freeze="stage5",
                     head_dims=(512, 128), lr=0.01),
          deviations=("backbone: EfficientNet-Lite0 (ImageNet weights, fine-tuned, pooled at stage7) instead of "
                      "ResNet-18; the projection head is the authors' one-class code's MLP (8 x 512 + 128 with "
                      "batch norm), which the paper does not spell out",
                      "an epoch is one pass over the training images (the paper: 256 steps of 32 images); no "
                      "random translation or colour jitter of the whole image before CutPaste",
                      "one network for detection (whole images) and one for localisation (patches), trained in "
                      "the same loop on the sum of their independent losses (the same as training them apart)",
                      "receptive-field upsampling written as the mean score of the patches covering a pixel, then "
                      "a Gaussian of sigma 4 px at 256 px (scaled to image_size)",
                      "quick preset: 64 px, 16 px patches at stride 8 (the paper: 4 at 256 px), stages 1-5 frozen, a 512-128 head, 8 epochs at lr 0.01"))
class CutPaste(FeatureDetector):
    """3-way CutPaste / scar classifier; Gaussian density of its representations; patch-level maps."""

    image_size = Param.image_size(256, low=32)
    epochs = Param.epochs(256)
    batch_size = Param(32, int, low=2, help="images per step; each adds its CutPaste and scar copies (3x)")
    lr = Param.lr(0.03)
    weight_decay = Param.weight_decay(3e-5)
    momentum = Param(0.9, float, low=0, high=1, high_open=True, help="SGD momentum")
    head_dims = Param((512,) * 8 + (128,), tuple, item=int, help="widths of the MLP projection head")
    tap = Param(None, str, none=True, help="the backbone tap whose pooled output is f(x) (None: the deepest)")
    freeze = Param(None, str, none=True, help="keep the stem and the stages up to this one fixed (None: train all)")
    patch_size = Param(64, int, low=8, help="side of the patch-level network's patches, px (at image_size)")
    patch_stride = Param(4, int, low=1, help="stride between scored patches, px")
    sigma = Param.sigma(4.0)
    localize = Param(True, bool, help="train the patch-level network and return maps")

    def _check_params(self) -> None:
        super()._check_params()
        if self.layers is not None:
            raise bad(self.name, "layers", self.layers, "None (CutPaste reads one pooled tap: set tap=)")
        taps = list(stages(self.backbone))
        for key in ("tap", "freeze"):
            value = getattr(self, key)
            if value is not None and value not in taps:
                raise bad(self.name, key, value, f"one of {', '.join(taps)}, or None")
        tap = self.tap or taps[-1]
        if self.freeze is not None and taps.index(self.freeze) >= taps.index(tap):
            raise bad(self.name, "freeze", self.freeze, f"a stage before the tap {tap!r} (something must train)")
        if self.image_size is not None and self.patch_size > self.image_size:
            raise bad(self.name, "patch_size", self.patch_size, f"at most image_size={self.image_size}")

    def _build(self, shapes: dict) -> None:
        tap = self.tap or list(stages(self.backbone))[-1]
        self.net_ = CutPasteNet(Backbone(self.backbone, self.pretrained, tap, self.freeze, self.weights),
                                self.head_dims)
        c = self.net_.backbone.channels
        self.register_buffer("mean_", torch.zeros(c, dtype=torch.float64))
        self.register_buffer("precision_", torch.eye(c, dtype=torch.float64))
        if self.localize:
            self.patch_net_ = CutPasteNet(Backbone(self.backbone, self.pretrained, tap, self.freeze, self.weights),
                                          self.head_dims)
            self.register_buffer("patch_mean_", torch.zeros(c, dtype=torch.float64))
            self.register_buffer("patch_precision_", torch.eye(c, dtype=torch.float64))

    # ----------------------------------------------------------------- training
    def _random_patches(self, x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        """One random ``patch_size`` crop per image."""
        p, (h, w) = self.patch_size, x.shape[-2:]
        ys = torch.randint(0, h - p + 1, (len(x),), generator=g).tolist()
        xs = torch.randint(0, w - p + 1, (len(x),), generator=g).tolist()
        return torch.stack([img[:, y : y + p, x0 : x0 + p] for img, y, x0 in zip(x, ys, xs)])

    def _step(self, x: torch.Tensor, ctx):
        xb, y = three_way_batch(x, ctx.generator)
        _, logits = self.net_(xb)
        loss = cutpaste_loss(logits, y)
        logs = {"acc": (logits.argmax(1) == y).float().mean()}
        if self.localize:
            patches = self._random_patches(x, ctx.generator)
            pb, py = three_way_batch(patches, ctx.generator, scar_scale=x.shape[-1] / self.patch_size)
            patch_loss = cutpaste_loss(self.patch_net_(pb)[1], py)
            loss = loss + patch_loss
            logs["patch"] = patch_loss.detach()
        return loss, logs

    def _fit(self, x: torch.Tensor) -> None:
        modules = nn.ModuleList([self.net_, self.patch_net_] if self.localize else [self.net_])
        self._train(self._step, x, module=modules, optimizer="sgd", momentum=self.momentum, schedule="cosine")
        f = self._embed(self.net_, x)
        self.mean_, cov, shrink = ledoit_wolf(f)
        self.precision_ = torch.linalg.inv(cov)
        self.diagnostics_["shrinkage"] = shrink
        if self.localize:
            fp = torch.cat([self._patch_embeddings(x[i : i + 8].to(self.device_))[0].flatten(0, 2).cpu()
                            for i in range(0, len(x), 8)])
            self.patch_mean_, cov, shrink = ledoit_wolf(fp)
            self.patch_precision_ = torch.linalg.inv(cov)
            self.diagnostics_["patch_shrinkage"] = shrink

    # ----------------------------------------------------------------- scoring
    @torch.no_grad()
    def _embed(self, net: CutPasteNet, x: torch.Tensor, bs: int = 32) -> torch.Tensor:
        net.eval()
        return torch.cat([net.backbone(x[i : i + bs].to(self.device_)).cpu() for i in range(0, len(x), bs)])

    @torch.no_grad()
    def _patch_embeddings(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        """f of every ``patch_size`` patch at ``patch_stride``: ``[B, gh, gw, C]``."""
        p, s = self.patch_size, self.patch_stride
        tiles = x.unfold(2, p, s).unfold(3, p, s)  # [B, 3, gh, gw, p, p]
        b, _, gh, gw = tiles.shape[:4]
        tiles = tiles.permute(0, 2, 3, 1, 4, 5).reshape(-1, 3, p, p)
        self.patch_net_.eval()
        f = torch.cat([self.patch_net_.backbone(tiles[i : i + 512]) for i in range(0, len(tiles), 512)])
        return f.view(b, gh, gw, -1), (gh, gw)

    def _score(self, x: torch.Tensor):
        self.net_.eval()
        scores = mahalanobis(self.net_.backbone(x), self.mean_, self.precision_)
        if not self.localize:
            return scores, None
        f, (gh, gw) = self._patch_embeddings(x)
        grid = mahalanobis(f.flatten(0, 2), self.patch_mean_, self.patch_precision_).view(len(x), gh, gw)
        maps = window_mean(grid, x.shape[-2:], self.patch_size, self.patch_stride)
        return scores, gaussian_blur(maps, self.sigma * x.shape[-1] / 256)


__all__ = ["CutPaste", "CutPasteNet", "cutpaste_loss", "ledoit_wolf", "mahalanobis", "three_way_batch"]
