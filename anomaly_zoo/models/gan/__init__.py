"""Generative adversarial networks: AnoGAN, GANomaly, Skip-GANomaly, f-AnoGAN (one file each; shared
DCGAN blocks, the WGAN-GP penalty and feature matching in ``blocks.py``)."""
from . import anogan, f_anogan, ganomaly, skip_ganomaly  # noqa: F401
