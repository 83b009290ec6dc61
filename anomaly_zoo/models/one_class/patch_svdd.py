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
  from f(p1) - f(p2): L_SSL = cross-entropy(y, C(f(p1) - f(p2))). As in the reference
  code: p1 lies anywhere in the image and p2 3K/4 to K-1 pixels away in its direction,
  clipped to the image; both patches get a random colour shift (std 0.02 per channel)
  and per-pixel noise (std 0.02); C is the MLP D-128-128-8 whose last layer has a fixed,
  column-normalised random weight and a trained bias (the reference computes that weight
  under ``no_grad``, so it never trains).
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

Default preset (the paper's and its reference code's settings): 256 px images, K = 64 and
32, test strides 16 and 4, lambda = 1, Adam, lr 1e-4, 300 epochs of 100 patch pairs per
image, batch 64, inputs centred by the training set's mean image. Its differences from
the paper are listed in the model card's ``deviations``.
The quick preset halves everything spatially (128 px, K = 32 and 16; f_small for 16 px
is the same design with 3 instead of 7 valid 3x3 layers), uses test strides of 8 and
trains on far fewer pairs.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ...base import Detector
from ...ops import knn, window_mean
from ...params import Param, bad
from ...registry import register
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


class NormalizedLinear(nn.Module):
    """The reference code's last layer of C: a linear map whose weight columns are divided by their
    norm inside ``torch.no_grad()``, so only the bias learns and the weight stays its (normalised)
    random initialisation. Kept that way here: a fixed random projection, a trained bias."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        lin = nn.Linear(cin, cout)  # PyTorch's default init, as the reference's reset_parameters
        self.register_buffer("weight", lin.weight.detach() / lin.weight.detach().norm(dim=0, keepdim=True))
        self.bias = nn.Parameter(lin.bias.detach().clone())

    def forward(self, x):
        return F.linear(x, self.weight, self.bias)


class PositionClassifier(nn.Module):
    """C: f(p1) - f(p2) -> logits over the 8 relative positions (the reference MLP D-128-128-8)."""

    def __init__(self, d: int = 64):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(d, 128), nn.LeakyReLU(0.1), nn.Linear(128, 128), nn.LeakyReLU(0.1),
                                 NormalizedLinear(128, 8))

    def forward(self, h1, h2):
        return self.net((h1 - h2).flatten(1))


def crop(x: torch.Tensor, tops: torch.Tensor, lefts: torch.Tensor, k: int) -> torch.Tensor:
    """Patches ``[B, 3, k, k]`` of images ``x [B, 3, H, W]`` at the given top-left corners."""
    r = torch.arange(k, device=x.device)
    rows = (tops.to(x.device)[:, None] + r)[:, :, None]
    cols = (lefts.to(x.device)[:, None] + r)[:, None, :]
    return x[torch.arange(len(x), device=x.device)[:, None, None], :, rows, cols].permute(0, 3, 1, 2)


def sample_position_pairs(b: int, h: int, w: int, k: int, g: torch.Generator):
    """SSL pairs as in the reference code: p1 anywhere in the image; p2 3K/4 to K-1 px away from p1 in
    direction ``label``, clipped to the image (near a border p2 then moves less, or not at all along
    that axis). Returns ``(top1, left1, top2, left2, label)`` (all ``[b]`` long)."""
    if min(h, w) < k:
        raise AnomalyZooError(f"images of {h}x{w} are too small for patch size {k}")
    t1 = torch.randint(0, h - k + 1, (b,), generator=g)
    l1 = torch.randint(0, w - k + 1, (b,), generator=g)
    label = torch.randint(0, 8, (b,), generator=g)
    dirs = torch.tensor(POSITIONS)[label]
    delta = torch.randint(0, max(1, k // 4), (b, 2), generator=g) + 3 * k // 4
    t2 = (t1 + dirs[:, 0] * delta[:, 0]).clamp(0, h - k)
    l2 = (l1 + dirs[:, 1] * delta[:, 1]).clamp(0, w - k)
    return t1, l1, t2, l2, label


def sample_jitter_pairs(b: int, h: int, w: int, k: int, g: torch.Generator):
    """SVDD' pairs as in the reference code: p1 anywhere, p2 = p1 shifted by at most J = max(1, K // 32) px
    per axis (never by zero), clipped to the image; a shift the clipping cancels is taken the other way."""
    j = max(1, k // 32)
    t1 = torch.randint(0, h - k + 1, (b,), generator=g)
    l1 = torch.randint(0, w - k + 1, (b,), generator=g)
    shift = torch.randint(-j, j + 1, (b, 2), generator=g)
    zero = (shift == 0).all(1)
    shift[zero, 0] = j  # the reference code redraws a zero shift; any non-zero shift will do
    t2, l2 = (t1 + shift[:, 0]).clamp(0, h - k), (l1 + shift[:, 1]).clamp(0, w - k)
    same = (t2 == t1) & (l2 == l1)
    t2[same] = (t1 - shift[:, 0])[same].clamp(0, h - k)
    l2[same] = (l1 - shift[:, 1])[same].clamp(0, w - k)
    return t1, l1, t2, l2


@register("patch_svdd", family="one_class", paper="Patch SVDD: Patch-level SVDD for Anomaly Detection and "
          "Segmentation", year=2020, bibkey="yi2020patchsvdd", localizes=True, trains=True,
          quick=dict(image_size=128, patch_size=32, strides=(8, 8), epochs=10, pairs_per_image=8),
          deviations=("data: the library's 256 px texture crops instead of MVTec AD images resized to 256 px",
                      "the nearest normal patch is found by exact brute force (the reference code uses an "
                      "approximate search, NGT or k-means)",
                      "SVDD' pairs: for K = 16 (quick preset) the jitter is 1 px; the reference's K // 32 would be 0"))
class PatchSVDD(Detector):
    """Hierarchical patch encoder (SVDD' + relative-position SSL); nearest-normal-patch distance maps."""

    predict_batch_size = 8

    patch_size = Param(64, int, choices=(32, 64), help="the big patch K (the small one is K/2); 64 in the paper")
    dim = Param(64, int, low=1, help="embedding size D")
    lam = Param(1.0, float, low=0, help="lambda of eq. 5, the weight of L_SVDD'")
    image_size = Param.image_size(256)
    strides = Param((16, 4), tuple, item=int, help="test strides (big, small), two even integers >= 2")
    epochs = Param.epochs(300)
    pairs_per_image = Param(100, int, low=1, help="training pairs drawn per image and epoch")
    batch_size = Param.batch_size(64)
    lr = Param.lr(1e-4)
    rgb_jitter = Param(0.02, float, low=0, help="std of the random colour shift of each SSL patch (reference code)")
    pixel_noise = Param(0.02, float, low=0, help="std of the per-pixel noise added to each SSL patch (reference code)")

    def _check_params(self) -> None:
        if len(self.strides) != 2 or any(s % 2 or s < 2 for s in self.strides):
            raise bad(self.name, "strides", self.strides, "two even integers >= 2 (big, small)")

    def _build(self, shapes: dict) -> None:
        self.enc_ = HierEncoder(SmallEncoder(self.patch_size // 2, self.dim), self.dim)
        self.cls_big_ = PositionClassifier(self.dim)
        self.cls_small_ = PositionClassifier(self.dim)
        self.register_buffer("mean_", torch.zeros(1, 3, *shapes["input_hw"]))

    # ----------------------------------------------------------------- training
    def _encoder(self, scale: str):
        return self.enc_ if scale == "big" else self.enc_.small

    def _pairs_loss(self, x: torch.Tensor, scale: str, g: torch.Generator):
        k = self.patch_size if scale == "big" else self.patch_size // 2
        enc = self._encoder(scale)
        cls = self.cls_big_ if scale == "big" else self.cls_small_
        b, _, h, w = x.shape
        t1, l1, t2, l2, label = sample_position_pairs(b, h, w, k, g)
        p1, p2 = self._jitter(crop(x, t1, l1, k), g), self._jitter(crop(x, t2, l2, k), g)
        ssl = F.cross_entropy(cls(enc(p1), enc(p2)), label.to(x.device))  # eq. (4)
        t1, l1, t2, l2 = sample_jitter_pairs(b, h, w, k, g)
        svdd = (enc(crop(x, t1, l1, k)) - enc(crop(x, t2, l2, k))).flatten(1).norm(dim=1).mean()  # eq. (3)
        return ssl, svdd

    def _jitter(self, p: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        """The reference code's perturbation of SSL patches: a random colour shift per patch plus
        per-pixel noise, so that colour casts and exact pixel values cannot give the position away."""
        shift = self.rgb_jitter * torch.randn(len(p), 3, 1, 1, generator=g)
        noise = self.pixel_noise * torch.randn(p.shape, generator=g)
        return p + (shift + noise).to(p.device)

    def _step(self, idx: torch.Tensor, ctx):
        x = self._train_x[idx.cpu()].to(self.device_) - self.mean_
        ssl_b, svdd_b = self._pairs_loss(x, "big", ctx.generator)
        ssl_s, svdd_s = self._pairs_loss(x, "small", ctx.generator)
        loss = ssl_b + ssl_s + self.lam * (svdd_b + svdd_s)  # eq. (5), both scales
        return loss, {"ssl": float((ssl_b + ssl_s).detach()), "svdd": float((svdd_b + svdd_s).detach())}

    def _fit(self, x: torch.Tensor) -> None:
        if min(x.shape[-2:]) < self.patch_size:
            raise bad(self.name, "image_size", self.image_size, f"at least patch_size={self.patch_size} px")
        # inputs are centred by the training set's mean image (the reference code subtracts it too)
        self.mean_.copy_(x.mean(0, keepdim=True).to(self.device_))
        self._train_x = x  # a plain attribute (not saved): the step crops its patches from here
        index = torch.arange(len(x)).repeat(self.pairs_per_image)
        modules = nn.ModuleList([self.enc_, self.cls_big_, self.cls_small_])
        try:
            self._train(self._step, index, module=modules)
        finally:
            del self._train_x
        # the normal patch embeddings of every training patch, both scales (the NN search's memory)
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

    def _score(self, x: torch.Tensor):
        maps = []
        for emb, memory, k, s in zip(self.embed_dense(x), (self.memory_big_, self.memory_small_),
                                     (self.patch_size, self.patch_size // 2), self.strides):
            b, d, gh, gw = emb.shape
            a = knn(emb.permute(0, 2, 3, 1).reshape(-1, d), memory, 1)[0][:, 0].view(b, gh, gw)  # eq. (6)
            maps.append(window_mean(a, x.shape[-2:], k, s))
        m = maps[0] * maps[1]  # the two scales, multiplied
        return m.flatten(1).amax(1), m
