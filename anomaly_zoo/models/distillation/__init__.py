"""Knowledge distillation: a student imitates a pretrained teacher on normal images only, and the
anomaly is where it fails to (the book's chapter "Knowledge distillation").

* ``stpm``: a same-architecture student regresses the teacher's normalised feature pyramid;
* ``reverse_distillation``: a decoder student rebuilds the teacher's features from a bottleneck;
* ``efficientad``: a small patch network student and an auto-encoder, hard-feature loss;
* ``mkd``: a smaller cloner, value and direction losses, gradient maps;
* ``uninformed_students``: an ensemble of students regresses a distilled patch teacher at several
  receptive fields; regression error + predictive variance.

Shared pieces (discrepancies, a trainable student backbone, generic photographs) live in ``common``.
"""
from . import efficientad, mkd, reverse_distillation, stpm, uninformed_students  # noqa: F401
