"""One-class family: OC-SVM, Deep SVDD, Patch SVDD, FCDD, and the training-time anomaly synthesis.

Hand cases for each method's equations, the properties the papers insist on (bias-free
Deep SVDD, no near-zero centre coordinates, the soft-boundary nu-property), exactness of the
OC-SVM's torch decision function against scikit-learn, every hyperparameter's range, and
quality tests that a degenerate model cannot pass: each trained model against its untrained
network or random backbone, on the datasets of tests/test_models.py, with the numbers
measured over data seeds 0, 1, 2 (quick presets, CPU) next to each threshold."""
from __future__ import annotations

import ast
import inspect
import math

import numpy as np
import pytest
import torch
from torch import nn

import anomaly_zoo as az
from anomaly_zoo import ops, synthesis
from anomaly_zoo.backbones import create_backbone
from anomaly_zoo.models.one_class import deep_svdd, fcdd, ocsvm, patch_svdd
from anomaly_zoo.utils import AnomalyZooError

# ------------------------------------------------------------------------------ parameters
BAD = {
    "ocsvm": [("nu", 1.5), ("nu", 0.0), ("gamma", 0.0), ("image_size", 8), ("backbone", "vgg16"),
              ("pretrained", "yes"), ("layers", "stage3")],
    "deep_svdd": [("objective", "hard"), ("nu", 1.5), ("epochs", -1), ("lr", 0.0), ("image_size", 30),
                  ("channels", (8,)), ("channels", (8, 0)), ("pretrain_epochs", -1), ("warm_up", -1), ("eps", 0.0),
                  ("rep_dim", 0), ("weight_decay", -1.0), ("batch_size", 0), ("lr_milestone", 0),
                  ("pretrain_weight_decay", -1.0), ("bias", 1)],
    "patch_svdd": [("patch_size", 48), ("strides", (3, 4)), ("strides", (8,)), ("epochs", 0), ("lr", 0.0),
                   ("lam", -1.0), ("rgb_jitter", -1.0), ("pixel_noise", -0.1), ("pairs_per_image", 0), ("dim", 0),
                   ("image_size", 16)],
    "fcdd": [("epochs", -1), ("lr", 0.0), ("gauss_std", 0.0), ("p_anomalous", 1.5), ("p_anomalous", 0.0),
             ("synthesis", "scratch"), ("optimizer", "rmsprop"), ("lr_decay", 0.0), ("lr_decay", 1.5),
             ("layers", ("stage2", "stage3")), ("hidden", 0), ("batch_size", 1), ("weight_decay", -1.0)],
}


@pytest.mark.parametrize("name,key,value", [(n, k, v) for n, bad in BAD.items() for k, v in bad])
def test_out_of_range_parameters_raise_at_fit(name, key, value, tiny):
    train, _ = tiny
    det = az.create(name, preset="quick", **{key: value})  # stored as given
    with pytest.raises(AnomalyZooError, match=f"{name}: {key}="):
        det.fit(train)


def test_every_one_class_model_lists_its_deviations():
    for card in az.list_models(family="one_class"):
        assert card.deviations, card.name
        assert all(f"- {d}" in card.deviations_markdown() for d in card.deviations)


# ------------------------------------------------------------------------------ synthesis
@pytest.mark.parametrize("kind", sorted(synthesis.KINDS))
def test_synthesis_masks_labels_and_seeding(kind, tiny):
    x, _ = tiny
    g = torch.Generator().manual_seed(0)
    out, masks, labels = synthesis.synthesize(x, kind, g, p=1.0)
    assert out.shape == x.shape and masks.shape == (len(x), 64, 64) and labels.shape == (len(x),)
    assert out.min() >= 0 and out.max() <= 1
    assert set(masks.unique().tolist()) <= {0.0, 1.0}
    assert torch.equal(labels, (masks.flatten(1).amax(1) > 0).float())
    assert labels.sum() >= 1
    # pixels outside the mask are untouched
    outside = (masks == 0)[:, None].expand_as(x)
    assert torch.equal(out[outside], x[outside])
    # same generator seed, same result
    again = synthesis.synthesize(x, kind, torch.Generator().manual_seed(0), p=1.0)
    assert torch.equal(again[0], out) and torch.equal(again[1], masks)
    # p = 0 leaves everything clean
    clean, m0, y0 = synthesis.synthesize(x, kind, torch.Generator().manual_seed(0), p=0.0)
    assert torch.equal(clean, x) and m0.sum() == 0 and y0.sum() == 0


def test_confetti_is_smoothed_rotated_and_added():
    """The reference code's confetti: at least one blob per layer, blobs rotated (not only axis-aligned),
    the noise smoothed (soft edges) and added to the image, not pasted over it."""
    x = torch.full((8, 3, 128, 128), 0.3)
    out, masks = synthesis.confetti(x, torch.Generator().manual_seed(0))
    assert (masks.flatten(1).sum(1) > 0).all()
    diff = (out - x)[:, 0]
    values = diff[masks.bool()]
    # smoothed: many intermediate values, not a few flat colours
    assert len(torch.unique((values * 255).round())) > 50
    # added, so the change is clipped only at 0 and 1: a grey image brightens by at most 0.7
    assert float(diff.max()) <= 0.7 + 1e-6
    # rotated: some blob's support is not a union of axis-aligned boxes -> check a diagonal edge exists
    hard, _ = synthesis.confetti(x, torch.Generator().manual_seed(1), smooth=0.0)
    m = (hard != x).any(1)
    rows = m.any(2).sum(1).float() * m.any(1).sum(1).float()  # bounding-box area, an upper bound
    assert bool((m.flatten(1).sum(1).float() < 0.95 * rows).any())


def test_synthesis_is_separate_from_the_test_defects():
    tree = ast.parse(inspect.getsource(synthesis))
    imported = [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
    imported += [n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
    assert not any("defects" in m or m.startswith(".data") or "anomaly_zoo.data" in m for m in imported), imported
    with pytest.raises(ValueError, match="unknown synthesis"):
        synthesis.synthesize(torch.rand(2, 3, 8, 8), "scratch")


# ------------------------------------------------------------------------------ OC-SVM
def test_ocsvm_torch_decision_function_equals_sklearn(tiny):
    from sklearn.svm import OneClassSVM

    train, test = tiny
    det = az.create("ocsvm", preset="quick", pretrained=False).fit(train)
    z_train = torch.cat([det.features(det._prepare(train, "x"))]).double().numpy()
    z_test = det.features(det._prepare(test, "x")).double().numpy()
    ref = OneClassSVM(kernel="rbf", nu=det.nu, gamma=float(det.gamma_)).fit(z_train)
    ours = det.decision_function(test).numpy()
    np.testing.assert_allclose(ours, ref.decision_function(z_test), rtol=1e-6, atol=1e-9)
    assert torch.equal(det.predict(test).scores, -torch.from_numpy(ours).float())


def test_ocsvm_median_heuristic():
    z = torch.tensor([[0.0, 0.0], [3.0, 0.0], [0.0, 4.0]])  # squared distances 9, 16, 25
    assert ocsvm.median_gamma(z) == pytest.approx(1 / 16)


def test_ocsvm_pretrained_beats_random_backbone():
    """Digits, normal class 5 (as tests/test_models.py), data seeds 0, 1, 2. Measured image AUROC:
    pretrained 0.907 / 0.921 / 0.978 (mean 0.935), random backbone 0.873 / 0.870 / 0.869 (mean 0.871)."""
    aurocs = {True: [], False: []}
    for seed in (0, 1, 2):
        ds = az.data.load("digits", normal_class=5, quick=True, seed=seed)
        for pretrained in (True, False):
            pred = az.create("ocsvm", preset="quick", pretrained=pretrained).fit(ds.train_images).predict(ds.test_images)
            aurocs[pretrained].append(az.metrics.image_auroc(pred.scores, ds.test_labels))
    assert min(aurocs[True]) >= 0.87, aurocs  # lowest seed 0.907 minus a margin of 0.04
    assert np.mean(aurocs[True]) >= np.mean(aurocs[False]) + 0.03, aurocs  # measured difference 0.064


# ------------------------------------------------------------------------------ Deep SVDD
def test_deep_svdd_network_has_no_bias_and_centre_has_no_near_zero_coordinates():
    ds = az.data.load("digits", normal_class=1, quick=True)
    det = az.create("deep_svdd", preset="quick", epochs=2, pretrain_epochs=2).fit(ds.train_images)
    for m in det.net_.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            assert m.bias is None
        if isinstance(m, nn.BatchNorm2d):
            assert not m.affine
    assert not [n for n, _ in det.named_parameters() if "bias" in n]
    assert (det.center_.abs() >= det.eps).all()
    assert "center_" not in dict(det.named_parameters())  # fixed, not learned


def test_init_center_pushes_small_coordinates_out():
    z = torch.tensor([[0.05, -0.02, 1.0], [0.03, -0.06, 3.0]])
    assert torch.allclose(deep_svdd.init_center(z, eps=0.1), torch.tensor([0.1, -0.1, 2.0]))


def test_deep_svdd_trivial_solution_needs_a_bias():
    """Prop. 2 by construction: with a bias, zero weights + bias = c give loss 0 and a useless detector;
    without one, zero weights give phi = 0 != c (the centre has no zero coordinate), so the loss stays > 0."""
    ds = az.data.load("digits", normal_class=2, quick=True)
    x = ds.train_images
    for bias in (True, False):
        det = az.create("deep_svdd", preset="quick", epochs=1, pretrain_epochs=0, bias=bias).fit(x)
        with torch.no_grad():
            det.net_.fc.weight.zero_()
            if bias:
                det.net_.fc.bias.copy_(det.center_)
        det.eval()
        with torch.no_grad():
            loss = float(det._loss(x))
        if bias:
            assert loss == pytest.approx(0.0, abs=1e-10)
            pred = det.predict(ds.test_images)
            assert az.metrics.image_auroc(pred.scores, ds.test_labels) == pytest.approx(0.5)
        else:
            assert loss >= det.rep_dim * det.eps**2 - 1e-6


def test_deep_svdd_soft_boundary_radius_is_the_nu_quantile():
    """Eq. (3)'s nu-property. R is the (1 - nu)-quantile of the training distances at its last update
    (the end of the last epoch, so the final network's): exactly nu of the training images lie outside.
    On *fresh* normal images (the normal test digits, never trained on) the share outside is larger:
    the sphere is fitted to 80 training images. Measured with nu = 0.1 on class 0, data seeds 0, 1, 2:
    training 0.10 / 0.10 / 0.10; fresh normal 0.40 / 0.17 / 0.37 (30 images each); anomalies 1.0 / 1.0 / 1.0."""
    ds = az.data.load("digits", normal_class=0, quick=True)
    det = az.create("deep_svdd", preset="quick", objective="soft-boundary", nu=0.1, warm_up=2).fit(ds.train_images)
    d = det._train_dists(det._prepare(ds.train_images, "x").to(det.device_))
    assert float(det.radius_) == pytest.approx(float(torch.quantile(d.sqrt().double(), 0.9)), rel=1e-5)
    outside = float((det.predict(ds.train_images).scores > 0).float().mean())
    assert abs(outside - 0.1) <= 1.5 / len(ds.train_images) + 1e-6  # the quantile itself, up to one image
    fresh = float((det.predict(ds.test_images[ds.test_labels == 0]).scores > 0).float().mean())
    anomalies = float((det.predict(ds.test_images[ds.test_labels == 1]).scores > 0).float().mean())
    assert 0.05 <= fresh <= 0.5, fresh  # measured 0.17-0.40: about nu plus the generalisation gap
    assert anomalies >= 0.9, anomalies  # measured 1.0: the other digits lie outside
    assert anomalies >= fresh + 0.4, (fresh, anomalies)


def test_deep_svdd_beats_the_untrained_network():
    """Digits, normal class 8 (as tests/test_models.py). Measured image AUROC over data seeds 0, 1, 2:
    trained 0.938 / 0.904 / 0.960; the untrained network (random init, no pretraining, lr 1e-12)
    0.662 / 0.833 / 0.699."""
    ds = az.data.load("digits", normal_class=8, quick=True)
    auroc = {}
    for label, kw in (("trained", {}), ("untrained", dict(pretrain_epochs=0, epochs=1, lr=1e-12))):
        pred = az.create("deep_svdd", preset="quick", **kw).fit(ds.train_images).predict(ds.test_images)
        auroc[label] = az.metrics.image_auroc(pred.scores, ds.test_labels)
    assert auroc["trained"] >= 0.87, auroc  # lowest seed 0.904 minus a margin of 0.03
    assert auroc["trained"] >= auroc["untrained"] + 0.15, auroc  # seed 0: 0.938 vs 0.662


# ------------------------------------------------------------------------------ Patch SVDD
def test_patch_svdd_relative_position_labels_hand_case():
    assert patch_svdd.POSITIONS[0] == (-1, -1) and patch_svdd.POSITIONS[4] == (0, 1)
    assert patch_svdd.POSITIONS[6] == (1, 0) and len(set(patch_svdd.POSITIONS)) == 8
    g = torch.Generator().manual_seed(0)
    k, size = 32, 128
    t1, l1, t2, l2, label = patch_svdd.sample_position_pairs(2000, size, size, k, g)
    dirs = torch.tensor(patch_svdd.POSITIONS)[label]
    for a1, a2, d in ((t1, t2, dirs[:, 0]), (l1, l2, dirs[:, 1])):
        assert (a1 >= 0).all() and (a1 <= size - k).all() and (a2 >= 0).all() and (a2 <= size - k).all()
        step = a2 - a1
        assert (step[d == 0] == 0).all()
        # p2 moves 3K/4..K-1 px in its direction, unless the image border clipped it (reference code)
        free = (d != 0) & (a2 > 0) & (a2 < size - k)
        assert torch.equal(torch.sign(step[free]), d[free])
        assert step[free].abs().min() >= 3 * k // 4 and step[free].abs().max() < k
        clipped = (d != 0) & ~free
        assert (torch.sign(step[clipped]) != -d[clipped]).all()  # never the wrong way
    assert set(label.tolist()) == set(range(8))
    assert (t1 < k).any() and (t1 > size - 2 * k).any()  # p1 anywhere, as in the reference code
    # a hand case: a patch right below p1 is label 6, one up-left is label 0
    img = torch.zeros(1, 3, 96, 96)
    img[0, :, 40:48, 40:48] = 1.0
    p = patch_svdd.crop(img, torch.tensor([36]), torch.tensor([36]), 16)
    assert p.shape == (1, 3, 16, 16) and p[0, 0, 4, 4] == 1 and p[0, 0, 12, 12] == 0


def test_patch_svdd_jitter_pairs_never_coincide():
    g = torch.Generator().manual_seed(0)
    t1, l1, t2, l2 = patch_svdd.sample_jitter_pairs(2000, 64, 64, 32, g)
    assert ((t1 != t2) | (l1 != l2)).all()
    assert ((t2 - t1).abs() <= 1).all() and ((l2 - l1).abs() <= 1).all()
    assert t2.min() >= 0 and t2.max() <= 32 and l2.min() >= 0 and l2.max() <= 32


def test_patch_svdd_classifier_last_layer_is_the_reference_normalised_linear():
    c = patch_svdd.PositionClassifier(16)
    last = c.net[-1]
    assert isinstance(last, patch_svdd.NormalizedLinear)
    assert torch.allclose(last.weight.norm(dim=0), torch.ones(128))
    assert "net.4.weight" not in dict(c.named_parameters()) and "net.4.bias" in dict(c.named_parameters())


def test_patch_svdd_dense_embeddings_equal_patchwise():
    torch.manual_seed(0)
    enc = patch_svdd.HierEncoder(patch_svdd.SmallEncoder(16, 8), 8).eval()
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        fs = enc.small(x)
        fb = enc.dense(fs)
        for top, left in ((0, 0), (8, 16), (32, 32)):
            small = enc.small(x[:, :, top : top + 16, left : left + 16])[0, :, 0, 0]
            big = enc(x[:, :, top : top + 32, left : left + 32])[0, :, 0, 0]
            assert torch.allclose(fs[0, :, top // 2, left // 2], small, atol=1e-5)
            assert torch.allclose(fb[0, :, top // 2, left // 2], big, atol=1e-5)


def test_patch_svdd_training_images_score_zero_everywhere(tiny):
    """Eq. (6): every patch of a training image is in the memory, so its distance to the nearest
    normal patch, and the map, is 0 (up to float error); other images are not."""
    train, test = tiny
    det = az.create("patch_svdd", preset="quick", epochs=1).fit(train)
    seen, unseen = det.predict(train[:2]).maps, det.predict(test).maps
    assert float(seen.max()) <= 1e-3 * float(unseen.mean())


def test_patch_svdd_training_beats_the_untrained_encoder(brick):
    """Brick (as tests/test_models.py). Measured over data seeds 0, 1, 2 (quick preset):
    trained image AUROC 0.941 / 0.858 / 0.915, pixel AUROC 0.980 / 0.980 / 0.979, AUPRO
    0.872 / 0.857 / 0.905; untrained encoder (lr 1e-12): image AUROC 0.811 / 0.778 / 0.864, pixel
    AUROC 0.974 / 0.975 / 0.976, AUPRO 0.842 / 0.834 / 0.880. A random patch encoder with the
    nearest-normal-patch distance already localises; training is what lifts detection."""
    report = {}
    for label, kw in (("trained", {}), ("untrained", dict(epochs=1, lr=1e-12))):
        pred = az.create("patch_svdd", preset="quick", **kw).fit(brick.train_images).predict(brick.test_images)
        report[label] = az.metrics.evaluate(pred, brick.test_labels, brick.test_masks)
    trained, untrained = report["trained"], report["untrained"]
    assert trained["pixel_auroc"] >= 0.96, report  # lowest seed 0.979 minus a margin of 0.02
    assert trained["image_auroc"] >= 0.83, report  # lowest seed 0.858 minus a margin of 0.03
    assert trained["image_auroc"] >= untrained["image_auroc"] + 0.07, report  # seed 0: 0.941 vs 0.811
    assert trained["aupro"] >= untrained["aupro"] + 0.01, report  # seed 0: 0.872 vs 0.842


# ------------------------------------------------------------------------------ FCDD
def test_fcdd_pseudo_huber_and_loss_hand_case():
    phi = torch.tensor([0.0, math.sqrt(3.0), -math.sqrt(8.0)])
    assert torch.allclose(fcdd.pseudo_huber(phi), torch.tensor([0.0, 1.0, 2.0]))
    a = torch.ones(2, 3, 3)  # mean A = 1 for both images
    assert float(fcdd.fcdd_loss(a, torch.tensor([0.0, 0.0]))) == pytest.approx(1.0)
    assert float(fcdd.fcdd_loss(a, torch.tensor([1.0, 1.0]))) == pytest.approx(-math.log(1 - math.exp(-1)))
    mixed = float(fcdd.fcdd_loss(a, torch.tensor([0.0, 1.0])))
    assert mixed == pytest.approx((1 - math.log(1 - math.exp(-1))) / 2)
    # an anomalous image with a zero heatmap is penalised heavily, not with inf/NaN
    assert math.isfinite(float(fcdd.fcdd_loss(torch.zeros(1, 2, 2), torch.tensor([1.0])))) is True


def test_fcdd_receptive_field_and_gaussian_upsampling():
    lite = create_backbone("efficientnet_lite0", pretrained=False, layers=["stage3"])
    assert lite.receptive_field("stage3") == (67, 8, 7.0)
    assert lite.receptive_field("stage3", extra=fcdd.HEAD_GEOMETRY) == (83, 8, 7.0)  # + the head's 3x3
    res = create_backbone("resnet18", pretrained=False, layers=["layer2"])
    assert res.receptive_field("layer2") == (99, 8, 0.0)
    k = ops.gaussian_kernel2d(83, 7.0)
    assert k.shape == (83, 83) and float(k.sum()) == pytest.approx(1.0, abs=1e-5)
    assert torch.allclose(k, k.T) and torch.allclose(k, k.flip(0))
    assert int(k.argmax()) == 41 * 83 + 41
    # an impulse at heatmap cell (2, 5) peaks at its receptive field's centre c + i*j
    a = torch.zeros(1, 16, 16)
    a[0, 2, 5] = 1.0
    up = fcdd.receptive_upsample(a, (128, 128), 83, 8, 7.0, 7.0)
    assert up.shape == (1, 128, 128)
    peak = divmod(int(up[0].argmax()), 128)
    assert peak == (7 + 2 * 8, 7 + 5 * 8)


def test_fcdd_reads_its_receptive_field_from_the_backbone(tiny):
    train, _ = tiny
    det = az.create("fcdd", preset="quick", pretrained=False, epochs=1).fit(train)
    assert det.diagnostics_["receptive_field"] == [83, 8, 7.0] and det.tap_ == "stage3"
    res = az.create("fcdd", preset="quick", backbone="resnet18", pretrained=False, epochs=1).fit(train)
    assert res.tap_ == "layer2" and res.diagnostics_["receptive_field"] == [115, 8, 0.0]  # 99 + 2 * 8 for the head's 3x3


def test_fcdd_localises_defects_better_than_its_baselines(brick):
    """Real localisation on brick: the map is higher inside the defect masks than outside, for the pixels
    (pixel AUROC) and per defect image (mean inside > mean outside), well above the untrained head and
    the random backbone. Measured over data seeds 0, 1, 2 (quick preset):
    trained: pixel AUROC 0.983 / 0.981 / 0.986, image AUROC 0.895 / 0.913 / 0.919, AUPRO 0.896 / 0.779 /
    0.914, defect images with mean inside > outside 1.00 / 0.94 / 1.00 (of 36);
    untrained head (lr 1e-12): pixel AUROC 0.781 / 0.709 / 0.800, image AUROC 0.515 / 0.526 / 0.537,
    inside > outside 0.92 / 0.92 / 0.89; random backbone: pixel AUROC 0.835 / 0.740 / 0.739, image
    AUROC 0.539 / 0.565 / 0.603."""
    report, masks = {}, brick.test_masks > 0.5
    for label, kw in (("trained", {}), ("untrained head", dict(epochs=1, lr=1e-12)),
                      ("random backbone", dict(pretrained=False))):
        pred = az.create("fcdd", preset="quick", **kw).fit(brick.train_images).predict(brick.test_images)
        report[label] = az.metrics.evaluate(pred, brick.test_labels, brick.test_masks)
        inside = [float(m[k].mean() > m[~k].mean()) for m, k in zip(pred.maps, masks) if k.any()]
        report[label]["inside > outside"] = float(np.mean(inside))
    trained = report["trained"]
    assert trained["pixel_auroc"] >= 0.96, report  # lowest seed 0.981 minus a margin of 0.02
    assert trained["pixel_auroc"] >= report["untrained head"]["pixel_auroc"] + 0.1, report
    assert trained["pixel_auroc"] >= report["random backbone"]["pixel_auroc"] + 0.1, report
    assert trained["image_auroc"] >= report["untrained head"]["image_auroc"] + 0.2, report
    assert trained["inside > outside"] >= 0.9, report  # lowest seed 0.94
