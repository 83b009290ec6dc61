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
    # --- reconstruction and VAE, on brick: on the quick digits sets the mean training image alone reaches
    # image AUROC 1.0 (normal class 0), so digits cannot tell a working auto-encoder from a collapsed one.
    # ae: image .551 / .546 / .629, pixel .806 / .778 / .797 (mean image: pixel .769 / .744 / .760)
    "ae": (dict(name="textures", category="brick"), {"image_auroc": 0.50, "pixel_auroc": 0.76}),
    # ms_ssim_ae (s_MSI region map): image .511 / .539 / .584, pixel .611 / .718 / .591
    "ms_ssim_ae": (dict(name="textures", category="brick"), {"image_auroc": 0.47, "pixel_auroc": 0.57}),
    # unet_ae: image .781 / .722 / .830, pixel .910 / .881 / .905
    "unet_ae": (dict(name="textures", category="brick"), {"image_auroc": 0.68, "pixel_auroc": 0.85}),
    # memae: image .630 / .561 / .687, pixel .777 / .740 / .749
    "memae": (dict(name="textures", category="brick"), {"image_auroc": 0.53, "pixel_auroc": 0.72}),
    # vae: image .614 / .567 / .689, pixel .831 / .768 / .810
    "vae": (dict(name="textures", category="brick"), {"image_auroc": 0.53, "pixel_auroc": 0.75}),
    # --- one-class
    # image AUROC 0.907 / 0.921 / 0.978 (random backbone: 0.873 / 0.870 / 0.869)
    "ocsvm": (dict(name="digits", normal_class=5), {"image_auroc": 0.87}),
    # image AUROC 0.938 / 0.904 / 0.960 (untrained network: 0.662 / 0.833 / 0.699)
    "deep_svdd": (dict(name="digits", normal_class=8), {"image_auroc": 0.87}),
    # image AUROC 0.941 / 0.858 / 0.915, pixel AUROC 0.980 / 0.980 / 0.979 (untrained: image 0.811 / 0.778 / 0.864)
    "patch_svdd": (dict(name="textures", category="brick"), {"image_auroc": 0.83, "pixel_auroc": 0.96}),
    # image AUROC 0.895 / 0.913 / 0.919, pixel AUROC 0.983 / 0.981 / 0.986 (untrained head: pixel 0.781 / 0.709 / 0.800)
    "fcdd": (dict(name="textures", category="brick"), {"image_auroc": 0.85, "pixel_auroc": 0.96}),
    # --- normalizing flows (quick presets, one thread; data seeds 0 / 1 / 2)
    # cflow: image 0.883 / 0.793 / 0.875, aupro 0.870 / 0.758 / 0.867, pixel 0.981 / 0.966 / 0.957
    "cflow": (dict(name="textures", category="brick"), {"image_auroc": 0.75, "aupro": 0.70}),
    # fastflow (40 epochs): image 0.974 / 0.923 / 0.944, aupro 0.933 / 0.938 / 0.944, pixel 0.977 / 0.966 / 0.979
    "fastflow": (dict(name="textures", category="brick"), {"image_auroc": 0.90, "aupro": 0.90}),
    # differnet: image 0.792 / 0.776 / 0.827, pixel 0.847 / 0.864 / 0.844 (aupro 0.641 / 0.419 / 0.576)
    "differnet": (dict(name="textures", category="brick"), {"image_auroc": 0.74, "pixel_auroc": 0.80}),
    # csflow: seed 0 only (60 epochs, 105 s CPU): image 0.929, pixel 0.991, aupro 0.955 -- provisional
    "csflow": (dict(name="textures", category="brick"), {"image_auroc": 0.88, "aupro": 0.90}),
    # --- GANs (quick presets, 32 px; data seeds 0 / 1 / 2). Brick pixel AUROC (issue target 0.70):
    # anogan 0.807 / 0.776 / 0.790, skip_ganomaly 0.881 / 0.872 / 0.894, f_anogan 0.796 / 0.750 / 0.785 (mean image
    # 0.764 / 0.732 / 0.750). Image AUROC: anogan 0.633 / 0.559 / 0.667, skip_ganomaly 0.620 / 0.618 / 0.740,
    # f_anogan 0.559 / 0.585 / 0.631 (mean image 0.654 / 0.556 / 0.701): at image level the GANs do no better
    # than the mean image on brick, so that threshold only catches a flipped score; the maps carry the test.
    "anogan": (dict(name="textures", category="brick"), {"image_auroc": 0.50, "pixel_auroc": 0.72}),
    "skip_ganomaly": (dict(name="textures", category="brick"), {"image_auroc": 0.55, "pixel_auroc": 0.80}),
    "f_anogan": (dict(name="textures", category="brick"), {"image_auroc": 0.50, "pixel_auroc": 0.70}),
    # ganomaly (no map), digit 8: image AUROC 0.990 / 0.977 / 0.985 (untrained: 0.511 / 0.604 / 0.533)
    "ganomaly": (dict(name="digits", normal_class=8), {"image_auroc": 0.92}),
    # --- knowledge distillation (quick presets, one thread)
    # stpm: image 0.964 / 0.926 / 0.952, aupro 0.964 / 0.958 / 0.957
    "stpm": (dict(name="textures", category="brick"), {"image_auroc": 0.88, "aupro": 0.92}),
    # reverse_distillation (40 epochs): image 0.942 / 0.951 / 0.926, aupro 0.923 / 0.948 / 0.947
    "reverse_distillation": (dict(name="textures", category="brick"), {"image_auroc": 0.90, "aupro": 0.89}),
    # mkd: image 0.879 / 0.823 / 0.843, pixel 0.784 / 0.756 / 0.746 (gradient maps)
    "mkd": (dict(name="textures", category="brick"), {"image_auroc": 0.78, "pixel_auroc": 0.70}),
    # uninformed_students: image 0.878 / 0.826 / 0.900, aupro 0.858 / 0.846 / 0.887 (random backbone, seed 0: pixel
    # 0.911 against 0.978). Its quick preset (student lr, epochs, crop, teacher lr) is the one a proxy validation on
    # synthetic anomalies in held-out training images picks (anomaly_zoo.validation); grass/gravel: chapter 10.
    "uninformed_students": (dict(name="textures", category="brick"), {"image_auroc": 0.78, "aupro": 0.80}),
    # efficientad (6000-step shipped teacher; 128 px, 300 x 2, lr 1e-3): brick image .779 / .679 / .639, pixel .972 /
    # .948 / .878, AUPRO .812 / .676 / .608 (issue target .90 missed; at 64 px x 600 x 4 image .594 / .573 / .669,
    # pixel .707 / .602 / .709); phantom image .689 / .559 / .792, pixel .817 / .803 / .808 (64 px: image .766 / .734 / .792)
    "efficientad": (dict(name="textures", category="brick"), {"image_auroc": 0.60, "pixel_auroc": 0.85}),
    # --- self-supervised (quick presets, one thread; data seeds 0 / 1 / 2; mean image: image .654 / .556 / .701,
    # pixel .764 / .732 / .750). DRAEM's quick epochs, lr and batch are the proxy validation's choice
    # (anomaly_zoo.validation: synthetic anomalies in held-out training images, no test labels).
    # cutpaste: image .877 / .860 / .815, aupro .892 / .887 / .876 (random backbone, seed 0: image .548, pixel .846)
    "cutpaste": (dict(name="textures", category="brick"), {"image_auroc": 0.76, "aupro": 0.83}),
    # draem (lr 3e-3), model seed 0: image .934 / .941 / .944, pixel .926 / .984 / .938; model seed = data seed
    # (results/quick.csv): image .934 / .958 / .857, pixel .926 / .942 / .861 (untrained, seed 0: image .475, pixel
    # .480); with sspcab=True, model seed 0: image .964 / .972 / .911, pixel .959 / .984 / .900
    "draem": (dict(name="textures", category="brick"), {"image_auroc": 0.82, "pixel_auroc": 0.82}),
    # riad: image .597 / .611 / .681, pixel .863 / .851 / .770, aupro .561 / .510 / .559
    "riad": (dict(name="textures", category="brick"), {"image_auroc": 0.55, "pixel_auroc": 0.72}),
    # nsa: image .674 / .653 / .607, pixel .906 / .899 / .773, aupro .670 / .571 / .517
    "nsa": (dict(name="textures", category="brick"), {"image_auroc": 0.56, "pixel_auroc": 0.72}),
    # puzzle_ae: image .674 / .586 / .645, pixel .804 / .749 / .729 (below the mean image's .750 on seed 2);
    # digits ten-class mean image AUROC 0.962 (seed 0)
    "puzzle_ae": (dict(name="textures", category="brick"), {"image_auroc": 0.53, "pixel_auroc": 0.68}),
    # igd, digits class 4: image .986 / .914 / .970 (untrained .724 / .656 / .699; the mean image .999 / .943 / .992:
    # IGD does not beat it on digits). Ten-class mean .961 / .945 / .961. Brick image .454 / .610 / .592, pixel
    # .580 / .492 / .461, below its own untrained network there, so no brick entry; phantom .542 / .408 / .410.
    "igd": (dict(name="digits", normal_class=4), {"image_auroc": 0.88}),
    # ccd (downstream igd, quick), digits class 1: image .952 / .871 / .985 (mean image .887 / .812 / .830); ten-class
    # mean .953 / .945 / .968; phantom .484 / .566 / .399 (the issue's .75 missed: chapter 11).
    # Pre-training ablation (phantom seed 0 / digits ten-class mean): igd none .542 / .961, simclr .526 / .969,
    # ccd .484 / .953 (tests/test_ssl_ccd.py checks the pieces)
    "ccd": (dict(name="digits", normal_class=1), {"image_auroc": 0.82}),
    # --- medical systems (quick presets, one thread; data seeds 0 / 1 / 2). Mean training image on phantom:
    # pixel .890 / .894 / .878. squid: image (discriminator score) .417 / .455 / .592: at chance, the issue's
    # .75 missed; pixel .938 / .957 / .897, AUPRO .703 / .757 / .685 (untrained, seed 0: pixel .262).
    # Retina: image .410 / .535 / .494, pixel .642 / .565 / .669 (mean image .659 / .635 / .653): no entry.
    "squid": (dict(name="phantom"), {"image_auroc": 0.0, "pixel_auroc": 0.85}),
    # descargan, fitted on the weak split: pixel .769 / .733 / .738 (untrained .497 / .497 / .498; the issue's
    # .75 met on seed 0 only; the mean image, which needs no labels, reaches .89); image .462 / .255 / .568
    "descargan": (dict(name="phantom"), {"image_auroc": 0.0, "pixel_auroc": 0.70}),
    # pnet: image .613 / .691 / .648 (issue target .70 missed), pixel .930 / .943 / .951, AUPRO .718 / .742 / .806
    # (mean image, seed 0: image .476, pixel .890; untrained: pixel .26). Retina pixel .635 / .535 / .590 misses .70:
    # blur lesions (61 % of the lesion pixels) score .43; exudate .995, haemorrhage .975, microaneurysm .952
    "pnet": (dict(name="phantom"), {"image_auroc": 0.58, "pixel_auroc": 0.90}),
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
    kw = {k: 1 for k in ("epochs", "steps", "teacher_steps") if k in params}
    if "pretrained" in params:
        kw["pretrained"] = False  # random features are enough for shapes
    return kw


def fit(det, images, ds=None):
    """Fit as the model's supervision asks: normal images, or (weakly supervised: DeScarGAN) the data set's
    weak split of healthy and diseased images, or, on tiny data, alternate labels 0, 1, 0, ..."""
    if det.supervision != "weak":
        return det.fit(images)
    if ds is not None:
        return det.fit(ds.weak_images, labels=ds.weak_labels)
    return det.fit(images, labels=[i % 2 for i in range(len(images))])


@pytest.mark.parametrize("name", MODELS)
def test_smoke_shapes_and_finite(name, tiny):
    train, test = tiny
    det = az.create(name, preset="quick", **_smoke_kwargs(name))
    assert fit(det, train) is det
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
            fit(az.create(name, preset="quick", **_smoke_kwargs(name)), bad)


@pytest.mark.parametrize("name", MODELS)
def test_save_load_round_trip_exact(name, tiny, tmp_path):
    train, test = tiny
    det = fit(az.create(name, preset="quick", **_smoke_kwargs(name)), train)
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
    s1 = fit(az.create(name, preset="quick", seed=3, **_smoke_kwargs(name)), train).predict(test).scores
    s2 = fit(az.create(name, preset="quick", seed=3, **_smoke_kwargs(name)), train).predict(test).scores
    assert torch.equal(s1, s2)


# Localising models whose quick maps are near chance on every set with masks (measured, see QUALITY), so that no
# pixel threshold could tell a flipped map from theirs: their maps are checked against an independent
# recomputation and for pointing at a planted change in the test named here instead.
MAP_TESTED_ELSEWHERE = {"igd": "tests/test_ssl_igd.py: test_igd_region_map_points_at_the_changed_region, "
                               "test_igd_score_and_map_recomputed_from_the_fitted_parts",
                        "ccd": "tests/test_ssl_ccd.py: test_ccd_score_and_map_are_the_downstreams"}


# Models whose quick image scores are at chance on every set (measured, see QUALITY): no threshold could tell a
# flipped score from theirs (their QUALITY entries hold image_auroc 0.0), so the score is recomputed from the
# fitted parts in the test named here, which a negated or noisy score fails.
SCORE_TESTED_ELSEWHERE = {
    "squid": "tests/test_medical_squid.py: test_squid_score_is_the_discriminator_recomputed_from_parts",
    "descargan": "tests/test_medical_descargan.py: test_descargan_map_and_score_recomputed_from_the_parts",
}


def test_every_model_has_a_quality_test():
    assert set(MODELS) <= set(QUALITY), f"add a QUALITY entry for {sorted(set(MODELS) - set(QUALITY))}"
    assert set(MODELS) <= set(BASELINES), f"add a BASELINES entry for {sorted(set(MODELS) - set(BASELINES))}"
    for name in MODELS:
        metrics = QUALITY[name][1]
        assert "image_auroc" in metrics, f"{name}: a flipped image score must fail its quality test"
        if metrics["image_auroc"] == 0.0:
            assert name in SCORE_TESTED_ELSEWHERE, f"{name}: image threshold 0.0 without a score test elsewhere"
        if az.get_card(name).localizes and name not in MAP_TESTED_ELSEWHERE:
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
    "vae": "mean_image", "deep_svdd": "untrained",
    "differnet": "random_backbone", "cflow": "random_backbone", "fastflow": "random_backbone",
    "csflow": "random_backbone", "patch_svdd": "untrained", "fcdd": "untrained",
    "anogan": "mean_image", "skip_ganomaly": "mean_image", "f_anogan": "mean_image", "ganomaly": "untrained",
    "stpm": "untrained", "reverse_distillation": "untrained", "mkd": "untrained", "efficientad": "mean_image",
    "uninformed_students": "random_backbone",
    "cutpaste": "random_backbone", "draem": "untrained", "riad": "mean_image", "nsa": "mean_image",
    "puzzle_ae": "mean_image", "igd": "untrained", "ccd": "mean_image",
    "squid": "mean_image", "descargan": "untrained", "pnet": "mean_image",
}
# name -> (metric, margin): the model's metric minus the baseline's, on data seed 0, must be >= margin
BASELINE_MARGIN = {name: ("pixel_auroc" if az.get_card(name).localizes else "image_auroc", 0.02) for name in MODELS}
# where a model's maps do not beat the mean image on brick (measured: memae pixel AUROC .777 / .740 / .749 against
# .769 / .744 / .760; ms_ssim_ae's s_MSI map .611 / .718 / .591 against .671 / .611 / .663 for the mean image
# scored the same way), the baseline is compared at the image level on digits class 1, where the mean image
# is weakest (image AUROC .887 at seed 0); both also rebuild their training images far better than the mean
# image (tests/test_reconstruction.py)
# (measured on digits class 1, data seeds 0 / 1: memae .998 / .999, ms_ssim_ae .993 / .999, mean image .887 / .812)
BASELINE_DATA = {name: dict(name="digits", normal_class=1) for name in ("memae", "ms_ssim_ae")}
BASELINE_MARGIN.update({name: ("image_auroc", 0.02) for name in BASELINE_DATA})
# Patch SVDD's untrained encoder already localises well on brick (pixel AUROC 0.974-0.976): its training shows
# at the image level
BASELINE_MARGIN["patch_svdd"] = ("image_auroc", 0.05)
# IGD on digits class 4: training must show clearly (untrained .724 at seed 0, trained .986)
BASELINE_MARGIN["igd"] = ("image_auroc", 0.10)
# CCD on digits class 1 (no masks): the image level, against the mean image (.952 against .887 at seed 0)
BASELINE_MARGIN["ccd"] = ("image_auroc", 0.03)


def baseline_prediction(name, kind, ds):
    if kind == "mean_image":
        mean = ds.train_images.mean(0, keepdim=True)
        maps = (ds.test_images - mean).pow(2).mean(1)
        return az.Prediction(maps.flatten(1).mean(1), maps)
    kw = {"pretrained": False} if kind == "random_backbone" else {"lr": 1e-12, "epochs": 1}
    return fit(az.create(name, preset="quick", **kw), ds.train_images, ds).predict(ds.test_images)


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(QUALITY))
def test_quality_on_real_data(name):
    """The quick preset reaches its thresholds, which a sabotaged copy of the same prediction (scores and
    maps negated, or replaced by noise of the same shape) does not."""
    data_kw, thresholds = QUALITY[name]
    kw = dict(data_kw)
    ds = az.data.load(kw.pop("name"), quick=True, **kw)
    pred = fit(az.create(name, preset="quick"), ds.train_images, ds).predict(ds.test_images)
    assert not _failures(pred, ds, thresholds), f"{name}: {_failures(pred, ds, thresholds)}"
    g = torch.Generator().manual_seed(0)
    flipped = az.Prediction(-pred.scores, None if pred.maps is None else -pred.maps)
    noise = az.Prediction(torch.rand(pred.scores.shape, generator=g),
                          None if pred.maps is None else torch.rand(pred.maps.shape, generator=g))
    for label, bad in (("negated", flipped), ("noise", noise)):
        assert _failures(bad, ds, thresholds), f"{name}: the {label} prediction passes the thresholds too"
    if name not in BASELINE_DATA:
        _assert_beats_baseline(name, ds, pred)


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(BASELINE_DATA))
def test_beats_its_degenerate_baseline_elsewhere(name):
    """For the models whose baseline is compared on other data than their QUALITY set (BASELINE_DATA)."""
    kw = dict(BASELINE_DATA[name])
    ds = az.data.load(kw.pop("name"), quick=True, **kw)
    _assert_beats_baseline(name, ds, fit(az.create(name, preset="quick"), ds.train_images, ds).predict(ds.test_images))


def _assert_beats_baseline(name, ds, pred):
    """On the same data (seed 0), the model beats its degenerate baseline (BASELINES) by a margin."""
    masks = ds.test_masks if ds.test_masks is not None and ds.test_masks.any() else None
    metric, margin = BASELINE_MARGIN[name]
    base = az.metrics.evaluate(baseline_prediction(name, BASELINES[name], ds), ds.test_labels, masks)
    report = az.metrics.evaluate(pred, ds.test_labels, masks)
    assert report[metric] >= base[metric] + margin, \
        f"{name}: {metric} {report[metric]:.3f} does not beat the {BASELINES[name]} baseline ({base[metric]:.3f}) by {margin}"
