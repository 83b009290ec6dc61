"""Puzzle-AE: novelty detection by solving puzzles (Salehi, Eftekhar, Sadjadi, Rohban & Rabiee, 2020;
seed 001 of the project).

A U-Net trained to reconstruct its input overfits: its skips copy everything through (``unet_ae``).
Puzzle-AE gives it a harder pretext task: the input is the image cut into a 2x2 puzzle whose tiles
are shuffled, the target is the original image. Solving the puzzle needs what normal images look
like as a whole, not only pixels. Jigsaw solvers are known to find shortcuts (tile borders, colour
fringes); the paper removes them with *adversarially robust training*: the shuffled input is
perturbed, within an L-infinity ball of radius epsilon, in the direction that most increases the
reconstruction loss, and the network is trained on that perturbed input.

* Puzzle (Sec. 3): :func:`anomaly_zoo.synthesis.masks.jigsaw`, ``grid x grid`` tiles (2x2) in a random
  order other than the identity.
* Robust training (Sec. 3, as the authors' code does it): one signed-gradient (FGSM) step from a random
  start, ``delta_0 ~ U[-eps, eps]``, ``delta = clip(delta_0 + alpha sign(grad_x L(x_p + delta_0)), -eps, eps)``,
  ``x_adv = clip(x_p + delta, 0, 1)`` (:func:`perturb`); ``eps`` 0.01 for MVTec AD, 0.07 for medical
  images, 0.1 for MNIST in the authors' configurations; ``alpha`` 2 (so the step reaches the ball's
  surface). ``pgd_steps > 1`` repeats the step (PGD) for study.
* Loss: the mean squared error between the reconstruction of ``x_adv`` and the original image.
* Score and map: the image is given unshuffled; the map is the per-pixel squared error (channel
  mean) and the image score its mean, the reconstruction error (:func:`reconstruction_error`).

Measured with the quick preset (20 epochs) on brick, data seeds 0 / 1 / 2, one CPU thread, 20-21 s of
CPU per fit: image AUROC 0.674 / 0.586 / 0.645, pixel AUROC 0.804 / 0.749 / 0.729, AUPRO 0.556 / 0.500 /
0.509; the mean training image reaches image 0.654 / 0.556 / 0.701 and pixel 0.764 / 0.732 / 0.750.
Like the L2 auto-encoders of chapter 5 on brick, Puzzle-AE is only a little better than the mean
image (its map falls below it at seed 2): the puzzle keeps the U-Net from copying, it does not make
the squared error a sharp detector of texture defects.

"The authors' code" below is the public repository of the paper (Niousha12/Puzzle_Anomaly_Detection),
read through a fork; its configuration gives eps, alpha, the learning rate and the batch size.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ...base import Detector
from ...nets import UNet
from ...params import Param, bad
from ...registry import register
from ...synthesis.masks import jigsaw


class PuzzleUNet(UNet):
    """The authors' network shape: the library's U-Net (``depth`` poolings, channels doubling from
    ``width``, 64 in their code, bilinear upsampling, concatenated skips) with a sigmoid output in [0, 1]."""

    def __init__(self, channels: int = 3, width: int = 64, depth: int = 4):
        super().__init__(channels, channels, width, depth)

    def forward(self, x):
        return torch.sigmoid(super().forward(x))


def perturb(net: nn.Module, x_in: torch.Tensor, target: torch.Tensor, eps: float, alpha: float, steps: int,
            generator: torch.Generator) -> torch.Tensor:
    """The robust-training input: ``steps`` signed-gradient ascent steps of the reconstruction loss from a
    uniform random start in the L-inf ball of radius ``eps`` around ``x_in`` (one step: the authors' FGSM)."""
    if eps <= 0 or steps == 0:
        return x_in
    delta = ((torch.rand(x_in.shape, generator=generator) * 2 - 1) * eps).to(x_in.device)
    for _ in range(steps):
        x_adv = (x_in + delta).clamp(0, 1).requires_grad_(True)
        loss = F.mse_loss(net(x_adv), target)
        (grad,) = torch.autograd.grad(loss, x_adv)
        delta = (delta + alpha * grad.sign()).clamp(-eps, eps)
    return (x_in + delta).clamp(0, 1).detach()


def reconstruction_error(x: torch.Tensor, x_hat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(scores [B], maps [B, H, W])``: the per-pixel squared error (channel mean) and its image mean."""
    maps = (x - x_hat).pow(2).mean(1)
    return maps.flatten(1).mean(1), maps


@register("puzzle_ae", family="ssl", paper="Puzzle-AE: Novelty Detection in Images through Solving Puzzles",
          year=2020, bibkey="salehi2020puzzleae", localizes=True, trains=True,
          quick=dict(image_size=64, width=8, depth=3, epochs=20, batch_size=8),
          deviations=("section-level references: the paper numbers no equation for the puzzle, the attack or the "
                      "score",
                      "the robust-training perturbation as the authors' code makes it (FGSM from a uniform random "
                      "start, alpha 2); eps 0.01, their MVTec AD value",
                      "the public code's later extras (a feature-matching discriminator with weight 0.02, greying "
                      "one tile, a test score averaged over all 23 permutations) are not used; the test image is "
                      "fed unshuffled",
                      "constant learning rate (their code lowers it on a plateau of the training loss, factor 0.8, "
                      "patience 50); 300 epochs instead of their 2000",
                      "quick preset: 64 px images, a 3-level U-Net of width 8, 20 epochs"))
class PuzzleAE(Detector):
    """Puzzle-AE: a U-Net rebuilds the image from its shuffled 2x2 puzzle, trained adversarially robust."""

    grid = Param(2, int, low=2, help="the puzzle has grid x grid tiles (2 in the paper)")
    eps = Param(0.01, float, low=0, help="L-inf radius of the robust-training perturbation (MVTec AD: 0.01)")
    alpha = Param(2.0, float, low=0, low_open=True, help="signed-gradient step (2 in the authors' code)")
    pgd_steps = Param(1, int, low=0, help="ascent steps (1: the authors' FGSM; 0: no robust training)")
    width = Param(64, int, low=1, help="channels of the U-Net's first level (64)")
    depth = Param(4, int, low=1, high=6, help="2x2 poolings of the U-Net")
    image_size = Param.image_size(128)
    epochs = Param.epochs(300)
    batch_size = Param.batch_size(8)
    lr = Param.lr(1e-3)
    weight_decay = Param.weight_decay(1e-5)

    def _check_params(self) -> None:
        if self.image_size is not None and self.image_size % (self.grid * 2**self.depth):
            raise bad(self.name, "image_size", self.image_size,
                      f"a multiple of grid * 2**depth = {self.grid * 2**self.depth}")

    def _build(self, shapes: dict) -> None:
        h, w = shapes["input_hw"]
        if h % self.grid or w % self.grid:
            raise bad(self.name, "image_size", self.image_size, f"a side divisible by grid={self.grid} (images {h}x{w})")
        self.net_ = PuzzleUNet(3, self.width, self.depth)

    def _puzzle(self, x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        """Shuffle the tiles; an identity draw is shuffled again (the paper excludes it)."""
        out, perms = jigsaw(x, g, self.grid)
        same = (perms == torch.arange(self.grid**2)).all(1)
        while bool(same.any()):
            idx = same.nonzero().flatten()
            redo, p = jigsaw(x[idx.to(x.device)], g, self.grid)
            out[idx.to(x.device)], perms[idx] = redo, p
            same = (perms == torch.arange(self.grid**2)).all(1)
        return out

    def _step(self, x: torch.Tensor, ctx) -> torch.Tensor:
        x_adv = perturb(self.net_, self._puzzle(x, ctx.generator), x, self.eps, self.alpha, self.pgd_steps,
                        ctx.generator)
        return F.mse_loss(self.net_(x_adv), x)

    def _fit(self, x: torch.Tensor) -> None:
        self._train(self._step, x)

    def reconstruct(self, images) -> torch.Tensor:
        """The reconstruction of (unshuffled) ``images`` at the detector's size, on CPU (for figures)."""
        x = self._prepare(images, "images").to(self.device_)
        with torch.no_grad():
            return self.net_(x).cpu()

    def _score(self, x: torch.Tensor):
        return reconstruction_error(x, self.net_(x))
