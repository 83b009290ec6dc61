"""Datasets that work offline: generated from a seed or read from an MVTec AD folder.

>>> import anomaly_zoo as az
>>> ds = az.data.load("textures", category="brick", quick=True)   # doctest: +SKIP
>>> ds.train_images.shape, ds.test_labels.float().mean()           # doctest: +SKIP

* ``textures``: crops of scikit-image's brick / grass / gravel photographs with six
  synthetic defect types and pixel masks (:mod:`.textures`, :mod:`.defects`).
* ``digits``: scikit-learn's 8x8 digits, one class normal (:mod:`.digits`).
* ``phantom``: Shepp-Logan-style head phantoms with lesions (:mod:`.phantom`).
* ``retina``: crops of scikit-image's fundus photograph with retinal lesions (:mod:`.retina`).

The sets with lesions (phantom, retina) also have a weakly labelled split
(``ds.weak_images``, ``ds.weak_labels``) for weakly supervised methods.
* ``mvtec``: any folder in the MVTec AD layout (:mod:`.mvtec`).

Generated sets are written once in the MVTec AD layout with a manifest of hashes
(:mod:`.cache`) and read back by the same reader as real MVTec AD.
"""
from .core import GOOD, AnomalyDataset, data_root
from .loader import list_categories, list_datasets, load, make, set_folder
from .mvtec import read_folder

__all__ = [
    "GOOD",
    "AnomalyDataset",
    "data_root",
    "list_categories",
    "list_datasets",
    "load",
    "make",
    "read_folder",
    "set_folder",
]
