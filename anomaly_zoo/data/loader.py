"""``load``, ``make``, ``list_datasets``: the entry points of ``anomaly_zoo.data``.

Generated sets live in ``<data root>/<dataset>/<category>[_quick][_seed<k>]/`` in the
MVTec AD layout (see :mod:`~anomaly_zoo.data.cache` for how they are cached and
:func:`~anomaly_zoo.data.core.data_root` for where). The seed is part of the folder
name (when not 0) so that notebooks comparing seeds do not rebuild each other's sets.

A generator module (``textures``, ``digits``, ``phantom``, ``retina``) provides ``NAME``,
``VERSION``, ``CATEGORIES``, ``DEFAULT_CATEGORY``, ``config(category, quick, seed)``
(every parameter that determines the output, recorded in the manifest) and
``generate(cfg)`` (yields :class:`~anomaly_zoo.data.core.Sample`). Bump ``VERSION``
whenever a code change alters the generated images: cached sets are then rebuilt.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from ..utils import AnomalyZooError, env_flag, progress_enabled
from . import cache, digits, mvtec, phantom, retina, textures
from .core import AnomalyDataset, data_root

GENERATORS = {"textures": textures, "digits": digits, "phantom": phantom, "retina": retina}
DATASETS = ("textures", "digits", "phantom", "retina", "mvtec")
_ARGS = {
    "textures": ("category", "quick", "seed", "root", "image_size"),
    "digits": ("normal_class", "category", "quick", "seed", "root", "image_size"),
    "phantom": ("category", "quick", "seed", "root", "image_size"),
    "retina": ("category", "quick", "seed", "root", "image_size"),
    "mvtec": ("root", "category", "image_size"),
}


def list_datasets() -> list[str]:
    """Names accepted by :func:`load`: ``["textures", "digits", "phantom", "retina", "mvtec"]``."""
    return list(DATASETS)


def list_categories(name: str, root: str | os.PathLike | None = None) -> list[str]:
    """Categories of a dataset (for ``mvtec``: the category folders present under ``root``)."""
    name = _check_name(name)
    if name == "mvtec":
        return mvtec.categories(root)
    return list(GENERATORS[name].CATEGORIES)


def _check_name(name) -> str:
    if not isinstance(name, str) or name.lower() not in DATASETS:
        raise AnomalyZooError(f"unknown dataset {name!r}; choose one of: {', '.join(DATASETS)}")
    return name.lower()


def _check_kwargs(name: str, kw: dict, allowed=None) -> None:
    allowed = allowed or _ARGS[name]
    unknown = sorted(set(kw) - set(allowed))
    if unknown:
        raise AnomalyZooError(
            f"load({name!r}): unknown argument(s) {', '.join(unknown)}; valid arguments: {', '.join(allowed)}"
        )


def _check_quick(quick) -> bool:
    if quick is None:
        return env_flag("AZOO_QUICK", False)
    if not isinstance(quick, (bool, np.bool_)):
        raise AnomalyZooError(f"quick must be True or False, got {quick!r}")
    return bool(quick)


def _check_seed(seed) -> int:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise AnomalyZooError(f"seed must be a non-negative integer, got {seed!r}")
    return int(seed)


def _check_category(name: str, gen, category, normal_class=None) -> str:
    if name == "digits" and normal_class is not None:
        if isinstance(normal_class, bool) or not isinstance(normal_class, (int, np.integer)) or not 0 <= normal_class <= 9:
            raise AnomalyZooError(f"normal_class must be an integer from 0 to 9, got {normal_class!r}")
        from_class = f"class_{int(normal_class)}"
        if category is not None and category != from_class:
            raise AnomalyZooError(f"category={category!r} and normal_class={normal_class} disagree; give one of them")
        category = from_class
    if category is None:
        return gen.DEFAULT_CATEGORY
    if category not in gen.CATEGORIES:
        raise AnomalyZooError(f"unknown {name} category {category!r}; choose one of: {', '.join(gen.CATEGORIES)}")
    return category


def set_folder(name: str, category: str, quick: bool, seed: int, root=None) -> Path:
    """Where a generated set lives: ``<root>/<name>/<category>[_quick][_seed<k>]``."""
    suffix = ("_quick" if quick else "") + (f"_seed{seed}" if seed else "")
    return data_root(root) / name / f"{category}{suffix}"


def _ensure(name, category, quick, seed, root, *, force=False, then=None):
    gen = GENERATORS[name]
    cfg = gen.config(category, quick, seed)
    expected = {"generator": f"anomaly_zoo.data.{gen.NAME}", "version": gen.VERSION, "params": cfg}
    folder = set_folder(name, category, quick, seed, root)
    wrapped = (lambda f: then(f, cfg)) if then is not None else None
    return cache.ensure(folder, lambda: gen.generate(cfg), expected, force=force, then=wrapped)


def load(name: str, **kw) -> AnomalyDataset:
    """Load a dataset as an :class:`AnomalyDataset` (generating and caching it if needed).

    Args:
        name: ``"textures"``, ``"digits"``, ``"phantom"``, ``"retina"`` or ``"mvtec"``.
        category: ``textures``: brick, grass, gravel (default brick); ``digits``:
            ``class_0`` .. ``class_9`` (or ``normal_class=k``); ``phantom``: head;
            ``retina``: fundus; ``mvtec``: a category folder under ``root``.
        quick: small set for CPU runs (128 px, 96 px for retina, tens of images) instead of the
            full one (256 px, ~200 train images). ``None``: ``$AZOO_QUICK``. Default False.
        seed: generation seed (default 0); the same seed gives the same images.
        root: data folder (default ``$AZOO_DATA``, the checkout's ``data/``, or
            ``~/.cache/anomaly_zoo``); for ``mvtec`` the folder holding the categories.
        image_size: resize on reading (int or (h, w); bilinear images, nearest masks).

    Example:
        >>> ds = load("textures", category="brick", quick=True)   # doctest: +SKIP
    """
    name = _check_name(name)
    _check_kwargs(name, kw)
    if name == "mvtec":
        return mvtec.load_mvtec(**kw)
    gen = GENERATORS[name]
    category = _check_category(name, gen, kw.get("category"), kw.get("normal_class"))
    quick, seed = _check_quick(kw.get("quick", False)), _check_seed(kw.get("seed", 0))
    image_size = kw.get("image_size")
    mvtec._parse_size(image_size)  # fail before generating anything

    def read(folder: Path, cfg: dict) -> AnomalyDataset:
        return mvtec.read_folder(folder, name=name, category=category, image_size=image_size, info=cfg)

    return _ensure(name, category, quick, seed, kw.get("root"), then=read)


def make(
    name: str,
    categories=None,
    *,
    quick: bool = False,
    seed: int = 0,
    root=None,
    force: bool = False,
    progress: bool | None = None,
) -> list[Path]:
    """Write every category (or the given ones) of a generated dataset to disk; return the folders.

    Used by ``python -m anomaly_zoo data make <name>``. Sets already on disk and intact
    are kept unless ``force=True``. ``progress=None`` shows a progress bar unless
    ``$AZOO_NO_PROGRESS`` is set.
    """
    from tqdm.auto import tqdm

    name = _check_name(name)
    if name == "mvtec":
        raise AnomalyZooError(
            "mvtec is read from disk, not generated: download MVTec AD, extract it and use "
            "load('mvtec', root=<folder>, category=<category>)"
        )
    gen = GENERATORS[name]
    if categories is None:
        categories = list(gen.CATEGORIES)
    elif isinstance(categories, str):
        categories = [categories]
    cats = [_check_category(name, gen, c) for c in categories]
    quick, seed = _check_quick(quick), _check_seed(seed)
    if progress is None:
        progress = progress_enabled()
    paths = []
    for category in tqdm(cats, desc=f"{name}{' (quick)' if quick else ''}", unit="category", disable=not progress):
        paths.append(_ensure(name, category, quick, seed, root, force=force))
    return paths
