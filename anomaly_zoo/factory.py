"""From a name to an object: ``create``, ``list_models``, ``load`` (timm's and scikit-learn's habits).

This module sits above the methods: importing it imports every method file (each
registers itself in :mod:`anomaly_zoo.registry`, a leaf), so the import graph is
``registry`` <- ``models`` <- ``factory`` with no cycle.

    >>> import anomaly_zoo as az
    >>> det = az.create("padim", preset="quick")     # the card's quick preset, for a CPU
    >>> az.list_models(family="feature")             # model cards (a DataFrame in Jupyter)
    >>> det2 = az.load("padim.pt")                    # what det.save("padim.pt") wrote
"""
from __future__ import annotations

import difflib
from pathlib import Path

from . import models  # noqa: F401 - importing registers every method
from .base import Detector, read_saved
from .registry import _REGISTRY, FAMILIES, ModelCard, ModelList
from .utils import AnomalyZooError

PRESETS = ("default", "quick")


def get_card(name: str) -> ModelCard:
    """The model card registered as ``name``; an unknown name lists the known ones."""
    if not isinstance(name, str) or name not in _REGISTRY:
        close = difflib.get_close_matches(str(name), _REGISTRY, n=3)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        raise AnomalyZooError(f"unknown model {name!r}.{hint} Known models: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name]


def create(name: str, preset: str = "default", **kwargs) -> Detector:
    """Build the detector registered as ``name``.

    ``preset="default"``: the paper's method and hyperparameters on the library's backbone
    (each difference from the paper is listed on the card: ``get_card(name).deviations``).
    ``preset="quick"``: the card's quick preset (fewer epochs, smaller images: a CPU run in
    seconds; the method is the same). Keyword arguments override both.
    """
    card = get_card(name)
    if preset not in PRESETS:
        raise AnomalyZooError(f"unknown preset {preset!r}; use one of {', '.join(PRESETS)}")
    params = dict(card.quick) if preset == "quick" else {}
    params.update(kwargs)
    return card.cls(**params)


def list_models(family: str | None = None, as_frame: bool = False):
    """Model cards of every registered method (optionally of one family), sorted by family then year."""
    if family is not None and family not in FAMILIES:
        raise AnomalyZooError(f"unknown family {family!r}; one of {', '.join(FAMILIES)}")
    order = list(FAMILIES)
    cards = ModelList(sorted((c for c in _REGISTRY.values() if family in (None, c.family)),
                             key=lambda c: (order.index(c.family), c.year, c.name)))
    return cards.to_frame() if as_frame else cards


def load(path: str | Path, device: str = "auto") -> Detector:
    """Load a detector written by ``Detector.save`` (``torch.load(weights_only=True)``)."""
    config, state = read_saved(path)
    det = get_card(config["name"]).cls(**config["params"])
    return det._restore(config, state, device)
