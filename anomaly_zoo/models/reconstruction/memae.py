"""Memory-augmented auto-encoder, MemAE (Gong et al., ICCV 2019).

An auto-encoder generalises too well: it often reconstructs anomalies too, and then
the residual shows nothing. MemAE puts a memory between encoder and decoder. The
encoding ``z = E(x)`` becomes a query; the decoder only sees ``z_hat = w M``, a sparse
combination of ``N`` memory items learned on normal data (``memory.py``: attention
addressing, eq. 4-5; hard shrinkage, eq. 7; read-out, eq. 3). An anomalous image is
therefore rebuilt from *normal* items, and its residual is large.

* Network: ``ae``'s ``ConvAutoEncoder`` (Bergmann et al. 2019) with the memory on its
  ``latent_dim`` code: one query per image, as in the paper's image experiments
  (MNIST, CIFAR-10, where the memory holds ``N`` = 100 / 500 items). Each memory item is
  itself a code, so ``decode_memory()`` shows what the memory stores.
* The query is the batch-normalised code: the authors' encoder ends with batch
  normalisation (Conv-BN-LeakyReLU blocks in their released code). Without it the codes
  of all images share a large common component, the dot-product addressing sends every
  image to the same single item, and MemAE rebuilds the mean image (measured on the quick
  brick crops: 1 item used, with weight 1; with the normalisation 53 items, about 4 per image).
* Loss (eq. 10): ``||x - x_hat||^2 + alpha * E(w_hat)`` with the entropy ``E`` of the
  addressing weights (eq. 9) and ``alpha = 0.0002``.
* Score: the reconstruction error (mean of the squared-error map, the paper's
  anomaly score); map: the per-pixel squared error (channel mean).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ...params import Param
from ...registry import register
from ...utils import AnomalyZooError
from .ae import ReconstructionDetector, residual_map
from .memory import Memory, addressing_entropy


@register("memae", family="reconstruction", paper="Memorizing Normality to Detect Anomaly: Memory-augmented "
          "Deep Autoencoder for Unsupervised Anomaly Detection", year=2019, bibkey="gong2019memae",
          localizes=True, trains=True, quick=dict(image_size=64, epochs=60, batch_size=8))
class MemAE(ReconstructionDetector):
    """Auto-encoder whose code is rebuilt from a learned memory of normal codes (sparse attention)."""

    memory_size = Param(100, int)
    shrink_threshold = Param(None, float, none=True)
    entropy_weight = Param(2e-4, float)
    similarity = Param("dot", str)
    latent_dim = Param(100, int)
    width = Param(32, int)
    image_size = Param.image_size(128)
    epochs = Param.epochs(200)
    batch_size = Param.batch_size(16)
    lr = Param.lr(2e-4)
    weight_decay = Param.weight_decay(1e-5)

    def _build(self, meta: dict) -> None:
        super()._build(meta)
        self.norm_ = nn.BatchNorm2d(self.latent_dim)  # the encoder's last batch norm (authors' code)
        self.memory_ = Memory(self.memory_size, self.latent_dim, self.shrink_threshold, self.similarity)

    def forward_memory(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(x_hat, w_hat)``: the reconstruction through the memory and the addressing weights ``[B, N]``."""
        z_hat, w = self.memory_(self.norm_(self.net_.encoder(x)))
        return self.net_.decoder(z_hat), w

    def _loss(self, x: torch.Tensor):
        x_hat, w = self.forward_memory(x)
        rec, ent = F.mse_loss(x_hat, x), addressing_entropy(w)
        return rec + self.entropy_weight * ent, {"entropy": ent.detach()}

    def _fit(self, x: torch.Tensor) -> None:
        if len(x) < 2:
            raise AnomalyZooError("memae needs at least 2 training images (its code is batch-normalised)")
        if self.memory_size < 1:
            raise AnomalyZooError(f"memory_size must be at least 1, got {self.memory_size}")
        self._train(x, self._loss, "memae")

    def _reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        """The reconstruction through the memory (``reconstruct()`` shows it)."""
        return self.forward_memory(x)[0]

    def addressing(self, images) -> torch.Tensor:
        """The shrunk addressing weights ``[N_images, memory_size]`` (CPU)."""
        x = self._prepare(images, "images").to(self.device_)
        with torch.no_grad():
            return self.forward_memory(x)[1].cpu()

    def decode_memory(self) -> torch.Tensor:
        """Every memory item decoded to an image ``[memory_size, 3, H, W]``: what the memory stores."""
        with torch.no_grad():
            return self.net_.decoder(self.memory_.items[:, :, None, None]).cpu()

    def _score(self, x: torch.Tensor):
        maps = residual_map(x, self._reconstruct(x), "l2")
        return maps.flatten(1).mean(1), maps
