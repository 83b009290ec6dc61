"""The leaderboard runner: methods x datasets -> one DataFrame.

    from anomaly_zoo import bench
    df = bench.run(["padim", "ae"], dataset="textures", categories=["brick"], quick=True)

Each row: the metrics of ``az.metrics.evaluate`` plus the fit time (seconds), the
prediction throughput (test images per second) on the device used, and the peak
resident memory of the process so far (run one model per process for a clean number).
A benchmark is a script or CLI run (``python -m anomaly_zoo bench``), not a test.
"""
from __future__ import annotations

import resource
import sys
import time

import pandas as pd

from . import data as azdata
from . import metrics
from .factory import create, get_card
from .utils import AnomalyZooError, progress_enabled, resolve_device, set_seed

COLUMNS = ["model", "dataset", "category", "image_auroc", "pixel_auroc", "aupro", "image_ap", "image_f1_max",
           "fit_s", "predict_ips", "peak_rss_mb", "device"]


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far (MB); Linux reports KiB, macOS bytes."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10


def fit_on(det, ds):
    """Fit ``det`` on what it learns from: the normal training images, or for a weakly supervised method
    (DeScarGAN) the weakly labelled split of healthy and diseased images (no masks)."""
    if det.supervision != "weak":
        return det.fit(ds.train_images)
    if getattr(ds, "weak_images", None) is None:
        raise AnomalyZooError(f"{det.name} is weakly supervised and {ds.name} has no weakly labelled split "
                              "(weak_images, weak_labels): use a set with lesions (phantom, retina)")
    return det.fit(ds.weak_images, labels=ds.weak_labels)


def run_one(name: str, ds, *, quick: bool = True, device: str = "auto", seed: int = 0, **kwargs) -> dict:
    """Fit ``name`` on ``ds.train_images``, predict ``ds.test_images``; metrics and timings as a dict."""
    dev = resolve_device(device)
    set_seed(seed)
    det = create(name, preset="quick" if quick else "default", device=str(dev), seed=seed, **kwargs)
    t0 = time.perf_counter()
    fit_on(det, ds)
    fit_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    pred = det.predict(ds.test_images)
    pred_s = time.perf_counter() - t0
    row = {"model": name, "dataset": ds.name, "category": ds.category, "fit_s": fit_s,
           "predict_ips": len(ds.test_images) / max(pred_s, 1e-9), "peak_rss_mb": peak_rss_mb(),
           "device": dev.type}
    row.update(metrics.evaluate(pred, ds.test_labels, ds.test_masks))
    return row


def run(models, dataset: str = "textures", categories=None, *, quick: bool = True, device: str = "auto",
        seed: int = 0, root=None, progress: bool | None = None) -> pd.DataFrame:
    """Benchmark every model on every category of ``dataset``; returns a DataFrame (one row each)."""
    from tqdm.auto import tqdm

    models = [models] if isinstance(models, str) else list(models)
    for m in models:
        get_card(m)  # unknown names fail before any work
    if isinstance(categories, str):
        categories = [categories]
    if not categories:
        categories = azdata.list_categories(dataset, root=root)
        if not categories:
            raise AnomalyZooError(f"no categories of {dataset!r} found" + (f" under {root}" if root else "")
                                  + ("; pass root= (the folder holding the MVTec categories)" if dataset == "mvtec" else ""))
    rows = []
    jobs = [(c, m) for c in categories for m in models]
    for cat, name in tqdm(jobs, desc="bench", disable=not (progress_enabled() if progress is None else progress)):
        ds = azdata.load(dataset, **_load_kw(dataset, cat, quick, seed, root))
        rows.append(run_one(name, ds, quick=quick, device=device, seed=seed))
    df = pd.DataFrame(rows)
    return df[[c for c in COLUMNS if c in df.columns]]


def _load_kw(dataset: str, category, quick: bool, seed: int, root) -> dict:
    """``az.data.load`` arguments for one category (MVTec folders are read, not generated)."""
    if dataset == "mvtec":
        return {"category": category, "root": root}
    return {"category": category, "quick": quick, "seed": seed, "root": root}


def to_markdown(df: pd.DataFrame, digits: int = 3) -> str:
    """A GitHub-markdown table (no extra dependency: pandas' own to_markdown needs tabulate)."""
    cols = list(df.columns)

    def fmt(v):
        if isinstance(v, float):
            return "-" if v != v else f"{v:.{digits}f}"
        return str(v)

    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join(" --- " for _ in cols) + "|"]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in df.itertuples(index=False)]
    return "\n".join(lines)
