"""Reconstruction auto-encoders: anomaly = what the network cannot reconstruct."""
from . import ae  # noqa: F401
