"""SSPCAB: the self-supervised predictive convolutional attentive block (Ristea et al., CVPR 2022).

A block that can replace a convolutional layer of an anomaly detector and brings its own
self-supervised task: predict each position's features from its surroundings *without seeing
the position itself*, then reweigh the channels, and be trained to give back its input.

* Masked convolution (Sec. 3, Fig. 2): the receptive field is a square of side 2k' + 2d + 1
  around each position; only its four corner sub-kernels K_1..K_4, each k' x k' with c input
  channels, carry weights; the centre M (and everything between, at distance d from it) is
  masked. Each position's output is the sum of the four sub-kernels' responses (c filters, so
  the output has the input's c channels and, with padding k' + d, its size), followed by ReLU.
  Written here as one convolution whose weight is multiplied by a fixed 0/1 mask, which is
  the sum of four convolutions with their own weights (and one summed bias).
* Channel attention (Sec. 3, squeeze-and-excitation, Hu et al. 2018): global average pooling
  to a c-vector, a fully connected layer down to c / r with ReLU, another back to c with a
  sigmoid, and the masked convolution's output is scaled channel by channel.
* Self-supervised loss (eq. 1): L_SSPCAB(G, X) = (G(X) - X)^2, the mean squared error between the
  block's output and its input, added to the host method's loss with weight lambda (eq. 2:
  L_total = L_F + lambda L_SSPCAB; lambda = 0.1 in the paper's DRAEM experiments).

Hyperparameters: k' = 1, d = 1 and r = 8, the paper's best setting (its Table 1). This file is
written from the paper; the reference code is CC BY-SA, so none of it is copied here.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def corner_mask(kernel: int, dilation: int) -> torch.Tensor:
    """The 0/1 mask ``[s, s]`` (s = 2 kernel + 2 dilation + 1) of the four ``kernel x kernel`` corner blocks."""
    s = 2 * kernel + 2 * dilation + 1
    m = torch.zeros(s, s)
    for r0 in (0, s - kernel):
        for c0 in (0, s - kernel):
            m[r0 : r0 + kernel, c0 : c0 + kernel] = 1
    return m


class SSPCAB(nn.Module):
    """Masked convolution (4 corner sub-kernels, centre hidden) + ReLU + channel attention; same shape out."""

    def __init__(self, channels: int, kernel: int = 1, dilation: int = 1, reduction: int = 8):
        super().__init__()
        self.pad = kernel + dilation
        s = 2 * self.pad + 1
        self.conv = nn.Conv2d(channels, channels, s)
        self.register_buffer("mask", corner_mask(kernel, dilation)[None, None], persistent=False)
        hidden = max(1, channels // reduction)
        self.fc1, self.fc2 = nn.Linear(channels, hidden), nn.Linear(hidden, channels)
        self.loss: torch.Tensor | None = None  # L_SSPCAB of the last forward pass
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """He initialisation counted over the *unmasked* inputs (4 k'^2 c of the (2k'+2d+1)^2 c in the window;
        the paper does not say): a default or N(0, 0.02) initialisation of the full window leaves the block's
        output near zero, and behind it the host network starts from almost no signal. Checked on training data
        only (:mod:`anomaly_zoo.validation`, DRAEM's quick preset, 8 proxy splits of brick and grass): with
        N(0, 0.02) the maps saturated on 2 splits (every image score equal) and the mean AUPRO was 0.33, with this
        initialisation 0.36."""
        fan_in = float(self.mask.sum()) * self.conv.in_channels
        nn.init.normal_(self.conv.weight, 0.0, (2.0 / fan_in) ** 0.5)
        nn.init.zeros_(self.conv.bias)

    def masked_conv(self, x: torch.Tensor) -> torch.Tensor:
        """The sum of the four corner sub-kernels' responses, then ReLU (the centre never contributes)."""
        return F.relu(F.conv2d(F.pad(x, (self.pad,) * 4), self.conv.weight * self.mask, self.conv.bias))

    def attention(self, f: torch.Tensor) -> torch.Tensor:
        """Squeeze-and-excitation weights ``[B, C, 1, 1]`` in (0, 1)."""
        z = f.mean((2, 3))
        return torch.sigmoid(self.fc2(F.relu(self.fc1(z))))[:, :, None, None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.masked_conv(x)
        out = f * self.attention(f)
        self.loss = sspcab_loss(out, x)
        return out


def sspcab_loss(output: torch.Tensor, block_input: torch.Tensor) -> torch.Tensor:
    """Eq. (1): L_SSPCAB = (G(X) - X)^2, averaged over every element."""
    return (output - block_input).pow(2).mean()


__all__ = ["SSPCAB", "corner_mask", "sspcab_loss"]
