"""Masks and permutations that are not anomalies but pretext tasks: jigsaw permutations (Puzzle-AE), disjoint random-grid inpainting masks (RIAD)."""
from __future__ import annotations

#: the synthesis kinds this module adds to :data:`anomaly_zoo.synthesis.KINDS`
KINDS: dict = {}
