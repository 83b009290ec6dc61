"""CCD: constrained contrastive distribution learning (Tian, Pang, Liu, Chen, Shin, Verjans, Singh &
Carneiro, MICCAI 2021; seed 000), a self-supervised *pre-training* of an anomaly detector's encoder.

Two stages, both in ``fit``:

1. **Pre-training** of an encoder ``f_theta`` on the normal training images, eq. (1)::

       l_CCD = l_con (eq. 2) + l_cla (eq. 3) + l_pos (eq. 4)

   * eq. (2), contrastive distribution learning (:func:`contrastive_loss`): every image ``x`` of a batch
     goes through each transformation ``a_j`` of a **strong** set ``A_n`` (``strong="cutperm"``: swapped
     halves; ``"rotation"``, ``"noise"``; :mod:`anomaly_zoo.synthesis.augment`), and each ``x~^j = a_j(x)``
     through two draws ``a, a'`` of the **weak** set ``A_p`` (SimCLR's crops, flips, colour jitter). The
     pair ``f(a(x~^j)), f(a'(x~^j))`` is pulled together, and ``f(a(x~^j))`` pushed away from
     ``f(a'(.))`` of every other strongly augmented image of the batch, at temperature ``tau``::

         l_con = -E log exp(s(a(x~^j), a'(x~^j)) / tau) / sum_m exp(s(a(x~^j), a'(m)) / tau)

     ``s`` the cosine similarity of a projection head's outputs (SimCLR's MLP to 128 dimensions, the
     authors' code), ``m`` over the batch's strongly augmented images: eq. (2)'s other images under the same
     ``a_j`` and, as in the authors' code (each strongly augmented copy its own instance), the images under
     the other ``a_j``. So the strong augmentations form *distributions* of their own, away from the
     normal one (``a_0``, the identity), which is what the detector later needs.
   * eq. (3), strong-augmentation classification (``l_cla``): a linear layer ``f_beta`` on ``f_theta``
     predicts which ``a_j`` was applied (cross-entropy, both weak views).
   * eq. (4), relative patch position (``l_pos``, after Doersch et al. 2015): a patch ``x_w1`` and one of
     its eight neighbours ``x_w2`` (:func:`neighbour_pairs`; the authors' offsets: 3/4 to 1 patch side
     along each axis, label order :data:`OFFSETS`); ``f_gamma`` (an MLP on the two concatenated codes)
     predicts which neighbour. The patches are resized to the image size for the encoder.

   ``pretrain="simclr"`` is the paper's SimCLR baseline: eq. (2) on the images themselves (no strong
   set: weak-augmentation positives, instance negatives), no eq. (3)-(4). ``pretrain="none"``: no
   pre-training, the downstream detector alone (the same numbers as ``az.create(downstream)``).

2. **Fine-tuning** of a downstream detector from ``f_theta``: ``downstream="igd"`` (the paper's best,
   score eq. (5) with l_rec eq. (6)), ``"f_anogan"`` (eq. (7): the encoder, pre-trained, is E of its izi_f
   stage) or ``"ms_ssim_ae"`` (s_MSI). The detector comes from the registry (no cross-family import):
   ``f_theta`` *is* that detector's encoder architecture (its ``ccd_encoder`` hook names it), and its
   ``encoder_init`` hook makes its ``fit`` start from the pre-trained weights; everything else (seeding,
   decoder, training, score and map) is the detector's own. Image score and map: the downstream's.
   Pre-training starts from the very weights the downstream would start from (one seed), so ``pretrain``
   ``"none"``, ``"simclr"`` and ``"ccd"`` differ by the pre-training alone (the paper's ablation).

Optimiser (the authors' configuration): SGD, lr 0.01, momentum 0.9, weight decay 3e-4, cosine decay,
batch 32, tau 0.2, 2000 epochs. Quick preset: 40 epochs at lr 0.02 and the downstream's quick preset (IGD
at 32 px), chosen on the training images alone: lr 0.05 diverged (NaN) on 2 of 11 quick sets (data seed 0),
0.02 reached the same pretext losses on all of them. About 35-45 s per fit on one busy CPU thread (15 s of it
pre-training); with ``downstream="ms_ssim_ae"`` (64 px) about 130 s.

Measured with the quick preset (data seeds 0 / 1 / 2):

* digits, ten-class one-vs-rest mean image AUROC 0.953 / 0.945 / 0.968 (the issue's target 0.85 is met);
  IGD alone: 0.961 / 0.945 / 0.961.
* phantom: image AUROC 0.484 / 0.566 / 0.399, pixel AUROC 0.467 / 0.576 / 0.512, AUPRO 0.130 / 0.208 / 0.132
  (the target 0.75 is **missed**; IGD alone 0.542 at seed 0). Lesions of 24-280 px at 128 px shrink to a
  few pixels at 32 px, swapped halves teach the encoder the global layout rather than small blobs, and
  fine-tuning (IGD: 40 epochs of Adam at 1e-3) moves the encoder far from its start.
* the paper's ablation (phantom seed 0: image / pixel AUROC; digits seed 0: ten-class mean image AUROC)::

      downstream   pretrain none         simclr               ccd
      igd          .542 / .592, .961     .526 / .570, .969    .484 / .467, .953
      f_anogan     .521 / .402, .988     .514 / .387, .985    .479 / .412, .988
      ms_ssim_ae   .608 / .825, .996     .597 / .824, .995    .580 / .810, .997

  On these small sets and short runs the pre-training adds nothing the spread of one seed could show
  (the paper reports gains of several points on colonoscopy and fundus images of 224-256 px, after
  2000 epochs of pre-training a ResNet-18).
"""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from ...base import Detector, resize
from ...params import Param, bad
from ...registry import _REGISTRY, register
from ...synthesis.augment import STRONG, strong_augment, weak_augment
from ...utils import AnomalyZooError, check_images

PRETRAIN = ("ccd", "simclr", "none")
DOWNSTREAM = ("igd", "f_anogan", "ms_ssim_ae")
#: eq. (4)'s eight classes: label -> (row, column) direction of x_w2 from x_w1 (the authors' ``pos_to_diff``)
OFFSETS = ((-1, -1), (-1, 0), (-1, 1), (0, -1), (0, 1), (1, -1), (1, 0), (1, 1))


# ------------------------------------------------------------------------------------ losses
def contrastive_loss(z_a: torch.Tensor, z_b: torch.Tensor, tau: float) -> torch.Tensor:
    """Eq. (2) over a batch of ``M`` instances: ``z_a[n]``, ``z_b[n]`` the projections of two weak views of
    instance ``n``; ``-mean_n log exp(c_nn / tau) / sum_m exp(c_nm / tau)``, ``c`` the cosine similarity."""
    logits = F.normalize(z_a, dim=1) @ F.normalize(z_b, dim=1).T / tau
    return F.cross_entropy(logits, torch.arange(len(z_a), device=z_a.device))


def neighbour_pairs(x: torch.Tensor, size: int, generator: torch.Generator):
    """Eq. (4)'s pretext: per image a ``size`` px patch ``x_w1`` placed so that all eight neighbours fit,
    and its neighbour ``x_w2`` in a random direction ``OFFSETS[label]``, shifted by ``3 size / 4`` plus a
    jitter in ``[0, size / 4)`` along each moving axis (the authors' ``generate_coords_position``).
    Returns ``(x_w1, x_w2 [N, C, size, size], labels [N], corners [N, 4] = (y1, x1, y2, x2))``."""
    n, _, h, w = x.shape
    if min(h, w) < 3 * size:
        raise AnomalyZooError(f"neighbour_pairs: patches of {size} px need images of at least {3 * size} px")
    g = generator
    labels = torch.randint(8, (n,), generator=g)
    y1 = torch.randint(size, h - 2 * size + 1, (n,), generator=g)
    x1 = torch.randint(size, w - 2 * size + 1, (n,), generator=g)
    gap, jitter = 3 * size // 4, max(1, size // 4)
    d = torch.tensor(OFFSETS)[labels]
    y2 = y1 + d[:, 0] * (gap + torch.randint(jitter, (n,), generator=g))
    x2 = x1 + d[:, 1] * (gap + torch.randint(jitter, (n,), generator=g))
    corners = torch.stack([y1, x1, y2, x2], 1)
    crop = [torch.stack([x[i, :, a:a + size, b:b + size] for i, (a, b) in enumerate(zip(ys.tolist(), xs.tolist()))])
            for ys, xs in ((y1, x1), (y2, x2))]
    return crop[0], crop[1], labels.to(x.device), corners


# ----------------------------------------------------------------------------------- network
class CCDNet(nn.Module):
    """``f_theta`` (a copy of the downstream detector's encoder) and the pre-training heads: the projection
    of eq. (2), ``f_beta`` of eq. (3) (``n_strong`` classes) and ``f_gamma`` of eq. (4) (eight classes)."""

    def __init__(self, encoder: nn.Module, side: int, signed: bool, proj_dim: int, n_strong: int = 0,
                 position: bool = False):
        super().__init__()
        self.encoder, self.signed = encoder, signed
        was = encoder.training
        with torch.no_grad():  # the code's dimension, in eval mode (BatchNorm statistics untouched)
            dim = self.encode(torch.zeros(2, 3, side, side).to(next(encoder.parameters()))).shape[1]
        encoder.train(was)
        self.project = nn.Sequential(nn.Linear(dim, dim), nn.ReLU(), nn.Linear(dim, proj_dim))
        self.classify = nn.Linear(dim, n_strong) if n_strong else None
        self.position = nn.Sequential(nn.Linear(2 * dim, proj_dim), nn.ReLU(),
                                      nn.Linear(proj_dim, len(OFFSETS))) if position else None

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """``f_theta(x)`` ``[B, D]`` for images in [0, 1] (an encoder that reads [-1, 1] gets ``2 x - 1``)."""
        return self.encoder(x * 2 - 1 if self.signed else x).flatten(1)


@register("ccd", family="ssl", paper="Constrained Contrastive Distribution Learning for Unsupervised Anomaly "
          "Detection and Localisation in Medical Images", year=2021, bibkey="tian2021ccd", localizes=True,
          trains=True, quick=dict(epochs=40, lr=0.02, downstream_preset="quick"),
          deviations=("f_theta is the downstream detector's own encoder (the library's conv auto-encoder for igd "
                      "and ms_ssim_ae, the DCGAN encoder for f_anogan) at that detector's image size, not the "
                      "authors' ResNet-18 on 224-256 px images",
                      "one global model: the paper (after IGD) also pre-trains and fine-tunes a second detector on "
                      "local patches and combines the two",
                      "eq. (2): cosine similarity of a projection head (the authors' code); the negatives are all "
                      "other strongly augmented images of the batch, as in the authors' code, where eq. (2) lists "
                      "only the other images under the same strong augmentation; one direction (anchor a(x))",
                      "each step takes batch_size images with all K strong augmentations of each (the authors "
                      "sample (image, augmentation) pairs from the K-fold set)",
                      "eq. (4): patches of a quarter of the side (the authors: 32 px of 256 px), resized to the "
                      "image size for the encoder, without weak augmentations; f_gamma reads the two codes "
                      "concatenated (the authors' code: the difference of projected codes)",
                      "weak augmentations re-implemented in torch; cosine decay to zero by step (the authors: "
                      "to lr / 1000 by epoch)",
                      "f_anogan: the library's f_anogan scores A_D in the critic's feature space, not in "
                      "f_theta's as eq. (7) writes; its WGAN is trained from scratch, the pre-trained encoder "
                      "is E of its izi_f stage",
                      "quick preset: 40 epochs at lr 0.02 (the authors: 2000 at 0.01), chosen on the training "
                      "images' pretext losses"))
class CCD(Detector):
    """Contrastive distribution pre-training (eq. 1-4) of a downstream detector's encoder, then that detector."""

    pretrain = Param("ccd", str, choices=PRETRAIN, help="'ccd' eq. (1); 'simclr' eq. (2) alone without strong "
                     "augmentations (the paper's baseline); 'none' the downstream alone")
    downstream = Param("igd", str, choices=DOWNSTREAM, help="the detector fine-tuned from the encoder (Sec. 2.2)")
    downstream_preset = Param("default", str, choices=("default", "quick"), help="the downstream's preset")
    downstream_params = Param(None, dict, none=True, help="a dict of the downstream's own parameters "
                              "(over its preset); None: the preset as is")
    strong = Param("cutperm", str, choices=tuple(STRONG), help="the strong augmentation set A_n")
    tau = Param(0.2, float, low=0, low_open=True, help="temperature of eq. (2) (0.2, the authors' code)")
    proj_dim = Param(128, int, low=1, help="output of eq. (2)'s projection head (128)")
    patch_size = Param(None, int, low=2, none=True, help="eq. (4)'s patches, px; None: a quarter of the side")
    image_size = Param(None, int, low=16, none=True, help="images are resized to this side, px; None: the "
                       "downstream's image_size")
    epochs = Param.epochs(2000)
    batch_size = Param.batch_size(32)
    lr = Param.lr(0.01)
    weight_decay = Param.weight_decay(3e-4)

    # ------------------------------------------------------------------- downstream
    def downstream_config(self) -> dict:
        """The downstream detector's parameters: its preset, ``downstream_params``, this ``image_size``,
        ``seed`` and ``device``."""
        card = _REGISTRY[self.downstream]
        params = dict(card.quick) if self.downstream_preset == "quick" else {}
        params.update(self.downstream_params or {})
        if self.image_size is not None:
            params["image_size"] = self.image_size
        params.update(seed=self.seed, device=self.device)
        return params

    def _make_downstream(self) -> Detector:
        try:
            return _REGISTRY[self.downstream].cls(**self.downstream_config())
        except AnomalyZooError as err:
            raise AnomalyZooError(f"{self.name}: downstream_params: {err}") from None

    def side(self) -> int | None:
        """The image side both stages work at (the downstream's ``image_size``)."""
        cfg = self.downstream_config()
        return cfg.get("image_size", _REGISTRY[self.downstream].cls._params["image_size"].default)

    def _patch(self, side: int) -> int:
        return self.patch_size or max(2, side // 4)

    def _check_params(self) -> None:
        extra = self.downstream_params
        for key in ("seed", "device"):
            if extra and key in extra:
                raise bad(self.name, "downstream_params", extra, f"no {key!r}: the downstream gets ccd's own {key}")
        down = self._make_downstream()
        try:
            down.check_params()
        except AnomalyZooError as err:
            raise AnomalyZooError(f"{self.name}: downstream {err}") from None
        side = self.side()
        if self.pretrain == "ccd" and side is not None and 3 * self._patch(side) > side:
            raise bad(self.name, "patch_size", self.patch_size, f"at most a third of the image side ({side} px)")

    def _prepare(self, images, name: str) -> torch.Tensor:
        x = check_images(images, name)
        side = self.side()
        return resize(x, side) if side else x

    def _build(self, shapes: dict) -> None:
        down = self._make_downstream()
        down.shapes_ = shapes.get("downstream", {"input_hw": list(shapes["input_hw"])})
        down.history_, down.diagnostics_ = {}, {}
        down._build(down.shapes_)
        self.downstream_ = down
        self.predict_batch_size = down.predict_batch_size
        if self.pretrain != "none":
            h, w = shapes["input_hw"]
            if self.pretrain == "ccd" and 3 * self._patch(min(h, w)) > min(h, w):
                raise bad(self.name, "patch_size", self.patch_size, f"at most a third of the image side ({h} px)")
            encoder = copy.deepcopy(down.get_submodule(down.ccd_encoder))
            ccd = self.pretrain == "ccd"
            self.ssl_ = CCDNet(encoder, h, down.ccd_signed, self.proj_dim, STRONG[self.strong][1] if ccd else 0,
                               position=ccd)

    def _restore(self, config, state, device="auto") -> Detector:
        super()._restore(config, state, device)
        self.downstream_.device_ = self.device_
        return self

    # --------------------------------------------------------------------- training
    def pretext_losses(self, x: torch.Tensor, generator: torch.Generator) -> dict:
        """The terms of eq. (1) on a batch ``x`` (and the pretext accuracies): ``{"con", "cla", "pos", ...}``."""
        net, g = self.ssl_, generator
        if self.pretrain == "ccd":
            xs, ys = strong_augment(x, self.strong, g)
        else:
            xs, ys = x, None
        z_a, z_b = net.encode(weak_augment(xs, g)), net.encode(weak_augment(xs, g))
        out = {"con": contrastive_loss(net.project(z_a), net.project(z_b), self.tau)}
        if self.pretrain == "ccd":
            logits = torch.cat([net.classify(z_a), net.classify(z_b)])
            labels = torch.cat([ys, ys])
            out["cla"] = F.cross_entropy(logits, labels)
            out["acc_cla"] = (logits.argmax(1) == labels).float().mean()
            p1, p2, pos, _ = neighbour_pairs(x, self._patch(x.shape[-1]), g)
            up = [F.interpolate(p, size=x.shape[-2:], mode="bilinear", align_corners=False) for p in (p1, p2)]
            logits = net.position(torch.cat([net.encode(up[0]), net.encode(up[1])], 1))
            out["pos"] = F.cross_entropy(logits, pos)
            out["acc_pos"] = (logits.argmax(1) == pos).float().mean()
        return out

    def _pretrain(self, x: torch.Tensor) -> None:
        sums: dict[str, list[float]] = {}

        def step(batch, ctx):
            terms = self.pretext_losses(batch, ctx.generator)
            for k, v in terms.items():
                sums.setdefault(k, []).append(float(v.detach()))
            loss = terms["con"] + terms.get("cla", 0.0) + terms.get("pos", 0.0)  # eq. (1)
            return loss, {k: v.detach() for k, v in terms.items()}

        def epoch_end(ctx):
            for k, v in sums.items():
                self.history_.setdefault(f"pretrain_{k}", []).append(sum(v) / len(v))
            sums.clear()

        self._train(step, x, module=self.ssl_, params=self.ssl_.parameters(), key="pretrain", optimizer="sgd",
                    schedule="cosine", on_epoch_end=epoch_end)

    def _fit(self, x: torch.Tensor) -> None:
        down = self.downstream_
        if self.pretrain != "none":
            self._pretrain(x)
            down.encoder_init = {k: v.detach().clone() for k, v in self.ssl_.encoder.state_dict().items()}
        try:
            down.fit(x)
        finally:
            down.encoder_init = None
        self.shapes_["downstream"] = down.shapes_
        self.history_.update({f"{self.downstream}_{k}": v for k, v in down.history_.items()})
        self.diagnostics_.update({f"{self.downstream}_{k}": v for k, v in down.diagnostics_.items()})

    # ---------------------------------------------------------------------- scoring
    def _score(self, x: torch.Tensor):
        """The downstream detector's score and map (eq. 5, eq. 7 or s_MSI)."""
        return self.downstream_._score(x)

    @torch.no_grad()
    def embed(self, images) -> torch.Tensor:
        """The fine-tuned encoder's codes ``f_theta(x)`` ``[N, D]`` (CPU), for figures."""
        down = self.downstream_
        x = self._prepare(images, "images").to(self.device_)
        enc = down.get_submodule(down.ccd_encoder)
        return enc(x * 2 - 1 if down.ccd_signed else x).flatten(1).cpu()
