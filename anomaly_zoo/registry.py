"""The registry: model cards and the ``@register`` decorator. A leaf: it imports no method.

Every method file puts ``@register(...)`` on its Detector class, which records a model
card: the registry name, the survey family, the paper, its year, the key of its entry
in ``book/references.bib``, whether it localises and trains, the ``quick`` preset
(fewer epochs, smaller images) that keeps a CPU run in seconds, and its ``deviations``:
every way the library's default preset differs from the paper (backbone, data,
optimiser, ...), which the book prints in each chapter.

What turns a name into an object (``create``, ``list_models``, ``load``) lives one level
up, in :mod:`anomaly_zoo.factory`, which imports the methods; the methods import this
module. So the import graph has no cycle: ``registry`` <- ``models`` <- ``factory``.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

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
    deviations: tuple[str, ...] = ()
    summary: str = ""
    cls: type | None = field(default=None, repr=False, compare=False)

    def as_row(self) -> dict:
        row = asdict(self)
        row.pop("cls")
        return row

    def deviations_markdown(self) -> str:
        """The card's deviations from the paper as a markdown list (printed in the chapters)."""
        lines = [f"- {d}" for d in self.deviations] or ["- none listed"]
        return f"**{self.name}** ({self.paper}, {self.year}), differences from the paper:\n" + "\n".join(lines)


class ModelList(list):
    """A list of :class:`ModelCard` that also renders as a table in Jupyter."""

    def to_frame(self):
        import pandas as pd

        return pd.DataFrame([c.as_row() for c in self]).set_index("name") if self else pd.DataFrame()

    def _repr_html_(self):
        return self.to_frame()._repr_html_()


_REGISTRY: dict[str, ModelCard] = {}


def register(name: str, *, family: str, paper: str, year: int, bibkey: str, localizes: bool, trains: bool,
             quick: dict | None = None, deviations: tuple[str, ...] | list[str] = ()):
    """Class decorator: record a Detector subclass under ``name`` with its model card.

    ``deviations``: one sentence per difference between the default preset and the paper
    (the default preset is the paper's method and hyperparameters on the library's backbone).
    """
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
                                    tuple(deviations), doc[0] if doc else "", cls)
        return cls

    return deco
