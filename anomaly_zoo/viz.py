"""Figures for the book: image grids with masks, heatmap overlays, ROC curves, score histograms.

Every function draws with matplotlib and returns the ``Figure`` (so a notebook
shows it and a script can ``savefig`` it). Nothing here selects a backend.
"""
from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
import torch

from . import metrics


def _np(x):
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


def to_rgb(img) -> np.ndarray:
    """``[3, H, W]`` tensor/array in [0, 1] -> ``[H, W, 3]`` numpy for ``imshow``."""
    a = _np(img)
    return np.clip(a.transpose(1, 2, 0) if a.ndim == 3 and a.shape[0] in (1, 3) else a, 0, 1)


def _pick(labels, n: int, seed: int = 0) -> np.ndarray:
    """Up to ``n`` indices: anomalous ones first (most of the grid), then a few normal ones."""
    labels = _np(labels).astype(int)
    rng = np.random.default_rng(seed)
    bad, good = np.flatnonzero(labels == 1), np.flatnonzero(labels == 0)
    n_good = min(len(good), max(1, n // 4)) if len(bad) else min(len(good), n)
    n_bad = min(len(bad), n - n_good)
    return np.concatenate([rng.permutation(bad)[:n_bad], rng.permutation(good)[:n_good]]).astype(int)


def show_images(images, masks=None, titles=None, n: int = 8, ncols: int = 8, size: float = 1.8):
    """A grid of images, with the ground-truth mask drawn as a red contour where given."""
    n = min(n, len(images))
    ncols = min(ncols, n)
    nrows = -(-n // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(size * ncols, size * nrows), squeeze=False)
    for k, ax in enumerate(axes.flat):
        ax.axis("off")
        if k >= n:
            continue
        ax.imshow(to_rgb(images[k]))
        if masks is not None and _np(masks[k]).any():
            ax.contour(_np(masks[k]), levels=[0.5], colors="red", linewidths=0.8)
        if titles is not None:
            ax.set_title(str(titles[k]), fontsize=8)
    fig.tight_layout()
    return fig


def show_dataset(ds, n: int = 8, seed: int = 0):
    """Training images (top row) and test images with their defect masks (bottom row)."""
    idx = _pick(ds.test_labels, n, seed)
    fig, axes = plt.subplots(2, n, figsize=(1.8 * n, 4.0), squeeze=False)
    for k in range(n):
        for ax in axes[:, k]:
            ax.axis("off")
        if k < len(ds.train_images):
            axes[0, k].imshow(to_rgb(ds.train_images[k]))
            axes[0, k].set_title("train: good", fontsize=8)
        if k < len(idx):
            i = idx[k]
            axes[1, k].imshow(to_rgb(ds.test_images[i]))
            if ds.test_masks is not None and _np(ds.test_masks[i]).any():
                axes[1, k].contour(_np(ds.test_masks[i]), levels=[0.5], colors="red", linewidths=0.8)
            axes[1, k].set_title(f"test: {ds.test_defects[i]}", fontsize=8)
    fig.suptitle(f"{ds.name} / {ds.category}", fontsize=10)
    fig.tight_layout()
    return fig


def show_predictions(ds, pred, n: int = 8, seed: int = 0, vmax: float | None = None, title: str | None = None):
    """Rows: image with mask contour, anomaly map, overlay; columns: test images (mostly anomalous).

    One colour scale for every map (``vmax`` defaults to the 99.5th percentile of all maps)
    so that maps can be compared across images.
    """
    idx = _pick(ds.test_labels, n, seed)
    n = len(idx)
    has_maps = pred.maps is not None
    rows = 3 if has_maps else 1
    fig, axes = plt.subplots(rows, n, figsize=(1.9 * n, 2.0 * rows + 0.3), squeeze=False)
    if has_maps:
        maps = _np(pred.maps)
        vmin = float(np.percentile(maps, 1))
        vmax = float(np.percentile(maps, 99.5)) if vmax is None else vmax
    for k, i in enumerate(idx):
        for ax in axes[:, k]:
            ax.axis("off")
        img = to_rgb(ds.test_images[i])
        axes[0, k].imshow(img)
        mask = None if ds.test_masks is None else _np(ds.test_masks[i])
        if mask is not None and mask.any():
            axes[0, k].contour(mask, levels=[0.5], colors="red", linewidths=0.8)
        axes[0, k].set_title(f"{ds.test_defects[i]}\nscore {float(pred.scores[i]):.3g}", fontsize=7)
        if has_maps:
            axes[1, k].imshow(maps[i], cmap="jet", vmin=vmin, vmax=vmax)
            axes[2, k].imshow(img)
            axes[2, k].imshow(maps[i], cmap="jet", alpha=0.45, vmin=vmin, vmax=vmax)
            if mask is not None and mask.any():
                axes[2, k].contour(mask, levels=[0.5], colors="white", linewidths=0.8)
    if has_maps:
        axes[0, 0].text(-0.1, 0.5, "image", transform=axes[0, 0].transAxes, rotation=90, va="center", ha="right")
        axes[1, 0].text(-0.1, 0.5, "map", transform=axes[1, 0].transAxes, rotation=90, va="center", ha="right")
        axes[2, 0].text(-0.1, 0.5, "overlay", transform=axes[2, 0].transAxes, rotation=90, va="center", ha="right")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def plot_roc(results: dict, labels, ax=None):
    """ROC curves of several predictions: ``results = {"padim": pred_or_scores, ...}``."""
    if ax is None:
        _, ax = plt.subplots(figsize=(4, 4))
    for name, p in results.items():
        scores = p.scores if hasattr(p, "scores") else p
        fpr, tpr, _ = metrics.roc_curve(scores, labels)
        ax.plot(fpr, tpr, label=f"{name} (AUROC {metrics.image_auroc(scores, labels):.3f})")
    ax.plot([0, 1], [0, 1], "k:", lw=0.8)
    ax.set(xlabel="false positive rate", ylabel="true positive rate", title="image-level ROC")
    ax.legend(fontsize=8, loc="lower right")
    return ax.figure


def plot_score_hist(scores, labels, threshold: float | None = None, ax=None, bins: int = 30):
    """Histograms of the image scores of normal and anomalous test images (and a threshold line)."""
    if ax is None:
        _, ax = plt.subplots(figsize=(5, 3))
    s, y = _np(scores).astype(float), _np(labels).astype(int)
    edges = np.histogram_bin_edges(s, bins=bins)
    ax.hist(s[y == 0], bins=edges, alpha=0.6, label="normal", color="tab:blue")
    ax.hist(s[y == 1], bins=edges, alpha=0.6, label="anomalous", color="tab:red")
    if threshold is not None:
        ax.axvline(threshold, color="k", ls="--", lw=1, label=f"threshold {threshold:.3g}")
    ax.set(xlabel="anomaly score", ylabel="images")
    ax.legend(fontsize=8)
    return ax.figure


def plot_pro_curve(maps, masks, fpr_limit: float = 0.3, ax=None, label: str | None = None):
    """The per-region-overlap curve up to ``fpr_limit``, with its normalised area in the legend."""
    if ax is None:
        _, ax = plt.subplots(figsize=(4, 3))
    score, fpr, pro = metrics.aupro(maps, masks, fpr_limit=fpr_limit, return_curve=True)
    ax.plot(fpr, pro, label=f"{label + ' ' if label else ''}AUPRO {score:.3f}")
    ax.set(xlabel="false positive rate (normal pixels)", ylabel="per-region overlap", xlim=(0, fpr_limit),
           ylim=(0, 1.02), title="PRO curve")
    ax.legend(fontsize=8)
    return ax.figure
