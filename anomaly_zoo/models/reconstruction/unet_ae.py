"""The same auto-encoder with skip connections: how a too-strong reconstructor fails.

Reconstruction-based detection rests on one assumption: the network can rebuild
what it saw in training (normal appearance) and *cannot* rebuild the rest. The
bottleneck of ``ae`` enforces that. Add skip connections from the encoder to the
decoder (the U-Net idea of Ronneberger et al. 2015, which is what makes it so good
at segmentation) and the decoder can read the input's details straight from the
shortcut: it reconstructs *everything*, anomalies included, and the residual map
goes blank exactly where it should light up (the survey's "identity shortcut"
weakness of the reconstruction family, Tao et al. 2022; Collin & De Vleeschouwer
2021 show that skips only help when the training task forbids copying).

* Network: ``ae``'s ``ConvAutoEncoder`` unchanged (Bergmann et al. 2019, Table 1),
  plus additive skips from the encoder to the decoder at 1/2, 1/4, 1/8 and 1/16 of the
  image size (where the channel counts already match, so no layer is added).
* Loss, residual map and score: those of ``ae`` (``loss="l2"``, ``"ssim"`` or
  ``"ms_ssim"``), so that the only difference between the two detectors is the skips.
"""
from __future__ import annotations

from ...registry import register
from .ae import AutoEncoder, ConvAutoEncoder

# (encoder layer whose output is kept, decoder layer after which it is added): same shape at both
SKIPS = {0: 8, 2: 6, 4: 4, 5: 3}


class UNetAutoEncoder(ConvAutoEncoder):
    """``ConvAutoEncoder`` whose decoder also receives the encoder's feature maps (additive skips)."""

    def forward(self, x):
        kept = {}
        for i, layer in enumerate(self.encoder):
            x = layer(x)
            if i in SKIPS:
                kept[SKIPS[i]] = x
        # the decoder's first two modules are the transposed convolution and its activation
        x = self.decoder[1](self.decoder[0](x))
        for j, layer in enumerate(self.decoder[2:], start=2):
            x = layer(x)
            if j in kept:
                x = x + kept[j]
        return x


@register("unet_ae", family="reconstruction", paper="U-Net: Convolutional Networks for Biomedical Image "
          "Segmentation (skips in an anomaly auto-encoder)", year=2015, bibkey="ronneberger2015unet",
          localizes=True, trains=True, quick=dict(image_size=64, epochs=40))
class UNetAE(AutoEncoder):
    """The ``ae`` auto-encoder with U-Net skip connections (a negative example: it copies anomalies)."""

    def _build(self, meta: dict) -> None:
        self.net_ = UNetAutoEncoder(meta["input_hw"][0], self.latent_dim, self.width)
