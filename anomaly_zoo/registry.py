"""The registry: one decorator, one ``create``, one list of model cards.

Every method file ends its Detector class with ``@register(...)``, which records a
model card: the registry name, the survey family, the paper, its year, the key of
its entry in ``book/references.bib``, whether it localises and trains, and the
``quick`` preset (fewer epochs, smaller images) that keeps a CPU run in seconds.

    >>> import anomaly_zoo as az
    >>> det = az.create("padim", preset="quick")
    >>> az.list_models(family="feature")
"""
from __future__ import annotations

import difflib
from dataclasses import asdict, dataclass, field

from .utils import AnomalyZooError

#: the survey's taxonomy (seed 003), plus the medical systems of the other seeds
FAMILIES = {
    "reconstruction": "Reconstruction auto-encoders",
    "vae": "Variational auto-encoders",
    "gan": "Generative adversarial networks",
    "flow": "Normalizing flows",
    "distillation": "Knowledge distillation",
    "feature": "Deep feature modeling",
    "ssl": "Self-supervised learning",
    "one_class": "One-class classification",
    "medical": "Medical imaging systems",
}
PRESETS = ("default", "quick")


@dataclass(frozen=True)
class ModelCard:
    name: str
    family: str
    paper: str
    year: int
    bibkey: str
    localizes: bool
    trains: bool
    quick: dict = field(default_factory=dict)
    summary: str = ""
    cls: type | None = field(default=None, repr=False, compare=False)

    def as_row(self) -> dict:
        row = asdict(self)
        row.pop("cls")
        return row


class ModelList(list):
    """A list of :class:`ModelCard` that also renders as a table in Jupyter."""

    def to_frame(self):
        import pandas as pd

        return pd.DataFrame([c.as_row() for c in self]).set_index("name") if self else pd.DataFrame()

    def _repr_html_(self):
        return self.to_frame()._repr_html_()


_REGISTRY: dict[str, ModelCard] = {}


def register(name: str, *, family: str, paper: str, year: int, bibkey: str, localizes: bool, trains: bool,
             quick: dict | None = None):
    """Class decorator: record a Detector subclass under ``name`` with its model card."""
    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; one of {sorted(FAMILIES)}")

    def deco(cls):
        if name in _REGISTRY and _REGISTRY[name].cls is not cls:
            raise ValueError(f"model name {name!r} is registered twice")
        params = set(cls._param_names())
        unknown = set(quick or {}) - params
        if unknown:
            raise ValueError(f"{name}: quick preset sets unknown parameters {sorted(unknown)}")
        doc = (cls.__doc__ or "").strip().splitlines()
        cls.name, cls.family, cls.localizes, cls.trains = name, family, localizes, trains
        _REGISTRY[name] = ModelCard(name, family, paper, year, bibkey, localizes, trains, dict(quick or {}),
                                    doc[0] if doc else "", cls)
        return cls

    return deco


def _ensure_loaded() -> None:
    from . import models  # noqa: F401 - importing registers every method


def get_card(name: str) -> ModelCard:
    _ensure_loaded()
    if not isinstance(name, str) or name not in _REGISTRY:
        close = difflib.get_close_matches(str(name), _REGISTRY, n=3)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        raise AnomalyZooError(f"unknown model {name!r}.{hint} Known models: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name]


def get_class(name: str) -> type:
    return get_card(name).cls


def create(name: str, preset: str = "default", **kwargs):
    """Build the detector registered as ``name``.

    ``preset="default"`` uses the paper's settings (the class defaults);
    ``preset="quick"`` applies the model card's quick preset (a CPU run in seconds).
    Keyword arguments override both.
    """
    card = get_card(name)
    if preset not in PRESETS:
        raise AnomalyZooError(f"unknown preset {preset!r}; use one of {', '.join(PRESETS)}")
    params = dict(card.quick) if preset == "quick" else {}
    params.update(kwargs)
    valid = card.cls._param_names()
    unknown = sorted(set(params) - set(valid))
    if unknown:
        raise AnomalyZooError(f"{name} has no parameter {', '.join(unknown)}; its parameters: {', '.join(valid)}")
    return card.cls(**params)


def list_models(family: str | None = None, as_frame: bool = False):
    """Model cards of every registered method (optionally of one family), sorted by family then year."""
    _ensure_loaded()
    if family is not None and family not in FAMILIES:
        raise AnomalyZooError(f"unknown family {family!r}; one of {', '.join(FAMILIES)}")
    order = list(FAMILIES)
    cards = ModelList(sorted((c for c in _REGISTRY.values() if family in (None, c.family)),
                             key=lambda c: (order.index(c.family), c.year, c.name)))
    return cards.to_frame() if as_frame else cards
