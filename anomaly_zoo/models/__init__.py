"""Every method, one file each, grouped by the survey's families.

Importing this package registers them all (see ``anomaly_zoo.registry``).
"""
from . import distillation, feature, flow, gan, medical, one_class, reconstruction, ssl, vae  # noqa: F401
