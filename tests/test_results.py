"""The committed leaderboard (results/quick.csv, written by `make leaderboard`): every registered model is
in it, every row has its provenance, and one row re-run here gives the committed numbers."""
from __future__ import annotations

import math
from pathlib import Path

import pytest

import anomaly_zoo as az
from anomaly_zoo import sweep

RESULTS = sweep.load_results()  # fails with a clear message when the file is missing


def test_every_registered_model_has_a_successful_quick_row():
    ok = RESULTS[(RESULTS.error == "") & (RESULTS["mode"] == "quick")]
    missing = sorted({c.name for c in az.list_models()} - set(ok.model))
    assert not missing, (f"models missing from {sweep.RESULTS} (the leaderboard is stale): {', '.join(missing)}; "
                         f"add them with: python -m anomaly_zoo bench --models {','.join(missing)} "
                         f"--datasets textures:brick,phantom --seeds 0 --quick --out results/quick.csv")
    unknown = sorted(set(RESULTS.model) - {c.name for c in az.list_models()})
    assert not unknown, f"rows of models that are no longer registered: {unknown}"


def test_rows_are_unique_and_carry_their_provenance():
    assert not RESULTS.duplicated(sweep.KEY).any()
    for col in ["version", "commit", "preset", "device", "torch", "date", "family"]:
        assert RESULTS[col].astype(str).str.len().gt(0).all(), col
    ok = RESULTS[RESULTS.error == ""]
    for col in ["image_auroc", "image_ap", "image_f1_max", "pixel_auroc", "aupro"]:
        vals = ok[col].dropna()
        assert ((vals >= 0) & (vals <= 1)).all(), col
    assert ok.image_auroc.notna().all() and (ok.fit_s > 0).all() and (ok.peak_rss_mb > 0).all()
    # a localising model has pixel metrics wherever the data have masks
    loc = {c.name for c in az.list_models() if c.localizes}
    masked = ok[ok.model.isin(loc) & ok.dataset.isin(["textures", "phantom", "retina"])]
    assert masked.pixel_auroc.notna().all()


def test_the_leaderboard_covers_its_whole_grid():
    """Every (model, dataset, category, seed) of `make leaderboard` has a row, and the only failed rows are the
    weakly supervised DeScarGAN on sets without a weakly labelled split (its clear error, recorded)."""
    make = (Path(sweep.__file__).resolve().parent.parent / "Makefile").read_text()
    seeds = ",".join(map(str, sweep.LEADERBOARD_SEEDS))
    assert f"--datasets {sweep.LEADERBOARD_DATASETS} --seeds {seeds} --quick" in make, \
        "the leaderboard target of the Makefile and sweep.LEADERBOARD_* name different grids"
    grid = sweep.plan("all", sweep.LEADERBOARD_DATASETS, sweep.LEADERBOARD_SEEDS)
    have = set(map(tuple, RESULTS[sweep.KEY].astype({"seed": int}).values.tolist()))
    missing = [j for j in grid if j.key not in have]
    assert not missing, (f"{len(missing)} of {len(grid)} leaderboard rows missing from {sweep.RESULTS}, e.g. "
                         f"{missing[0].model} on {missing[0].dataset}:{missing[0].category} seed {missing[0].seed}; "
                         "`make leaderboard` adds them")
    failed = RESULTS[RESULTS.error != ""]
    assert set(failed.model) <= {"descargan"} and set(failed.dataset) <= {"textures", "digits"}, failed.error.unique()
    assert failed.error.str.contains("no weakly labelled split").all()


@pytest.mark.parametrize("model", ["padim"])
def test_a_committed_row_reproduces(model):
    """Re-run one committed row (fast, on CPU) and compare: the leaderboard is a measurement, not a claim."""
    row = RESULTS[(RESULTS.model == model) & (RESULTS.dataset == "textures") & (RESULTS.category == "brick")
                  & (RESULTS.seed == 0) & (RESULTS.error == "")].iloc[0]
    again = sweep.run_job(sweep.Job(model, "textures", "brick", 0))
    for col in ["image_auroc", "pixel_auroc", "aupro"]:
        assert math.isclose(again[col], row[col], abs_tol=1e-3), (col, again[col], row[col])
