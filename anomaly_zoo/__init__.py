"""anomaly_zoo: unsupervised visual anomaly detection and localisation, one family at a time.

    import anomaly_zoo as az
    ds = az.data.load("textures", category="brick", quick=True)
    det = az.create("padim", preset="quick").fit(ds.train_images)
    pred = det.predict(ds.test_images)
    az.metrics.evaluate(pred, ds.test_labels, ds.test_masks)

``az.viz``, ``az.bench`` and ``az.notebook`` are imported on first use, so that
``import anomaly_zoo`` does not load matplotlib or pandas.
"""
import importlib

from . import backbones, data, metrics  # noqa: F401
from .base import Detector, FeatureDetector, Prediction
from .factory import create, get_card, list_models, load
from .params import Param
from .registry import FAMILIES, register
from .utils import AnomalyZooError, NotFittedError, resolve_device, set_seed

__version__ = "0.1.0"

_LAZY = ("bench", "notebook", "validation", "viz")

__all__ = [
    "AnomalyZooError", "Detector", "FAMILIES", "FeatureDetector", "NotFittedError", "Param", "Prediction",
    "backbones", "bench", "create", "data", "get_card", "list_models", "load", "metrics", "notebook", "register",
    "resolve_device", "set_seed", "validation", "viz", "__version__",
]


def __getattr__(name):
    if name in _LAZY:
        module = importlib.import_module(f".{name}", __name__)
        globals()[name] = module
        return module
    raise AttributeError(f"module 'anomaly_zoo' has no attribute {name!r}")
