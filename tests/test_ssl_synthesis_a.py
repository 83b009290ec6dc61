"""Training-time synthesis of CutPaste (cutpaste, cutpaste_scar) and DRAEM (Perlin masks, procedural
textures, source augmentations, the eq. 4 blend), each checked against an independent computation."""
from __future__ import annotations

import ast
import inspect
import math

import numpy as np
import pytest
import torch

from anomaly_zoo.synthesis import patches, perlin


def g(seed=0):
    return torch.Generator().manual_seed(seed)


# ------------------------------------------------------------------ Perlin noise
def _perlin_numpy(h, w, ry, rx, angles):
    """Gradient noise written pixel by pixel from the definition (Perlin 2002), with the given corner angles."""
    out = np.zeros((h, w))
    fade = lambda t: 6 * t**5 - 15 * t**4 + 10 * t**3  # noqa: E731
    for y in range(h):
        for x in range(w):
            u, v = y * ry / h, x * rx / w
            i, j = int(math.floor(u)), int(math.floor(v))
            fy, fx = u - i, v - j
            dots = {}
            for dy in (0, 1):
                for dx in (0, 1):
                    a = angles[i + dy, j + dx]
                    dots[dy, dx] = math.cos(a) * (fy - dy) + math.sin(a) * (fx - dx)
            top = dots[0, 0] + fade(fx) * (dots[0, 1] - dots[0, 0])
            bottom = dots[1, 0] + fade(fx) * (dots[1, 1] - dots[1, 0])
            out[y, x] = math.sqrt(2) * (top + fade(fy) * (bottom - top))
    return out


@pytest.mark.parametrize("res", [(1, 1), (2, 4), (3, 5)])
def test_perlin_noise_matches_the_definition(res):
    h, w = 12, 20
    noise = perlin.perlin_noise(h, w, res, g(3))[0]
    angles = (2 * math.pi * torch.rand(1, res[0] + 1, res[1] + 1, generator=g(3)))[0].double().numpy()
    np.testing.assert_allclose(noise.numpy(), _perlin_numpy(h, w, *res, angles), atol=1e-5)
    assert noise.abs().max() <= 1.0 + 1e-6


def test_perlin_masks_are_binary_seeded_and_scale_with_the_lattice():
    m = perlin.perlin_masks(16, 64, 64, g(0))
    assert m.shape == (16, 64, 64) and set(m.unique().tolist()) <= {0.0, 1.0}
    assert torch.equal(m, perlin.perlin_masks(16, 64, 64, g(0)))
    assert 0.005 < float(m.mean()) < 0.3  # the threshold 0.5 keeps the high tails of the noise
    # a coarse lattice (2^0 cells) gives few, large blobs; a fine one (up to 2^5) many small ones
    from scipy import ndimage as ndi
    coarse = perlin.perlin_masks(16, 64, 64, g(1), max_exponent=1)
    fine = perlin.perlin_masks(16, 64, 64, g(1), max_exponent=6)
    blobs = lambda ms: np.mean([ndi.label(x.numpy())[1] for x in ms if x.any()])  # noqa: E731
    assert blobs(fine) > blobs(coarse)


def test_rotate_turns_a_quarter_exactly():
    x = torch.arange(36.0).view(1, 1, 6, 6)
    out = perlin.rotate(x, torch.tensor([90.0]))
    assert torch.allclose(out[0, 0], torch.rot90(x[0, 0], 1), atol=1e-4) or \
        torch.allclose(out[0, 0], torch.rot90(x[0, 0], -1), atol=1e-4)


# ------------------------------------------------------------------ the blend and the anomaly source
def test_blend_is_eq4():
    x, a = torch.rand(2, 3, 5, 5, generator=g(0)), torch.rand(2, 3, 5, 5, generator=g(1))
    m = (torch.rand(2, 5, 5, generator=g(2)) > 0.5).float()
    beta = torch.tensor([0.3, 0.9])
    out = perlin.blend(x, a, m, beta)
    xn, an, mn = x.numpy(), a.numpy(), m.numpy()[:, None]
    expected = (1 - mn) * xn + (1 - beta.numpy()[:, None, None, None]) * (mn * xn) \
        + beta.numpy()[:, None, None, None] * (mn * an)
    np.testing.assert_allclose(out.numpy(), expected, atol=1e-6)


def test_draem_anomaly_changes_only_the_mask_and_repeats():
    x = torch.rand(8, 3, 64, 64, generator=g(5))
    out, m = perlin.draem_anomaly(x, g(0))
    assert out.shape == x.shape and m.shape == (8, 64, 64) and out.min() >= 0 and out.max() <= 1
    outside = (m == 0)[:, None].expand_as(x)
    assert torch.equal(out[outside], x[outside])
    inside = (m == 1)[:, None].expand_as(x)
    assert (out[inside] != x[inside]).float().mean() > 0.9  # a texture at opacity >= 0.1 changes the pixels
    again, m2 = perlin.draem_anomaly(x, g(0))
    assert torch.equal(out, again) and torch.equal(m, m2)
    # beta = (1, 1): the mask's pixels are the (augmented) source itself, drawn from the given bank
    bank = torch.full((1, 3, 64, 64), 0.25)
    full, m3 = perlin.draem_anomaly(x, g(1), sources=bank, beta=(1.0, 1.0))
    sel = (m3 == 1)[:, None].expand_as(x)
    assert sel.any() and not torch.allclose(full[sel], x[sel])


def test_procedural_textures_are_varied_seeded_and_shipped_by_no_test_set():
    t = perlin.procedural_textures(10, 48, g(0))
    assert t.shape == (10, 3, 48, 48) and t.min() >= 0 and t.max() <= 1
    assert torch.equal(t, perlin.procedural_textures(10, 48, g(0)))
    assert (t.flatten(1).std(1) > 0.02).all()  # none is flat
    for kind in perlin.TEXTURE_KINDS:
        one = perlin.procedural_textures(2, 32, g(1), kinds=(kind,))
        assert torch.isfinite(one).all() and one.flatten(1).std(1).min() > 0.01
    tree = ast.parse(inspect.getsource(perlin))
    imported = [n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
    imported += [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
    assert not any("data" in m or "skimage" in m for m in imported), imported


def test_each_source_augmentation():
    x = torch.rand(3, 16, 16, generator=g(0))
    for op in range(perlin.N_AUGMENTATIONS):
        y = perlin._augment_one(x, op, g(op)).clamp(0, 1)
        assert y.shape == x.shape and torch.isfinite(y).all()
    assert torch.equal(perlin._augment_one(x, 6, g(0)), 1 - x)  # invert
    eq = perlin._augment_one(x, 8, g(0))  # equalize: each channel's values become its ranks, evenly spread
    for c in range(3):
        np.testing.assert_allclose(np.sort(eq[c].flatten().numpy()), np.linspace(0, 1, 256), atol=1e-6)
    ac = perlin._augment_one(x, 7, g(0))  # autocontrast: each channel spans [0, 1]
    assert torch.allclose(ac.amin((1, 2)), torch.zeros(3)) and torch.allclose(ac.amax((1, 2)), torch.ones(3))
    grey = torch.full((3, 4, 4), 0.4)  # the hue rotation leaves greys grey
    assert torch.allclose(perlin._hue_saturation(grey, 1.0, 1.0), grey, atol=1e-5)
    a = perlin.augment_source(torch.rand(4, 3, 16, 16, generator=g(1)), g(2))
    assert a.shape == (4, 3, 16, 16) and a.min() >= 0 and a.max() <= 1


# ------------------------------------------------------------------ CutPaste and the scar
def _find_source(img, patch):
    """Where in ``img`` [3, H, W] the ``patch`` [3, h, w] is an exact copy (or None)."""
    _, h, w = patch.shape
    win = img.unfold(1, h, 1).unfold(2, w, 1)  # [3, H-h+1, W-w+1, h, w]
    hits = (win == patch[:, None, None]).all(0).all(-1).all(-1).nonzero()
    return hits[0].tolist() if len(hits) else None


def test_cutpaste_pastes_a_copy_of_the_paper_size_and_shape():
    x = torch.rand(40, 3, 64, 64, generator=g(0))
    out, m = patches.cutpaste(x, g(1), jitter=0.0)
    for i in range(len(x)):
        ys, xs = m[i].nonzero(as_tuple=True)
        t, le, hh, ww = int(ys.min()), int(xs.min()), int(ys.max() - ys.min() + 1), int(xs.max() - xs.min() + 1)
        assert m[i].sum() == hh * ww  # one rectangle
        assert 0.02 * 64 * 64 * 0.8 <= hh * ww <= 0.15 * 64 * 64 * 1.2  # area ratio (integer rounding)
        assert 0.3 * 0.8 <= ww / hh <= 3.3 * 1.25  # aspect ratio
        assert _find_source(x[i], out[i, :, t : t + hh, le : le + ww]) is not None  # a copy from the image
    outside = (m == 0)[:, None].expand_as(x)
    assert torch.equal(out[outside], x[outside])
    again = patches.cutpaste(x, g(1), jitter=0.0)
    assert torch.equal(again[0], out)


def test_colour_jitter():
    p = torch.rand(3, 8, 8, generator=g(0))
    assert torch.equal(patches.colour_jitter(p, 0.0, g(0)), p)
    j = patches.colour_jitter(p, 0.1, g(0))
    assert j.shape == p.shape and not torch.equal(j, p)
    assert (j - p).abs().mean() < 0.15  # a mild change


def test_cutpaste_scar_is_thin_rotated_and_copied():
    x = torch.rand(30, 3, 128, 128, generator=g(0))
    straight, m = patches.cutpaste_scar(x, g(1), rotation=0.0, jitter=0.0)
    for i in range(len(x)):
        ys, xs = m[i].nonzero(as_tuple=True)
        t, le = int(ys.min()), int(xs.min())
        hh, ww = int(ys.max()) - t + 1, int(xs.max()) - le + 1
        assert m[i].sum() == hh * ww
        assert 1 <= ww <= round(16 / 256 * 128) and round(10 / 256 * 128) <= hh <= round(25 / 256 * 128) + 1
        assert _find_source(x[i], straight[i, :, t : t + hh, le : le + ww]) is not None
    rotated, mr = patches.cutpaste_scar(x, g(2), jitter=0.0)
    outside = (mr == 0)[:, None].expand_as(x)
    assert torch.equal(rotated[outside], x[outside])
    # rotated: some scar does not fill its bounding box
    fill = []
    for mi in mr:
        ys, xs = mi.nonzero(as_tuple=True)
        fill.append(float(mi.sum()) / float((ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1)))
    assert min(fill) < 0.8
    # every scar pixel is a pixel of the image (nearest-neighbour rotation copies, it does not interpolate)
    for i in range(3):
        vals = set(map(tuple, x[i].permute(1, 2, 0).reshape(-1, 3).tolist()))
        got = rotated[i].permute(1, 2, 0)[mr[i].bool()].tolist()
        assert all(tuple(v) in vals for v in got)
