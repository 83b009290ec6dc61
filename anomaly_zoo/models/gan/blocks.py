"""Pieces every GAN of this family shares: DCGAN encoder/decoder/discriminator, their
initialisation, the WGAN-GP gradient penalty, discriminator feature matching, and the
hyperparameters and image scaling of a GAN detector.

* DCGAN blocks (Radford et al., ICLR 2016, Sec. 3 "architecture guidelines"): strided 4x4
  convolutions down to a 4x4 grid (BatchNorm + LeakyReLU(0.2), none on the first layer), and
  the mirrored transposed convolutions up (BatchNorm + ReLU, tanh on the output). GANomaly's
  ``NetG``/``NetD`` (samet-akcay/ganomaly, ``lib/networks.py``) and AnoGAN's DCGAN are this
  pyramid; its ``width`` is the ``ngf``/``ndf`` of that code (64 there). Weights start from
  ``N(0, 0.02)`` and BatchNorm scales from ``N(1, 0.02)`` (``dcgan_init_``, Radford et al. Sec. 4).
* :class:`Discriminator`: the encoder pyramid with one logit on top; ``forward`` returns
  ``(logit [B], features [B, C, 4, 4])``: the features of its last hidden layer are the "f(.)"
  of AnoGAN's discrimination loss, GANomaly's adversarial loss, Skip-GANomaly's latent loss and
  f-AnoGAN's feature residual. ``norm="layer"`` (no BatchNorm) is the critic of WGAN-GP, whose
  penalty is per sample (Gulrajani et al. 2017, Sec. 4: "no critic batch normalization").
* :func:`gradient_penalty`: WGAN-GP, Gulrajani et al. (NeurIPS 2017) eq. (3),
  ``lambda E[(||grad_xhat D(xhat)||_2 - 1)^2]``, ``xhat = eps x + (1 - eps) x~``, ``eps ~ U[0, 1]``.
* :func:`feature_matching`: the mean squared distance between discriminator features
  (Salimans et al. 2016, Sec. 3.1), per image.

Images enter the networks in ``[-1, 1]`` (``to_signed``), as in every official code of the
family (tanh outputs); maps and scores are read back in the library's ``[0, 1]`` units.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from ...base import Detector
from ...params import Param, bad

NORMS = ("batch", "layer", "none")


def to_signed(x: torch.Tensor) -> torch.Tensor:
    """``[0, 1]`` images -> ``[-1, 1]`` (the range of a tanh generator)."""
    return x * 2 - 1


def _norm(kind: str, channels: int, hw: int) -> nn.Module:
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    if kind == "layer":  # WGAN-GP's critic: normalise each sample over (C, H, W)
        return nn.LayerNorm([channels, hw, hw])
    return nn.Identity()


def _levels(image_size: int) -> int:
    """Halvings from ``image_size`` down to 4 (a power of two >= 16)."""
    return int(round(math.log2(image_size))) - 2


class Pyramid(nn.Module):
    """DCGAN encoder trunk: ``[B, C, S, S] -> [B, width * 2^(L-1), 4, 4]`` by 4x4 stride-2 convolutions."""

    def __init__(self, image_size: int, width: int, channels: int = 3, norm: str = "batch"):
        super().__init__()
        layers = [nn.Conv2d(channels, width, 4, 2, 1, bias=False), nn.LeakyReLU(0.2, True)]
        c, hw = width, image_size // 2
        for _ in range(_levels(image_size) - 1):
            hw //= 2
            layers += [nn.Conv2d(c, 2 * c, 4, 2, 1, bias=False), _norm(norm, 2 * c, hw), nn.LeakyReLU(0.2, True)]
            c *= 2
        self.net, self.out_channels = nn.Sequential(*layers), c

    def forward(self, x):
        return self.net(x)


class Encoder(nn.Module):
    """DCGAN encoder: the pyramid, then a 4x4 convolution to one ``latent_dim`` vector ``[B, latent_dim]``."""

    def __init__(self, image_size: int, latent_dim: int, width: int, channels: int = 3, norm: str = "batch"):
        super().__init__()
        self.trunk = Pyramid(image_size, width, channels, norm)
        self.head = nn.Conv2d(self.trunk.out_channels, latent_dim, 4, 1, 0, bias=False)

    def forward(self, x):
        return self.head(self.trunk(x)).flatten(1)


class Decoder(nn.Module):
    """DCGAN generator: ``z [B, latent_dim] -> [B, C, S, S]`` in ``[-1, 1]`` (transposed convs, BN, ReLU, tanh)."""

    def __init__(self, image_size: int, latent_dim: int, width: int, channels: int = 3):
        super().__init__()
        c = width * 2 ** (_levels(image_size) - 1)
        layers = [nn.ConvTranspose2d(latent_dim, c, 4, 1, 0, bias=False), nn.BatchNorm2d(c), nn.ReLU(True)]
        for _ in range(_levels(image_size) - 1):
            layers += [nn.ConvTranspose2d(c, c // 2, 4, 2, 1, bias=False), nn.BatchNorm2d(c // 2), nn.ReLU(True)]
            c //= 2
        layers += [nn.ConvTranspose2d(c, channels, 4, 2, 1, bias=False), nn.Tanh()]
        self.net = nn.Sequential(*layers)

    def forward(self, z):
        return self.net(z[:, :, None, None])


class Discriminator(nn.Module):
    """The pyramid and one logit: ``forward(x) -> (logit [B], features [B, C, 4, 4])``."""

    def __init__(self, image_size: int, width: int, channels: int = 3, norm: str = "batch"):
        super().__init__()
        self.features = Pyramid(image_size, width, channels, norm)
        self.head = nn.Conv2d(self.features.out_channels, 1, 4, 1, 0, bias=False)

    def forward(self, x):
        f = self.features(x)
        return self.head(f).flatten(), f


def dcgan_init_(module: nn.Module, generator: torch.Generator | None = None) -> nn.Module:
    """Radford et al. (2016) Sec. 4: convolution weights ``N(0, 0.02)``; BatchNorm ``N(1, 0.02)``, bias 0.
    ``generator``: draw from it (a re-initialisation during training) instead of the global seed."""
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)):
                m.weight.copy_(torch.randn(m.weight.shape, generator=generator) * 0.02)
                if m.bias is not None:
                    m.bias.zero_()
            elif isinstance(m, nn.BatchNorm2d):
                m.weight.copy_(1 + torch.randn(m.weight.shape, generator=generator) * 0.02)
                m.bias.zero_()
    return module


def gradient_penalty(critic: nn.Module, real: torch.Tensor, fake: torch.Tensor, generator: torch.Generator,
                     weight: float = 10.0) -> torch.Tensor:
    """WGAN-GP (Gulrajani et al. 2017, eq. 3): ``weight * mean((||grad D(xhat)||_2 - 1)^2)`` on
    random interpolates ``xhat = eps real + (1 - eps) fake``, one ``eps ~ U[0, 1]`` per sample
    (drawn from ``generator``, the loop's seeded one). ``create_graph`` so the critic's update
    differentiates through the gradient norm."""
    eps = torch.rand(len(real), *[1] * (real.dim() - 1), generator=generator).to(real.device, real.dtype)
    xhat = (eps * real + (1 - eps) * fake.detach()).requires_grad_(True)
    (grad,) = torch.autograd.grad(critic(xhat)[0].sum(), xhat, create_graph=True)
    return weight * (grad.flatten(1).norm(dim=1) - 1).pow(2).mean()


def feature_matching(f_real: torch.Tensor, f_fake: torch.Tensor) -> torch.Tensor:
    """Mean squared distance between discriminator features, per image ``[B]`` (Salimans et al. 2016)."""
    return (f_real - f_fake).pow(2).flatten(1).mean(1)


class GANDetector(Detector):
    """The hyperparameters and checks every GAN detector of this family shares.

    Square images whose side is a power of two from 16 (the DCGAN pyramid halves it down to 4).
    Training randomness (noise vectors, interpolates) comes from the loop's ``ctx.generator``.
    """

    latent_dim = Param(100, int, low=1, help="dimension of the code z (nz = 100 in the DCGAN/GANomaly code)")
    width = Param(64, int, low=1, high=512, help="channels of the first layer (ngf = ndf = 64 in the code)")
    image_size = Param.image_size(64)
    epochs = Param.epochs(15)
    batch_size = Param.batch_size(64)
    lr = Param.lr(2e-4)
    weight_decay = Param.weight_decay(0.0)

    def _check_params(self) -> None:
        super()._check_params()
        s = self.image_size
        if s is not None and (s < 16 or s & (s - 1)):
            raise bad(self.name, "image_size", s, "a power of two >= 16 (the DCGAN pyramid halves it to 4)")

    def _side(self, shapes: dict) -> int:
        h, w = shapes["input_hw"]
        if h != w or h < 16 or h & (h - 1):
            raise bad(self.name, "image_size", self.image_size, f"square images whose side is a power of two >= 16 "
                      f"(the images are {h}x{w}: set image_size)")
        return h
