"""Perlin-noise masks and procedural textures (DRAEM's anomaly source; DTD replaced by generated textures)."""
from __future__ import annotations

#: the synthesis kinds this module adds to :data:`anomaly_zoo.synthesis.KINDS`
KINDS: dict = {}
