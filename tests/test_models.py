"""Every registered model: smoke (fit + predict on tiny data), save/load round trip, seeding,
and a quality threshold on a quick real dataset that a broken implementation would miss."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import anomaly_zoo as az

MODELS = [c.name for c in az.list_models()]

# name -> (dataset kwargs, metric, threshold); every registered model needs an entry
QUALITY = {
    "padim": (dict(name="textures", category="brick"), "image_auroc", 0.95),
    "spade": (dict(name="textures", category="brick"), "aupro", 0.90),
    "patchcore": (dict(name="textures", category="brick"), "image_auroc", 0.97),
    "dfm": (dict(name="textures", category="brick"), "image_auroc", 0.80),
    "dfr": (dict(name="textures", category="brick"), "aupro", 0.90),
    "ae": (dict(name="digits", normal_class=0), "image_auroc", 0.80),
    "ms_ssim_ae": (dict(name="digits", normal_class=0), "image_auroc", 0.80),
    "unet_ae": (dict(name="textures", category="brick"), "pixel_auroc", 0.80),  # 0.910 (seed 1: 0.881)
    "memae": (dict(name="digits", normal_class=0), "image_auroc", 0.80),
    "vae": (dict(name="digits", normal_class=0), "image_auroc", 0.85),
    "ocsvm": (dict(name="digits", normal_class=5), "image_auroc", 0.85),
    "deep_svdd": (dict(name="digits", normal_class=8), "image_auroc", 0.85),
    "patch_svdd": (dict(name="textures", category="brick"), "pixel_auroc", 0.80),
    "fcdd": (dict(name="textures", category="brick"), "pixel_auroc", 0.80),
}


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


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(QUALITY))
def test_quality_on_real_data(name):
    data_kw, metric, threshold = QUALITY[name]
    kw = dict(data_kw)
    ds = az.data.load(kw.pop("name"), quick=True, **kw)
    pred = az.create(name, preset="quick").fit(ds.train_images).predict(ds.test_images)
    report = az.metrics.evaluate(pred, ds.test_labels, ds.test_masks)
    assert report[metric] >= threshold, f"{name}: {metric} {report[metric]:.3f} < {threshold}"


# ------------------------------------------------------------------ PaDiM
def test_padim_pretrained_beats_random_features(brick):
    scores = {}
    for pretrained in (True, False):
        det = az.create("padim", preset="quick", pretrained=pretrained).fit(brick.train_images)
        pred = det.predict(brick.test_images)
        scores[pretrained] = az.metrics.evaluate(pred, brick.test_labels, brick.test_masks)
    assert scores[True]["image_auroc"] > scores[False]["image_auroc"]
    assert scores[True]["aupro"] > scores[False]["aupro"]


def test_padim_matches_a_direct_computation(tiny):
    """Eq. (1)-(2) written out with numpy for one position: the library's map agrees."""
    train, test = tiny
    det = az.create("padim", preset="quick", pretrained=False, image_size=64, sigma=0).fit(train)
    emb_train = det._embed(train).double().numpy()  # [N, d, P]
    emb_test = det._embed(test[:1]).double().numpy()
    p = 5
    xs = emb_train[:, :, p]
    mu = xs.mean(0)
    cov = np.cov(xs, rowvar=False) + det.eps * np.eye(xs.shape[1])
    delta = emb_test[0, :, p] - mu
    expected = np.sqrt(delta @ np.linalg.inv(cov) @ delta)
    grid = det.meta_["grid"]
    raw = torch.einsum("bdp,pde,bep->bp", det._embed(test[:1]) - det.mean_, det.cov_inv_,
                       det._embed(test[:1]) - det.mean_).sqrt().view(1, *grid)
    assert float(raw.flatten()[p]) == pytest.approx(expected, rel=1e-3)
