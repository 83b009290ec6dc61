"""Metrics for anomaly detection (one score per image) and localisation (one map per image).

Every function takes torch tensors or numpy arrays. Scores follow the library's
convention: **higher means more anomalous**, for image scores and for every pixel
of a map. Labels and masks are binary: 0 = normal, 1 = anomalous.

A detector gives a *score*, not a decision. A decision needs a threshold ``t``:
"anomalous if score >= t". Most metrics below sweep ``t`` over every distinct
score, so they judge the ranking itself and need no threshold to be chosen.

Image level (detection)
-----------------------
``image_auroc(scores, labels)``
    Area under the ROC curve: true-positive rate (anomalies caught) against
    false-positive rate (normal images flagged) over all thresholds. Equals the
    probability that a random anomalous image scores higher than a random normal
    one (ties count one half). 0.5 = chance, 1.0 = perfect separation. It does not
    depend on how rare anomalies are.
``average_precision(scores, labels)``
    Area under the precision-recall curve, step-wise (as scikit-learn's
    ``average_precision_score``): ``AP = sum_k (R_k - R_{k-1}) P_k`` over the
    thresholds, highest first. It is sensitive to the proportion of anomalies:
    chance level is that proportion, not 0.5.
``f1_max(scores, labels)``
    The best F1 (harmonic mean of precision and recall) over all thresholds: an
    optimistic "what if the threshold were chosen well" number.
    ``return_threshold=True`` also gives that threshold (rule: ``score >= t``).

Pixel level (localisation)
--------------------------
``pixel_auroc(maps, masks)``
    The same AUROC, with every pixel of every test image as one sample. Large
    defects contain most anomalous pixels, so they dominate it; a method that
    misses every small defect can still score high.
``aupro(maps, masks, fpr_limit=0.3)``
    Area under the per-region-overlap curve, the MVTec AD protocol (Bergmann et
    al., 2019/2021), which weights every defect equally whatever its size:

    * the ground-truth *regions* are the 8-connected components of each mask;
    * for a threshold ``t``: ``FPR(t)`` = fraction of **all** normal pixels (mask
      == 0, over all images) with score >= t, and ``PRO(t)`` = mean over all regions
      of the fraction of that region's pixels with score >= t;
    * the curve PRO against FPR, taken over every distinct threshold, is
      integrated with the trapezoid rule from FPR = 0 to ``fpr_limit`` (the curve
      is interpolated linearly at exactly ``fpr_limit``) and divided by
      ``fpr_limit``, so that 1.0 is perfect. The limit (0.3) keeps only the
      operating points a user could live with; a constant map scores 0.15.

``evaluate(pred, labels, masks=None)``
    All of the above in one dict (see its docstring).

Implementation notes
--------------------
All curves are exact: the scores are sorted once and cumulative counts are
read off at the end of every group of tied scores, so tied scores form a single
step (a diagonal segment of the curve, never an arbitrary order inside the tie)
and no threshold grid is involved. The AUROCs use the equivalent rank
(Mann-Whitney) form, with integer counts. scikit-learn is deliberately not used
here: the tests use it as the independent reference.
"""
from __future__ import annotations

import numpy as np
import torch
from scipy import ndimage

from .utils import AnomalyZooError, check_masks

__all__ = [
    "roc_curve",
    "image_auroc",
    "average_precision",
    "f1_max",
    "pixel_auroc",
    "aupro",
    "evaluate",
]


# ----------------------------------------------------------------------------- input checks


def _as_numpy(x, name: str) -> np.ndarray:
    """A torch tensor, numpy array or (nested) list -> a numeric numpy array (no copy when possible)."""
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu()
        if x.dtype in (torch.float16, torch.bfloat16):
            x = x.float()
        x = x.numpy()
    elif not isinstance(x, np.ndarray):
        try:
            x = np.asarray(x)
        except (TypeError, ValueError) as err:
            raise AnomalyZooError(f"{name}: expected a torch.Tensor or numpy array, got {type(x).__name__}") from err
    if x.dtype == np.float16:
        x = x.astype(np.float32)
    if not (x.dtype == np.bool_ or np.issubdtype(x.dtype, np.integer) or np.issubdtype(x.dtype, np.floating)):
        raise AnomalyZooError(f"{name}: expected numbers, got dtype {x.dtype}")
    return x


def _check_no_nan(x: np.ndarray, name: str) -> None:
    if np.issubdtype(x.dtype, np.floating) and np.isnan(x).any():
        raise AnomalyZooError(f"{name}: contains NaN values ({int(np.isnan(x).sum())} of {x.size})")


def _check_scores_labels(scores, labels, what: str) -> tuple[np.ndarray, np.ndarray]:
    """-> (scores [N] numeric, labels [N] bool), or one clear error."""
    s = _as_numpy(scores, f"{what}: scores")
    y = _as_numpy(labels, f"{what}: labels")
    if s.ndim != 1:
        raise AnomalyZooError(f"{what}: scores must have shape [N], got {tuple(s.shape)}")
    if y.ndim != 1:
        raise AnomalyZooError(f"{what}: labels must have shape [N], got {tuple(y.shape)}")
    if s.shape[0] != y.shape[0]:
        raise AnomalyZooError(f"{what}: {s.shape[0]} scores but {y.shape[0]} labels (need one label per score)")
    if s.shape[0] == 0:
        raise AnomalyZooError(f"{what}: no scores given (empty input)")
    _check_no_nan(s, f"{what}: scores")
    if y.dtype != np.bool_:
        _check_no_nan(y, f"{what}: labels")
        bad = (y != 0) & (y != 1)
        if bad.any():
            values = np.unique(y[bad])[:5].tolist()
            raise AnomalyZooError(
                f"{what}: labels must be binary (0 = normal, 1 = anomalous), found other values {values}"
            )
        y = y == 1
    return s, y


def _require_both_classes(y: np.ndarray, what: str, kind: str = "labels") -> None:
    n_pos = int(np.count_nonzero(y))
    if n_pos == 0 or n_pos == y.size:
        only = "anomalous (1)" if n_pos else "normal (0)"
        raise AnomalyZooError(
            f"{what}: the {kind} hold only one class ({only}); it needs both normal (0) and anomalous (1) samples"
        )


def _check_maps_masks(maps, masks, what: str) -> tuple[np.ndarray, np.ndarray]:
    """-> (maps [N, H, W] numeric, masks [N, H, W] bool); ``[N, 1, H, W]`` is accepted for both."""
    m = _as_numpy(maps, f"{what}: maps")
    if m.ndim == 4 and m.shape[1] == 1:
        m = m[:, 0]
    if m.ndim != 3:
        raise AnomalyZooError(
            f"{what}: maps must have shape [N, H, W], got {tuple(m.shape)}"
            + ("; add a batch dimension with maps[None]" if m.ndim == 2 else "")
        )
    if isinstance(masks, (list, tuple)):
        masks = np.asarray(masks)
    gt = check_masks(masks, name=f"{what}: masks").numpy()  # binary (> 0), [N, 1, H, W] squeezed
    if gt.shape != m.shape:
        raise AnomalyZooError(
            f"{what}: masks of shape {tuple(gt.shape)} do not match the maps of shape {tuple(m.shape)} "
            "(need the same N, H and W; resize the maps to the masks' size)"
        )
    if m.size == 0:
        raise AnomalyZooError(f"{what}: no maps given (empty input)")
    _check_no_nan(m, f"{what}: maps")
    return m, gt


# ----------------------------------------------------------------------------- the sorted sweep


def _sweep(scores: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Counts at every distinct threshold, highest first (as scikit-learn's ``_binary_clf_curve``).

    Returns ``(fps, tps, thresholds)``: ``fps[k]`` / ``tps[k]`` = number of negatives /
    positives with ``score >= thresholds[k]``. Ties: the counts are read only at the
    end of each group of equal scores, so a tie is one step.
    """
    order = np.argsort(scores)[::-1]  # descending; order inside a tie does not matter
    s = scores[order]
    tps = np.cumsum(labels[order], dtype=np.int64)
    del order
    # ``!=`` rather than ``np.diff``: inf - inf would be NaN and split a tie of infinities
    ends = np.flatnonzero(s[1:] != s[:-1])
    ends = np.append(ends, s.size - 1)
    tps = tps[ends]
    fps = ends + 1 - tps
    return fps, tps, s[ends]


def _trapezoid(y: np.ndarray, x: np.ndarray) -> float:
    return float(np.sum((x[1:] - x[:-1]) * (y[1:] + y[:-1])) / 2.0)


# ----------------------------------------------------------------------------- image level


def roc_curve(scores, labels) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """ROC curve over every distinct score: ``(fpr, tpr, thresholds)``, thresholds decreasing.

    ``fpr[k]``, ``tpr[k]``: rates for the rule "anomalous if score >= thresholds[k]".
    The first point is ``(0, 0)`` with threshold ``+inf`` (nothing flagged), the last
    ``(1, 1)``. Tied scores are one point (no intermediate point is dropped, unlike
    scikit-learn's default ``drop_intermediate=True``).
    """
    s, y = _check_scores_labels(scores, labels, "roc_curve")
    _require_both_classes(y, "roc_curve")
    return _roc(s, y)


def _roc(s: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    fps, tps, thr = _sweep(s, y)
    fpr = np.concatenate([[0.0], fps / fps[-1]])
    tpr = np.concatenate([[0.0], tps / tps[-1]])
    thresholds = np.concatenate([[np.inf], thr.astype(np.float64)])
    return fpr, tpr, thresholds


def image_auroc(scores, labels) -> float:
    """Area under the ROC curve of image scores ``[N]`` against labels ``[N]`` (0 normal, 1 anomalous)."""
    s, y = _check_scores_labels(scores, labels, "image_auroc")
    _require_both_classes(y, "image_auroc")
    return _auroc(s, y)


def _auroc(s: np.ndarray, y: np.ndarray) -> float:
    """AUROC as the Mann-Whitney statistic: P(score_anomalous > score_normal) + P(tie) / 2.

    The same number as the trapezoid under ``roc_curve`` (tied scores make a diagonal
    segment: half credit), computed with integer counts, so it is exact up to one
    final division, and with two plain sorts (no argsort), which is ~3x faster on
    millions of pixels.
    """
    neg = s[~y]
    neg.sort()
    pos = s[y]
    pos.sort()  # sorted queries make searchsorted cache-friendly
    below = np.searchsorted(neg, pos, side="left").sum(dtype=np.int64)  # normals strictly lower
    below_or_tied = np.searchsorted(neg, pos, side="right").sum(dtype=np.int64)
    return (int(below) + int(below_or_tied)) / (2.0 * pos.size * neg.size)


def average_precision(scores, labels) -> float:
    """Step-wise average precision ``sum_k (R_k - R_{k-1}) P_k`` (scikit-learn's definition).

    Needs at least one anomalous sample (recall is undefined otherwise); with no
    normal sample it is 1.0.
    """
    s, y = _check_scores_labels(scores, labels, "average_precision")
    if not y.any():
        raise AnomalyZooError(
            "average_precision: the labels hold only one class (normal (0)); it needs at least one anomalous (1) sample"
        )
    fps, tps, _ = _sweep(s, y)
    precision = tps / (tps + fps)
    recall_gain = np.diff(tps, prepend=0) / tps[-1]
    return float(np.sum(recall_gain * precision))


def f1_max(scores, labels, return_threshold: bool = False):
    """The best F1 score over all thresholds "anomalous if score >= t".

    With ``return_threshold=True`` returns ``(f1, t)``; ``t`` is one of the scores
    (the highest one that reaches the best F1 when several do).
    """
    s, y = _check_scores_labels(scores, labels, "f1_max")
    if not y.any():
        raise AnomalyZooError(
            "f1_max: the labels hold only one class (normal (0)); it needs at least one anomalous (1) sample"
        )
    fps, tps, thr = _sweep(s, y)
    # F1 = 2 TP / (2 TP + FP + FN) and TP + FN = P (all positives)
    f1 = 2.0 * tps / (tps + fps + tps[-1])
    k = int(np.argmax(f1))  # first = highest threshold among equal maxima
    if return_threshold:
        return float(f1[k]), float(thr[k])
    return float(f1[k])


# ----------------------------------------------------------------------------- pixel level


def pixel_auroc(maps, masks) -> float:
    """AUROC over all test pixels: maps ``[N, H, W]`` (higher = more anomalous), masks ``[N, H, W]`` binary."""
    m, gt = _check_maps_masks(maps, masks, "pixel_auroc")
    gt = gt.ravel()
    _require_both_classes(gt, "pixel_auroc", kind="masks")
    return _auroc(m.ravel(), gt)


def aupro(maps, masks, fpr_limit: float = 0.3, return_curve: bool = False):
    """Normalised area under the PRO-vs-FPR curve up to ``fpr_limit`` (MVTec AD protocol).

    maps ``[N, H, W]`` (higher = more anomalous), masks ``[N, H, W]`` binary. See the
    module docstring for the definition. Exact: every distinct map value is a
    threshold (sort-based sweep, ties are one step).

    With ``return_curve=True`` returns ``(aupro, fpr, pro)``: the curve that was
    integrated, from ``(0, 0)`` to the interpolated point at ``fpr == fpr_limit``
    (``fpr_limit=1.0`` gives the whole curve), so that
    ``np.trapezoid(pro, fpr) / fpr_limit == aupro`` up to rounding.
    """
    m, gt = _check_maps_masks(maps, masks, "aupro")
    fpr_limit = float(fpr_limit)
    if not 0.0 < fpr_limit <= 1.0:
        raise AnomalyZooError(f"aupro: fpr_limit must lie in (0, 1], got {fpr_limit}")
    _require_both_classes(gt.ravel(), "aupro", kind="masks")

    # Regions: 8-connected components inside each image (a 3x3x3 structure whose only
    # non-zero slice is the middle one connects pixels within an image, never across).
    structure = np.zeros((3, 3, 3), dtype=bool)
    structure[1] = True
    regions, n_regions = ndimage.label(gt, structure=structure)
    regions = regions.ravel()
    sizes = np.bincount(regions, minlength=n_regions + 1)
    n_normal = int(sizes[0])
    # Each anomalous pixel adds 1 / (n_regions * |its region|) to PRO when it enters;
    # normal pixels (label 0) add 0.
    pixel_weight = np.zeros(n_regions + 1, dtype=np.float64)
    pixel_weight[1:] = 1.0 / (n_regions * sizes[1:].astype(np.float64))

    # Only thresholds with FPR <= fpr_limit matter, plus the first one above it (for the
    # interpolation). That one is the m-th highest normal score, where m is the
    # smallest normal count with m / n_normal > fpr_limit. Pixels scoring below it
    # never enter the integrated part, so drop them before the sort (exact, and it
    # sorts ~fpr_limit of the pixels instead of all of them).
    scores = m.ravel()
    m_cross = min(int(np.floor(fpr_limit * n_normal)) + 1, n_normal + 1)
    while m_cross > 1 and (m_cross - 1) / n_normal > fpr_limit:
        m_cross -= 1
    while m_cross <= n_normal and m_cross / n_normal <= fpr_limit:
        m_cross += 1
    if m_cross <= n_normal:
        normal_scores = scores[regions == 0]
        cut = np.partition(normal_scores, n_normal - m_cross)[n_normal - m_cross]
        del normal_scores
        keep = scores >= cut
        scores, regions = scores[keep], regions[keep]

    order = np.argsort(scores)[::-1]
    s = scores[order]
    reg = regions[order]
    del order
    ends = np.append(np.flatnonzero(s[1:] != s[:-1]), s.size - 1)
    fp = np.cumsum(reg == 0, dtype=np.int64)[ends]
    pro = np.cumsum(pixel_weight[reg])[ends]
    fpr = np.concatenate([[0.0], fp / n_normal])
    pro = np.concatenate([[0.0], np.minimum(pro, 1.0)])  # clip the last ulp of rounding

    j = int(np.searchsorted(fpr, fpr_limit, side="right"))  # first point with fpr > fpr_limit
    if j < fpr.size:
        x0, x1, y0, y1 = fpr[j - 1], fpr[j], pro[j - 1], pro[j]
        y_lim = y0 + (y1 - y0) * (fpr_limit - x0) / (x1 - x0)
        fpr = np.append(fpr[:j], fpr_limit)
        pro = np.append(pro[:j], y_lim)
    value = _trapezoid(pro, fpr) / fpr_limit
    if return_curve:
        return value, fpr, pro
    return value


# ----------------------------------------------------------------------------- all at once


def evaluate(pred, labels, masks=None) -> dict[str, float]:
    """The survey's metrics for one prediction, as a dict of floats.

    ``pred``: a ``Prediction`` (anything with ``.scores`` ``[N]`` and ``.maps``
    ``[N, H, W]`` or ``None``), a tuple ``(scores, maps)``, or the scores alone.
    ``labels``: ``[N]``, 0 normal, 1 anomalous. ``masks``: ``[N, H, W]`` binary, optional.

    Keys: ``image_auroc``, ``image_ap``, ``image_f1_max``; and ``pixel_auroc`` and
    ``aupro`` (at FPR 0.3) when masks are given, the prediction has maps and the
    masks hold anomalous pixels (image-level datasets such as ``digits`` have none).
    """
    if hasattr(pred, "scores"):
        scores, maps = pred.scores, getattr(pred, "maps", None)
    elif isinstance(pred, (tuple, list)) and len(pred) == 2 and not np.isscalar(pred[0]):
        scores, maps = pred
    elif isinstance(pred, (torch.Tensor, np.ndarray, list)):
        scores, maps = pred, None
    else:
        raise AnomalyZooError(
            "evaluate: pred must be a Prediction (with .scores and .maps), a tuple (scores, maps) "
            f"or an array of scores, got {type(pred).__name__}"
        )
    s, y = _check_scores_labels(scores, labels, "evaluate")
    _require_both_classes(y, "evaluate")
    report = {
        "image_auroc": image_auroc(s, y),
        "image_ap": average_precision(s, y),
        "image_f1_max": f1_max(s, y),
    }
    if masks is not None and maps is not None:
        m, gt = _check_maps_masks(maps, masks, "evaluate")
        if m.shape[0] != s.shape[0]:
            raise AnomalyZooError(f"evaluate: {s.shape[0]} scores but {m.shape[0]} maps (need one map per image)")
        if gt.any():
            report["pixel_auroc"] = pixel_auroc(m, gt)
            report["aupro"] = aupro(m, gt)
    return report
