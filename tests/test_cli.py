"""The command line: list, data, bench; user errors print one line and exit non-zero."""
from __future__ import annotations

import subprocess
import sys

import pytest

from anomaly_zoo.__main__ import main


def test_list_prints_model_cards(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    assert "| name | family |" in out and "padim" in out and "ae" in out


def test_data_list(capsys):
    assert main(["data", "list"]) == 0
    assert capsys.readouterr().out.split() == ["textures", "digits", "phantom", "retina", "mvtec"]


@pytest.mark.parametrize("argv, message", [
    (["bench", "--models", "nope", "--quick"], "unknown model 'nope'"),
    (["bench", "--models", "padim", "--dataset", "nope"], "nope"),
    (["data", "make"], "data make needs a dataset name"),
    (["frobnicate"], "invalid choice"),
    (["bench"], "one of the arguments --models --family is required"),
    (["bench", "--family", "nope"], "unknown family 'nope'"),
    (["bench", "--models", "padim", "--datasets", "textures:wood"], "textures has no category 'wood'"),
    (["bench", "--models", "padim", "--engine", "spark"], "invalid choice: 'spark'"),
])
def test_user_errors_one_line_nonzero(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err and "\n" not in err and "Traceback" not in err


def test_bench_markdown_and_csv(tmp_path):
    out = tmp_path / "r.csv"
    proc = subprocess.run([sys.executable, "-m", "anomaly_zoo", "bench", "--dataset", "textures", "--category",
                           "brick", "--models", "padim", "--quick", "--out", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "| model | dataset | category | image_auroc | pixel_auroc | aupro |" in proc.stdout
    import pandas as pd

    df = pd.read_csv(out)
    assert df.loc[0, "model"] == "padim" and df.loc[0, "image_auroc"] > 0.9
    assert df.loc[0, "fit_s"] > 0 and df.loc[0, "predict_ips"] > 0


def test_data_make_writes_mvtec_layout(tmp_path, capsys):
    assert main(["data", "make", "phantom", "--root", str(tmp_path)]) == 0
    printed = capsys.readouterr().out.split()
    assert printed and all((tmp_path / "phantom").exists() for _ in printed)
    folder = next((tmp_path / "phantom").iterdir())
    assert (folder / "train" / "good").is_dir() and (folder / "ground_truth").is_dir()
    assert (folder / "manifest.json").is_file()


def test_bench_missing_mvtec_folder(tmp_path, capsys):
    assert main(["bench", "--dataset", "mvtec", "--models", "padim", "--root", str(tmp_path / "nope")]) == 2
    assert "no categories of 'mvtec' found" in capsys.readouterr().err
    assert main(["bench", "--dataset", "mvtec", "--category", "bottle", "--models", "padim",
                 "--root", str(tmp_path)]) == 2
    assert "MVTec category 'bottle' not found" in capsys.readouterr().err
