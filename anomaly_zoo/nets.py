"""Network pieces that several families share: the convolutional auto-encoder and its initialisation.

* :class:`ConvAutoEncoder`: the encoder/decoder of Bergmann et al. (VISAPP 2019, Table 1), used by
  the reconstruction family (``ae``, ``unet_ae``, ``ms_ssim_ae``, ``memae``) and, with a
  ``(mu, log sigma^2)`` head, by the VAE; any later method (a GAN's generator, DFR's feature
  auto-encoder) may import it from here instead of from another method's file.
* :func:`he_init_`: He et al. (ICCV 2015) initialisation for LeakyReLU layers, including the
  right fan-in of a strided transposed convolution.
* :func:`conv_block`: a convolution (or transposed convolution) followed by LeakyReLU(0.2).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .params import bad
from .utils import AnomalyZooError

INITS = ("he", "pytorch")


def conv_block(cin: int, cout: int, k: int, s: int, transpose: bool = False) -> nn.Sequential:
    """Conv (or ConvTranspose) ``k x k``, stride ``s``, 'same'-style padding, then LeakyReLU(0.2)."""
    conv = nn.ConvTranspose2d if transpose else nn.Conv2d
    p = 1 if k == 4 else k // 2
    return nn.Sequential(conv(cin, cout, k, s, p), nn.LeakyReLU(0.2, inplace=True))


def he_init_(conv: nn.Conv2d | nn.ConvTranspose2d, slope: float = 0.2) -> None:
    """He et al. (2015) initialisation for LeakyReLU(``slope``): weights ``N(0, 2 / ((1 + slope^2) fan_in))``,
    zero bias, where ``fan_in`` is the number of inputs that reach one output (for a transposed
    convolution with stride ``s``: ``in_channels * k^2 / s^2``). It keeps the signal's variance
    constant through the layers. PyTorch's default (uniform, with the gain of a slope of sqrt(5))
    shrinks it about threefold per layer: through the nine encoder layers the code of every image is
    the same to 1e-5, the decoder learns the mean training image and the encoder never recovers
    (measured on the quick brick crops; the VAE's code collapses the same way).
    """
    k = conv.kernel_size[0] * conv.kernel_size[1]
    if isinstance(conv, nn.ConvTranspose2d):
        fan_in = conv.in_channels * k / (conv.stride[0] * conv.stride[1])
    else:
        fan_in = conv.in_channels * k
    nn.init.normal_(conv.weight, 0.0, math.sqrt(2.0 / ((1 + slope**2) * fan_in)))
    nn.init.zeros_(conv.bias)


def init_convs_(module: nn.Module, init: str) -> None:
    """Initialise every (transposed) convolution of ``module``: ``"he"`` (:func:`he_init_`) or
    ``"pytorch"`` (PyTorch's default, kept to show why not)."""
    if init not in INITS:
        raise AnomalyZooError(f"init must be one of {', '.join(map(repr, INITS))}, got {init!r}")
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
            he_init_(m) if init == "he" else m.reset_parameters()


class ConvAutoEncoder(nn.Module):
    """Bergmann et al.'s encoder/decoder (Table 1); ``width`` scales the channel counts (32 in the paper).

    Strided 4x4 / 3x3 convolutions with LeakyReLU(0.2) down to an ``image_size/16`` grid, a last
    convolution to one ``latent_dim`` vector per image, and the mirrored decoder with transposed
    convolutions; a sigmoid keeps the output in [0, 1]. ``init="he"``: He initialisation
    (:func:`he_init_`; the paper does not say); ``"pytorch"``: PyTorch's default, to show why not.
    """

    def __init__(self, image_size: int = 128, latent_dim: int = 100, width: int = 32, channels: int = 3,
                 init: str = "he"):
        super().__init__()
        if image_size % 16 or image_size < 16:
            raise AnomalyZooError(f"the auto-encoder needs an image side that is a multiple of 16, got {image_size}")
        w, g = width, image_size // 16
        self.encoder = nn.Sequential(
            conv_block(channels, w, 4, 2), conv_block(w, w, 4, 2), conv_block(w, w, 3, 1),
            conv_block(w, 2 * w, 4, 2), conv_block(2 * w, 2 * w, 3, 1), conv_block(2 * w, 4 * w, 4, 2),
            conv_block(4 * w, 2 * w, 3, 1), conv_block(2 * w, w, 3, 1),
            nn.Conv2d(w, latent_dim, g),  # the bottleneck: one latent_dim vector per image
        )
        self.decoder = nn.Sequential(
            nn.ConvTranspose2d(latent_dim, w, g), nn.LeakyReLU(0.2, inplace=True),
            conv_block(w, 2 * w, 3, 1), conv_block(2 * w, 4 * w, 3, 1), conv_block(4 * w, 2 * w, 4, 2, True),
            conv_block(2 * w, 2 * w, 3, 1), conv_block(2 * w, w, 4, 2, True), conv_block(w, w, 3, 1),
            conv_block(w, w, 4, 2, True),
            nn.ConvTranspose2d(w, channels, 4, 2, 1), nn.Sigmoid(),
        )
        if init != "pytorch":
            init_convs_(self, init)

    def forward(self, x):
        return self.decoder(self.encoder(x))


def check_side(name: str, image_size: int | None, hw=None) -> None:
    """The conv auto-encoder halves its input four times: ``image_size`` (and, when given, the
    images' ``hw``) must be square with a side that is a multiple of 16; else one clear error."""
    if image_size is not None and image_size % 16:
        raise bad(name, "image_size", image_size, "a multiple of 16 (the encoder halves it four times)")
    if hw is not None and (hw[0] != hw[1] or hw[0] % 16):
        raise bad(name, "image_size", image_size, f"square images whose side is a multiple of 16 "
                  f"(the images are {hw[0]}x{hw[1]}: set image_size)")


def double_conv(cin: int, cout: int) -> nn.Sequential:
    """U-Net's block: two 3x3 convolutions (padding 1), each followed by BatchNorm and ReLU."""
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
                         nn.Conv2d(cout, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class UNet(nn.Module):
    """A U-Net (Ronneberger et al. 2015): ``depth`` 2x2 max-poolings, channels doubling from ``width``,
    bilinear upsampling and concatenated skips, then a 1x1 convolution to ``cout`` channels (raw output).
    RIAD inpaints with it and Puzzle-AE (sigmoid on top) reassembles with it."""

    def __init__(self, cin: int = 3, cout: int = 3, width: int = 64, depth: int = 4):
        super().__init__()
        chans = [width * 2**i for i in range(depth + 1)]
        self.down = nn.ModuleList([double_conv(cin, chans[0])] + [double_conv(a, b) for a, b in zip(chans, chans[1:])])
        self.up = nn.ModuleList([double_conv(b + a, a) for a, b in zip(chans[:-1], chans[1:])][::-1])
        self.head = nn.Conv2d(chans[0], cout, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = []
        for i, block in enumerate(self.down):
            x = block(x if i == 0 else F.max_pool2d(x, 2))
            skips.append(x)
        for block, skip in zip(self.up, skips[-2::-1]):
            up = F.interpolate(x, size=skip.shape[-2:], mode="bilinear", align_corners=False)
            x = block(torch.cat([up, skip], 1))
        return self.head(x)
