"""Every method, one file each, grouped by the survey's families.

Importing this package registers them all (see ``anomaly_zoo.registry``); ``anomaly_zoo.factory``
imports it. How to add a method: the README's "How to add a method" section.
"""
from . import distillation, feature, flow, gan, medical, one_class, reconstruction, ssl, vae  # noqa: F401
