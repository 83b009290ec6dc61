"""Seamless (Poisson) blending of patches from other normal images (NSA)."""
from __future__ import annotations

#: the synthesis kinds this module adds to :data:`anomaly_zoo.synthesis.KINDS`
KINDS: dict = {}
