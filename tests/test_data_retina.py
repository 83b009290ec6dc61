"""The ``retina`` set and the weakly labelled split of the sets with lesions (phantom, retina)."""
from __future__ import annotations

import hashlib
import json
import warnings

import numpy as np
import pytest
import torch
from scipy import ndimage as ndi

import anomaly_zoo.data as D
from anomaly_zoo.utils import AnomalyZooError

LESIONS = {"exudate", "haemorrhage", "microaneurysm", "blur"}
# digest of phantom's quick train and test images, masks and defect names (data seed 0), recorded
# with the generator as it was before the weak split existed: the weak split must not change them
PHANTOM_SEED0_DIGEST = "8803c2a6fa2aeb85"


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("azoo_retina")


@pytest.fixture(scope="module")
def fundus(root):
    return D.load("retina", quick=True, root=root)


@pytest.fixture(scope="module")
def head(root):
    return D.load("phantom", quick=True, root=root)


def _digest(ds) -> str:
    h = hashlib.sha256()
    for t in (ds.train_images, ds.test_images, ds.test_masks):
        h.update((t * 255).round().to(torch.uint8).numpy().tobytes())
    h.update(",".join(ds.test_defects).encode())
    return h.hexdigest()[:16]


def _min_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.cdist(a.flatten(1), b.flatten(1)).min())


def test_retina_is_listed_and_checks_its_category():
    assert "retina" in D.list_datasets() and D.list_categories("retina") == ["fundus"]
    with pytest.raises(AnomalyZooError, match="unknown retina category 'eye'.*fundus"):
        D.load("retina", category="eye", quick=True)


def test_retina_layout_and_manifest(fundus, root):
    folder = root / "retina" / "fundus_quick"
    assert fundus.root == folder and fundus.category == "fundus"
    assert sorted(p.name for p in (folder / "test").iterdir()) == sorted({"good", *LESIONS})
    assert sorted(p.name for p in (folder / "weak").iterdir()) == ["diseased", "good"]
    assert sorted(p.name for p in (folder / "ground_truth").iterdir()) == sorted(LESIONS)
    for lesion in LESIONS:
        images = sorted(p.stem for p in (folder / "test" / lesion).glob("*.png"))
        assert sorted(p.stem[: -len("_mask")] for p in (folder / "ground_truth" / lesion).glob("*.png")) == images
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["generator"] == "anomaly_zoo.data.retina" and manifest["params"]["image_size"] == 96
    assert manifest["counts"] == {"train/good": 60, "test/good": 32, **{f"test/{t}": 8 for t in LESIONS},
                                  "weak/good": 40, "weak/diseased": 40}
    assert sum(k.startswith("weak/") for k in manifest["files"]) == 80  # hashed, so a damaged file is noticed


def test_retina_images_masks_and_lesion_types(fundus):
    n = len(fundus.test_images)
    assert fundus.train_images.shape == (60, 3, 96, 96) and fundus.test_images.shape == (n, 3, 96, 96)
    assert set(fundus.defect_types) == LESIONS
    assert fundus.test_labels.tolist() == [int(d != "good") for d in fundus.test_defects]
    # colour photographs, inside the field of view (the black rim never shows), red fundus
    for x in (fundus.train_images, fundus.test_images, fundus.weak_images):
        assert x.dtype == torch.float32 and 0 <= float(x.min()) and float(x.max()) <= 1
        assert float(x[:, 0].amin((1, 2)).min()) > 0.2
        assert (x[:, 0].mean((1, 2)) > x[:, 1].mean((1, 2)) + 0.2).all()
    area = fundus.test_masks.flatten(1).sum(1)
    bad = fundus.test_labels == 1
    assert (area[bad] >= 4).all() and (area[~bad] == 0).all() and float(area.max()) < 0.2 * 96 * 96
    assert set(fundus.test_masks.unique().tolist()) == {0.0, 1.0}
    # normal crops vary (position, rotation, exposure) and no test image repeats a training image
    assert float(fundus.train_images.mean((1, 2, 3)).std()) > 0.01
    assert _min_distance(fundus.test_images, fundus.train_images) > 1.0


def _inside_minus_ring(ds, lesion: str, channel: int) -> float:
    """Median over the lesion's images of (mean inside the mask - mean in a ring around it)."""
    out = []
    for i, d in enumerate(ds.test_defects):
        if d == lesion:
            m = ds.test_masks[i].numpy() > 0
            ring = ndi.binary_dilation(m, iterations=4) & ~ndi.binary_dilation(m, iterations=1)
            img = ds.test_images[i, channel].numpy()
            out.append(img[m].mean() - img[ring].mean())
    return float(np.median(out))


def test_retina_lesions_look_like_their_kind(fundus):
    # exudates are bright (yellowish: green rises), haemorrhages and microaneurysms dark red (green falls)
    assert _inside_minus_ring(fundus, "exudate", 1) > 0.1
    assert _inside_minus_ring(fundus, "haemorrhage", 1) < -0.05
    assert _inside_minus_ring(fundus, "microaneurysm", 1) < -0.03
    # a blur removes fine detail: the Laplacian under the mask is weaker than in the same places of normal crops
    good = [i for i, d in enumerate(fundus.test_defects) if d == "good"]
    blurred = [i for i, d in enumerate(fundus.test_defects) if d == "blur"]

    def detail(img, mask):
        return float(np.abs(ndi.laplace(img[1].numpy()))[mask].mean())

    for i in blurred:
        mask = fundus.test_masks[i].numpy() > 0
        assert detail(fundus.test_images[i], mask) < np.median([detail(fundus.test_images[j], mask) for j in good])


def test_retina_is_deterministic_and_seeded(fundus, tmp_path):
    again = D.load("retina", quick=True, root=tmp_path)
    for a, b in ((fundus.train_images, again.train_images), (fundus.test_images, again.test_images),
                 (fundus.test_masks, again.test_masks), (fundus.weak_images, again.weak_images)):
        assert torch.equal(a, b)
    other = D.load("retina", quick=True, seed=1, root=tmp_path)
    assert other.root.name == "fundus_quick_seed1" and not torch.equal(other.train_images, fundus.train_images)


@pytest.mark.parametrize("which", ["retina", "phantom"])
def test_weak_split_is_labelled_balanced_and_disjoint(which, fundus, head):
    ds = fundus if which == "retina" else head
    x, y = ds.weak_images, ds.weak_labels
    assert x.dtype == torch.float32 and x.shape == (80, 3, *ds.image_size)
    assert y.dtype == torch.int64 and y.tolist() == [0] * 40 + [1] * 40
    # new images: none is (nearly) a train or test image, nor another weak image
    assert _min_distance(x, ds.train_images) > 1.0 and _min_distance(x, ds.test_images) > 1.0
    d = torch.cdist(x.flatten(1), x.flatten(1)) + torch.eye(len(x)) * 1e9
    assert float(d.min()) > 1.0
    assert "weak" in ds.summary()["split"].tolist()
    assert "80 weakly labelled" in repr(ds)


def test_phantom_train_and_test_unchanged_by_the_weak_split(head):
    assert _digest(head) == PHANTOM_SEED0_DIGEST


def test_sets_without_lesions_have_no_weak_split(root):
    ds = D.load("digits", normal_class=3, quick=True, root=root)
    assert ds.weak_images is None and ds.weak_labels is None
    assert "weak" not in ds.summary()["split"].tolist() and "weakly" not in repr(ds)


def test_weak_folder_is_checked(fundus, tmp_path):
    import shutil

    folder = tmp_path / "copy"
    shutil.copytree(fundus.root, folder)
    (folder / "weak" / "unknown").mkdir()
    with pytest.raises(AnomalyZooError, match="weak/good and weak/diseased, found unknown"):
        D.read_folder(folder)
    # a weak image added to a cached set is noticed: the set is rebuilt
    root = tmp_path / "cache"
    D.load("retina", quick=True, root=root)
    extra = root / "retina" / "fundus_quick" / "weak" / "good" / "999.png"
    shutil.copy(root / "retina" / "fundus_quick" / "weak" / "good" / "000.png", extra)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        D.load("retina", quick=True, root=root)
    assert any("unexpected file weak/good/999.png" in str(w.message) for w in caught) and not extra.exists()
