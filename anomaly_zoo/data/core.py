"""The dataset object every loader returns, and where datasets live on disk.

``AnomalyDataset`` is deliberately plain: tensors a detector can eat directly
(``det.fit(ds.train_images)``), the labels and masks the metrics need, and the
folder it came from. Everything else in ``anomaly_zoo.data`` produces one.
"""
from __future__ import annotations

import os
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..utils import AnomalyZooError

#: Name of the folder (and defect label) that holds normal images, as in MVTec AD.
GOOD = "good"
#: Folder of the diseased images in the weakly labelled split (``weak/good``, ``weak/diseased``).
DISEASED = "diseased"


@dataclass(repr=False, eq=False)
class AnomalyDataset:
    """One category of an anomaly-detection dataset, loaded into memory.

    Attributes:
        name: dataset name (``"textures"``, ``"digits"``, ``"phantom"``, ``"mvtec"``).
        category: category inside the dataset (``"brick"``, ``"class_3"``, ``"head"``, ...).
        root: the category folder on disk (MVTec AD layout).
        train_images: float32 ``[N, 3, H, W]`` in ``[0, 1]``, normal images only.
        test_images: float32 ``[M, 3, H, W]`` in ``[0, 1]``.
        test_labels: int64 ``[M]``, 1 = anomalous, 0 = normal.
        test_masks: float32 ``[M, H, W]`` of 0/1 (1 = anomalous pixel), or ``None``
            for sets with image-level labels only (``digits``).
        test_defects: defect type of each test image, ``"good"`` for normal ones.
        test_files: path of each test image relative to ``root/test`` (``"hole/003.png"``).
        info: the generator's parameters (from ``manifest.json``), empty for plain folders.
        weak_images: float32 ``[K, 3, H, W]``, the weakly labelled split (folders ``weak/good``
            then ``weak/diseased``), or ``None`` for sets without one (textures, digits, MVTec AD).
        weak_labels: int64 ``[K]``, 0 = healthy, 1 = diseased (image level only, no masks), or ``None``.

    The weak split (phantom, retina) is for weakly supervised methods only (DeScarGAN): healthy
    and diseased images with image-level labels, no masks, generated apart from the train and
    test images (none of its images is in either).
    """

    name: str
    category: str
    root: Path
    train_images: torch.Tensor
    test_images: torch.Tensor
    test_labels: torch.Tensor
    test_masks: torch.Tensor | None
    test_defects: list[str]
    test_files: list[str] = field(default_factory=list)
    info: dict = field(default_factory=dict)
    weak_images: torch.Tensor | None = None
    weak_labels: torch.Tensor | None = None

    @property
    def image_size(self) -> tuple[int, int]:
        """``(H, W)`` of every image in the set."""
        return tuple(self.train_images.shape[-2:])

    @property
    def defect_types(self) -> list[str]:
        """The anomalous defect types present in the test set, sorted."""
        return sorted({d for d in self.test_defects if d != GOOD})

    def summary(self):
        """A small ``pandas.DataFrame``: one row per (split, defect type) with its count.

        The weak split, where there is one, adds rows ``weak``/``good`` and ``weak``/``diseased``.
        Columns: ``split``, ``defect``, ``label`` (0 normal / 1 anomalous), ``count`` and,
        when masks exist, ``mean_mask_area`` (fraction of the image marked anomalous).
        """
        import pandas as pd

        rows = [{"split": "train", "defect": GOOD, "label": 0, "count": len(self.train_images)}]
        defects = np.asarray(self.test_defects)
        for defect in [GOOD, *self.defect_types]:
            sel = defects == defect
            row = {"split": "test", "defect": defect, "label": int(defect != GOOD), "count": int(sel.sum())}
            if self.test_masks is not None:
                row["mean_mask_area"] = float(self.test_masks[torch.from_numpy(sel)].mean()) if sel.any() else 0.0
            rows.append(row)
        if self.weak_labels is not None:
            for label, defect in ((0, GOOD), (1, DISEASED)):
                rows.append({"split": "weak", "defect": defect, "label": label,
                             "count": int((self.weak_labels == label).sum())})
        return pd.DataFrame(rows)

    def __repr__(self) -> str:
        h, w = self.image_size
        n_bad = int(self.test_labels.sum())
        masks = "pixel masks" if self.test_masks is not None else "image labels only"
        weak = f", {len(self.weak_labels)} weakly labelled" if self.weak_labels is not None else ""
        return (
            f"AnomalyDataset({self.name}/{self.category}: {len(self.train_images)} train, "
            f"{len(self.test_images)} test ({len(self.test_images) - n_bad} good, {n_bad} anomalous, "
            f"{len(self.defect_types)} defect types){weak}, {h}x{w} px, {masks}, root={str(self.root)!r})"
        )


@dataclass
class Sample:
    """One generated image on its way to disk.

    ``image`` is uint8 ``[H, W]`` (grayscale, saved as one channel) or ``[H, W, 3]``
    (colour). ``mask`` is a bool ``[H, W]`` for defective test images, else ``None`` (always
    ``None`` in the weak split, which has image labels only).
    """

    split: str  # "train", "test" or "weak"
    defect: str  # "good" or a defect type ("weak": "good" or "diseased")
    image: np.ndarray
    mask: np.ndarray | None = None


def to_uint8(x: np.ndarray) -> np.ndarray:
    """Float image in [0, 1] -> uint8 (rounded, clipped)."""
    return np.clip(np.round(np.asarray(x, dtype=np.float64) * 255.0), 0, 255).astype(np.uint8)


def make_rng(seed: int, *keys: str) -> np.random.Generator:
    """A NumPy generator seeded from ``seed`` and stable string keys (dataset, category, ...).

    Python's ``hash()`` changes between processes; ``crc32`` does not, so two processes
    (or two machines) generate identical data from the same seed.
    """
    entropy = [int(seed)] + [zlib.crc32(k.encode()) for k in keys]
    return np.random.default_rng(np.random.SeedSequence(entropy))


# ---------------------------------------------------------------------------------------
# Where datasets live
# ---------------------------------------------------------------------------------------

def _checkout_data_dir() -> Path | None:
    """``<repo>/data`` when the package is imported from a source checkout, else ``None``."""
    repo = Path(__file__).resolve().parents[2]
    if (repo / "pyproject.toml").is_file() and (repo / "data").is_dir():
        return repo / "data"
    return None


def data_root(root: str | os.PathLike | None = None) -> Path:
    """The folder that holds all datasets.

    In order: the ``root`` argument, ``$AZOO_DATA``, the repository's ``data/`` folder
    when running from a checkout, else ``$XDG_CACHE_HOME/anomaly_zoo`` (``~/.cache/anomaly_zoo``).
    """
    if root is not None:
        if not isinstance(root, (str, os.PathLike)):
            raise AnomalyZooError(f"root must be a folder path (str or Path), got {type(root).__name__}")
        return Path(root).expanduser()
    env = os.environ.get("AZOO_DATA")
    if env:
        return Path(env).expanduser()
    checkout = _checkout_data_dir()
    if checkout is not None:
        return checkout
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(cache) / "anomaly_zoo"
