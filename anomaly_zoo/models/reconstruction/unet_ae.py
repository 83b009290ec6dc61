"""The same auto-encoder with skip connections: how a too-strong reconstructor fails.

Reconstruction-based detection rests on one assumption: the network can rebuild
what it saw in training (normal appearance) and *cannot* rebuild the rest. The
bottleneck of ``ae`` enforces that. Add skip connections from the encoder to the
decoder (the U-Net idea of Ronneberger et al. 2015, which is what makes it so good
at segmentation) and the decoder can read the input's details straight from the
shortcut: it can reconstruct *everything*, anomalies included, and the residual map
then goes blank exactly where it should light up (the survey's "identity shortcut"
weakness of the reconstruction family, Tao et al. 2022; Collin & De Vleeschouwer
2021 show that skips only help when the training task forbids copying).

* Network: ``anomaly_zoo.nets.ConvAutoEncoder`` unchanged (Bergmann et al. 2019, Table 1),
  plus a skip at every resolution, as in a U-Net: additive skips from the encoder to
  the decoder at 1/2, 1/4, 1/8 and 1/16 of the image size (where the channel counts
  already match, so no layer is added), and at full resolution, where the encoder's
  only feature map is the input itself, U-Net's concatenation: the input is
  concatenated to the decoder's last output and a 3x3 convolution (``fuse``) maps the
  pair to the reconstruction before the sigmoid.
* Loss, residual map and score: those of ``ae`` (``loss="l2"``, ``"ssim"`` or
  ``"ms_ssim"``), so that the only difference between the two detectors is the skips.

The quick preset is ``ae``'s (60 epochs, batches of 8, lr 2e-4), so that the skips are the only
difference. On brick's quick training crops it reaches a training error of 0.0012 against
``ae``'s 0.0029 and the mean image's 0.0066.

Whether the shortcut really copies defects through depends on how far training goes
towards the identity, and on the texture: with the quick presets it does on grass (pixel AUROC
below ``ae``'s) and does not on brick (above); chapter 5 measures both and
``tests/test_reconstruction.py`` asserts both, with the numbers.
"""
from __future__ import annotations

import torch
from torch import nn

from ...nets import ConvAutoEncoder
from ...registry import register
from .ae import AutoEncoder

# (encoder layer whose output is kept, decoder layer after which it is added): same shape at both
SKIPS = {0: 8, 2: 6, 4: 4, 5: 3}


class UNetAutoEncoder(ConvAutoEncoder):
    """``ConvAutoEncoder`` whose decoder also receives the encoder's feature maps and the input."""

    def __init__(self, image_size: int = 128, latent_dim: int = 100, width: int = 32, channels: int = 3):
        super().__init__(image_size, latent_dim, width, channels)
        self.fuse = nn.Conv2d(2 * channels, channels, 3, padding=1)  # the full-resolution skip

    def forward(self, x):
        image, kept = x, {}
        for i, layer in enumerate(self.encoder):
            x = layer(x)
            if i in SKIPS:
                kept[SKIPS[i]] = x
        # the decoder's first two modules are the transposed convolution and its activation,
        # its last one the sigmoid
        x = self.decoder[1](self.decoder[0](x))
        for j, layer in enumerate(self.decoder[2:-1], start=2):
            x = layer(x)
            if j in kept:
                x = x + kept[j]
        return self.decoder[-1](self.fuse(torch.cat([x, image], 1)))


@register("unet_ae", family="reconstruction", paper="U-Net: Convolutional Networks for Biomedical Image "
          "Segmentation (skips in an anomaly auto-encoder)", year=2015, bibkey="ronneberger2015unet",
          localizes=True, trains=True, quick=dict(image_size=64, epochs=60, batch_size=8),
          deviations=("not a method of the survey but a teaching counter-example: Bergmann et al.'s auto-encoder "
                      "(the ae model, its loss, score and hyperparameters) with U-Net skips added; U-Net itself "
                      "(Ronneberger et al.) is a supervised segmentation network",
                      "skips are added (not concatenated) where the channel counts match, to add no layer; only the "
                      "full-resolution skip concatenates, followed by one 3x3 convolution"))
class UNetAE(AutoEncoder):
    """The ``ae`` auto-encoder with U-Net skip connections (a negative example: it can copy anomalies)."""

    network = UNetAutoEncoder
