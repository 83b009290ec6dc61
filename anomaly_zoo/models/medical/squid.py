"""SQUID: deep feature in-painting with space-aware memory queues (Xiang et al., CVPR 2023).

Radiographs (and registered scans) show the same anatomy at the same place in every image, so a
normal patch at one position looks like the normal patches seen *at that position* before. SQUID
turns this into a detector in four parts (paper Sec. 3; the equations are cited by name, their
numbers were not checked):

1. **Patches and encoder.** The image is cut into an ``N x N`` grid of non-overlapping patches
   (``grid``); one shared convolutional encoder ``E`` (``blocks.Pyramid``) encodes each patch on its
   own into a feature map ``F_p`` (position ``p = row * N + col``).
2. **Space-aware memory queue** (Sec. 3.2, :class:`MemoryQueue`). Each position ``p`` has its own
   memory of ``memory_size`` real patch features, a first-in-first-out queue: after each generator
   step the features just computed at ``p`` overwrite the oldest entries of ``p``'s queue (no
   gradient reaches the memory; it holds real features, not learned bases). A query ``q`` at ``p``
   reads only ``p``'s queue, with **Gumbel shrinkage** (:func:`gumbel_shrink`)::

       w = softmax(q M_p^T),   w^ = sg(hs(w, t) - w) + w,   read(q) = w^ M_p

   ``hs(w, t)`` keeps the ``top_k`` largest weights (``t`` the k-th largest) and renormalises them to
   sum 1, ``sg`` stops the gradient: the forward pass combines the k most similar normal features,
   the backward pass is the softmax's.
3. **Feature in-painting** (Sec. 3.3, :class:`InpaintBlock`). A 1x1 bottleneck reduces ``F_p`` to
   ``q_p`` (flattened: the memory's items). Each patch is then rebuilt by one transformer layer whose
   query is ``q_p`` and whose keys and values are the memory read-outs of its **8 neighbours** in the
   grid (zero vectors outside it, as the authors' code pads the 3x3 window), with the patch's own
   read-out as the residual: ``h = ReLU(LN(Attn(q_p, n, n)) + read(q_p))``, ``h' = ReLU(LN(FF(h)) + h)``;
   a binary code of ``p`` is appended and a 1x1 convolution restores the channels. The raw patch
   feature thus enters the output only through the attention weights and the choice of memory
   items: everything added up comes from normal features stored in the memory. In training, the
   **masked shortcut** ``F'_p = delta inpaint(F)_p + (1 - delta) F_p``, ``delta ~ Bernoulli(rho)`` per
   feature-map position (``mask_ratio`` = rho = 0.95), lets a little of the real feature through; at
   test time ``F' = inpaint(F)``.
4. **Teacher and student generators, discriminator** (Sec. 3.1, 3.4, 3.5). Two decoders of the same
   shape (``blocks.UpPyramid``): the teacher ``G_t`` decodes the real features ``E(x)`` (detached, as
   in the code: an auto-encoder that only regularises), the student ``G_s`` the in-painted ones.
   Knowledge distillation couples them at every upsampling stage. A discriminator ``D``
   (``blocks.SimpleDiscriminator``) tells real images from the student's reconstructions; only the
   student receives its gradient. Losses (binary cross-entropy on ``D``'s logits)::

       L_G = l_s ||x - G_s(F')||^2 + l_t ||x - G_t(E(x))||^2 + l_dist sum_i ||G_s^i - G_t^i||^2
             + l_gen BCE(D(G_s(F')), real)
       L_D = l_d [BCE(D(x), real) + BCE(D(G_s(F')), fake)]

   weights 10 / 0.01 / 0.001 / 0.005 and 0.005 (the authors' best chest X-ray configuration),
   ``D`` updated on every batch and the generators on every ``n_critic`` = 2nd (``Player(every=2)``).

**Anomaly score** (Sec. 3.4): the discriminator judges the student's reconstruction of the test
image, standardised by the mean ``mu`` and standard deviation ``sigma`` of ``D`` on the training
images' reconstructions (computed once after training)::

    A(x) = 1 - sigmoid((D(G_s(inpaint(E(x)))) - mu) / sigma)

(written ``sigmoid(-z)``, the same number without the rounding of ``1 - sigmoid``). **Map** (the
paper gives none): the student's reconstruction residual ``mean_c |x - G_s(inpaint(E(x)))|``,
Gaussian-smoothed by ``sigma_map`` px: where the image differs from its in-painted, memory-made
normal version.

Default preset: the authors' ``configs/zhang_best.py`` (128 px, a 2 x 2 grid, 4 encoder stages of
32-512 channels, 200 memory items per position, top 5, rho 0.95, Adam lr 1e-4 with betas (0.5,
0.999), weight decay 1e-5 on the generators, batch 16, 200 epochs).

Quick preset (64 px, 4 x 4 grid, about 33 s of one CPU thread on 60 images), chosen on the training
images only (48 to fit, 12 held out, with synthetic anomalies of :mod:`anomaly_zoo.synthesis`): lr
3e-3 and batch 4 bring the held-out reconstruction error from 0.095 (lr 1e-3, batch 16) to 0.005;
60 epochs, width 16, a 2 x 2 grid, top 1, 10 memory items or ``w_gen`` 0.05 / 0.5 left the
discriminator's AUROC on the synthetic anomalies at 0.48-0.62 (0.59 / 0.60 for the preset),
so the paper's values stay. Measured, data seeds 0 / 1 / 2 (test sets, once, at the end):

* phantom: image AUROC 0.417 / 0.455 / 0.592 (the issue's target 0.75 is **missed**), pixel AUROC
  0.938 / 0.957 / 0.897, AUPRO 0.703 / 0.757 / 0.685 (mean training image: pixel 0.890 / 0.894 /
  0.878, AUPRO 0.63 / 0.61 / 0.60; untrained network, seed 0: image 0.552, pixel 0.262);
* retina: image AUROC 0.410 / 0.535 / 0.494 (target 0.70 **missed**), pixel AUROC 0.642 / 0.565 /
  0.669 (mean image 0.659 / 0.635 / 0.653: not beaten; the crops are not aligned, so the
  per-position memory has no anatomy to learn).

Why the score fails here while the map works: the in-painting does what it should (the residual
map finds the lesions, and on held-out training images with synthetic anomalies the top 1 % of the
map separates them with AUROC 0.99 / 0.93), so the student's reconstruction of a lesioned image is
a *normal-looking* reconstruction, and ``D``, which only sees that reconstruction, has nothing to
object to. The paper's premise, that reconstructions of abnormal images look unrealistic, does not
hold for these small, aligned sets and a generator trained for seconds.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ...base import Detector
from ...ops import gaussian_blur
from ...params import Param, bad
from ...registry import register
from ...training import Player
from .blocks import Pyramid, SimpleDiscriminator, UpPyramid, to_patches

CENTRE = 4  # index of the patch itself in its flattened 3x3 neighbourhood


def gumbel_shrink(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Gumbel shrinkage over the last axis: forward the ``k`` largest softmax weights renormalised,
    backward the softmax's gradient (``sg(hs(w, t) - w) + w``)."""
    w = torch.softmax(logits, dim=-1)
    if k >= w.shape[-1]:
        return w
    top = w.topk(k, dim=-1)
    hard = torch.zeros_like(w).scatter(-1, top.indices, top.values)
    hard = hard / hard.sum(-1, keepdim=True)
    return (hard - w).detach() + w


class MemoryQueue(nn.Module):
    """One FIFO queue of ``size`` real features of dimension ``dim`` per grid position (``items [P, size, dim]``)."""

    def __init__(self, positions: int, size: int, dim: int, top_k: int):
        super().__init__()
        bound = 1 / math.sqrt(dim)  # the authors' initial (random) content, replaced as training fills the queue
        self.register_buffer("items", torch.empty(positions, size, dim).uniform_(-bound, bound))
        self.register_buffer("ptr", torch.zeros(positions, dtype=torch.long))
        self.top_k = top_k

    def read(self, q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Queries ``q [B, P, dim]``, each against its own position's queue -> (read-out ``[B, P, dim]``,
        weights ``[B, P, size]``)."""
        items = self.items.clone()  # a snapshot: push() may overwrite the queue before backward
        w = gumbel_shrink(torch.einsum("bpd,pmd->bpm", q, items), self.top_k)
        return torch.einsum("bpm,pmd->bpd", w, items), w

    @torch.no_grad()
    def push(self, f: torch.Tensor) -> None:
        """Enqueue features ``f [B, P, dim]``: at every position they overwrite the oldest entries."""
        size, b = self.items.shape[1], f.shape[0]
        first = max(0, b - size)  # more features than slots: only the newest ``size`` stay
        for p in range(self.items.shape[0]):
            slots = (self.ptr[p] + torch.arange(first, b, device=f.device)) % size
            self.items[p, slots] = f[first:, p].to(self.items.dtype)
            self.ptr[p] = (self.ptr[p] + b) % size


def neighbours(r: torch.Tensor, grid: int) -> torch.Tensor:
    """Read-outs ``r [B, P, d]`` on the grid -> the 8 neighbours of every patch ``[B * P, 8, d]``
    (row-major over the 3x3 window without its centre; zeros outside the grid)."""
    b, p, d = r.shape
    windows = F.unfold(r.transpose(1, 2).reshape(b, d, grid, grid), 3, padding=1)  # [B, d * 9, P]
    windows = windows.view(b, d, 9, p).permute(0, 3, 2, 1)  # [B, P, 9, d]
    keep = [i for i in range(9) if i != CENTRE]
    return windows[:, :, keep].reshape(b * p, 8, d)


def position_code(positions: int) -> torch.Tensor:
    """Binary code of every position ``[P, bits]``, most significant bit first (``floor(log2 P) + 1`` bits)."""
    bits = int(math.log2(positions)) + 1
    idx = torch.arange(positions)[:, None]
    return ((idx >> torch.arange(bits - 1, -1, -1)) & 1).float()


class InpaintBlock(nn.Module):
    """Bottleneck, space-aware memory, transformer in-painting from the 8 neighbours, position code, masked shortcut."""

    def __init__(self, channels: int, hw: tuple[int, int], grid: int, heads: int, mask_ratio: float,
                 memory_size: int, top_k: int):
        super().__init__()
        c = channels // 4
        self.grid, self.c, self.hw, self.mask_ratio = grid, c, hw, mask_ratio
        d = c * hw[0] * hw[1]
        self.reduce = nn.Sequential(nn.Conv2d(channels, c, 1, bias=False), nn.BatchNorm2d(c), nn.ReLU())
        self.memory = MemoryQueue(grid * grid, memory_size, d, top_k)
        self.attention = nn.MultiheadAttention(d, heads, batch_first=True)
        self.norm1, self.norm2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.ff = nn.Sequential(nn.Linear(d, d // 4), nn.ReLU(), nn.Linear(d // 4, d))
        self.register_buffer("code", position_code(grid * grid), persistent=False)
        self.expand = nn.Sequential(nn.Conv2d(c + self.code.shape[1], channels, 1), nn.BatchNorm2d(channels),
                                    nn.ReLU())

    def forward(self, feat: torch.Tensor, generator: torch.Generator | None = None):
        """Patch features ``[B * P, C, h, w]`` -> (in-painted features, same shape; queries ``[B, P, d]``)."""
        n, (h, w), p = feat.shape[0], self.hw, self.grid**2
        q = self.reduce(feat).reshape(n // p, p, -1)
        r, _ = self.memory.read(q)
        nb = neighbours(r, self.grid)
        a = self.attention(q.reshape(n, 1, -1), nb, nb, need_weights=False)[0][:, 0]
        z = F.relu(self.norm1(a) + r.reshape(n, -1))
        z = F.relu(self.norm2(self.ff(z)) + z)
        code = self.code.repeat(n // p, 1)[:, :, None, None].expand(-1, -1, h, w)
        out = self.expand(torch.cat([z.view(n, self.c, h, w), code], 1))
        if self.training and self.mask_ratio < 1:  # the masked shortcut
            delta = torch.bernoulli(torch.full((n, 1, h, w), self.mask_ratio), generator=generator)
            delta = delta.to(out.device, out.dtype)
            out = delta * out + (1 - delta) * feat
        return out, q


class SquidNet(nn.Module):
    """Encoder, in-painting block, student and teacher generators."""

    def __init__(self, channels, width, levels, grid, combine, hw, heads, mask_ratio, memory_size, top_k):
        super().__init__()
        self.grid = grid
        self.encoder = Pyramid(channels, width, levels)
        self.inpaint = InpaintBlock(self.encoder.out_channels, hw, grid, heads, mask_ratio, memory_size, top_k)
        self.student = UpPyramid(channels, width, levels, grid, combine)
        self.teacher = UpPyramid(channels, width, levels, grid, combine)

    def forward(self, x: torch.Tensor, generator: torch.Generator | None = None, teacher: bool = True) -> dict:
        feat = self.encoder(to_patches(x, self.grid))
        z, q = self.inpaint(feat, generator)
        out = dict(zip(("student", "student_feats"), self.student(z)), query=q, features=feat)
        if teacher:
            out.update(zip(("teacher", "teacher_feats"), self.teacher(feat.detach())))
        return out


def generator_terms(x: torch.Tensor, out: dict) -> dict:
    """The reconstruction and distillation terms of L_G (mean squared errors)."""
    dist = sum(F.mse_loss(s, t) for s, t in zip(out["student_feats"], out["teacher_feats"]))
    return {"student": F.mse_loss(out["student"], x), "teacher": F.mse_loss(out["teacher"], x), "dist": dist}


@register("squid", family="medical", paper="SQUID: Deep Feature In-Painting for Unsupervised Anomaly Detection",
          year=2023, bibkey="xiang2023squid", localizes=True, trains=True,
          quick=dict(image_size=64, grid=4, levels=2, width=8, memory_size=50, combine=1, epochs=30, lr=3e-3,
                     d_lr=1e-3, batch_size=4, sigma_map=2.0),
          deviations=("the encoder and generators have no skip connections and no memory matrices in the decoder "
                      "(the authors' code concatenates encoder features into the two deepest decoder stages, "
                      "each followed by a learned, space-aware memory matrix)",
                      "Gumbel shrinkage keeps exactly the top_k weights (the authors' hard_shrink_relu at the "
                      "k-th weight also zeroes the k-th: top k - 1)",
                      "constant learning rates (the code: cosine annealing to 0.1 lr over 300 epochs)",
                      "three-channel images in and out (the code: one grey channel)",
                      "the map (student reconstruction residual) is the library's; the paper only detects",
                      "D sees real and reconstructed images in one batch (the code: two calls, whose BatchNorm "
                      "batch statistics alone separate them; in eval mode D then answered the same for both)",
                      "quick preset: 64 px, a 4 x 4 grid of 16 px patches, 2 encoder stages of width 8, 50 memory "
                      "items per position, batch 4, 30 epochs at lr 3e-3 (D: 1e-3)"))
class Squid(Detector):
    """Patch features in-painted from their neighbours and per-position memory queues; a discriminator scores."""

    image_size = Param.image_size(128)
    grid = Param(2, int, low=2, help="patches per side N (N x N patches, each encoded separately)")
    levels = Param(4, int, low=1, high=6, help="stride-2 encoder stages (the generators mirror them)")
    width = Param(32, int, low=4, high=256, help="channels of the first encoder stage, doubled at each stage")
    combine = Param(2, int, low=0, help="last generator stages that run on whole images instead of patches")
    memory_size = Param(200, int, low=1, help="memory queue slots per grid position")
    top_k = Param(5, int, low=1, help="memory items kept by Gumbel shrinkage")
    heads = Param(8, int, low=1, help="attention heads of the in-painting transformer")
    mask_ratio = Param(0.95, float, low=0, high=1, help="rho: probability of the in-painted feature in training")
    w_student = Param(10.0, float, low=0, help="weight of the student's reconstruction loss")
    w_teacher = Param(0.01, float, low=0, help="weight of the teacher's reconstruction loss")
    w_dist = Param(0.001, float, low=0, help="weight of the distillation loss")
    w_gen = Param(0.005, float, low=0, help="weight of the student's adversarial loss")
    w_disc = Param(0.005, float, low=0, low_open=True, help="weight of the discriminator's loss")
    n_critic = Param(2, int, low=1, help="discriminator steps per generator step")
    d_lr = Param(1e-4, float, low=0, low_open=True, help="learning rate of the discriminator")
    sigma_map = Param(0.0, float, low=0, help="Gaussian smoothing of the residual map, px (0: none)")
    epochs = Param.epochs(200)
    batch_size = Param.batch_size(16)
    lr = Param.lr(1e-4)
    weight_decay = Param.weight_decay(1e-5)

    # ------------------------------------------------------------- checks
    def _check_params(self) -> None:
        if self.combine > self.levels:
            raise bad(self.name, "combine", self.combine, f"an integer from 0 to levels={self.levels}")
        if self.top_k > self.memory_size:
            raise bad(self.name, "top_k", self.top_k, f"an integer from 1 to memory_size={self.memory_size}")
        if self.image_size is not None:
            self._geometry((self.image_size, self.image_size))

    def _geometry(self, hw) -> tuple[int, int]:
        """The bottleneck's (h, w) per patch for images of size ``hw``, or one clear error."""
        step = self.grid * 2**self.levels
        for side in hw:
            if side % step:
                key, value = ("image_size", self.image_size) if self.image_size is not None else ("images", hw)
                raise bad(self.name, key, value, f"a side divisible by grid * 2^levels = {self.grid} * "
                          f"2^{self.levels} = {step} (the grid's patches are halved {self.levels} times)")
        h, w = (side // step for side in hw)
        channels = self.width * 2**self.levels
        d = channels // 4 * h * w
        if d % self.heads:
            raise bad(self.name, "heads", self.heads, f"a divisor of the memory items' size {d} "
                      f"(width * 2^levels / 4 channels x {h} x {w})")
        return h, w

    # ------------------------------------------------------------ build/fit
    def _build(self, shapes: dict) -> None:
        hw = tuple(shapes["input_hw"])
        self.net_ = SquidNet(3, self.width, self.levels, self.grid, self.combine, self._geometry(hw), self.heads,
                             self.mask_ratio, self.memory_size, self.top_k)
        self.disc_ = SimpleDiscriminator(3, hw)
        self.register_buffer("d_mean_", torch.zeros(()))
        self.register_buffer("d_std_", torch.ones(()))

    def _judge(self, real: torch.Tensor, fake: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``D``'s logits for real and reconstructed images, in *one* batch: with two batches, BatchNorm's
        training-mode statistics alone tell them apart, and in eval mode ``D`` then says nothing."""
        logits = self.disc_(torch.cat([real, fake]))
        return logits[: len(real)], logits[len(real):]

    def _d_step(self, x, ctx):
        with torch.no_grad():
            fake = self.net_(x, ctx.generator, teacher=False)["student"]
        real_logit, fake_logit = self._judge(x, fake)
        loss = F.binary_cross_entropy_with_logits(real_logit, torch.ones_like(real_logit)) + \
            F.binary_cross_entropy_with_logits(fake_logit, torch.zeros_like(fake_logit))
        return self.w_disc * loss

    def _g_step(self, x, ctx):
        out = self.net_(x, ctx.generator)
        terms = generator_terms(x, out)
        logit = self._judge(x, out["student"])[1]
        terms["gen"] = F.binary_cross_entropy_with_logits(logit, torch.ones_like(logit))
        loss = (self.w_student * terms["student"] + self.w_teacher * terms["teacher"] + self.w_dist * terms["dist"]
                + self.w_gen * terms["gen"])
        self.net_.inpaint.memory.push(out["query"].detach())  # FIFO update with this step's real features
        return loss, {k: v.detach() for k, v in terms.items()}

    def _fit(self, x: torch.Tensor) -> None:
        betas = (0.5, 0.999)
        self._train([Player("discriminator", self._d_step, self.disc_.parameters(), lr=self.d_lr, betas=betas,
                            weight_decay=0.0),
                     Player("generator", self._g_step, self.net_.parameters(), betas=betas, every=self.n_critic)],
                    x, module=self)
        self.eval()
        with torch.no_grad():  # mu and sigma of D on the training images' reconstructions (the code's ``collect``)
            logits = torch.cat([self.disc_(self.net_(b.to(self.device_), teacher=False)["student"]).float().cpu()
                                for b in x.split(self.predict_batch_size)])
        self.d_mean_.fill_(logits.mean())
        self.d_std_.fill_(logits.std().clamp_min(1e-6) if len(logits) > 1 else 1.0)
        self.diagnostics_["train_logit_mean"] = float(logits.mean())

    # ------------------------------------------------------------- scoring
    @torch.no_grad()
    def reconstruct(self, images) -> torch.Tensor:
        """The student's reconstruction ``G_s(inpaint(E(x)))`` of ``images`` at ``image_size`` (CPU, [0, 1])."""
        x = self._prepare(images, "images").to(self.device_)
        return torch.cat([self.net_(b, teacher=False)["student"].float().cpu() for b in x.split(self.predict_batch_size)])

    @torch.no_grad()
    def memory_queries(self, images) -> torch.Tensor:
        """The queries ``q_p`` every patch sends to its position's memory, ``[N, P, d]`` (CPU), for figures."""
        x = self._prepare(images, "images").to(self.device_)
        p = self.grid**2
        return torch.cat([self.net_.inpaint.reduce(self.net_.encoder(to_patches(b, self.grid))).reshape(len(b), p, -1)
                          .float().cpu() for b in x.split(self.predict_batch_size)])

    def _score(self, x: torch.Tensor):
        x_s = self.net_(x, teacher=False)["student"]
        z = (self.disc_(x_s) - self.d_mean_) / self.d_std_
        maps = gaussian_blur((x - x_s).abs().mean(1), self.sigma_map)
        return torch.sigmoid(-z), maps
