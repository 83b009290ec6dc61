"""Datasets: generation, caching, the MVTec reader, errors. Every test writes under tmp folders."""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import anomaly_zoo.data as D
from anomaly_zoo.data import cache, core, textures
from anomaly_zoo.utils import AnomalyZooError

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("azoo_data")


@pytest.fixture(scope="module")
def brick(root):
    return D.load("textures", category="brick", quick=True, root=root)


@pytest.fixture(scope="module")
def head(root):
    return D.load("phantom", quick=True, root=root)


def _same(a: D.AnomalyDataset, b: D.AnomalyDataset) -> bool:
    return (
        torch.equal(a.train_images, b.train_images)
        and torch.equal(a.test_images, b.test_images)
        and torch.equal(a.test_labels, b.test_labels)
        and (a.test_masks is None) == (b.test_masks is None)
        and (a.test_masks is None or torch.equal(a.test_masks, b.test_masks))
        and a.test_defects == b.test_defects
    )


def _check_common(ds: D.AnomalyDataset, size: int) -> None:
    for x in (ds.train_images, ds.test_images):
        assert x.dtype == torch.float32 and x.ndim == 4 and x.shape[1:] == (3, size, size)
        assert 0.0 <= float(x.min()) and float(x.max()) <= 1.0
    assert ds.test_labels.dtype == torch.int64 and ds.test_labels.shape == (len(ds.test_images),)
    assert len(ds.test_defects) == len(ds.test_images) == len(ds.test_files)
    assert ds.test_labels.tolist() == [int(d != "good") for d in ds.test_defects]
    assert 0 < int(ds.test_labels.sum()) < len(ds.test_labels)


# --------------------------------------------------------------------------- the sets


def test_list_datasets():
    assert D.list_datasets() == ["textures", "digits", "phantom", "retina", "mvtec"]
    assert D.list_categories("textures") == ["brick", "grass", "gravel"]
    assert D.list_categories("digits")[3] == "class_3"


def test_textures_quick(brick, root):
    _check_common(brick, 128)
    assert brick.root == root / "textures" / "brick_quick"
    assert set(brick.defect_types) == {"scratch", "stain", "hole", "cut", "colour", "foreign"}
    assert brick.test_masks.dtype == torch.float32 and brick.test_masks.shape == (len(brick.test_images), 128, 128)
    assert set(brick.test_masks.unique().tolist()) <= {0.0, 1.0}
    area = brick.test_masks.flatten(1).sum(1)
    assert (area[brick.test_labels == 1] > 0).all() and (area[brick.test_labels == 0] == 0).all()
    assert float(area.max()) < 0.5 * 128 * 128  # a defect, not the whole image
    # grey images have identical channels; only the colour defect tints them
    spread = (brick.test_images.amax(1) - brick.test_images.amin(1)).flatten(1).amax(1)
    colour = torch.tensor([d == "colour" for d in brick.test_defects])
    assert (spread[~colour] == 0).all() and (spread[colour] > 0.05).all()
    assert (brick.train_images[:, 0] == brick.train_images[:, 2]).all()
    # no test image repeats a training image
    assert torch.cdist(brick.test_images.flatten(1), brick.train_images.flatten(1)).min() > 1.0
    assert "textures/brick" in repr(brick) and "\n" not in repr(brick)
    summary = brick.summary()
    assert summary["count"].sum() == len(brick.train_images) + len(brick.test_images)
    assert set(summary["defect"]) == {"good", *brick.defect_types}


def test_phantom_quick(head):
    _check_common(head, 128)
    assert set(head.defect_types) == {"bright_lesion", "dark_lesion", "mass_effect"}
    frac = head.test_masks.flatten(1).mean(1)
    bad = head.test_labels == 1
    assert (frac[bad] > 0.001).all() and (frac[bad] < 0.1).all() and (frac[~bad] == 0).all()
    # lesions lie inside the head: the image is not background (black) under the mask
    inside = (head.test_images[:, 0] * head.test_masks).flatten(1).sum(1) / head.test_masks.flatten(1).sum(1).clamp(min=1)
    assert (inside[bad] > 0.1).all()
    assert (head.test_images[:, 0] == head.test_images[:, 1]).all()


def test_digits(root):
    ds = D.load("digits", normal_class=3, quick=True, root=root)
    _check_common(ds, 32)
    assert ds.category == "class_3" and ds.test_masks is None
    assert set(ds.defect_types) == {f"digit_{j}" for j in range(10) if j != 3}
    assert (root / "digits" / "class_3_quick" / "test" / "digit_7").is_dir()
    assert not (root / "digits" / "class_3_quick" / "ground_truth").exists()
    assert _same(ds, D.load("digits", category="class_3", quick=True, root=root))


# --------------------------------------------------------------------------- determinism and caching


def test_determinism(brick, tmp_path):
    again = D.load("textures", category="brick", quick=True, root=tmp_path)
    assert _same(brick, again)
    other = D.load("textures", category="brick", quick=True, seed=1, root=tmp_path)
    assert other.root.name == "brick_quick_seed1"
    assert not torch.equal(brick.train_images, other.train_images)
    assert not torch.equal(brick.test_masks, other.test_masks)


def test_reuse_does_not_regenerate(brick, root, monkeypatch):
    folder = brick.root
    mtimes = {p: p.stat().st_mtime_ns for p in folder.rglob("*")}

    def boom(*a, **k):
        raise AssertionError("rebuilt a valid cached set")

    monkeypatch.setattr(cache, "build", boom)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        again = D.load("textures", category="brick", quick=True, root=root)
    assert _same(brick, again)
    assert mtimes == {p: p.stat().st_mtime_ns for p in folder.rglob("*")}


def _fresh(tmp_path):
    return D.load("digits", normal_class=1, quick=True, root=tmp_path)


@pytest.mark.parametrize("damage", ["corrupt", "missing", "params", "extra", "no_manifest"])
def test_damaged_set_is_rebuilt(tmp_path, damage):
    ds = _fresh(tmp_path)
    folder = ds.root
    manifest = json.loads((folder / "manifest.json").read_text())
    victim = folder / "test" / "digit_5" / "001.png"
    if damage == "corrupt":
        victim.write_bytes(victim.read_bytes()[:40])
    elif damage == "missing":
        victim.unlink()
    elif damage == "params":
        manifest["params"]["n_train"] = 3
        (folder / "manifest.json").write_text(json.dumps(manifest))
    elif damage == "extra":
        Image.fromarray(np.zeros((32, 32), np.uint8)).save(folder / "train" / "good" / "999.png")
    else:
        (folder / "manifest.json").unlink()
    with pytest.warns(UserWarning, match="rebuilding"):
        again = _fresh(tmp_path)
    assert _same(ds, again)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _fresh(tmp_path)  # and now it is trusted again


def test_crash_leaves_no_half_written_set(tmp_path, monkeypatch):
    real = textures.generate

    def crashing(cfg):
        for i, s in enumerate(real(cfg)):
            if i == 10:
                raise KeyboardInterrupt
            yield s

    monkeypatch.setattr(textures, "generate", crashing)
    with pytest.raises(KeyboardInterrupt):
        D.load("textures", category="gravel", quick=True, root=tmp_path)
    assert [p.name for p in (tmp_path / "textures").iterdir() if not p.name.endswith(".lock")] == []
    monkeypatch.setattr(textures, "generate", real)
    ds = D.load("textures", category="gravel", quick=True, root=tmp_path)
    assert len(ds.train_images) == 60


_CHILD = """
import hashlib, sys, anomaly_zoo.data as D
ds = D.load("textures", category="grass", quick=True, root=sys.argv[1])
h = hashlib.sha256()
for t in (ds.train_images, ds.test_images, ds.test_masks, ds.test_labels):
    h.update(t.numpy().tobytes())
print(h.hexdigest())
"""


def test_concurrent_loads(tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    procs = [
        subprocess.Popen([sys.executable, "-c", _CHILD, str(tmp_path)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        for _ in range(2)
    ]
    outs = [p.communicate(timeout=120) for p in procs]
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err
        assert "rebuilding" not in err
    assert outs[0][0].strip() == outs[1][0].strip() != ""
    ds = D.load("textures", category="grass", quick=True, root=tmp_path)
    h = hashlib.sha256()
    for t in (ds.train_images, ds.test_images, ds.test_masks, ds.test_labels):
        h.update(t.numpy().tobytes())
    assert h.hexdigest() == outs[0][0].strip()
    leftovers = [p.name for p in (tmp_path / "textures").iterdir() if p.name.startswith(".") and not p.name.endswith(".lock")]
    assert leftovers == []


def test_make(tmp_path):
    paths = D.make("digits", ["class_2", "class_4"], quick=True, root=tmp_path, progress=False)
    assert paths == [tmp_path / "digits" / "class_2_quick", tmp_path / "digits" / "class_4_quick"]
    assert all((p / "manifest.json").is_file() for p in paths)
    with pytest.raises(AnomalyZooError, match="not generated"):
        D.make("mvtec")


def test_location(tmp_path, monkeypatch):
    monkeypatch.setenv("AZOO_DATA", str(tmp_path / "env"))
    assert D.data_root() == tmp_path / "env"
    assert D.data_root(tmp_path / "arg") == tmp_path / "arg"
    monkeypatch.delenv("AZOO_DATA")
    if (REPO / "pyproject.toml").is_file() and (REPO / "data").is_dir():
        assert D.data_root() == REPO / "data"
    monkeypatch.setattr(core, "_checkout_data_dir", lambda: None)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    assert D.data_root() == tmp_path / "cache" / "anomaly_zoo"
    monkeypatch.setenv("AZOO_DATA", str(tmp_path / "env"))
    ds = D.load("digits", quick=True)
    assert ds.root == tmp_path / "env" / "digits" / "class_0_quick"


# --------------------------------------------------------------------------- the MVTec reader


def test_mvtec_round_trip(brick, root):
    ds = D.load("mvtec", root=root / "textures", category="brick_quick")
    assert ds.name == "mvtec" and ds.category == "brick_quick"
    assert _same(brick, ds)
    small = D.load("mvtec", root=root / "textures" / "brick_quick", image_size=64)  # a category folder works too
    assert small.test_images.shape[-2:] == (64, 64) and small.test_masks.shape[-2:] == (64, 64)
    assert set(small.test_masks.unique().tolist()) <= {0.0, 1.0}
    assert (small.test_masks.flatten(1).sum(1) > 0).tolist() == small.test_labels.bool().tolist()


def _tiny_mvtec(base: Path, mask_size=16) -> Path:
    cat = base / "widget"
    for rel in ("train/good/000.png", "train/good/001.png", "test/good/000.png", "test/crack/000.png"):
        (cat / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.full((16, 16, 3), 100, np.uint8)).save(cat / rel)
    (cat / "ground_truth" / "crack").mkdir(parents=True)
    m = np.zeros((mask_size, mask_size), np.uint8)
    m[4:8, 4:8] = 255
    Image.fromarray(m).save(cat / "ground_truth" / "crack" / "000_mask.png")
    return cat


def test_mvtec_tiny_folder(tmp_path):
    _tiny_mvtec(tmp_path)
    ds = D.load("mvtec", root=tmp_path)  # a single category is found without category=
    assert ds.category == "widget" and ds.test_defects == ["good", "crack"]
    assert ds.test_masks.sum() == 16 and ds.test_masks[0].sum() == 0


def _one_line_error(match: str, **kw):
    with pytest.raises(AnomalyZooError, match=match) as err:
        D.load(**kw)
    assert "\n" not in str(err.value)


def test_mvtec_errors(tmp_path):
    _one_line_error("MVTec folder not found", name="mvtec", root=tmp_path / "nowhere", category="bottle")
    cat = _tiny_mvtec(tmp_path / "a")
    _one_line_error(r"'bottle' not found.*present.*widget", name="mvtec", root=tmp_path / "a", category="bottle")
    (cat / "test" / "crack" / "000.png").write_bytes(b"not a png at all")
    _one_line_error(r"cannot read image file .*crack.000\.png", name="mvtec", root=tmp_path / "a", category="widget")
    _tiny_mvtec(tmp_path / "b", mask_size=20)
    _one_line_error(r"mask .*000_mask\.png is 20x20 but its image .* is 16x16", name="mvtec", root=tmp_path / "b", category="widget")


def test_bad_arguments(tmp_path):
    _one_line_error(r"unknown dataset 'mnist'.*textures, digits, phantom, retina, mvtec", name="mnist")
    _one_line_error(r"unknown textures category 'wood'.*brick, grass, gravel", name="textures", category="wood", root=tmp_path)
    _one_line_error(r"unknown argument\(s\) colour.*valid arguments: category", name="textures", colour=True)
    _one_line_error("normal_class must be an integer from 0 to 9", name="digits", normal_class=10)
    _one_line_error("disagree", name="digits", normal_class=1, category="class_2")
    _one_line_error("seed must be a non-negative integer", name="phantom", seed=-1)
    _one_line_error("quick must be True or False", name="phantom", quick="yes")
    _one_line_error("image_size must be", name="phantom", image_size=0)
    assert not (tmp_path / "textures").exists()
