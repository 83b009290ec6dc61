"""Every registered model: smoke (fit + predict on tiny data), save/load round trip, seeding,
and a quality threshold on a quick real dataset that a broken implementation would miss."""
from __future__ import annotations

import pytest
import torch

import anomaly_zoo as az

MODELS = [c.name for c in az.list_models()]

# name -> (dataset kwargs, {metric: threshold}). Each threshold is the lowest of the quick preset's
# values over data seeds 0, 1, 2 minus a margin (the measured values are in the comment: seed 0 / 1 / 2).
# Localising models get a pixel metric too, so that a flipped or noisy map fails as well as a flipped score.
QUALITY = {
    # image AUROC .985 / .982 / .966, AUPRO .969 / .955 / .963 (random backbone: .633 / .576 / .642, AUPRO .321-.445)
    "padim": (dict(name="textures", category="brick"), {"image_auroc": 0.93, "aupro": 0.92}),
    # image AUROC (eq. 1) .840 / .799 / .880, AUPRO .962 / .943 / .952 (random: .546 / .632 / .624)
    "spade": (dict(name="textures", category="brick"), {"image_auroc": 0.76, "aupro": 0.91}),
    # image AUROC 1.000 / .999 / .999, AUPRO .984 / .976 / .977 (random: .684 / .605 / .728)
    "patchcore": (dict(name="textures", category="brick"), {"image_auroc": 0.96, "aupro": 0.94}),
    # image AUROC .877 / .913 / .933, pixel AUROC .908 / .869 / .886 (random: .619 / .564 / .671)
    "dfm": (dict(name="textures", category="brick"), {"image_auroc": 0.84, "pixel_auroc": 0.84}),
    # image AUROC .986 / .932 / .974, AUPRO .966 / .882 / .952 (random: .522 / .550 / .658)
    "dfr": (dict(name="textures", category="brick"), {"image_auroc": 0.90, "aupro": 0.85}),
    "ae": (dict(name="digits", normal_class=0), {"image_auroc": 0.80}),
    "ms_ssim_ae": (dict(name="digits", normal_class=0), {"image_auroc": 0.80}),
    "unet_ae": (dict(name="textures", category="brick"), {"image_auroc": 0.60, "pixel_auroc": 0.80}),
    "memae": (dict(name="digits", normal_class=0), {"image_auroc": 0.80}),
    "vae": (dict(name="digits", normal_class=0), {"image_auroc": 0.85}),
    # image AUROC 0.907 / 0.921 / 0.978 (random backbone: 0.873 / 0.870 / 0.869)
    "ocsvm": (dict(name="digits", normal_class=5), {"image_auroc": 0.87}),
    # image AUROC 0.938 / 0.904 / 0.960 (untrained network: 0.662 / 0.833 / 0.699)
    "deep_svdd": (dict(name="digits", normal_class=8), {"image_auroc": 0.87}),
    # image AUROC 0.941 / 0.858 / 0.915, pixel AUROC 0.980 / 0.980 / 0.979 (untrained: image 0.811 / 0.778 / 0.864)
    "patch_svdd": (dict(name="textures", category="brick"), {"image_auroc": 0.83, "pixel_auroc": 0.96}),
    # image AUROC 0.895 / 0.913 / 0.919, pixel AUROC 0.983 / 0.981 / 0.986 (untrained head: pixel 0.781 / 0.709 / 0.800)
    "fcdd": (dict(name="textures", category="brick"), {"image_auroc": 0.85, "pixel_auroc": 0.96}),
}


BAD_INPUTS = [
    (torch.rand(3, 64, 64), "expected 4 dimensions"),
    (torch.rand(2, 4, 64, 64), "expected 3 channels"),
    (torch.rand(2, 3, 64, 64) * 255, r"values must lie in \[0, 1\]"),
    (torch.full((2, 3, 64, 64), float("nan")), "NaN"),
    (torch.rand(0, 3, 64, 64), "empty"),
    ("images.png", "expected a torch.Tensor or numpy array"),
]


def _smoke_kwargs(name):
    card = next(c for c in az.list_models() if c.name == name)
    params = card.cls._param_names()
    kw = {"epochs": 1} if "epochs" in params else {}
    if "pretrained" in params:
        kw["pretrained"] = False  # random features are enough for shapes
    return kw


@pytest.mark.parametrize("name", MODELS)
def test_smoke_shapes_and_finite(name, tiny):
    train, test = tiny
    det = az.create(name, preset="quick", **_smoke_kwargs(name))
    assert det.fit(train) is det
    pred = det.predict(test)
    assert pred.scores.shape == (len(test),) and pred.scores.device.type == "cpu"
    assert torch.isfinite(pred.scores).all()
    if det.localizes:
        assert pred.maps.shape == (len(test), 64, 64) and torch.isfinite(pred.maps).all()
        assert pred.maps.device.type == "cpu"
    # numpy input gives the same answer
    np_pred = det.predict(test.numpy())
    assert torch.equal(np_pred.scores, pred.scores)
    # every bad input, to fit and to predict: one clear AnomalyZooError
    for bad, message in BAD_INPUTS:
        with pytest.raises(az.AnomalyZooError, match=message):
            det.predict(bad)
        with pytest.raises(az.AnomalyZooError, match=message):
            az.create(name, preset="quick", **_smoke_kwargs(name)).fit(bad)


@pytest.mark.parametrize("name", MODELS)
def test_save_load_round_trip_exact(name, tiny, tmp_path):
    train, test = tiny
    det = az.create(name, preset="quick", **_smoke_kwargs(name)).fit(train)
    path = det.save(tmp_path / f"{name}.pt")
    again = az.load(path)
    assert type(again) is type(det) and again.get_params() == det.get_params()
    p1, p2 = det.predict(test), again.predict(test)
    assert torch.equal(p1.scores, p2.scores)
    if p1.maps is not None:
        assert torch.equal(p1.maps, p2.maps)
    # weights_only load works on the raw file (no pickled code inside)
    blob = torch.load(path, weights_only=True)
    assert set(blob) == {"config", "state_dict"}


@pytest.mark.parametrize("name", MODELS)
def test_one_seed_same_scores(name, tiny):
    train, test = tiny
    s1 = az.create(name, preset="quick", seed=3, **_smoke_kwargs(name)).fit(train).predict(test).scores
    s2 = az.create(name, preset="quick", seed=3, **_smoke_kwargs(name)).fit(train).predict(test).scores
    assert torch.equal(s1, s2)


def test_every_model_has_a_quality_test():
    assert set(MODELS) <= set(QUALITY), f"add a QUALITY entry for {sorted(set(MODELS) - set(QUALITY))}"
    for name in MODELS:
        metrics = QUALITY[name][1]
        assert "image_auroc" in metrics, f"{name}: a flipped image score must fail its quality test"
        if az.get_card(name).localizes:
            assert {"pixel_auroc", "aupro"} & set(metrics), f"{name}: a flipped map must fail its quality test"


def _failures(pred, ds, thresholds) -> list[str]:
    report = az.metrics.evaluate(pred, ds.test_labels, ds.test_masks)
    return [f"{m} {report[m]:.3f} < {t}" for m, t in thresholds.items() if not report[m] >= t]


# The degenerate baseline each model must beat on its QUALITY set, on the same data:
# "mean_image": the distance to the mean normal training image (what a collapsed auto-encoder computes);
# "random_backbone": the same method on a randomly initialised backbone (pretrained=False);
# "untrained": the same method whose networks never move (lr=1e-12, one epoch).
BASELINES = {
    "padim": "random_backbone", "spade": "random_backbone", "patchcore": "random_backbone",
    "dfm": "random_backbone", "dfr": "random_backbone", "ocsvm": "random_backbone",
    "ae": "mean_image", "unet_ae": "mean_image", "ms_ssim_ae": "mean_image", "memae": "mean_image",
    "vae": "mean_image", "deep_svdd": "untrained", "patch_svdd": "untrained", "fcdd": "untrained",
}
# name -> (metric, margin): the model's metric minus the baseline's, on data seed 0, must be >= margin
BASELINE_MARGIN = {name: ("pixel_auroc" if az.get_card(name).localizes else "image_auroc", 0.02) for name in MODELS}
# Patch SVDD's untrained encoder already localises well on brick (pixel AUROC 0.974-0.976): its training shows
# at the image level
BASELINE_MARGIN["patch_svdd"] = ("image_auroc", 0.05)


def baseline_prediction(name, kind, ds):
    if kind == "mean_image":
        mean = ds.train_images.mean(0, keepdim=True)
        maps = (ds.test_images - mean).pow(2).mean(1)
        return az.Prediction(maps.flatten(1).mean(1), maps)
    kw = {"pretrained": False} if kind == "random_backbone" else {"lr": 1e-12, "epochs": 1}
    return az.create(name, preset="quick", **kw).fit(ds.train_images).predict(ds.test_images)


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(QUALITY))
def test_quality_on_real_data(name):
    """The quick preset reaches its thresholds, which a sabotaged copy of the same prediction (scores and
    maps negated, or replaced by noise of the same shape) does not, and it beats its degenerate baseline."""
    data_kw, thresholds = QUALITY[name]
    kw = dict(data_kw)
    ds = az.data.load(kw.pop("name"), quick=True, **kw)
    pred = az.create(name, preset="quick").fit(ds.train_images).predict(ds.test_images)
    assert not _failures(pred, ds, thresholds), f"{name}: {_failures(pred, ds, thresholds)}"
    g = torch.Generator().manual_seed(0)
    flipped = az.Prediction(-pred.scores, None if pred.maps is None else -pred.maps)
    noise = az.Prediction(torch.rand(pred.scores.shape, generator=g),
                          None if pred.maps is None else torch.rand(pred.maps.shape, generator=g))
    for label, bad in (("negated", flipped), ("noise", noise)):
        assert _failures(bad, ds, thresholds), f"{name}: the {label} prediction passes the thresholds too"
    metric, margin = BASELINE_MARGIN[name]
    base = az.metrics.evaluate(baseline_prediction(name, BASELINES[name], ds), ds.test_labels, ds.test_masks)
    report = az.metrics.evaluate(pred, ds.test_labels, ds.test_masks)
    assert report[metric] >= base[metric] + margin, \
        f"{name}: {metric} {report[metric]:.3f} does not beat the {BASELINES[name]} baseline ({base[metric]:.3f}) by {margin}"
