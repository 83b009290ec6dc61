"""anomaly_zoo: unsupervised visual anomaly detection and localisation, one family at a time.

    import anomaly_zoo as az
    ds = az.data.load("textures", category="brick", quick=True)
    det = az.create("padim", preset="quick").fit(ds.train_images)
    pred = det.predict(ds.test_images)
    az.metrics.evaluate(pred, ds.test_labels, ds.test_masks)
"""
from . import backbones, bench, data, metrics, notebook, viz  # noqa: F401
from .base import Detector, Prediction, load
from .registry import FAMILIES, create, list_models, register
from .utils import AnomalyZooError, NotFittedError, resolve_device, set_seed

__version__ = "0.1.0"

__all__ = [
    "AnomalyZooError", "Detector", "bench", "FAMILIES", "NotFittedError", "Prediction", "backbones", "create", "data",
    "list_models", "load", "metrics", "register", "resolve_device", "set_seed", "viz", "__version__",
]
