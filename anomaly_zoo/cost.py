"""What a method costs on this machine: fit and predict time and peak memory, quick and full preset.

    python -m anomaly_zoo cost --models padim,cflow,fastflow --dataset textures --category brick \\
        --threads 2 --out results/cost.csv              # quick preset, quick data: timed in full
    python -m anomaly_zoo cost --models cflow --full --epochs 1,2 --out results/cost.csv

A quick-preset fit is timed as it runs. A full preset trains for hundreds of epochs at 256 px or
more, days on a CPU, so its fit is timed twice, with ``epochs`` = e1 and e2 (default 1 and 2) instead of the
preset's E, each in a fresh process, and extrapolated on the straight line through the two:

    seconds per epoch  s = (t(e2) - t(e1)) / (e2 - e1)
    setup              t0 = t(e1) - e1 s          (what does not repeat: features cached before the loop, ...)
    fit at E epochs    t(E) = t0 + E s

Prediction and peak resident memory are measured on the e2 run: they do not depend on the number of
epochs. A quick preset predicts every test image; a full preset the first ``predict_images`` (default 16),
enough for a rate (DifferNet's full map alone, 64 rotations with a backward pass each at 448 px, would take
most of an hour for the 132 test images on two cores). Every row says whether its fit time is ``measured`` or ``extrapolated``, and the
number of threads torch used. Each run happens in a fresh child process (as a sweep row does), so its peak
memory is its own.
"""
from __future__ import annotations

import time

import pandas as pd

from .utils import AnomalyZooError

COLUMNS = ["model", "preset", "dataset", "category", "image_size", "train_images", "test_images", "threads",
           "epochs", "fit_s", "fit", "s_per_epoch", "setup_s", "predict_ips", "cpu_s", "peak_rss_mb",
           "version", "commit", "device", "torch", "date"]


def _timed_run(model: str, dataset: str, category: str, quick: bool, epochs: int | None, threads: int,
               seed: int, root, predict_images: int | None = None) -> dict:
    """One fit + predict in this process (the child's body)."""
    import torch

    from . import bench, sweep
    from . import data as azdata
    from .factory import create

    torch.set_num_threads(threads)
    cpu0 = sweep._cpu_seconds()
    ds = azdata.load(dataset, **bench._load_kw(dataset, category, quick, seed, root))
    over = {} if epochs is None else {"epochs": epochs}
    det = create(model, preset="quick" if quick else "default", device="cpu", seed=seed, **over)
    t0 = time.perf_counter()
    bench.fit_on(det, ds)
    fit_s = time.perf_counter() - t0
    test = ds.test_images[:predict_images]
    t0 = time.perf_counter()
    det.predict(test)
    pred_s = time.perf_counter() - t0
    params = det.get_params()
    return {"fit_s": fit_s, "predict_ips": len(test) / max(pred_s, 1e-9),
            "cpu_s": sweep._cpu_seconds() - cpu0, "peak_rss_mb": bench.peak_rss_mb(),
            "image_size": params.get("image_size", ds.train_images.shape[-1]),
            "train_images": len(ds.train_images), "test_images": len(test),
            "epochs": params.get("epochs")}


def measure(model: str, dataset: str = "textures", category: str | None = "brick", *, quick: bool = True,
            epochs=(1, 2), threads: int = 2, seed: int = 0, root=None, predict_images: int = 16) -> dict:
    """One row: ``model``'s cost in its quick (``quick=True``, timed in full) or full preset (fit timed at
    ``epochs`` = (e1, e2) and extrapolated to the preset's epochs, prediction timed on ``predict_images``
    test images; see the module docstring)."""
    from . import sweep
    from .factory import create

    if threads < 1:
        raise AnomalyZooError(f"threads={threads}: needs at least one thread")
    full_epochs = create(model, preset="quick" if quick else "default").get_params().get("epochs")
    row = {"model": model, "preset": "quick" if quick else "default", "dataset": dataset,
           "category": category or "", "threads": threads}
    row.update({k: v for k, v in sweep.provenance(quick, "cpu").items() if k in COLUMNS})
    if predict_images < 1:
        raise AnomalyZooError(f"predict_images={predict_images}: needs at least one test image")
    n_pred = None if quick else predict_images
    if quick or full_epochs is None:  # a quick preset, or a method without epochs: time the real fit
        run = sweep.in_child(_timed_run, model, dataset, category, quick, None, threads, seed, root, n_pred)
        row.update(run, fit="measured")
        return {c: row.get(c, float("nan")) for c in COLUMNS}
    e1, e2 = (int(e) for e in epochs)
    if not 1 <= e1 < e2 < full_epochs:
        raise AnomalyZooError(f"epochs={tuple(epochs)}: needs two epoch counts 1 <= e1 < e2 < {full_epochs}, "
                              f"the {model} preset's epochs")
    first = sweep.in_child(_timed_run, model, dataset, category, quick, e1, threads, seed, root, n_pred)
    second = sweep.in_child(_timed_run, model, dataset, category, quick, e2, threads, seed, root, n_pred)
    per_epoch = max(0.0, (second["fit_s"] - first["fit_s"]) / (e2 - e1))
    setup = max(0.0, first["fit_s"] - e1 * per_epoch)
    row.update(second, epochs=full_epochs, fit="extrapolated", s_per_epoch=per_epoch, setup_s=setup,
               fit_s=setup + full_epochs * per_epoch, cpu_s=first["cpu_s"] + second["cpu_s"])
    return {c: row.get(c, float("nan")) for c in COLUMNS}


def run(models, dataset: str = "textures", category: str | None = "brick", *, quick: bool = True,
        epochs=(1, 2), threads: int = 2, seed: int = 0, root=None, predict_images: int = 16,
        out=None) -> pd.DataFrame:
    """:func:`measure` for every model; rows appended to ``out`` (a CSV) as they finish."""
    from . import sweep

    rows = []
    for model in models:
        row = measure(model, dataset, category, quick=quick, epochs=epochs, threads=threads, seed=seed, root=root,
                      predict_images=predict_images)
        if out is not None:
            sweep._append(out, row, columns=COLUMNS)
        rows.append(row)
    return pd.DataFrame(rows, columns=COLUMNS)


def load(path=None) -> pd.DataFrame:
    """A cost file as a DataFrame (default: the committed ``results/cost.csv``)."""
    from pathlib import Path

    from .sweep import RESULTS as SWEEP_RESULTS

    path = Path(SWEEP_RESULTS.parent / "cost.csv" if path is None else path)
    if not path.is_file():
        raise AnomalyZooError(f"no cost rows at {path}: run python -m anomaly_zoo cost ... --out {path}")
    df = pd.read_csv(path)
    missing = [c for c in COLUMNS if c not in df.columns]
    if missing:
        raise AnomalyZooError(f"{path} is not a cost file: it lacks the columns {', '.join(missing)}")
    return df
