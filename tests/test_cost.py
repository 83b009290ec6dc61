"""What a method costs (anomaly_zoo.cost): a quick fit timed in full, a full-preset fit timed at two epoch
counts and extrapolated on the line through them, clear errors, and the CLI's CSV."""
from __future__ import annotations

import pandas as pd
import pytest

from anomaly_zoo import cost, sweep
from anomaly_zoo.__main__ import main
from anomaly_zoo.utils import AnomalyZooError


def test_quick_cost_is_measured_in_a_child_process():
    row = cost.measure("padim", "digits", "class_3", quick=True, threads=1)
    assert row["fit"] == "measured" and row["preset"] == "quick" and row["threads"] == 1
    assert row["fit_s"] > 0 and row["predict_ips"] > 0 and row["cpu_s"] > 0 and row["peak_rss_mb"] > 50
    assert row["train_images"] > 0 and row["test_images"] > 0 and row["commit"] is not None
    assert list(row) == cost.COLUMNS


def test_full_preset_fit_is_extrapolated_from_two_epoch_counts(monkeypatch):
    """t(e) = 7 + 3 e s: 3 s per epoch, 7 s of setup, so FastFlow's 500 epochs cost 1507 s."""
    seen = []

    def fake(fn, model, dataset, category, quick, epochs, threads, seed, root, n_pred):
        assert n_pred == 16
        seen.append((model, quick, epochs, threads))
        return {"fit_s": 7.0 + 3.0 * epochs, "predict_ips": 10.0, "cpu_s": 1.0 + epochs, "peak_rss_mb": 900.0,
                "image_size": 256, "train_images": 200, "test_images": 132, "epochs": epochs}

    monkeypatch.setattr(sweep, "in_child", fake)
    row = cost.measure("fastflow", quick=False, epochs=(2, 5), threads=2)
    assert seen == [("fastflow", False, 2, 2), ("fastflow", False, 5, 2)]
    assert row["fit"] == "extrapolated" and row["epochs"] == 500
    assert row["s_per_epoch"] == pytest.approx(3.0) and row["setup_s"] == pytest.approx(7.0)
    assert row["fit_s"] == pytest.approx(7.0 + 3.0 * 500)
    assert row["cpu_s"] == pytest.approx(3.0 + 6.0)  # both timed runs
    assert row["preset"] == "default" and row["image_size"] == 256


def test_methods_without_epochs_are_timed_in_full_even_in_full_mode(monkeypatch):
    seen = []
    monkeypatch.setattr(sweep, "in_child", lambda fn, *a: seen.append(a[4]) or {"fit_s": 4.0})
    row = cost.measure("padim", quick=False)
    assert seen == [None] and row["fit"] == "measured" and row["fit_s"] == 4.0


def test_bad_settings_raise_one_clear_error():
    with pytest.raises(AnomalyZooError, match=r"epochs=\(2, 1\): needs two epoch counts 1 <= e1 < e2 < 500"):
        cost.measure("fastflow", quick=False, epochs=(2, 1))
    with pytest.raises(AnomalyZooError, match="predict_images=0"):
        cost.measure("padim", predict_images=0)
    with pytest.raises(AnomalyZooError, match="threads=0"):
        cost.measure("padim", threads=0)
    with pytest.raises(AnomalyZooError, match="unknown model"):
        cost.measure("nope")
    with pytest.raises(AnomalyZooError, match="descargan is weakly supervised and textures has no weakly"):
        cost.measure("descargan", "textures", "brick", threads=1)  # the child's error, as the sweep's


def test_cli_writes_one_row_per_model(tmp_path, capsys):
    out = tmp_path / "cost.csv"
    assert main(["cost", "--models", "dfm,padim", "--dataset", "digits", "--category", "class_3",
                 "--threads", "1", "--out", str(out)]) == 0
    df = pd.read_csv(out)
    assert df["model"].tolist() == ["dfm", "padim"] and (df["fit"] == "measured").all()
    assert "| dfm | quick |" in capsys.readouterr().out
    assert main(["cost", "--models", "fastflow", "--full", "--epochs", "3,3"]) != 0


def test_load_reads_the_committed_rows_and_names_a_bad_file(tmp_path):
    df = cost.load()
    flows = ["padim", "cflow", "fastflow", "csflow"]  # chapter 9 table (DifferNet full: killed, out of memory)
    for preset in ("quick", "default"):
        assert set(flows) <= set(df[df.preset == preset].model), preset
    full = df[(df.preset == "default") & (df.fit == "extrapolated")]
    assert (full.fit_s > full.setup_s).all() and (full.s_per_epoch > 0).all()
    with pytest.raises(AnomalyZooError, match="no cost rows at"):
        cost.load(tmp_path / "none.csv")
    (tmp_path / "bad.csv").write_text("model,fit_s\npadim,1\n")
    with pytest.raises(AnomalyZooError, match="lacks the columns preset"):
        cost.load(tmp_path / "bad.csv")
