"""The leaderboard sweep: every (model, dataset, category, seed) becomes one row of a CSV file.

    python -m anomaly_zoo bench --models all --datasets textures,phantom,digits --seeds 0,1,2 \\
        --out results/quick.csv                       # in-process, one row after the other
    python -m anomaly_zoo bench --family flow --datasets textures:brick --engine ray   # a local Ray cluster
    RAY_ADDRESS=auto python -m anomaly_zoo bench ... --engine ray   # join a running cluster (or --address)

or from Python::

    from anomaly_zoo import sweep
    jobs = sweep.plan(["padim", "ae"], ["textures:brick", "digits:class_3"], seeds=[0, 1])
    df = sweep.sweep(jobs, out="results/mine.csv")

A row holds the metrics of :func:`anomaly_zoo.metrics.evaluate` (image AUROC, AP, F1-max, pixel
AUROC, AUPRO where the model localises and the data have masks), the fit seconds, the prediction
throughput (test images per second), the CPU seconds of the row, the peak resident memory of the
process that ran it, and its provenance: package version, git commit of the checkout, preset,
device, torch version, date. A run that fails (out of memory, a model that cannot handle the data)
becomes a row with ``error`` set, never a crash of the sweep. Rows are appended to ``out`` as they
finish, so an interrupted sweep keeps what it has; a second run skips the rows already there
(resume). The engine only decides *where* a row runs (:func:`run_job` is the same function):
``local`` runs them one after the other, each in a fresh child process, ``ray`` makes each row a Ray task (one CPU, plus one GPU when
the device is CUDA), on a fresh local cluster or on the one ``address`` / ``$RAY_ADDRESS`` names.
Ray is an optional extra: ``pip install -e ".[sweep]"``.
"""
from __future__ import annotations

import datetime as _dt
import os
import resource
import subprocess
from dataclasses import asdict, dataclass
from pathlib import Path

import pandas as pd

from . import __version__
from .utils import AnomalyZooError

COLUMNS = ["model", "family", "dataset", "category", "seed", "mode", "image_auroc", "image_ap", "image_f1_max",
           "pixel_auroc", "aupro", "fit_s", "predict_ips", "cpu_s", "peak_rss_mb", "error",
           "version", "commit", "preset", "device", "torch", "date"]
#: what makes a row unique: a second sweep skips jobs whose key is already in the output file
KEY = ["model", "dataset", "category", "seed", "mode"]
ENGINES = ("local", "ray")


@dataclass(frozen=True)
class Job:
    """One row to compute: a model fitted on one generated dataset (one category, one data seed)."""

    model: str
    dataset: str
    category: str
    seed: int
    quick: bool = True
    device: str = "auto"
    root: str | None = None

    @property
    def key(self) -> tuple:
        return (self.model, self.dataset, self.category, int(self.seed), "quick" if self.quick else "full")


def select_models(models: str | list[str] | None = None, family: str | None = None) -> list[str]:
    """Registry names from ``"a,b"`` / a list / ``"all"``, and/or every model of ``family``."""
    from .factory import get_card, list_models

    if models is None and family is None:
        raise AnomalyZooError("choose the models: --models a,b (or all) or --family NAME")
    if isinstance(models, str):
        models = [m.strip() for m in models.split(",") if m.strip()]
    names = [c.name for c in list_models()] if models in (None, ["all"]) else list(models)
    for name in names:
        get_card(name)  # unknown names fail before any work
    if family is not None:
        members = {c.name for c in list_models(family=family)}
        if not members:
            raise AnomalyZooError(f"no model of family {family!r}")
        names = [n for n in names if n in members]
    return names


def parse_datasets(spec, root=None) -> list[tuple[str, str]]:
    """``"textures,phantom,digits:class_0+class_1"`` -> [(dataset, category), ...]; a dataset without
    ``:categories`` stands for all of its categories."""
    from . import data as azdata

    items = [s.strip() for s in spec.split(",")] if isinstance(spec, str) else list(spec)
    pairs = []
    for item in filter(None, items):
        name, _, cats = item.partition(":")
        known = azdata.list_categories(name, root=root)
        if not known and not cats:  # only mvtec, whose categories are the folders found under root
            raise AnomalyZooError(f"no categories of {name!r} found" + (f" under {root}" if root else "")
                                  + "; pass --root, the folder holding the MVTec categories")
        chosen = [c for c in cats.split("+") if c] if cats else known
        for c in chosen:
            if c not in known:
                raise AnomalyZooError(f"MVTec category {c!r} not found under {root}" if name == "mvtec" else
                                      f"{name} has no category {c!r}; its categories: {', '.join(known)}")
        pairs += [(name, c) for c in chosen]
    if not pairs:
        raise AnomalyZooError("no dataset given: e.g. --datasets textures:brick,phantom")
    return pairs


def plan(models, datasets, seeds=(0,), *, quick: bool = True, device: str = "auto", root=None) -> list[Job]:
    """Every (model, dataset category, seed) as a :class:`Job`, datasets outermost (data generated once)."""
    names = select_models(models)
    return [Job(m, d, c, int(s), quick, device, None if root is None else str(root))
            for d, c in parse_datasets(datasets, root) for s in seeds for m in names]


def provenance(quick: bool, device: str) -> dict:
    """Where a row comes from: package version, git commit of the checkout (if any), torch, date."""
    import torch

    try:
        here = Path(__file__).resolve().parent.parent
        commit = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=here, capture_output=True,
                                text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = ""
    return {"version": __version__, "commit": commit, "preset": "quick" if quick else "default",
            "device": device, "torch": torch.__version__,
            "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")}


def _cpu_seconds() -> float:
    use = resource.getrusage(resource.RUSAGE_SELF)
    return use.ru_utime + use.ru_stime


def run_job(job: Job) -> dict:
    """Fit and evaluate one job; any failure becomes the row's ``error`` (the sweep goes on)."""
    from . import bench
    from . import data as azdata
    from .factory import get_card
    from .utils import resolve_device

    row = dict(zip(KEY, job.key))
    cpu0 = _cpu_seconds()
    try:
        row["family"] = get_card(job.model).family
        device = resolve_device(job.device).type
        row.update(provenance(job.quick, device))
        ds = azdata.load(job.dataset, **bench._load_kw(job.dataset, job.category, job.quick, job.seed, job.root))
        result = bench.run_one(job.model, ds, quick=job.quick, device=job.device, seed=job.seed)
        row.update({k: v for k, v in result.items() if k not in ("model", "dataset", "category")})
        row["error"] = ""
    except Exception as err:  # noqa: BLE001 - a failed row is a result, not a crash
        row = _error_row(job, f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}", row)
    row["cpu_s"] = _cpu_seconds() - cpu0
    row["peak_rss_mb"] = bench.peak_rss_mb()
    return {c: row.get(c, float("nan")) for c in COLUMNS}


def _error_row(job: Job, message: str, row: dict | None = None) -> dict:
    from .factory import list_models

    row = dict(zip(KEY, job.key)) if row is None else row
    row.setdefault("family", {c.name: c.family for c in list_models()}.get(job.model, ""))
    row.update({k: v for k, v in provenance(job.quick, job.device).items() if k not in row})
    row["error"] = message[:300]
    return {c: row.get(c, float("nan")) for c in COLUMNS}


def done_keys(out) -> set[tuple]:
    """Keys of the rows already in ``out`` (an absent file: none)."""
    if out is None or not Path(out).exists() or Path(out).stat().st_size == 0:
        return set()
    df = pd.read_csv(out, usecols=KEY, dtype={"category": str})
    return {(r.model, r.dataset, str(r.category), int(r.seed), r.mode) for r in df.itertuples(index=False)}


def _append(out, row: dict, columns=COLUMNS) -> None:
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    new = not path.exists() or path.stat().st_size == 0
    pd.DataFrame([row], columns=columns).to_csv(path, mode="a", header=new, index=False)


def sweep(jobs: list[Job], out=None, *, engine: str = "local", address: str | None = None,
          progress: bool | None = None) -> pd.DataFrame:
    """Run the jobs not yet in ``out`` on ``engine``; append each row to ``out`` as it finishes.

    Returns the rows computed now (the file holds the earlier ones too).
    """
    from tqdm.auto import tqdm

    from .utils import progress_enabled

    if engine not in ENGINES:
        raise AnomalyZooError(f"engine={engine!r}; choose one of: {', '.join(ENGINES)}")
    done = done_keys(out)
    todo = [j for j in jobs if j.key not in done]
    rows = []
    rows_iter = _local(todo) if engine == "local" else _ray(todo, address)
    show = progress_enabled() if progress is None else progress
    for row in tqdm(rows_iter, total=len(todo), desc="sweep", disable=not show):
        if out is not None:
            _append(out, row)
        rows.append(row)
    return pd.DataFrame(rows, columns=COLUMNS)


def in_child(fn, *args):
    """``fn(*args)`` in a fresh child process: its peak memory is its own (a process's peak only grows,
    so work run in one process would inherit the largest before it). A child that dies (killed for
    memory, a crash in native code) raises :class:`AnomalyZooError`."""
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor
    from concurrent.futures.process import BrokenProcessPool

    ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
    with ProcessPoolExecutor(max_workers=1, mp_context=ctx) as pool:
        try:
            return pool.submit(fn, *args).result()
        except BrokenProcessPool:
            raise AnomalyZooError("the process running it died (out of memory?)") from None


def _local(jobs):
    """One job after the other, each in a fresh child process (:func:`in_child`); a job whose process
    dies becomes an error row instead of ending the sweep."""
    for job in jobs:
        try:
            yield in_child(run_job, job)
        except AnomalyZooError as err:
            yield _error_row(job, str(err))


def _ray(jobs, address):
    """Each job a Ray task; rows come back in the order they finish."""
    try:
        import ray
    except ImportError:
        raise AnomalyZooError("--engine ray needs Ray: pip install -e \".[sweep]\"") from None
    if not jobs:
        return
    address = address or os.environ.get("RAY_ADDRESS") or None
    started = not ray.is_initialized()
    if started:
        here = str(Path(__file__).resolve().parent.parent)  # workers import this checkout's anomaly_zoo
        env = {"env_vars": {"PYTHONPATH": os.pathsep.join(filter(None, [here, os.environ.get("PYTHONPATH")]))}}
        ray.init(address=address, include_dashboard=False, log_to_driver=False, runtime_env=env,
                 **({} if address else {"num_cpus": os.cpu_count()}))
    try:
        task = ray.remote(max_calls=1)(run_job)  # a fresh worker per row: its own peak memory
        # a GPU is asked for only where the cluster has one: a CUDA job on a CPU-only cluster would wait
        # forever for its GPU; run there, it fails like it does locally and becomes an error row
        gpus = ray.cluster_resources().get("GPU", 0) > 0
        pending = [task.options(num_cpus=1, num_gpus=1 if gpus and _wants_gpu(j) else 0).remote(j) for j in jobs]
        while pending:
            ready, pending = ray.wait(pending, num_returns=1)
            yield ray.get(ready[0])
    finally:
        if started:
            ray.shutdown()


def _wants_gpu(job: Job) -> bool:
    if job.device.startswith("cuda"):
        return True
    if job.device != "auto":
        return False
    import torch

    return torch.cuda.is_available()


#: the grid of ``make leaderboard`` (every registered model on each, quick presets); tests/test_results.py checks
#: that the committed file covers it
LEADERBOARD_DATASETS, LEADERBOARD_SEEDS = "textures,phantom,digits,retina", (0, 1, 2)
#: the committed quick-mode leaderboard that the book reads (``make leaderboard`` writes it)
RESULTS = Path(__file__).resolve().parent.parent / "results" / "quick.csv"


def load_results(path=None) -> pd.DataFrame:
    """A sweep's output file as a DataFrame (default: the committed quick-mode leaderboard)."""
    path = Path(RESULTS if path is None else path)
    if not path.is_file():
        raise AnomalyZooError(f"no sweep results at {path}: run `make leaderboard` (or python -m anomaly_zoo "
                              "bench ... --out FILE) in a checkout of the repository")
    df = pd.read_csv(path, keep_default_na=False, na_values=[""], dtype={"error": str})
    missing = [c for c in COLUMNS if c not in df.columns]
    if missing:
        raise AnomalyZooError(f"{path} is not a sweep output: it lacks the columns {', '.join(missing)}")
    df["error"] = df["error"].fillna("")
    return df


def summarize(df: pd.DataFrame, metrics=("image_auroc", "pixel_auroc", "aupro")) -> pd.DataFrame:
    """Mean and standard deviation over seeds of each (model, family, dataset, category); failed rows
    are left out and counted in ``failed``."""
    ok = df[df["error"] == ""]
    keys = ["model", "family", "dataset", "category"]
    g = ok.groupby(keys)
    out = pd.concat({"mean": g[list(metrics)].mean(), "std": g[list(metrics)].std(ddof=1)}, axis=1)
    out.columns = [f"{m}_{stat}" for stat, m in out.columns]
    out["seeds"] = g.size()
    out["fit_s"] = g["fit_s"].mean()
    out["cpu_s"] = g["cpu_s"].mean()
    out["peak_rss_mb"] = g["peak_rss_mb"].mean()
    failed = df[df["error"] != ""].groupby(keys).size()
    out["failed"] = failed.reindex(out.index).fillna(0).astype(int)
    return out.reset_index()


def mean_std(mean: float, std: float) -> str:
    """``'0.912 ± 0.021'``, the mean alone for a single seed, ``''`` where nothing was measured."""
    if pd.isna(mean):
        return ""
    return f"{mean:.3f}" + ("" if pd.isna(std) else f" ± {std:.3f}")


def board(df: pd.DataFrame, metric: str = "image_auroc", *, models=None, family: str | None = None,
          datasets=None) -> pd.DataFrame:
    """A chapter's view of a sweep: one row per model (of ``models`` or ``family``), one column per data set
    (``dataset:category``, or only those in ``datasets``), each cell ``'mean ± std'`` of ``metric`` over the
    seeds with the number of seeds in brackets; empty where the model was not run (or the metric does not
    apply)."""
    if metric not in ("image_auroc", "image_ap", "image_f1_max", "pixel_auroc", "aupro"):
        raise AnomalyZooError(f"board: unknown metric {metric!r}")
    s = summarize(df, metrics=(metric,))
    s["data"] = s["dataset"] + ":" + s["category"].astype(str)
    if family is not None:
        s = s[s["family"] == family]
    if models is not None:
        s = s[s["model"].isin(list(models))]
    if datasets is not None:
        s = s[s["data"].isin(list(datasets))]
    if s.empty:
        raise AnomalyZooError(f"board: no successful rows for models={models}, family={family}, "
                              f"datasets={datasets}")
    s["cell"] = [mean_std(m, d) + (f" ({n})" if m == m else "")
                 for m, d, n in zip(s[f"{metric}_mean"], s[f"{metric}_std"], s["seeds"])]
    out = s.pivot(index="model", columns="data", values="cell").fillna("")
    order = list(models) if models is not None else sorted(out.index)
    cols = list(datasets) if datasets is not None else sorted(out.columns)
    out = out.reindex(index=[m for m in order if m in out.index], columns=[c for c in cols if c in out.columns])
    out.columns.name = metric
    return out


def against_targets(df: pd.DataFrame, targets) -> pd.DataFrame:
    """Each target ``(model, "dataset:category", metric, threshold)`` against the sweep's rows: the value of every
    seed (``'0.912 / 0.871 / 0.930'``, seeds in order), the lowest, and ``met`` (every seed at or above the
    threshold; ``'-'`` where no seed was run). The category ``"mean"`` (``"digits:mean"``) is the mean over the
    data set's categories, for the seeds run on all of them (the digits' ten-class mean)."""
    ok = df[df["error"] == ""]
    out = []
    for model, data, metric, threshold in targets:
        dataset, _, category = data.partition(":")
        rows = ok[(ok["model"] == model) & (ok["dataset"] == dataset)]
        if category == "mean":
            n = df.loc[df["dataset"] == dataset, "category"].nunique()
            per_seed = rows.groupby("seed")[metric].agg(["mean", "count"])
            vals = per_seed.loc[per_seed["count"] == n, "mean"]
        else:
            vals = rows[rows["category"].astype(str) == category].sort_values("seed")[metric].dropna()
        out.append({"model": model, "data": data, "metric": metric, "target": threshold,
                    "seeds": " / ".join(f"{v:.3f}" for v in vals),
                    "lowest": round(float(vals.min()), 3) if len(vals) else float("nan"),
                    "met": "-" if vals.empty else ("yes" if (vals >= threshold).all() else "no")})
    return pd.DataFrame(out)


def jobs_as_frame(jobs: list[Job]) -> pd.DataFrame:
    """The plan as a table (a dry run)."""
    return pd.DataFrame([asdict(j) for j in jobs])

