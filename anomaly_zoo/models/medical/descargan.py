"""DeScarGAN: disease-specific anomaly detection with weak supervision (Wolleb, Sandkühler & Cattin,
MICCAI 2020).

The one **weakly supervised** method of the zoo: it learns from healthy images (class ``h``) *and*
diseased ones (class ``p``), labelled per image only (no masks): ``fit(images, labels=...)``, 0 =
healthy, 1 = diseased. For a set with lesions the weak split serves: ``det.fit(ds.weak_images,
labels=ds.weak_labels)``. It refuses to fit without diseased examples: what sets them apart from
the healthy ones is all it learns.

The idea (paper Sec. 2): translate a real image ``r_c`` of class ``c`` into an artificial one
``a_cbar = G_cbar(r_c)`` of the other class ``cbar`` (an unpaired image-to-image translation, as in
StarGAN). The generator turns a diseased image into a healthy-looking one that keeps the patient's
anatomy; where the two differ is the disease: the map is ``d = |r_c - a_h|``.

* **Generator** ``G`` (:class:`Generator`): a U-Net conditioned on the target class (its one-hot
  code as two extra input planes, StarGAN's way) with one output branch per class, ``G_h`` and
  ``G_p``. Skip connections keep the image's details, so the difference map is sharp; the skip
  at full resolution is left out, so that the generator can change structures.
* **Discriminator** ``D`` (:class:`Discriminator`): a shared convolutional trunk with three heads:
  ``D_h`` and ``D_p``, critics (patch maps, averaged) telling real images of their class from
  artificial ones, and ``D_cls``, a classifier healthy vs diseased.

Losses (paper Sec. 2, the equations as the paper writes them; weights of the authors' code):

* adversarial, WGAN-GP: ``L_adv,d = -E[D_c(r_c)] + E[D_cbar(G_cbar(r_c))] + lambda_gp E[(||grad D_cbar(x^)||_2 - 1)^2]``
  and ``L_adv,g = -E[D_cbar(G_cbar(r_c))]`` (:meth:`DeScarGAN._d_step`, :meth:`DeScarGAN._g_step`);
* classification: ``L_cls,d = E[-log D_cls^c(r_c)]`` on real images, ``L_cls,g = E[-log D_cls^cbar(G_cbar(r_c))]``
  (the translated image must be classified as its target class);
* identity: ``L_id = E[||r_c - G_c(r_c)||_2]`` (a translation to the image's own class changes nothing);
* reconstruction (cycle): ``L_rec = E[||r_c - G_c(G_cbar(r_c))||_2]``;
* totals: ``L_d = lambda_adv,d L_adv,d + lambda_cls,d L_cls,d`` and
  ``L_g = lambda_adv,g L_adv,g + lambda_rec L_rec + lambda_id L_id + lambda_cls,g L_cls,g``,
  with the authors' weights 20 (real and fake terms), 10 (gradient penalty), 5, and 1, 50, 50, 1;
  ``||.||_2`` is the mean squared error in the code (``nn.MSELoss``), and so here.

``D`` takes a step on every batch, ``G`` on every ``n_critic`` = 5th (``Player(every=5)``), Adam
lr 1e-4, betas (0.5, 0.999), gradient norms clipped at 10, batch 10, 500 epochs (the authors'
code). As there, inputs get uniform noise ``0.05 U(0, 1)`` in training (in the ``[-1, 1]`` range of
the networks), drawn from the loop's seeded generator, and the identity and cycle targets are the
clean images. The gradient penalty of head ``D_cbar`` is taken on ``x^ = e r_c + (1 - e) G_cbar(r_c)``,
``e ~ U(0, 1)`` (``gan.blocks.gradient_penalty``), the pairs the paper's fake term compares, on
the *sum* of the critic's patch outputs, as the authors' code (``grad_outputs`` of ones on the
patch map): the losses use their mean, so the penalty holds that mean to a slope of 1 / (number
of patches), a far stiffer critic than a penalty on the mean (which diverges here within a hundred
steps, the adversarial terms weighing twice the penalty).

**Map** (the paper's difference ``d``): ``mean_c |x - G_h(x)|`` in ``[0, 1]`` units, every image
translated to healthy (for a healthy image, ideally no change), optionally smoothed (``sigma``, 0
by default). **Image score** (``score``): ``"classifier"`` (the paper's, default) is ``D_cls``'s
log-odds of "diseased", ``log D_cls^p(x) - log D_cls^h(x)``; ``"difference"`` is the mean of the map.

Quick preset (64 px, generator width 8, critic width 8, 15 epochs at lr 5e-4 over the weak split;
40-70 s of one busy CPU thread). Two changes, chosen on the training data (the weak split, 60 images
to fit, 20 held out): a **residual** generator that starts as the identity (the plain one needs ~300
steps to learn the identity at all: mean error 0.025 after 300 steps), and a **patch classifier**
(``classifier="patch_max"``: the dense head stayed at chance on the held-out images after 300 steps,
the patch head reached AUROC ~0.7-0.8). Even so, a few hundred discriminator steps on 80 images
teach it little: measured on phantom (trained on its weak split, tested on its test set), data seeds
0 / 1 / 2: pixel AUROC 0.769 / 0.733 / 0.738 (the issue's target 0.75 is met on seed 0 only; the
untrained network: 0.50; the distance to the mean training image: 0.89), AUPRO 0.33 / 0.26 / 0.23,
image AUROC 0.46 / 0.26 / 0.57 (chance). Retina: pixel AUROC 0.51 / 0.52 / 0.50, image AUROC 0.39 /
0.58 / 0.40 (chance). Ten times longer (150 epochs, 12 minutes; phantom seed 0): image AUROC 0.70,
pixel AUROC 0.81, AUPRO 0.42: the method needs GPU-scale training, as in the paper (500 epochs).
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
from ...utils import AnomalyZooError
from ..gan.blocks import gradient_penalty, to_signed

HEALTHY, DISEASED = 0, 1
N_CLASSES = 2


def conv_bn(cin: int, cout: int) -> nn.Sequential:
    """3x3 convolution, BatchNorm, ReLU (the generator's block in the authors' code)."""
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


def conv_relu(cin: int, cout: int) -> nn.Sequential:
    """3x3 convolution and ReLU, no normalisation (the critic of WGAN-GP: the penalty is per sample)."""
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.ReLU(inplace=True))


def by_class(heads: nn.ModuleList, h: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Apply ``heads[c]`` to the samples of ``h`` whose ``target`` is ``c`` (one output branch per class)."""
    if bool((target == target[0]).all()):
        return heads[int(target[0])](h)
    parts = [(target == c).nonzero().flatten() for c in range(len(heads))]
    outs = [heads[c](h[idx]) for c, idx in enumerate(parts) if len(idx)]
    order = torch.cat([idx for idx in parts if len(idx)]).argsort()
    return torch.cat(outs)[order]


class Generator(nn.Module):
    """U-Net with ``depth`` max-poolings (channels ``width * 2^i``), the target class as two constant
    input planes, skips at every level but the top one, and one output branch per class (tanh).

    ``residual=True`` (not in the paper; the quick preset): each branch outputs a change added to its
    input, ``G_c(x) = clamp(x + r_c(x), -1, 1)``, with ``r_c`` zero at the start, so that the
    generator starts as the identity instead of spending its first hundreds of steps learning it.
    """

    def __init__(self, channels: int = 3, width: int = 64, depth: int = 3, residual: bool = False):
        super().__init__()
        self.residual = residual
        ch = [width * 2**i for i in range(depth + 1)]
        self.down = nn.ModuleList([nn.Sequential(conv_bn(channels + N_CLASSES, ch[0]), conv_bn(ch[0], ch[0]))])
        self.down.extend(nn.Sequential(nn.MaxPool2d(2), conv_bn(a, b), conv_bn(b, b)) for a, b in zip(ch, ch[1:]))
        # decoder level i (from the bottom): upsample ch[i+1] -> ch[i]; levels below the top concatenate the skip
        self.ups = nn.ModuleList(nn.Sequential(nn.Upsample(scale_factor=2), conv_bn(ch[i + 1], ch[i]))
                                 for i in reversed(range(depth)))
        self.merge = nn.ModuleList(nn.Sequential(conv_bn(2 * ch[i], ch[i]), conv_bn(ch[i], ch[i]))
                                   for i in reversed(range(1, depth)))
        self.heads = nn.ModuleList(nn.Sequential(conv_bn(ch[0], ch[0]), nn.Conv2d(ch[0], channels, 3, padding=1),
                                                 nn.Identity() if residual else nn.Tanh())
                                   for _ in range(N_CLASSES))  # G_h, G_p

    def forward(self, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        code = F.one_hot(target, N_CLASSES).to(x.dtype)[:, :, None, None].expand(-1, -1, *x.shape[-2:])
        h = torch.cat([x, code], 1)
        skips = []
        for block in self.down:
            h = block(h)
            skips.append(h)
        for i, up in enumerate(self.ups):
            h = up(h)
            if i < len(self.merge):  # no skip at full resolution (the top level)
                h = self.merge[i](torch.cat([h, skips[-2 - i]], 1))
        out = by_class(self.heads, h, target)
        return (x + out).clamp(-1, 1) if self.residual else out


class Discriminator(nn.Module):
    """A shared trunk of 3x3 convolutions and max-poolings down to ``side/8``, then the critics
    ``D_h``, ``D_p`` (a patch map each, averaged to one number per image) and the classifier ``D_cls``.

    ``classifier="dense"`` is the authors' ``D_cls`` (two convolutions, a pooling, two dense layers);
    ``"patch_max"`` (not in the paper; the quick preset) gives every patch of the ``side/8`` grid its
    own two logits, like the critics, and takes, per class, the largest over the patches: an image
    is diseased when one patch is (multiple-instance learning). From 80 labelled images the dense
    head stays at chance for hundreds of steps; the patch head learns within a hundred.
    """

    def __init__(self, image_size: int, channels: int = 3, width: int = 32, classifier: str = "dense"):
        super().__init__()
        self.pool_patches = classifier == "patch_max"
        levels = int(round(math.log2(image_size))) - 3  # 256 px: five poolings to 8x8, as the authors' code
        layers, c = [conv_relu(channels, width)], width
        for i in range(1, levels + 1):
            out = 16 * width if i == levels else width * min(2**i, 8)
            layers += [nn.MaxPool2d(2), conv_relu(c, out)] + ([conv_relu(out, out)] if 1 < i < levels else [])
            c = out
        self.trunk = nn.Sequential(*layers)
        self.critics = nn.ModuleList(nn.Sequential(conv_relu(c, c), conv_relu(c, c), nn.Conv2d(c, 1, 1))
                                     for _ in range(N_CLASSES))  # D_h, D_p
        if self.pool_patches:
            self.classifier = nn.Sequential(conv_relu(c, c), conv_relu(c, c), nn.Conv2d(c, N_CLASSES, 1))
        else:
            self.classifier = nn.Sequential(conv_relu(c, c), conv_relu(c, c), nn.MaxPool2d(2), nn.Flatten(),
                                            nn.Linear(c * 16, 64), nn.ReLU(inplace=True), nn.Linear(64, N_CLASSES))

    def critic_map(self, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """The patch outputs of ``D_c`` for each image's class ``c = target``: ``[B, side/8, side/8]``."""
        return by_class(self.critics, self.trunk(x), target)[:, 0]

    def critic(self, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """``D_c(x)``, the mean of its patch outputs: ``[B]``."""
        return self.critic_map(x, target).flatten(1).mean(1)

    def classify(self, x: torch.Tensor) -> torch.Tensor:
        """``D_cls`` logits ``[B, 2]`` (healthy, diseased)."""
        out = self.classifier(self.trunk(x))
        return out.flatten(2).amax(2) if self.pool_patches else out


def init_weights_(gen: nn.Module, disc: nn.Module) -> None:
    """The authors' initialisation: He (fan-in, ReLU) for the generator, Xavier for the discriminator."""
    for module, init in ((gen, lambda w: nn.init.kaiming_normal_(w, mode="fan_in", nonlinearity="relu")),
                         (disc, nn.init.xavier_normal_)):
        for m in module.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                init(m.weight)
                nn.init.zeros_(m.bias)
    if gen.residual:  # start as the identity: every branch's change is zero
        for head in gen.heads:
            nn.init.zeros_(head[1].weight)


NEEDS_DISEASED = ("descargan is weakly supervised: it learns what sets diseased images apart from healthy ones, so "
                  "it needs labelled examples of both: fit(images, labels=...) with labels 0 (healthy) and 1 "
                  "(diseased), e.g. ds = az.data.load('phantom', quick=True); det.fit(ds.weak_images, "
                  "labels=ds.weak_labels)")


@register("descargan", family="medical", paper="DeScarGAN: Disease-Specific Anomaly Detection with Weak Supervision",
          year=2020, bibkey="wolleb2020descargan", localizes=True, trains=True,
          quick=dict(image_size=64, width=8, disc_width=8, residual=True, classifier="patch_max", epochs=15, lr=5e-4),
          deviations=("colour input (3 channels); the paper's images are grey",
                      "the generator's last layer is a plain convolution and tanh (the authors' code puts "
                      "BatchNorm before the tanh); BatchNorm momentum 0.1 (code: 0.01)",
                      "no dropout in the classifier head (code: 0.1), so that all randomness comes from the "
                      "seeded training loop",
                      "the gradient penalty of D_cbar is taken between r_c and G_cbar(r_c) only (the code also "
                      "penalises the identity translations)",
                      "the image score is D_cls's log-odds of 'diseased' (the paper reports the classifier's "
                      "decision); the map is not thresholded",
                      "training length in epochs over the weak split (the code: 500 epochs)",
                      "quick preset only: a residual generator and a patch classifier (residual=True, "
                      "classifier='patch_max'), not in the paper (see the module docstring)"))
class DeScarGAN(Detector):
    """Weakly supervised: translate to healthy with a class-conditioned U-Net GAN; map |x - G_h(x)|."""

    supervision = "weak"

    image_size = Param.image_size(256, low=16)
    width = Param(64, int, low=1, high=256, help="generator channels at full resolution (nf = 64 in the code)")
    disc_width = Param(32, int, low=1, high=256, help="discriminator's first channels (init_filters = 32 in the code)")
    depth = Param(3, int, low=1, high=6, help="max-poolings of the generator's U-Net (3 in the code)")
    residual = Param(False, bool, help="the generator adds a change to its input, starting as the identity "
                     "(not in the paper)")
    classifier = Param("dense", str, choices=("dense", "patch_max"),
                       help="D_cls: the authors' dense head, or per-patch logits, max over patches (not in the paper)")
    n_critic = Param(5, int, low=1, help="discriminator steps per generator step")
    gp_weight = Param(10.0, float, low=0, help="lambda_gp of the gradient penalty")
    adv_d_weight = Param(20.0, float, low=0, help="lambda_adv,d: the critics' real and fake terms (code: 20)")
    cls_d_weight = Param(5.0, float, low=0, help="lambda_cls,d of the classifier on real images")
    adv_g_weight = Param(1.0, float, low=0, help="lambda_adv,g of the generator's adversarial term")
    cls_g_weight = Param(1.0, float, low=0, help="lambda_cls,g: translations classified as their target")
    rec_weight = Param(50.0, float, low=0, help="lambda_rec of the cycle reconstruction")
    id_weight = Param(50.0, float, low=0, help="lambda_id of the identity translation")
    input_noise = Param(0.05, float, low=0, high=1, help="uniform noise added to training inputs, in [-1, 1] units")
    clip_grad = Param(10.0, float, low=0, low_open=True, help="gradient-norm clipping of both players")
    score = Param("classifier", str, choices=("classifier", "difference"),
                  help="image score: D_cls's log-odds (the paper) or the mean of the map")
    sigma = Param.sigma(0.0)
    epochs = Param.epochs(500)
    batch_size = Param.batch_size(10)
    lr = Param.lr(1e-4)

    def _check_params(self) -> None:
        s, step = self.image_size, 2**self.depth
        if s is not None and (s & (s - 1) or s < max(16, 2 * step)):
            raise bad(self.name, "image_size", s, f"a power of two >= {max(16, 2 * step)} (the discriminator "
                      f"pools to side/8, the U-Net of depth {self.depth} halves it {self.depth} times)")

    def _check_labels(self, labels, n: int):
        if labels is None:
            raise AnomalyZooError(NEEDS_DISEASED + "; got no labels")
        y = super()._check_labels(labels, n)
        if not bool((y == DISEASED).any()) or not bool((y == HEALTHY).any()):
            only = "healthy (0)" if bool((y == HEALTHY).all()) else "diseased (1)"
            raise AnomalyZooError(NEEDS_DISEASED + f"; got only {only} labels")
        return y

    def _build(self, shapes: dict) -> None:
        h, w = shapes["input_hw"]
        if h != w or h & (h - 1) or h < max(16, 2 * 2**self.depth):
            raise bad(self.name, "image_size", self.image_size, f"square images whose side is a power of two >= "
                      f"{max(16, 2 * 2**self.depth)} (the images are {h}x{w}: set image_size)")
        self.gen_ = Generator(3, self.width, self.depth, self.residual)
        self.disc_ = Discriminator(h, 3, self.disc_width, self.classifier)
        init_weights_(self.gen_, self.disc_)

    # ------------------------------------------------------------------ training
    def _noisy(self, x: torch.Tensor, ctx) -> torch.Tensor:
        u = torch.rand(x.shape, generator=ctx.generator).to(x.device, x.dtype)
        return x + self.input_noise * u

    def _d_step(self, batch, ctx):
        """``L_d = lambda_adv,d (-E[D_c(r_c)] + E[D_cbar(G_cbar(r_c))]) + lambda_gp GP + lambda_cls,d L_cls,d``."""
        x, y = batch
        real = self._noisy(to_signed(x), ctx)
        other = 1 - y
        with torch.no_grad():
            fake = self.gen_(real, other)  # a_cbar = G_cbar(r_c)
        fake = self._noisy(fake, ctx)
        wasserstein = self.disc_.critic(fake, other).mean() - self.disc_.critic(real, y).mean()
        gp = gradient_penalty(lambda z: (self.disc_.critic_map(z, other).flatten(1).sum(1),), real, fake,
                              ctx.generator, self.gp_weight)
        cls = F.cross_entropy(self.disc_.classify(real), y)
        loss = self.adv_d_weight * wasserstein + gp + self.cls_d_weight * cls
        return loss, {"w_dist": -wasserstein.detach(), "cls_d": cls.detach()}

    def _g_step(self, batch, ctx):
        """``L_g = lambda_adv,g L_adv,g + lambda_rec L_rec + lambda_id L_id + lambda_cls,g L_cls,g``."""
        x, y = batch
        clean = to_signed(x)
        real = self._noisy(clean, ctx)
        other = 1 - y
        fake = self.gen_(real, other)  # a_cbar = G_cbar(r_c)
        seen = self._noisy(fake, ctx)
        adv = -self.disc_.critic(seen, other).mean()
        cls = F.cross_entropy(self.disc_.classify(seen), other)
        ident = F.mse_loss(self.gen_(real, y), clean)  # G_c(r_c) = r_c
        rec = F.mse_loss(self.gen_(seen, y), clean)  # G_c(G_cbar(r_c)) = r_c
        loss = self.adv_g_weight * adv + self.rec_weight * rec + self.id_weight * ident + self.cls_g_weight * cls
        return loss, {"id": ident.detach(), "rec": rec.detach(), "cls_g": cls.detach()}

    def _fit(self, x: torch.Tensor, labels: torch.Tensor) -> None:
        betas = (0.5, 0.999)
        self._train([Player("discriminator", self._d_step, self.disc_.parameters(), betas=betas),
                     Player("generator", self._g_step, self.gen_.parameters(), betas=betas, every=self.n_critic)],
                    (x, labels.long()), module=self, clip_grad=self.clip_grad)
        self.diagnostics_["n_healthy"] = int((labels == HEALTHY).sum())
        self.diagnostics_["n_diseased"] = int((labels == DISEASED).sum())

    # ------------------------------------------------------------------- scoring
    def _translate(self, x: torch.Tensor, target: int) -> torch.Tensor:
        """``G_target(x)`` in ``[-1, 1]`` for images ``x`` in ``[0, 1]`` on the device."""
        t = torch.full((len(x),), target, dtype=torch.long, device=x.device)
        return self.gen_(to_signed(x), t)

    def _score(self, x: torch.Tensor):
        maps = (to_signed(x) - self._translate(x, HEALTHY)).abs().mean(1) / 2  # d = |r - a_h|, in [0, 1] units
        if self.score == "classifier":
            logits = self.disc_.classify(to_signed(x))
            scores = logits[:, DISEASED] - logits[:, HEALTHY]  # log D_cls^p(x) - log D_cls^h(x)
        else:
            scores = maps.flatten(1).mean(1)
        return scores, gaussian_blur(maps, self.sigma)

    @torch.no_grad()
    def translate(self, images, target: int = HEALTHY) -> torch.Tensor:
        """``G_target(x)`` in ``[0, 1]`` (CPU, at ``image_size``): ``target`` 0 = healthy, 1 = diseased."""
        if not self.is_fitted:
            raise AnomalyZooError("descargan is not fitted yet: call .fit(images, labels=...) first")
        if target not in (HEALTHY, DISEASED):
            raise AnomalyZooError(f"target must be 0 (healthy) or 1 (diseased), got {target!r}")
        x = self._prepare(images, "images").to(self.device_)
        self.eval()
        return ((self._translate(x, target) + 1) / 2).clamp(0, 1).cpu()

    @torch.no_grad()
    def classify(self, images) -> torch.Tensor:
        """``D_cls``'s probability that each image is diseased (CPU)."""
        if not self.is_fitted:
            raise AnomalyZooError("descargan is not fitted yet: call .fit(images, labels=...) first")
        x = self._prepare(images, "images").to(self.device_)
        self.eval()
        return self.disc_.classify(to_signed(x)).softmax(1)[:, DISEASED].cpu()
