"""What the flow methods share besides the flow blocks (:mod:`.coupling`): reading the frozen backbone.

CFLOW-AD, FastFlow and CS-Flow never fine-tune their CNN, so its features are computed once per
training image and the flows are trained on those stored features (the papers' code does the same
per batch; storing them saves recomputing a frozen network every epoch, and gives the same numbers).
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

from ...backbones import FeatureExtractor


@torch.no_grad()
def extract_taps(extractor: FeatureExtractor, layers: Sequence[str], x: torch.Tensor, batch_size: int,
                 device) -> dict[str, torch.Tensor]:
    """``{tap: [N, C, h, w]}`` for images ``x`` (on the CPU), computed in batches on ``device``, kept on the CPU."""
    parts: dict[str, list[torch.Tensor]] = {name: [] for name in layers}
    for i in range(0, len(x), batch_size):
        feats = extractor(x[i : i + batch_size].to(device))
        for name in layers:
            parts[name].append(feats[name].float().cpu())
    return {name: torch.cat(p) for name, p in parts.items()}
