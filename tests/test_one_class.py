"""One-class family: OC-SVM, Deep SVDD, Patch SVDD, FCDD, and the training-time anomaly synthesis.

Hand cases for each method's equations, the properties the papers insist on (bias-free
Deep SVDD, no near-zero centre coordinates), exactness of the OC-SVM's torch decision
function against scikit-learn, and the digits quality thresholds on a subset of classes
(the ten-class means are measured in the chapter and reported in the issue)."""
from __future__ import annotations

import ast
import inspect
import math

import numpy as np
import pytest
import torch
from torch import nn

import anomaly_zoo as az
from anomaly_zoo import synthesis
from anomaly_zoo.models.one_class import deep_svdd, fcdd, ocsvm, patch_svdd


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
    ref = OneClassSVM(kernel="rbf", nu=det.nu, gamma=det.meta_["gamma"]).fit(z_train)
    ours = det.decision_function(test).numpy()
    np.testing.assert_allclose(ours, ref.decision_function(z_test), rtol=1e-6, atol=1e-9)
    assert torch.equal(det.predict(test).scores, -torch.from_numpy(ours).float())


def test_ocsvm_median_heuristic():
    z = torch.tensor([[0.0, 0.0], [3.0, 0.0], [0.0, 4.0]])  # squared distances 9, 16, 25
    assert ocsvm.median_gamma(z) == pytest.approx(1 / 16)


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


def test_deep_svdd_soft_boundary_radius():
    ds = az.data.load("digits", normal_class=0, quick=True)
    det = az.create("deep_svdd", preset="quick", objective="soft-boundary", nu=0.1, warm_up=2).fit(ds.train_images)
    assert det.radius_ > 0
    inside = det.predict(ds.train_images).scores <= 1e-6
    assert inside.float().mean() >= 0.85  # about 1 - nu of the training data inside the sphere


@pytest.mark.slow
@pytest.mark.parametrize("name", ["deep_svdd", "ocsvm"])
def test_digits_one_vs_rest_quality(name):
    """Three classes here (time); the ten-class mean (>= 0.85 required) is measured in the chapter."""
    aurocs = []
    for k in (1, 5, 8):
        ds = az.data.load("digits", normal_class=k, quick=True)
        pred = az.create(name, preset="quick").fit(ds.train_images).predict(ds.test_images)
        aurocs.append(az.metrics.image_auroc(pred.scores, ds.test_labels))
    assert np.mean(aurocs) >= 0.85, aurocs


# ------------------------------------------------------------------------------ Patch SVDD
def test_patch_svdd_relative_position_labels_hand_case():
    assert patch_svdd.POSITIONS[0] == (-1, -1) and patch_svdd.POSITIONS[4] == (0, 1)
    assert patch_svdd.POSITIONS[6] == (1, 0) and len(set(patch_svdd.POSITIONS)) == 8
    g = torch.Generator().manual_seed(0)
    k = 32
    t1, l1, t2, l2, label = patch_svdd.sample_position_pairs(500, 128, 128, k, g)
    dirs = torch.tensor(patch_svdd.POSITIONS)[label]
    dy, dx = t2 - t1, l2 - l1
    assert torch.equal(torch.sign(dy), dirs[:, 0]) and torch.equal(torch.sign(dx), dirs[:, 1])
    moved = torch.cat([dy[dirs[:, 0] != 0].abs(), dx[dirs[:, 1] != 0].abs()])
    assert moved.min() >= 3 * k // 4 and moved.max() < k
    assert (t2 >= 0).all() and (t2 <= 128 - k).all() and (l2 >= 0).all() and (l2 <= 128 - k).all()
    assert set(label.tolist()) == set(range(8))
    # a hand case: a patch right below p1 is label 6, one up-left is label 0
    img = torch.zeros(1, 3, 96, 96)
    img[0, :, 40:48, 40:48] = 1.0
    p = patch_svdd.crop(img, torch.tensor([36]), torch.tensor([36]), 16)
    assert p.shape == (1, 3, 16, 16) and p[0, 0, 4, 4] == 1 and p[0, 0, 12, 12] == 0


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


def test_patch_svdd_distribute_and_nn_distance():
    scores = torch.tensor([[[1.0, 3.0]]])  # two patches of 4 px at stride 2 along a row
    m = patch_svdd.distribute(scores, (4, 6), 4, 2)
    assert torch.allclose(m[0, 0], torch.tensor([1.0, 1.0, 2.0, 2.0, 3.0, 3.0]))
    q = torch.tensor([[0.0, 0.0], [3.0, 4.0]])
    mem = torch.tensor([[0.0, 1.0], [3.0, 0.0]])
    assert torch.allclose(patch_svdd.PatchSVDD.nn_distance(q, mem), torch.tensor([1.0, 4.0]))


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
    assert fcdd.receptive_field(fcdd.backbone_layers("efficientnet_lite0", "stage3")) == (67, 8, 7.0)
    assert fcdd.receptive_field(fcdd.backbone_layers("resnet18", "layer2")) == (99, 8, 0.0)
    k = fcdd.gaussian_kernel(83, 7.0)
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


def test_fcdd_trains_on_synthesis_and_localises(tiny):
    train, test = tiny
    det = az.create("fcdd", preset="quick", pretrained=False, epochs=2).fit(train)
    assert det.meta_["receptive_field"] == [83, 8, 7.0]
    pred = det.predict(test)
    assert pred.maps.shape == (3, 64, 64) and (pred.maps >= 0).all() and (pred.scores >= 0).all()
