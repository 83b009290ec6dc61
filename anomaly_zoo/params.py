"""Hyperparameters, declared once: ``Param`` (a default plus the allowed values) and their check.

A method declares each hyperparameter once, as a class attribute, next to what it means::

    class PaDiM(FeatureDetector):
        n_features = Param(100, int, low=1, help="channels kept at random (Sec. III-C)")
        eps = Param(0.01, float, low=0, low_open=True, help="covariance ridge (eq. 1)")
        sigma = Param(4.0, float, low=0, help="Gaussian smoothing of the map, px")

``Detector`` turns the declarations of a class and its bases into a keyword-only
``__init__`` that stores every value as given (scikit-learn's rule: no logic there)
and an ``inspect.Signature`` for ``help()`` and tab completion. When ``fit`` starts,
:func:`check_params` checks every value against its declaration and raises one
``AnomalyZooError`` that names the parameter, its value and what is allowed::

    padim: n_features=0 is out of range; allowed: an integer >= 1

A constraint that ties two parameters together (``patch_size <= image_size``) is the
method's ``_check_params`` hook, called right after, with the same kind of message.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from .utils import AnomalyZooError

_MISSING = object()


@dataclass(frozen=True)
class Param:
    """One hyperparameter: its default and the values it accepts.

    kind: ``int``, ``float`` (ints accepted), ``bool``, ``str``, ``tuple`` (a list or tuple,
    each item checked by ``item``), ``dict`` (keys are strings; the method checks the values),
    or ``object`` (anything; say why in ``help``).
    low/high: inclusive bounds (``low_open``/``high_open``: exclusive). choices: allowed values.
    none: whether ``None`` is allowed (it means "the method's choice", said in ``help``).
    """

    default: object = _MISSING
    kind: type = object
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    choices: Sequence | None = None
    none: bool = False
    item: type | None = None  # for kind=tuple: the type of each item
    help: str = ""

    # the parameters most methods share, with one range each (``epochs = Param.epochs(200)``)
    @staticmethod
    def epochs(default: int) -> Param:
        return Param(default, int, low=1, help="passes over the training images")

    @staticmethod
    def batch_size(default: int) -> Param:
        return Param(default, int, low=1, help="images per training step")

    @staticmethod
    def lr(default: float) -> Param:
        return Param(default, float, low=0, low_open=True, help="learning rate")

    @staticmethod
    def weight_decay(default: float) -> Param:
        return Param(default, float, low=0, help="L2 weight decay of the optimiser")

    @staticmethod
    def image_size(default: int | None, low: int = 16) -> Param:
        return Param(default, int, low=low, none=True, help="images are resized to this side, px (None: as given)")

    @staticmethod
    def sigma(default: float) -> Param:
        return Param(default, float, low=0, help="Gaussian smoothing of the map, px (0: none)")

    def allowed(self) -> str:
        """What is allowed, in words: the end of the error message."""
        if self.choices is not None:
            text = "one of " + ", ".join(map(repr, self.choices))
        elif self.kind is bool:
            text = "True or False"
        elif self.kind in (int, float):
            what = "an integer" if self.kind is int else "a number"
            bounds = []
            if self.low is not None:
                bounds.append(f"{'>' if self.low_open else '>='} {self.low:g}")
            if self.high is not None:
                bounds.append(f"{'<' if self.high_open else '<='} {self.high:g}")
            text = f"{what} {' and '.join(bounds)}".strip() if bounds else what
        elif self.kind is tuple:
            text = f"a non-empty list of {self.item.__name__ if self.item else 'values'}"
        elif self.kind is str:
            text = "a string"
        elif self.kind is dict:
            text = "a dict with string keys"
        else:
            text = "any value"
        return text + (", or None" if self.none else "")

    def check(self, value) -> bool:
        """Whether ``value`` is allowed."""
        if value is None:
            return self.none
        if self.choices is not None:
            return any(value == c and type(value) is type(c) for c in self.choices)
        if self.kind is bool:
            return isinstance(value, bool)
        if self.kind in (int, float):
            if isinstance(value, bool) or not isinstance(value, (int, float) if self.kind is float else int):
                return False
            if not math.isfinite(value):
                return False
            if self.low is not None and (value < self.low or (self.low_open and value == self.low)):
                return False
            return not (self.high is not None and (value > self.high or (self.high_open and value == self.high)))
        if self.kind is tuple:
            if not isinstance(value, (list, tuple)) or not value:
                return False
            return self.item is None or all(isinstance(v, self.item) and not isinstance(v, bool) for v in value)
        if self.kind is str:
            return isinstance(value, str)
        if self.kind is dict:
            return isinstance(value, dict) and all(isinstance(k, str) for k in value)
        return True


def collect_params(cls) -> dict[str, Param]:
    """The ``Param`` declarations of ``cls`` and its bases, bases first; a subclass may redeclare
    a base's parameter (a different default or range) and keeps its place in the order."""
    out: dict[str, Param] = {}
    for klass in reversed(cls.__mro__):
        for name, value in vars(klass).items():
            if isinstance(value, Param):
                out[name] = value
    return out


def check_params(name: str, values: dict, specs: dict[str, Param]) -> None:
    """Raise one ``AnomalyZooError`` for the first value that its ``Param`` does not allow."""
    for key, spec in specs.items():
        value = values.get(key)
        if not spec.check(value):
            raise AnomalyZooError(f"{name}: {key}={value!r} is out of range; allowed: {spec.allowed()}")


def bad(name: str, key: str, value, allowed: str) -> AnomalyZooError:
    """The same one-line message for a constraint a method checks itself (``_check_params``)."""
    return AnomalyZooError(f"{name}: {key}={value!r} is out of range; allowed: {allowed}")
