"""Training-time synthesis of RIAD, NSA and Puzzle-AE, and the MSGMS: each checked against an independent
computation on small inputs (a dense linear solve, SciPy's filters, loops written out by hand)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import ndimage

from anomaly_zoo.gms import C_GMS, gms_map, gradient_magnitude, msgms_loss, msgms_map
from anomaly_zoo.synthesis import KINDS, synthesize
from anomaly_zoo.synthesis.blend import median_filter, nsa, nsa_targets, poisson_blend
from anomaly_zoo.synthesis.masks import grid_masks, jigsaw


# ------------------------------------------------------------------ Poisson blending (NSA)
def _dense_poisson(dest: np.ndarray, src: np.ndarray) -> np.ndarray:
    """Perez et al.'s discrete Poisson equation on a rectangle, as one dense linear system per channel:
    4 f_p - sum_{q in N(p)} f_q = 4 s_p - sum_{q in N(p)} s_q inside, f = dest on the border."""
    h, w = dest.shape
    inside = [(i, j) for i in range(1, h - 1) for j in range(1, w - 1)]
    index = {p: k for k, p in enumerate(inside)}
    a, b = np.zeros((len(inside), len(inside))), np.zeros(len(inside))
    for (i, j), k in index.items():
        a[k, k] = 4
        b[k] = 4 * src[i, j]
        for q in ((i - 1, j), (i + 1, j), (i, j - 1), (i, j + 1)):
            b[k] -= src[q]
            if q in index:
                a[k, index[q]] = -1
            else:
                b[k] += dest[q]
    out = dest.copy()
    for (i, j), v in zip(inside, np.linalg.solve(a, b)):
        out[i, j] = v
    return out


def test_poisson_blend_solves_the_discrete_poisson_equation_nsa():
    g = torch.Generator().manual_seed(0)
    dest, src = torch.rand(3, 6, 9, generator=g, dtype=torch.float64), torch.rand(3, 6, 9, generator=g, dtype=torch.float64)
    out = poisson_blend(dest, src)
    for c in range(3):
        expected = _dense_poisson(dest[c].numpy(), src[c].numpy())
        assert np.allclose(out[c].numpy(), expected, atol=1e-10)
    # the border is the destination's, exactly; a constant offset of the source is absorbed (gradients only)
    assert torch.equal(out[:, 0], dest[:, 0]) and torch.equal(out[:, :, -1], dest[:, :, -1])
    assert torch.allclose(poisson_blend(dest, src + 0.3), out, atol=1e-10)


def test_nsa_mask_marks_exactly_what_changed_and_repeats_with_a_seed():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(6, 3, 48, 48, generator=g)
    bad, masks = nsa(x, torch.Generator().manual_seed(1))
    changed = (bad != x).any(1)
    assert not bool((changed & (masks == 0)).any()), "a pixel outside the mask changed"
    assert changed[masks > 0].float().mean() > 0.95, "the mask claims pixels that did not change"
    assert bool((masks.flatten(1).amax(1) == 1).all()), "every image gets at least one patch"
    assert bad.min() >= 0 and bad.max() <= 1
    again, masks2 = nsa(x, torch.Generator().manual_seed(1))
    assert torch.equal(again, bad) and torch.equal(masks2, masks)
    # registered as a synthesis kind: synthesize() labels what it touched
    out, m, labels = synthesize(x, "nsa", torch.Generator().manual_seed(2), p=1.0)
    assert "nsa" in KINDS and torch.equal(labels, torch.ones(6)) and not bool(((out != x).any(1) & (m == 0)).any())


def test_nsa_patches_come_from_the_other_image():
    """A source that is a flat colour, blended into a flat image: Poisson blending keeps the destination's
    flat level (no gradient to copy) while a textured source shows up inside the mask."""
    flat = torch.full((2, 3, 40, 40), 0.5)
    bad, masks = nsa(flat, torch.Generator().manual_seed(0), source=torch.full_like(flat, 0.9))
    assert torch.allclose(bad, flat, atol=1e-6)  # gradient-free source: nothing to blend in
    stripes = flat.clone()
    stripes[..., ::2] = 0.2
    bad, masks = nsa(flat, torch.Generator().manual_seed(0), source=stripes)
    assert (bad - flat).abs().sum(1)[masks > 0].mean() > 0.1


def test_median_filter_matches_scipy():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 17, 13, generator=g)
    for radius, disk in ((2, False), (5, True)):
        t = np.arange(-radius, radius + 1)
        foot = np.ones((2 * radius + 1,) * 2, bool) if not disk else (t[:, None] ** 2 + t[None] ** 2) <= radius**2
        for i in range(2):
            values = ndimage.generic_filter(x[i].numpy(), lambda v: np.sort(v)[(len(v) - 1) // 2], footprint=foot,
                                            mode="nearest")
            assert np.allclose(median_filter(x, radius, disk)[i].numpy(), values, atol=1e-7)


def test_nsa_targets_are_the_logistic_of_the_intensity_change():
    clean = torch.full((1, 3, 32, 32), 0.5)
    blended, masks = clean.clone(), torch.zeros(1, 32, 32)
    blended[..., 8:24, 8:24] += 20 / 255  # a clear change of 20 grey levels inside the mask
    blended[..., 8:24, 26:30] += 20 / 255  # the same change outside the mask does not count
    masks[:, 8:24, 8:24] = 1
    y = nsa_targets(clean, blended, masks, k=1 / 3, x0=7)
    assert float(y[0, 16, 16]) == pytest.approx(1 / (1 + np.exp(-(20 - 7) / 3)), abs=1e-4)
    assert float(y[0, 16, 28]) == 0 and float(y[0, 2, 2]) == 0
    faint = clean.clone()
    faint[..., 8:24, 8:24] += 0.5 / 255  # below the 1-grey-level tolerance: no target at all
    assert float(nsa_targets(clean, faint, masks).max()) == 0


# ------------------------------------------------------------------ RIAD's masks, Puzzle-AE's jigsaw
@pytest.mark.parametrize("k", [2, 4, 8, 16, 5])
def test_riad_grid_masks_are_disjoint_cover_and_follow_the_cells(k):
    g = torch.Generator().manual_seed(0)
    m = grid_masks(3, 32, 32, k, 3, g)
    assert m.shape == (3, 3, 32, 32)
    assert torch.equal(m.sum(1), torch.ones(3, 32, 32)), "each pixel is hidden by exactly one mask"
    cells = -(-32 // k)
    for i in range(3):
        for s in range(3):
            for cy in range(cells):
                for cx in range(cells):  # constant on each k x k cell
                    block = m[i, s, cy * k : (cy + 1) * k, cx * k : (cx + 1) * k]
                    assert block.min() == block.max()
        counts = torch.stack([m[i, s, ::k, ::k].sum() for s in range(3)])
        assert counts.max() - counts.min() <= 1, "the cells are dealt evenly"
    assert torch.equal(grid_masks(3, 32, 32, k, 3, torch.Generator().manual_seed(0)), m)


def test_jigsaw_moves_whole_tiles_as_its_permutation_says():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(4, 3, 8, 12, generator=g)
    out, perms = jigsaw(x, g, grid=2)
    tiles = [(r, c) for r in range(2) for c in range(2)]
    for i in range(4):
        for j, (r, c) in enumerate(tiles):
            sr, sc = tiles[int(perms[i, j])]
            assert torch.equal(out[i, :, r * 4 : (r + 1) * 4, c * 6 : (c + 1) * 6],
                               x[i, :, sr * 4 : (sr + 1) * 4, sc * 6 : (sc + 1) * 6])
    assert sorted(perms[0].tolist()) == [0, 1, 2, 3]


# ------------------------------------------------------------------ GMS / MSGMS
def _gms_numpy(a: np.ndarray, b: np.ndarray, c: float = C_GMS) -> np.ndarray:
    hx = np.array([[1, 0, -1]] * 3, float) / 3
    def mag(z):
        gx = ndimage.correlate(z, hx, mode="nearest")
        gy = ndimage.correlate(z, hx.T, mode="nearest")
        return np.sqrt(gx**2 + gy**2 + 1e-12)
    ga, gb = mag(a.mean(0)), mag(b.mean(0))
    return (2 * ga * gb + c) / (ga**2 + gb**2 + c)


def test_gms_matches_scipy_prewitt_and_is_one_for_equal_images():
    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(2, 3, 16, 16, generator=g, dtype=torch.float64), torch.rand(2, 3, 16, 16, generator=g,
                                                                                   dtype=torch.float64)
    for i in range(2):
        assert np.allclose(gms_map(x, y)[i, 0].numpy(), _gms_numpy(x[i].numpy(), y[i].numpy()), atol=1e-10)
    assert torch.allclose(gms_map(x, x), torch.ones(2, 1, 16, 16, dtype=torch.float64))
    # a vertical edge: gradient magnitude 1/3 * 3 * step / 3 ... = the step size on the two columns next to it
    edge = torch.zeros(1, 1, 5, 6, dtype=torch.float64)
    edge[..., 3:] = 0.6
    assert torch.allclose(gradient_magnitude(edge)[0, 0, 2, 2:4], torch.tensor([0.6, 0.6], dtype=torch.float64))


def test_msgms_map_and_loss_average_the_scales_as_written():
    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(2, 3, 32, 32, generator=g), torch.rand(2, 3, 32, 32, generator=g)
    maps, losses = [], []
    xl, yl = x, y
    for _ in range(4):
        m = gms_map(xl, yl)
        losses.append(float((1 - m).mean()))
        maps.append(torch.nn.functional.interpolate(m, size=(32, 32), mode="bilinear", align_corners=False)[:, 0])
        xl, yl = torch.nn.functional.avg_pool2d(xl, 2), torch.nn.functional.avg_pool2d(yl, 2)
    assert torch.allclose(msgms_map(x, y), torch.stack(maps).mean(0), atol=1e-6)
    assert float(msgms_loss(x, y)) == pytest.approx(np.mean(losses), abs=1e-6)
    assert float(msgms_loss(x, x)) == pytest.approx(0.0, abs=1e-6)
    # a local defect lowers MSGMS there and not far away
    z = x.clone()
    z[..., 4:10, 4:10] = 0.5
    m = msgms_map(x, z)
    assert m[:, 5:9, 5:9].mean() < 0.8 and m[:, 24:, 24:].mean() > 0.99
