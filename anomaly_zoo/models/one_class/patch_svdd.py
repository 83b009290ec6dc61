"""Patch SVDD: Patch-level SVDD for Anomaly Detection and Segmentation (Yi & Yoon, ACCV 2020).

Deep SVDD describes a whole image by one point near one centre. A texture or an
object is made of many different-looking patches, so one centre cannot describe them
all; Patch SVDD embeds *patches* and only asks that neighbouring patches, which look
alike, be embedded close together (many implicit centres), plus a self-supervised task
that keeps the embedding informative.

* SVDD' (their eq. 3): L_SVDD' = sum_i ||f(p_i) - f(p_i')||_2, with p_i' a patch
  jittered by a few pixels around p_i (the reference code: at most K/32 px).
* Self-supervised learning (eq. 4, after Doersch et al. 2015): a classifier C predicts
  the relative position (one of 8 neighbours in a 3x3 grid) of p2 with respect to p1
  from f(p1) - f(p2): L_SSL = cross-entropy(y, C(f(p1) - f(p2))). p2 lies 3K/4 to K
  pixels away from p1 in its direction (the reference code's sampling).
* Total (eq. 5): L = lambda L_SVDD' + L_SSL, summed over the two patch sizes.
* Hierarchical encoder (Sec. 3.3, Fig. 6): f_big (patch K) splits its patch into 2x2
  sub-patches of K/2, encodes each with f_small and merges them with a 2x2 convolution
  and a 1x1 convolution; f_small is also the encoder of the small patch size.
  LeakyReLU(0.1) between layers, tanh at the end, embedding size D = 64.
* Inference (eq. 6 and Sec. 3.4): every patch (stride S) is scored by the distance to its
  nearest normal patch embedding, A(p) = min_{p_normal} ||f(p) - f(p_normal)||_2 (the
  normal embeddings of all training patches at all positions); each pixel takes the mean
  score of the patches covering it; the maps of the two scales are multiplied; the
  image score is the maximum of the map.

The encoders have no padding and a stride of 2 only in the first layer, so they are
fully convolutional: one pass over a whole image gives every patch embedding at once
(f_big by a dilated 2x2 convolution over f_small's map). The tests check that this dense
pass equals encoding each patch alone.

Paper settings (default preset): 256 px images, K = 64 and 32, test strides 16 and 4,
lambda = 1, Adam, lr 1e-4, 300 epochs of 100 patch pairs per image, batch 64.
The quick preset halves everything spatially (128 px, K = 32 and 16; f_small for 16 px
is the same design with 3 instead of 7 valid 3x3 layers), uses test strides of 8 and
trains on far fewer pairs.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ...base import Detector
from ...params import Param
from ...registry import register
from ...training import fit_loop
from ...utils import AnomalyZooError

#: (dy, dx) of the 8 relative positions (row-major 3x3 grid without its centre), the SSL labels
POSITIONS = ((-1, -1), (-1, 0), (-1, 1), (0, -1), (0, 1), (1, -1), (1, 0), (1, 1))


class SmallEncoder(nn.Module):
    """f_small: a K x K patch -> [D, 1, 1]; conv 3x3 stride 2, then valid 3x3 convs (the reference EncoderDeep)."""

    def __init__(self, k: int = 32, d: int = 64):
        super().__init__()
        widths = {32: (32, 64, 128, 128, 64, 32, 32), 16: (32, 64, 64)}
        if k not in widths:
            raise AnomalyZooError(f"Patch SVDD's small patch size must be 16 or 32, got {k}")
        chans = widths[k]
        layers = [nn.Conv2d(3, chans[0], 3, 2)]
        for cin, cout in zip(chans, chans[1:] + (d,)):
            layers.append(nn.Conv2d(cin, cout, 3))
        self.convs = nn.ModuleList(layers)
        self.k = k
        for conv in self.convs:  # He init for LeakyReLU: PyTorch's default shrinks 8 layers' output to ~0
            nn.init.kaiming_normal_(conv.weight, a=0.1, nonlinearity="leaky_relu")
            nn.init.zeros_(conv.bias)

    def forward(self, x):  # any size: a dense map of embeddings at stride 2
        for i, conv in enumerate(self.convs):
            x = conv(x)
            x = F.leaky_relu(x, 0.1) if i < len(self.convs) - 1 else torch.tanh(x)
        return x


class HierEncoder(nn.Module):
    """f_big: a 2K x 2K patch = 2x2 sub-patches of K, each through f_small, merged by conv 2x2 + conv 1x1."""

    def __init__(self, small: SmallEncoder, d: int = 64):
        super().__init__()
        self.small = small
        self.conv1 = nn.Conv2d(d, 128, 2)
        self.conv2 = nn.Conv2d(128, d, 1)
        self.k = 2 * small.k

    def merge(self, h, dilation: int = 1):
        return torch.tanh(self.conv2(F.leaky_relu(F.conv2d(h, self.conv1.weight, self.conv1.bias,
                                                           dilation=dilation), 0.1)))

    def forward(self, x):  # x: [B, 3, 2K, 2K] patches -> [B, D, 1, 1]
        b, k = len(x), self.small.k
        subs = x.unfold(2, k, k).unfold(3, k, k)  # [B, 3, 2, 2, K, K]
        h = self.small(subs.permute(0, 2, 3, 1, 4, 5).reshape(4 * b, 3, k, k))  # [4B, D, 1, 1]
        return self.merge(h.view(b, 2, 2, -1).permute(0, 3, 1, 2))

    def dense(self, small_map):
        """Every big-patch embedding from f_small's dense map (stride 2): sub-patches are K/2 cells apart."""
        return self.merge(small_map, dilation=self.small.k // 2)


class PositionClassifier(nn.Module):
    """C: f(p1) - f(p2) -> logits over the 8 relative positions (the reference MLP D-128-128-8)."""

    def __init__(self, d: int = 64):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(d, 128), nn.LeakyReLU(0.1), nn.Linear(128, 128), nn.LeakyReLU(0.1),
                                 nn.Linear(128, 8))

    def forward(self, h1, h2):
        return self.net((h1 - h2).flatten(1))


def crop(x: torch.Tensor, tops: torch.Tensor, lefts: torch.Tensor, k: int) -> torch.Tensor:
    """Patches ``[B, 3, k, k]`` of images ``x [B, 3, H, W]`` at the given top-left corners."""
    r = torch.arange(k, device=x.device)
    rows = (tops.to(x.device)[:, None] + r)[:, :, None]
    cols = (lefts.to(x.device)[:, None] + r)[:, None, :]
    return x[torch.arange(len(x), device=x.device)[:, None, None], :, rows, cols].permute(0, 3, 1, 2)


def sample_position_pairs(b: int, h: int, w: int, k: int, g: torch.Generator):
    """SSL pairs: p1 anywhere its 8 neighbours fit; p2 3K/4..K-1 px away in direction ``label``.
    Returns ``(top1, left1, top2, left2, label)`` (all ``[b]`` long)."""
    if min(h, w) < 3 * k:
        raise AnomalyZooError(f"images of {h}x{w} are too small for patch size {k}: need at least {3 * k} px")
    t1 = torch.randint(k, h - 2 * k + 1, (b,), generator=g)
    l1 = torch.randint(k, w - 2 * k + 1, (b,), generator=g)
    label = torch.randint(0, 8, (b,), generator=g)
    dirs = torch.tensor(POSITIONS)[label]
    delta = torch.randint(0, max(1, k // 4), (b, 2), generator=g) + 3 * k // 4
    return t1, l1, t1 + dirs[:, 0] * delta[:, 0], l1 + dirs[:, 1] * delta[:, 1], label


def sample_jitter_pairs(b: int, h: int, w: int, k: int, g: torch.Generator):
    """SVDD' pairs: p2 = p1 shifted by at most max(1, K // 32) px (never by zero)."""
    j = max(1, k // 32)
    t1 = torch.randint(j, h - k - j + 1, (b,), generator=g)
    l1 = torch.randint(j, w - k - j + 1, (b,), generator=g)
    shift = torch.randint(-j, j + 1, (b, 2), generator=g)
    zero = (shift == 0).all(1)
    shift[zero, 0] = j  # the reference code redraws a zero shift; any non-zero shift will do
    return t1, l1, t1 + shift[:, 0], l1 + shift[:, 1]


def distribute(scores: torch.Tensor, size, k: int, stride: int) -> torch.Tensor:
    """Patch scores ``[B, gh, gw]`` (patch (i, j) at ``(i*stride, j*stride)``) -> pixel maps ``[B, H, W]``:
    each pixel gets the mean score of the patches that cover it (uncovered border pixels: nearest)."""
    ones = torch.ones(1, 1, k, k, device=scores.device, dtype=scores.dtype)
    total = F.conv_transpose2d(scores[:, None], ones, stride=stride)
    count = F.conv_transpose2d(torch.ones_like(scores[:1, None]), ones, stride=stride)
    m = total / count.clamp_min(1)
    h, w = size
    pad = (0, max(0, w - m.shape[-1]), 0, max(0, h - m.shape[-2]))
    return F.pad(m, pad, mode="replicate")[:, 0, :h, :w]


@register("patch_svdd", family="one_class", paper="Patch SVDD: Patch-level SVDD for Anomaly Detection and "
          "Segmentation", year=2020, bibkey="yi2020patchsvdd", localizes=True, trains=True,
          quick=dict(image_size=128, patch_size=32, strides=(8, 8), epochs=10, pairs_per_image=8))
class PatchSVDD(Detector):
    """Hierarchical patch encoder (SVDD' + relative-position SSL); nearest-normal-patch distance maps."""

    predict_batch_size = 8

    patch_size = Param(64, int)
    dim = Param(64, int)
    lam = Param(1.0, float)
    image_size = Param.image_size(256)
    strides = Param((16, 4), tuple)
    epochs = Param.epochs(300)
    pairs_per_image = Param(100, int)
    batch_size = Param.batch_size(64)
    lr = Param.lr(1e-4)
    rgb_jitter = Param(0.01, float)

    def _build(self, meta: dict) -> None:
        if self.patch_size not in (32, 64):
            raise AnomalyZooError(f"patch_size must be 64 (the paper) or 32, got {self.patch_size}")
        self.enc_ = HierEncoder(SmallEncoder(self.patch_size // 2, self.dim), self.dim)
        self.cls_big_ = PositionClassifier(self.dim)
        self.cls_small_ = PositionClassifier(self.dim)

    # ----------------------------------------------------------------- training
    def _encoder(self, scale: str):
        return self.enc_ if scale == "big" else self.enc_.small

    def _pairs_loss(self, x: torch.Tensor, scale: str):
        k = self.patch_size if scale == "big" else self.patch_size // 2
        enc = self._encoder(scale)
        cls = self.cls_big_ if scale == "big" else self.cls_small_
        b, _, h, w = x.shape
        g = self._gen
        t1, l1, t2, l2, label = sample_position_pairs(b, h, w, k, g)
        p1, p2 = self._jitter(crop(x, t1, l1, k)), self._jitter(crop(x, t2, l2, k))
        ssl = F.cross_entropy(cls(enc(p1), enc(p2)), label.to(x.device))  # eq. (4)
        t1, l1, t2, l2 = sample_jitter_pairs(b, h, w, k, g)
        svdd = (enc(crop(x, t1, l1, k)) - enc(crop(x, t2, l2, k))).flatten(1).norm(dim=1).mean()  # eq. (3)
        return ssl, svdd

    def _jitter(self, p: torch.Tensor) -> torch.Tensor:
        """A small random RGB shift per patch (reference code) so colour casts cannot give the position away."""
        if not self.rgb_jitter:
            return p
        return p + self.rgb_jitter * torch.randn(len(p), 3, 1, 1, generator=self._gen).to(p.device)

    def _loss(self, idx: torch.Tensor):
        x = self._train_x[idx.cpu()].to(self.device_) - self.mean_
        ssl_b, svdd_b = self._pairs_loss(x, "big")
        ssl_s, svdd_s = self._pairs_loss(x, "small")
        loss = ssl_b + ssl_s + self.lam * (svdd_b + svdd_s)  # eq. (5), both scales
        return loss, {"ssl": float((ssl_b + ssl_s).detach()), "svdd": float((svdd_b + svdd_s).detach())}

    def _fit(self, x: torch.Tensor) -> None:
        if len(self.strides) != 2 or any(s % 2 or s < 2 for s in self.strides):
            raise AnomalyZooError(f"strides must be two even numbers (big, small), got {self.strides}")
        self._build(self.meta_)
        self._gen = torch.Generator().manual_seed(self.seed)
        # inputs are centred by the training set's channel means (the reference code subtracts the mean image)
        self.register_buffer("mean_", x.mean((0, 2, 3)).view(1, 3, 1, 1).to(self.device_))
        self._train_x = x  # a plain attribute (not saved): the step crops its patches from here
        index = torch.arange(len(x)).repeat(self.pairs_per_image)
        modules = nn.ModuleList([self.enc_, self.cls_big_, self.cls_small_])
        try:
            self.meta_["history"] = fit_loop(modules, self._loss, index, epochs=self.epochs,
                                             batch_size=self.batch_size, lr=self.lr, device=self.device_,
                                             seed=self.seed, desc="patch_svdd", checkpoint=self.checkpoint)
        finally:
            del self._train_x, self._gen
        # the normal patch embeddings of every training patch, both scales (the NN search's memory)
        self.to(self.device_)
        big, small = [], []
        with torch.no_grad():
            for i in range(0, len(x), self.predict_batch_size):
                eb, es = self.embed_dense(x[i : i + self.predict_batch_size].to(self.device_))
                big.append(eb.permute(0, 2, 3, 1).reshape(-1, self.dim))
                small.append(es.permute(0, 2, 3, 1).reshape(-1, self.dim))
        self.register_buffer("memory_big_", torch.cat(big))
        self.register_buffer("memory_small_", torch.cat(small))

    # ---------------------------------------------------------------- inference
    def embed_dense(self, x: torch.Tensor):
        """Embeddings of every patch at the test strides: ``(big [B, D, gh, gw], small [B, D, gh', gw'])``;
        the patch of cell (i, j) has its top-left corner at ``(i * stride, j * stride)``."""
        s_big, s_small = self.strides
        fs = self.enc_.small(x - self.mean_)  # dense at stride 2
        fb = self.enc_.dense(fs)
        return fb[:, :, :: s_big // 2, :: s_big // 2], fs[:, :, :: s_small // 2, :: s_small // 2]

    @staticmethod
    def nn_distance(query: torch.Tensor, memory: torch.Tensor, chunk: int = 4096) -> torch.Tensor:
        """min_m ||q - m||_2 for each row of ``query`` (eq. 6)."""
        m2 = memory.pow(2).sum(1)
        out = []
        for i in range(0, len(query), chunk):
            q = query[i : i + chunk]
            d2 = q.pow(2).sum(1, keepdim=True) + m2[None] - 2 * q @ memory.T
            out.append(d2.amin(1).clamp_min(0).sqrt())
        return torch.cat(out)

    def _score(self, x: torch.Tensor):
        maps = []
        for emb, memory, k, s in zip(self.embed_dense(x), (self.memory_big_, self.memory_small_),
                                     (self.patch_size, self.patch_size // 2), self.strides):
            b, d, gh, gw = emb.shape
            a = self.nn_distance(emb.permute(0, 2, 3, 1).reshape(-1, d), memory).view(b, gh, gw)
            maps.append(distribute(a, x.shape[-2:], k, s))
        m = maps[0] * maps[1]  # the two scales, multiplied
        return m.flatten(1).amax(1), m
