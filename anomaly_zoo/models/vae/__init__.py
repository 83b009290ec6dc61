"""Variational auto-encoders: anomaly = low evidence lower bound (ELBO) under a latent-variable model."""
from . import vae  # noqa: F401
