"""Self-supervised learning: a network learns normality from a pretext task or from anomalies it
makes up itself (the book's chapter "Self-supervised learning").

* ``cutpaste``: normal vs CutPaste vs CutPaste-Scar, then a Gaussian on the learned embedding;
* ``draem``: reconstruct Perlin-masked synthetic anomalies, segment the difference (``sspcab=True``:
  the masked-convolution block);
* ``riad``: inpaint from disjoint random-grid masks, MSGMS map;
* ``nsa``: Poisson-blended patches of other normal images, per-pixel targets;
* ``puzzle_ae``: reassemble a shuffled jigsaw, with adversarially robust training;
* ``igd``: auto-encoder + Gaussian normality classifier on its codes, kept smooth by adversarial
  interpolation; CCD's s_IGD;
* ``ccd``: contrastive distribution pre-training (strong and weak augmentations, augmentation and
  patch-position pretexts) of a downstream detector's encoder (``igd``, ``f_anogan``, ``ms_ssim_ae``).

The training-time anomalies come from :mod:`anomaly_zoo.synthesis`, never from the test defects.
"""
from . import ccd, cutpaste, draem, igd, nsa, puzzle_ae, riad  # noqa: F401
