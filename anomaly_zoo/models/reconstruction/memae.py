"""Memory-augmented auto-encoder, MemAE (Gong et al., ICCV 2019).

An auto-encoder generalises too well: it often reconstructs anomalies too, and then
the residual shows nothing. MemAE puts a memory between encoder and decoder. The
encoding ``z = E(x)`` becomes a query; the decoder only sees ``z_hat = w M``, a sparse
combination of ``N`` memory items learned on normal data (``memory.py``: attention
addressing, eq. 4-5; hard shrinkage, eq. 7; read-out, eq. 3). An anomalous image is
therefore rebuilt from *normal* items, and its residual is large.

* Network: ``anomaly_zoo.nets.ConvAutoEncoder`` (Bergmann et al. 2019) with the memory on its
  ``latent_dim`` code: one query per image, as in the paper's image experiments
  (MNIST, CIFAR-10, where the memory holds ``N`` = 100 / 500 items). Each memory item is
  itself a code, so ``decode_memory()`` shows what the memory stores.
* The query is the batch-normalised, rectified code: the authors' encoder is made of
  Conv-BN-LeakyReLU(0.2) blocks, its last one included (their released code), so the code
  passes through ``norm_`` (batch norm) and ``act_`` (LeakyReLU 0.2) before it addresses the memory. Without it the codes
  of all images share a large common component, the dot-product addressing sends every
  image to the same single item, and MemAE rebuilds the mean image (measured on the quick
  brick crops: 1 item used, with weight 1). With the batch norm and the LeakyReLU, on brick at
  data seeds 0, 1, 2: 72, 91, 88 items used, 6 to 10 per image; yet the reconstructions stay close
  to the mean image (training error 0.91, 0.92, 0.85 of the mean image's; 0.87 without the
  LeakyReLU, seed 0) and the pixel AUROC is the mean image's (0.777, 0.740, 0.749 against 0.769,
  0.744, 0.760). On digits (normal class 0) the training error is 0.43, 0.37, 0.46 of the mean image's.
* Loss (eq. 10): ``||x - x_hat||^2 + alpha * E(w_hat)`` with the entropy ``E`` of the
  addressing weights (eq. 9) and ``alpha = 0.0002``.
* Score: the reconstruction error (mean of the squared-error map, the paper's
  anomaly score); map: the per-pixel squared error (channel mean).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ...params import Param, bad
from ...registry import register
from .ae import ReconstructionDetector, residual_map
from .memory import Memory, addressing_entropy


@register("memae", family="reconstruction", paper="Memorizing Normality to Detect Anomaly: Memory-augmented "
          "Deep Autoencoder for Unsupervised Anomaly Detection", year=2019, bibkey="gong2019memae",
          localizes=True, trains=True, quick=dict(image_size=64, epochs=60, batch_size=8),
          deviations=("encoder/decoder: Bergmann et al.'s convolutional auto-encoder with He initialisation and "
                      "a batch-normalised, LeakyReLU code, not the paper's per-dataset networks",
                      "one memory query per image (the code is a vector), as the paper's MNIST/CIFAR-10 "
                      "experiments; memory_size 100 as for MNIST",
                      "addressing by the dot product of the authors' code (similarity='dot'); eq. (5) as printed, "
                      "the cosine, is similarity='cosine'",
                      "Adam with Bergmann et al.'s lr 2e-4 and weight decay 1e-5, not the paper's per-dataset "
                      "training settings"))
class MemAE(ReconstructionDetector):
    """Auto-encoder whose code is rebuilt from a learned memory of normal codes (sparse attention)."""

    memory_size = Param(100, int, low=1, help="N, the number of memory items (eq. 3; 100 for MNIST)")
    shrink_threshold = Param(None, float, low=0, high=1, high_open=True, none=True,
                             help="lambda of the hard shrinkage (eq. 7); None: 1/N; 0: no shrinkage")
    entropy_weight = Param(2e-4, float, low=0, help="alpha, the weight of the addressing entropy (eq. 10)")
    similarity = Param("dot", str, choices=("dot", "cosine"), help="addressing similarity (eq. 5)")

    def _build(self, shapes: dict) -> None:
        super()._build(shapes)
        # the encoder's last Conv-BN-LeakyReLU block (authors' code): batch norm and activation of the code
        self.norm_ = nn.BatchNorm2d(self.latent_dim)
        self.act_ = nn.LeakyReLU(0.2)
        self.memory_ = Memory(self.memory_size, self.latent_dim, self.shrink_threshold, self.similarity)

    def query(self, x: torch.Tensor) -> torch.Tensor:
        """The memory query of each image ``[B, latent_dim, 1, 1]``: the batch-normalised, rectified code."""
        return self.act_(self.norm_(self.net_.encoder(x)))

    def forward_memory(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(x_hat, w_hat)``: the reconstruction through the memory and the addressing weights ``[B, N]``."""
        z_hat, w = self.memory_(self.query(x))
        return self.net_.decoder(z_hat), w

    def _loss(self, x: torch.Tensor, ctx=None):
        x_hat, w = self.forward_memory(x)
        rec, ent = F.mse_loss(x_hat, x), addressing_entropy(w)
        return rec + self.entropy_weight * ent, {"entropy": ent.detach()}

    def _fit(self, x: torch.Tensor) -> None:
        if len(x) < 2:
            raise bad(self.name, "train images", len(x), "at least 2 training images (its code is batch-normalised)")
        self._train(self._loss, x)

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
