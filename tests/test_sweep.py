"""The leaderboard sweep (anomaly_zoo.sweep): the plan, one row per job with provenance, failures as rows,
resume from the output file, and the same rows from the Ray engine on a local Ray instance."""
from __future__ import annotations

import pandas as pd
import pytest

import anomaly_zoo as az
from anomaly_zoo import sweep
from anomaly_zoo.utils import AnomalyZooError

METRICS = ["image_auroc", "image_ap", "image_f1_max", "pixel_auroc", "aupro"]


def test_plan_is_the_product_of_models_datasets_and_seeds():
    jobs = sweep.plan(["padim", "ae"], "textures:brick+grass,digits:class_3", seeds=[0, 2])
    assert len(jobs) == 2 * 3 * 2 and len({j.key for j in jobs}) == len(jobs)
    assert {(j.dataset, j.category) for j in jobs} == {("textures", "brick"), ("textures", "grass"),
                                                       ("digits", "class_3")}
    assert [j.key for j in jobs[:2]] == [("padim", "textures", "brick", 0, "quick"), ("ae", "textures", "brick", 0, "quick")]
    assert len(sweep.parse_datasets("textures")) == len(az.data.list_categories("textures"))
    assert sweep.select_models("all") == [c.name for c in az.list_models()]
    assert sweep.select_models(family="flow") == [c.name for c in az.list_models(family="flow")]
    with pytest.raises(AnomalyZooError, match="unknown model 'nope'"):
        sweep.plan("padim,nope", "textures:brick")
    with pytest.raises(AnomalyZooError, match="textures has no category 'wood'"):
        sweep.plan("padim", "textures:wood")
    with pytest.raises(AnomalyZooError, match="engine='spark'"):
        sweep.sweep(jobs, engine="spark")


@pytest.fixture(scope="module")
def local_rows(tmp_path_factory):
    """Two jobs that work and one that fails (a CUDA device this machine does not have), run locally."""
    out = tmp_path_factory.mktemp("sweep") / "rows.csv"
    jobs = sweep.plan(["padim", "dfm"], "digits:class_3", seeds=[0])
    jobs.append(sweep.Job("padim", "digits", "class_3", 1, device="cuda:7"))
    return out, jobs, sweep.sweep(jobs, out=out, engine="local", progress=False)


def test_local_sweep_writes_one_row_per_job_with_provenance(local_rows):
    out, jobs, df = local_rows
    assert list(df.columns) == sweep.COLUMNS and len(df) == len(jobs)
    ok = df[df["error"] == ""]
    assert list(ok["model"]) == ["padim", "dfm"]
    assert (ok["image_auroc"] > 0.8).all() and (ok["fit_s"] > 0).all() and (ok["predict_ips"] > 0).all()
    assert (ok["cpu_s"] > 0).all() and (ok["peak_rss_mb"] > 50).all()
    assert set(ok["family"]) == {"feature"} and set(ok["preset"]) == {"quick"} and set(ok["device"]) == {"cpu"}
    import torch

    assert (ok["version"] == az.__version__).all() and (ok["torch"] == torch.__version__).all()
    assert ok["date"].str.match(r"\d{4}-\d\d-\d\dT").all()
    # the same rows are in the file, with the same numbers
    disk = pd.read_csv(out, dtype={"category": str})
    assert len(disk) == len(jobs) and list(disk["error"].fillna("") != "") == [False, False, True]
    assert disk.loc[disk["model"] == "padim", "image_auroc"].iloc[0] == pytest.approx(ok["image_auroc"].iloc[0])


def test_a_failing_job_is_a_row_with_its_error(local_rows):
    _, _, df = local_rows
    bad = df[df["error"] != ""]
    assert len(bad) == 1 and bad["seed"].iloc[0] == 1
    assert "cuda" in bad["error"].iloc[0].lower() and pd.isna(bad["image_auroc"].iloc[0])
    assert bad["model"].iloc[0] == "padim" and bad["version"].iloc[0] == az.__version__


def _die(job):
    """A job whose process dies (as when the kernel kills it for memory)."""
    import os

    os._exit(9)


def _hold_memory(job):
    """A job that holds ``seed`` x 200 MB for a moment and reports its own peak memory."""
    block = bytearray(job.seed * 200 * 2**20)
    block[:: 4096] = b"x" * len(block[:: 4096])  # touch every page so it is resident
    return {"model": job.model, "seed": job.seed, "peak_rss_mb": az.bench.peak_rss_mb()}


def test_a_job_whose_process_dies_is_an_error_row_and_the_sweep_goes_on(monkeypatch):
    monkeypatch.setattr(sweep, "run_job", _die)
    rows = sweep.sweep([sweep.Job("padim", "digits", "class_3", 0)], engine="local", progress=False)
    assert len(rows) == 1 and rows.loc[0, "model"] == "padim" and rows.loc[0, "family"] == "feature"
    assert "died" in rows.loc[0, "error"]


def test_each_local_row_reports_its_own_peak_memory(monkeypatch):
    """A large job first must not inflate the peak memory of the small one after it."""
    monkeypatch.setattr(sweep, "run_job", _hold_memory)
    jobs = [sweep.Job("padim", "digits", "class_3", s) for s in (2, 0)]
    big, small = list(sweep._local(jobs))
    assert big["peak_rss_mb"] > small["peak_rss_mb"] + 300


def test_a_second_sweep_resumes(local_rows):
    out, jobs, _ = local_rows
    again = sweep.sweep(jobs, out=out, progress=False)
    assert again.empty and len(pd.read_csv(out)) == len(jobs)
    more = jobs + sweep.plan(["dfm"], "digits:class_3", seeds=[1])
    new = sweep.sweep(more, out=out, progress=False)
    assert list(zip(new["model"], new["seed"])) == [("dfm", 1)]
    assert len(pd.read_csv(out)) == len(jobs) + 1


@pytest.mark.slow
def test_ray_engine_gives_the_local_rows(local_rows, tmp_path, monkeypatch):
    """Each row a task on a local Ray instance: the same metrics as in-process (one seed, one thread)."""
    pytest.importorskip("ray", reason="the sweep extra: pip install -e '.[sweep]'")
    import ray

    # on 2 busy cores (the test suite's other worker) the raylet can take over a minute to register
    monkeypatch.setenv("RAY_raylet_start_wait_time_s", "600")

    _, jobs, local = local_rows
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        df = sweep.sweep(jobs, out=tmp_path / "ray.csv", engine="ray", progress=False)
    finally:
        ray.shutdown()
    assert len(df) == len(jobs)
    got = df.sort_values(["model", "seed"]).reset_index(drop=True)
    want = local.sort_values(["model", "seed"]).reset_index(drop=True)
    assert list(got["error"] != "") == list(want["error"] != "")
    pd.testing.assert_frame_equal(got[METRICS], want[METRICS], check_exact=False, atol=1e-6)


def _rows(values):
    """Result rows ``(model, family, category, seed, image_auroc, error)`` as a sweep file would hold them."""
    return pd.DataFrame([dict(model=m, family=f, dataset="textures", category=c, seed=s, image_auroc=v,
                              pixel_auroc=None, aupro=None, fit_s=1.0 + s, cpu_s=2.0 * (1 + s), peak_rss_mb=1.0,
                              error=e)
                         for m, f, c, s, v, e in values])


def test_summarize_averages_the_successful_seeds_and_counts_the_failed():
    df = _rows([("a", "x", "brick", 0, 0.8, ""), ("a", "x", "brick", 1, 0.9, ""), ("a", "x", "brick", 2, 0.1, "oom")])
    s = sweep.summarize(df).iloc[0]
    assert (s.model, s.seeds, s.failed) == ("a", 2, 1)
    assert s.image_auroc_mean == pytest.approx(0.85) and s.image_auroc_std == pytest.approx(0.0707107)
    assert s.fit_s == pytest.approx(1.5) and s.cpu_s == pytest.approx(3.0)  # the failed row's cost left out


def test_board_gives_mean_std_and_seed_count_per_model_and_data_set():
    df = _rows([("a", "x", "brick", 0, 0.8, ""), ("a", "x", "brick", 1, 0.9, ""), ("a", "x", "grass", 0, 0.5, ""),
                ("a", "x", "grass", 1, float("nan"), "boom"), ("b", "y", "brick", 0, 0.7, ""),
                ("c", "x", "brick", 0, 0.6, "")])
    t = sweep.board(df, "image_auroc", family="x")
    assert list(t.index) == ["a", "c"] and list(t.columns) == ["textures:brick", "textures:grass"]
    assert t.loc["a", "textures:brick"] == "0.850 ± 0.071 (2)"  # std over seeds, ddof 1
    assert t.loc["a", "textures:grass"] == "0.500 (1)"  # the failed seed is left out
    assert t.loc["c", "textures:grass"] == ""  # not run there
    t = sweep.board(df, "image_auroc", models=["b", "a"], datasets=["textures:brick"])
    assert list(t.index) == ["b", "a"] and t.loc["b", "textures:brick"] == "0.700 (1)"
    with pytest.raises(AnomalyZooError, match="metric"):
        sweep.board(df, "accuracy")
    with pytest.raises(AnomalyZooError, match="no successful rows"):
        sweep.board(df, family="gan")


def test_against_targets_lists_every_seed_and_fails_a_target_missed_on_one_seed():
    df = _rows([("a", "x", "brick", 1, 0.95, ""), ("a", "x", "brick", 0, 0.80, ""), ("a", "x", "brick", 2, 0.0, "oom"),
                ("b", "y", "brick", 0, 0.91, "")])
    t = sweep.against_targets(df, [("a", "textures:brick", "image_auroc", 0.85),
                                   ("b", "textures:brick", "image_auroc", 0.90),
                                   ("b", "textures:grass", "image_auroc", 0.90)]).set_index("model")
    assert t.seeds.tolist() == ["0.800 / 0.950", "0.910", ""]
    assert t.met.tolist() == ["no", "yes", "-"] and t.lowest.iloc[0] == 0.8


def test_against_targets_averages_the_categories_for_mean():
    df = _rows([("a", "x", "brick", 0, 0.8, ""), ("a", "x", "grass", 0, 0.6, ""), ("a", "x", "brick", 1, 0.9, "")])
    t = sweep.against_targets(df, [("a", "textures:mean", "image_auroc", 0.75)])
    assert t.seeds.tolist() == ["0.700"] and t.met.tolist() == ["no"]  # seed 1 lacks grass: left out
