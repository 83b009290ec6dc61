"""Reconstruction auto-encoders: anomaly = what the network cannot reconstruct."""
from . import ae, memae, ms_ssim_ae, unet_ae  # noqa: F401
