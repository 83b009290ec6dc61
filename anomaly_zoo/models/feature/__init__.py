"""Deep feature modeling: anomaly = distance to normal features of a pretrained CNN.

Three views of "normal" in a frozen network's feature space (the book's chapter 4):

* a Gaussian per position: ``padim``;
* a memory of normal patches, searched by nearest neighbours: ``spade``, ``patchcore``;
* reconstruction in feature space: ``dfm`` (PCA), ``dfr`` (a 1x1-convolution auto-encoder).

Shared pieces (multi-scale embedding, pooled head features, re-tapping one backbone) live in
``common``; neighbours, batched extraction and explained-variance rank in :mod:`anomaly_zoo.ops`.
"""
from . import dfm, dfr, padim, patchcore, spade  # noqa: F401
