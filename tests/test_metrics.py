"""Tests of anomaly_zoo.metrics against independent computations.

Image-level metrics and pixel AUROC are checked against scikit-learn; AUPRO against
hand-computed cases and a brute-force reference written here from the definition
(a Python loop over every distinct threshold).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest
import torch
from scipy import ndimage
from sklearn.metrics import average_precision_score, f1_score, precision_recall_curve, roc_auc_score
from sklearn.metrics import roc_curve as sk_roc_curve

import anomaly_zoo.metrics as M
from anomaly_zoo.utils import AnomalyZooError

# ----------------------------------------------------------------------------- helpers

trapezoid = getattr(np, "trapezoid", None) or np.trapz  # numpy < 2 has only trapz


def sk_f1_max(scores, labels) -> float:
    precision, recall, _ = precision_recall_curve(labels, scores)
    with np.errstate(invalid="ignore", divide="ignore"):
        f1 = 2 * precision * recall / (precision + recall)
    return float(np.nanmax(f1))


def random_case(kind: str, seed: int):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(2, 300))
    labels = rng.random(n) < rng.uniform(0.1, 0.9)
    labels[0], labels[1] = True, False  # both classes present
    if kind == "continuous":
        scores = rng.standard_normal(n) + 0.8 * labels
    elif kind == "integer":  # heavy ties
        scores = rng.integers(0, 4, n) + (rng.random(n) < 0.3) * labels
    elif kind == "rounded":
        scores = np.round(rng.standard_normal(n) + labels, 1)
    else:  # "constant": everything tied
        scores = np.full(n, 3.0)
    return scores, labels.astype(int)


def trapezoid_upto(x, y, x_max: float) -> float:
    """Trapezoid rule from x[0] up to x_max, interpolating y linearly at x_max (MVTec's rule)."""
    area = 0.0
    for i in range(1, len(x)):
        if x[i] <= x_max:
            area += (x[i] - x[i - 1]) * (y[i] + y[i - 1]) / 2
        else:
            y_max = y[i - 1] + (y[i] - y[i - 1]) * (x_max - x[i - 1]) / (x[i] - x[i - 1])
            area += (x_max - x[i - 1]) * (y_max + y[i - 1]) / 2
            break
    return area


def brute_aupro(maps, masks, fpr_limit: float = 0.3) -> float:
    """AUPRO straight from the definition: a loop over every distinct threshold."""
    maps = np.asarray(maps, dtype=np.float64)
    masks = np.asarray(masks) > 0
    regions = []
    for img_map, img_mask in zip(maps, masks):
        lab, n = ndimage.label(img_mask, structure=np.ones((3, 3)))
        regions += [img_map[lab == r] for r in range(1, n + 1)]
    normal = maps[~masks]
    fpr, pro = [0.0], [0.0]
    for t in np.unique(maps)[::-1]:
        fpr.append(np.mean(normal >= t))
        pro.append(np.mean([np.mean(r >= t) for r in regions]))
    return trapezoid_upto(fpr, pro, fpr_limit) / fpr_limit


def blob_case(seed: int, n: int = 4, size: int = 24, quantise: float | None = None):
    """Random smooth maps and blob-shaped masks (some images normal, regions of many sizes)."""
    rng = np.random.default_rng(seed)
    noise = ndimage.gaussian_filter(rng.standard_normal((n, size, size)), (0, 2, 2))
    masks = noise > rng.uniform(0.15, 0.35)
    masks[0] = False  # one fully normal image
    maps = ndimage.gaussian_filter(rng.standard_normal((n, size, size)), (0, 1, 1)) + 0.4 * masks
    if quantise:
        maps = np.round(maps / quantise) * quantise
    assert masks.any() and (~masks).any()
    return maps, masks


# ----------------------------------------------------------------------------- image level vs scikit-learn


@pytest.mark.parametrize("kind", ["continuous", "integer", "rounded", "constant"])
@pytest.mark.parametrize("seed", range(6))
def test_image_metrics_match_sklearn(kind, seed):
    scores, labels = random_case(kind, seed)
    assert M.image_auroc(scores, labels) == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)
    assert M.average_precision(scores, labels) == pytest.approx(average_precision_score(labels, scores), abs=1e-12)
    f1, thr = M.f1_max(scores, labels, return_threshold=True)
    assert f1 == pytest.approx(sk_f1_max(scores, labels), abs=1e-12)
    assert M.f1_max(scores, labels) == f1
    # the threshold really reaches that F1 with the rule "score >= t"
    assert f1_score(labels, scores >= thr) == pytest.approx(f1, abs=1e-12)
    assert thr in scores


@pytest.mark.parametrize("kind", ["continuous", "integer", "constant"])
def test_roc_curve_matches_sklearn_and_auroc(kind):
    scores, labels = random_case(kind, 7)
    fpr, tpr, thr = M.roc_curve(scores, labels)
    sk_fpr, sk_tpr, sk_thr = sk_roc_curve(labels, scores, drop_intermediate=False)
    np.testing.assert_allclose(fpr, sk_fpr, atol=1e-15)
    np.testing.assert_allclose(tpr, sk_tpr, atol=1e-15)
    np.testing.assert_array_equal(thr[1:], sk_thr[1:])
    assert thr[0] == np.inf and (fpr[0], tpr[0]) == (0.0, 0.0) and (fpr[-1], tpr[-1]) == (1.0, 1.0)
    # one point per distinct score: ties are a single step
    assert len(thr) == len(np.unique(scores)) + 1
    assert M.image_auroc(scores, labels) == pytest.approx(trapezoid(tpr, fpr), abs=1e-12)


def test_ties_are_half_credit_and_one_step():
    # an anomaly tied with a normal image: neither order, half credit
    scores, labels = [0.0, 1.0, 1.0, 2.0], [0, 0, 1, 1]
    assert M.image_auroc(scores, labels) == pytest.approx(0.875)
    fpr, tpr, thr = M.roc_curve(scores, labels)
    np.testing.assert_allclose(fpr, [0, 0, 0.5, 1])
    np.testing.assert_allclose(tpr, [0, 0.5, 1, 1])
    np.testing.assert_allclose(thr, [np.inf, 2, 1, 0])


def test_torch_numpy_and_lists_agree():
    scores, labels = random_case("rounded", 3)
    ref = M.image_auroc(scores, labels)
    assert M.image_auroc(torch.tensor(scores), torch.tensor(labels, dtype=torch.bool)) == ref
    assert M.image_auroc(torch.tensor(scores, dtype=torch.bfloat16), labels) == pytest.approx(
        roc_auc_score(labels, torch.tensor(scores, dtype=torch.bfloat16).float().numpy())
    )
    assert M.image_auroc(list(scores), list(labels)) == ref
    assert M.average_precision(torch.tensor(scores), torch.tensor(labels)) == M.average_precision(scores, labels)


def test_perfect_and_inverted_scores():
    labels = np.array([0, 0, 0, 1, 1])
    scores = np.array([0.1, 0.2, 0.3, 0.8, 0.9])
    assert M.image_auroc(scores, labels) == 1.0
    assert M.image_auroc(-scores, labels) == 0.0
    assert M.average_precision(scores, labels) == 1.0
    assert M.f1_max(scores, labels, return_threshold=True) == (1.0, 0.8)
    # all anomalous: AP and F1 are defined (1.0); AUROC is not
    assert M.average_precision(scores, np.ones(5)) == 1.0
    assert M.f1_max(scores, np.ones(5)) == 1.0


# ----------------------------------------------------------------------------- pixel AUROC


@pytest.mark.parametrize("quantise", [None, 0.25])
def test_pixel_auroc_matches_sklearn(quantise):
    maps, masks = blob_case(1, n=12, size=48, quantise=quantise)
    ref = roc_auc_score(masks.ravel(), maps.ravel())
    assert M.pixel_auroc(maps, masks) == pytest.approx(ref, abs=1e-12)
    assert M.pixel_auroc(torch.from_numpy(maps).float(), torch.from_numpy(masks)) == pytest.approx(ref, abs=1e-6)
    # [N, 1, H, W] and 0/255 masks are accepted too
    assert M.pixel_auroc(maps[:, None], (masks * 255).astype(np.uint8)[:, None]) == pytest.approx(ref, abs=1e-12)


# ----------------------------------------------------------------------------- AUPRO, by hand


def test_aupro_perfect_map():
    _, masks = blob_case(2)
    assert M.aupro(masks.astype(float), masks) == pytest.approx(1.0, abs=1e-12)
    rng = np.random.default_rng(0)
    maps = np.where(masks, rng.uniform(0.6, 1.0, masks.shape), rng.uniform(0.0, 0.5, masks.shape))
    assert M.aupro(maps, masks) == pytest.approx(1.0, abs=1e-12)
    assert M.aupro(maps, masks, fpr_limit=1.0) == pytest.approx(1.0, abs=1e-12)


@pytest.mark.parametrize("fpr_limit", [0.05, 0.3, 1.0])
def test_aupro_constant_map(fpr_limit):
    # one threshold: (0, 0) -> (1, 1); the diagonal gives area L^2 / 2, normalised L / 2
    _, masks = blob_case(3)
    assert M.aupro(np.full(masks.shape, 0.7), masks, fpr_limit=fpr_limit) == pytest.approx(fpr_limit / 2, abs=1e-12)
    assert M.aupro(np.zeros(masks.shape), masks) == pytest.approx(0.15, abs=1e-12)


def test_aupro_half_region_without_false_positives():
    # one 2x2 region in a 6x6 image; two of its pixels score above every normal pixel,
    # the other two tie with the 17th-highest of the 32 normal pixels (scores 0..31)
    masks = np.zeros((1, 6, 6), dtype=bool)
    masks[0, 1:3, 1:3] = True
    maps = np.zeros((1, 6, 6))
    maps[0][~masks[0]] = np.arange(32)
    maps[0, 1, 1:3] = 100.0
    maps[0, 2, 1:3] = 16.0
    # PRO = 0.5 from FPR 0 until FPR 15/32; the tie at score 16 is one diagonal step to
    # (16/32, 1); then PRO = 1 up to FPR 1.
    assert M.aupro(maps, masks) == pytest.approx(0.5, abs=1e-12)
    expected_full = 0.5 * 15 / 32 + (1 / 32) * (0.5 + 1.0) / 2 + 1.0 * 16 / 32
    assert expected_full == 0.7578125
    assert M.aupro(maps, masks, fpr_limit=1.0) == pytest.approx(expected_full, abs=1e-12)


def test_aupro_weights_regions_pixel_auroc_weights_pixels():
    masks = np.zeros((1, 20, 20), dtype=bool)
    masks[0, 2:12, 2:12] = True  # big region: 100 pixels
    masks[0, 16:18, 16:18] = True  # small region: 4 pixels
    big, small = np.zeros_like(masks), np.zeros_like(masks)
    big[0, 2:12, 2:12] = True
    small[0, 16:18, 16:18] = True
    # normal pixels score 0; the detected region 1, the missed one -1 (below every normal pixel)
    finds_big = big * 1.0 - small * 1.0
    finds_small = small * 1.0 - big * 1.0
    # AUPRO: PRO = 0.5 (one of two regions) until FPR 1, in both cases
    assert M.aupro(finds_big, masks) == pytest.approx(0.5, abs=1e-12)
    assert M.aupro(finds_small, masks) == pytest.approx(0.5, abs=1e-12)
    # pixel AUROC: 100 of 104 anomalous pixels above all normals, or only 4 of them
    assert M.pixel_auroc(finds_big, masks) == pytest.approx(100 / 104, abs=1e-12)
    assert M.pixel_auroc(finds_small, masks) == pytest.approx(4 / 104, abs=1e-12)
    assert M.pixel_auroc(finds_big, masks) == pytest.approx(roc_auc_score(masks.ravel(), finds_big.ravel()))


def test_aupro_regions_are_8_connected_and_per_image():
    # a diagonal pair (one region with 8-connectivity, two with 4) and a separate pair
    masks = np.zeros((1, 6, 6), dtype=bool)
    masks[0, 1, 1] = masks[0, 2, 2] = True
    masks[0, 4, 3:5] = True
    maps = np.where(masks, -1.0, 0.0)
    maps[0, 1, 1] = 1.0  # only one pixel of the diagonal pair is found
    # 8-connected: PRO = mean(1/2, 0) = 0.25 (4-connected would give mean(1, 0, 0) = 1/3)
    assert M.aupro(maps, masks) == pytest.approx(0.25, abs=1e-12)
    # the same place in two images is two regions: 1 pixel in image 0 (found), 3 in image 1
    masks = np.zeros((2, 5, 5), dtype=bool)
    masks[0, 2, 2] = True
    masks[1, 2, 1:4] = True
    maps = np.where(masks, -1.0, 0.0)
    maps[0, 2, 2] = 1.0
    assert M.aupro(maps, masks) == pytest.approx(0.5, abs=1e-12)  # mean(1, 0), not 1/4


def test_aupro_tied_scores_are_one_step():
    # 10 normal pixels, one region of 2; the region ties with one normal pixel at 0.5
    masks = np.zeros((1, 3, 4), dtype=bool)
    masks[0, 0, :2] = True
    maps = np.zeros((1, 3, 4))
    maps[0, 0, :3] = 0.5
    # curve (0, 0) -> (0.1, 1) -> (1, 1): area to 0.3 = 0.05 + 0.2 = 0.25
    # (normal-first order would give 0.2, anomaly-first 0.3)
    assert M.aupro(maps, masks) == pytest.approx(0.25 / 0.3, abs=1e-12)


def test_aupro_interpolates_at_the_fpr_limit():
    # 10 normal pixels: 2 at 0.9, 3 at 0.5, 5 at 0; a region of 2 pixels at 1.0 and 0.5.
    # Curve: (0,0) (0,.5) (.2,.5) (.5,1) (1,1); FPR jumps from 0.2 past 0.3 to 0.5.
    masks = np.zeros((1, 3, 4), dtype=bool)
    masks[0, 0, :2] = True
    maps = np.zeros((1, 3, 4))
    maps[0, 0, :2] = [1.0, 0.5]
    maps[0, 1, :2] = 0.9
    maps[0, 2, :3] = 0.5
    # PRO at 0.3 = 0.5 + 0.5 * (0.1 / 0.3) = 2/3; area = 0.2 * 0.5 + 0.1 * (0.5 + 2/3) / 2 = 19/120
    assert M.aupro(maps, masks) == pytest.approx(19 / 36, abs=1e-12)
    assert M.aupro(maps, masks, fpr_limit=0.5) == pytest.approx((0.1 + 0.3 * 0.75) / 0.5, abs=1e-12)
    assert M.aupro(maps, masks, fpr_limit=1.0) == pytest.approx(0.825, abs=1e-12)
    value, fpr, pro = M.aupro(maps, masks, return_curve=True)
    np.testing.assert_allclose(fpr, [0, 0, 0.2, 0.3], atol=1e-15)
    np.testing.assert_allclose(pro, [0, 0.5, 0.5, 2 / 3], atol=1e-15)
    assert trapezoid(pro, fpr) / 0.3 == pytest.approx(value, abs=1e-15)


def test_aupro_point_exactly_at_the_limit():
    # 3 of 10 normal pixels above the found half: a curve point at FPR exactly 0.3
    masks = np.zeros((1, 3, 4), dtype=bool)
    masks[0, 0, :2] = True
    maps = np.zeros((1, 3, 4))
    maps[0, 0, 0] = 1.0
    maps[0, 1, :3] = 0.9
    assert M.aupro(maps, masks) == pytest.approx(0.5, abs=1e-12)
    _, fpr, pro = M.aupro(maps, masks, return_curve=True)
    assert fpr[-1] == 0.3 and pro[-1] == 0.5


# ----------------------------------------------------------------------------- AUPRO vs brute force


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("quantise", [None, 0.1, 0.5])
@pytest.mark.parametrize("fpr_limit", [0.05, 0.3, 1.0])
def test_aupro_matches_brute_force(seed, quantise, fpr_limit):
    maps, masks = blob_case(10 + seed, quantise=quantise)
    ref = brute_aupro(maps, masks, fpr_limit)
    assert M.aupro(maps, masks, fpr_limit=fpr_limit) == pytest.approx(ref, abs=1e-9)


def test_aupro_brute_force_small_normal_counts():
    # few normal pixels and coarse scores: curve points land exactly on the limit often
    rng = np.random.default_rng(5)
    for _ in range(30):
        masks = rng.random((2, 4, 5)) < 0.6
        masks[0, 0, 0], masks[0, 0, 1] = True, False
        maps = rng.integers(0, 5, masks.shape).astype(float)
        for limit in (0.1, 0.2, 0.3, 0.5):
            assert M.aupro(maps, masks, fpr_limit=limit) == pytest.approx(brute_aupro(maps, masks, limit), abs=1e-9)


def test_aupro_curve_and_inputs():
    maps, masks = blob_case(20, quantise=0.2)
    value, fpr, pro = M.aupro(maps, masks, return_curve=True)
    assert value == M.aupro(maps, masks)
    assert fpr[0] == 0 and pro[0] == 0 and fpr[-1] == 0.3
    assert np.all(np.diff(fpr) >= 0) and np.all(np.diff(pro) >= 0)
    assert trapezoid(pro, fpr) / 0.3 == pytest.approx(value, abs=1e-12)
    _, fpr_full, pro_full = M.aupro(maps, masks, fpr_limit=1.0, return_curve=True)
    assert fpr_full[-1] == 1.0 and pro_full[-1] == pytest.approx(1.0)
    # torch float32 maps, [N, 1, H, W], uint8 masks
    t = torch.from_numpy(maps).float()[:, None]
    expected = brute_aupro(t[:, 0].numpy(), masks)
    assert M.aupro(t, torch.from_numpy(masks.astype(np.uint8))) == pytest.approx(expected, abs=1e-9)


# ----------------------------------------------------------------------------- evaluate


@dataclass
class FakePrediction:
    scores: torch.Tensor
    maps: torch.Tensor | None = None


def test_evaluate_keys_and_values():
    maps, masks = blob_case(30, n=6, quantise=0.1)
    labels = masks.reshape(len(masks), -1).any(1).astype(int)
    scores = maps.reshape(len(maps), -1).max(1)
    pred = FakePrediction(torch.from_numpy(scores).float(), torch.from_numpy(maps).float())
    report = M.evaluate(pred, torch.from_numpy(labels), torch.from_numpy(masks))
    assert list(report) == ["image_auroc", "image_ap", "image_f1_max", "pixel_auroc", "aupro"]
    assert all(type(v) is float for v in report.values())
    s32 = pred.scores.numpy()
    assert report["image_auroc"] == pytest.approx(roc_auc_score(labels, s32))
    assert report["image_ap"] == pytest.approx(average_precision_score(labels, s32))
    assert report["image_f1_max"] == pytest.approx(sk_f1_max(s32, labels))
    assert report["pixel_auroc"] == pytest.approx(roc_auc_score(masks.ravel(), pred.maps.numpy().ravel()))
    assert report["aupro"] == pytest.approx(brute_aupro(pred.maps.numpy(), masks), abs=1e-9)
    # a (scores, maps) tuple gives the same
    assert M.evaluate((pred.scores, pred.maps), labels, masks) == report


def test_evaluate_without_pixel_metrics():
    scores, labels = random_case("continuous", 1)
    image_keys = ["image_auroc", "image_ap", "image_f1_max"]
    assert list(M.evaluate(FakePrediction(torch.tensor(scores)), labels)) == image_keys
    # masks given but the method does not localise
    masks = np.zeros((len(scores), 4, 4))
    assert list(M.evaluate(FakePrediction(torch.tensor(scores)), labels, masks)) == image_keys
    # maps given but no mask holds an anomalous pixel (image-level dataset)
    maps = np.random.default_rng(0).random((len(scores), 4, 4))
    assert list(M.evaluate((scores, maps), labels, masks)) == image_keys
    assert list(M.evaluate(scores, labels)) == image_keys
    assert M.evaluate(list(scores), labels) == M.evaluate(scores, labels)


# ----------------------------------------------------------------------------- errors


def test_errors_for_bad_inputs():
    ok_s, ok_y = np.array([0.1, 0.5, 0.9]), np.array([0, 1, 1])
    with pytest.raises(AnomalyZooError, match="only one class"):
        M.image_auroc(ok_s, [1, 1, 1])
    with pytest.raises(AnomalyZooError, match="only one class"):
        M.roc_curve(ok_s, [0, 0, 0])
    with pytest.raises(AnomalyZooError, match="only one class"):
        M.average_precision(ok_s, [0, 0, 0])
    with pytest.raises(AnomalyZooError, match="3 scores but 2 labels"):
        M.image_auroc(ok_s, [0, 1])
    with pytest.raises(AnomalyZooError, match="NaN"):
        M.f1_max([0.1, np.nan, 0.3], ok_y)
    with pytest.raises(AnomalyZooError, match="binary"):
        M.image_auroc(ok_s, [0, 1, 2])
    with pytest.raises(AnomalyZooError, match=r"shape \[N\]"):
        M.image_auroc(ok_s[:, None], ok_y)
    with pytest.raises(AnomalyZooError, match="empty"):
        M.image_auroc([], [])
    with pytest.raises(AnomalyZooError, match="expected numbers"):
        M.image_auroc(["a", "b", "c"], ok_y)
    assert issubclass(AnomalyZooError, ValueError)

    maps, masks = blob_case(40)
    with pytest.raises(AnomalyZooError, match="do not match the maps"):
        M.pixel_auroc(maps, masks[:, :-1])
    with pytest.raises(AnomalyZooError, match="do not match the maps"):
        M.aupro(maps, masks[:-1])
    with pytest.raises(AnomalyZooError, match=r"\[N, H, W\]"):
        M.aupro(maps[0], masks)
    bad = maps.copy()
    bad[1, 2, 3] = np.nan
    with pytest.raises(AnomalyZooError, match="NaN"):
        M.pixel_auroc(bad, masks)
    with pytest.raises(AnomalyZooError, match="NaN"):
        M.aupro(bad, masks)
    with pytest.raises(AnomalyZooError, match="only one class"):
        M.aupro(maps, np.zeros_like(masks))
    with pytest.raises(AnomalyZooError, match="only one class"):
        M.pixel_auroc(maps, np.ones_like(masks))
    with pytest.raises(AnomalyZooError, match="fpr_limit"):
        M.aupro(maps, masks, fpr_limit=0.0)

    labels = masks.reshape(len(masks), -1).any(1)
    scores = maps.reshape(len(maps), -1).max(1)
    with pytest.raises(AnomalyZooError, match="do not match the maps"):
        M.evaluate((scores, maps), labels, masks[:, ::2])
    with pytest.raises(AnomalyZooError, match="4 scores but 3 labels"):
        M.evaluate((scores, maps), labels[:3], masks)
    with pytest.raises(AnomalyZooError, match="pred must be"):
        M.evaluate("scores", labels)
