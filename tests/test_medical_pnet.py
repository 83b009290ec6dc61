"""pnet: the Frangi structure extractor against an independent computation and on lines, blobs and flat
regions; the score and map recomputed from their two terms; a moved structure scores higher than the
structure in place; clear errors."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import ndimage as ndi

import anomaly_zoo as az
from anomaly_zoo.models.medical.pnet import hessian_eigenvalues, pnet_terms, vesselness
from anomaly_zoo.ops import LUMA
from anomaly_zoo.utils import AnomalyZooError


def _canvas(side=64, value=0.7):
    return torch.full((1, 3, side, side), value, dtype=torch.float64)


def test_pnet_hessian_matches_scipy_gaussian_derivatives():
    g = torch.Generator().manual_seed(0)
    grey = ndi.gaussian_filter(torch.rand(40, 40, generator=g, dtype=torch.float64).numpy(), 2.0)
    for sigma in (1.0, 2.0):
        # scipy's Gaussian derivative filters, truncated at 3 sigma, 'nearest' = replicate padding; P-Net's
        # second-derivative kernel has its sum (times the Gaussian) taken off, so a flat image has none
        t = np.arange(-3 * sigma, 3 * sigma + 1)
        gauss = np.exp(-0.5 * (t / sigma) ** 2) / np.exp(-0.5 * (t / sigma) ** 2).sum()
        dc = ((t**2 / sigma**4 - 1 / sigma**2) * gauss).sum()
        smooth = ndi.gaussian_filter(grey, sigma, truncate=3.0, mode="nearest")
        d = {o: sigma**2 * ndi.gaussian_filter(grey, sigma, order=o, truncate=3.0, mode="nearest")
             for o in ((0, 2), (2, 0), (1, 1))}
        d[(0, 2)] -= sigma**2 * dc * smooth
        d[(2, 0)] -= sigma**2 * dc * smooth
        hessian = np.stack([np.stack([d[(0, 2)], d[(1, 1)]], -1), np.stack([d[(1, 1)], d[(2, 0)]], -1)], -2)
        eig = np.linalg.eigvalsh(hessian)  # ascending; P-Net's order is by magnitude
        order = np.argsort(np.abs(eig), -1)
        want = np.take_along_axis(eig, order, -1)
        l1, l2 = hessian_eigenvalues(torch.from_numpy(grey)[None, None], sigma)
        np.testing.assert_allclose(l1[0, 0].numpy(), want[..., 0], atol=1e-8)  # 1e-12 under the square root
        np.testing.assert_allclose(l2[0, 0].numpy(), want[..., 1], atol=1e-8)


def test_pnet_vesselness_is_frangis_formula():
    g = torch.Generator().manual_seed(1)
    x = torch.rand(2, 3, 24, 24, generator=g, dtype=torch.float64)
    grey = (x * torch.tensor(LUMA, dtype=torch.float64).view(1, 3, 1, 1)).sum(1, keepdim=True)
    c, beta = 0.05, 0.5
    per_scale = []
    for s in (1.0, 2.0):
        l1, l2 = hessian_eigenvalues(grey, s)
        per_scale.append(np.exp(-(l1 / l2).numpy() ** 2 / (2 * beta**2))
                         * (1 - np.exp(-(l1**2 + l2**2).numpy() / (2 * c**2))) * (l2 > 0).numpy())
    np.testing.assert_allclose(vesselness(x, (1.0, 2.0), c, beta, "dark").numpy(), np.maximum(*per_scale),
                               rtol=1e-6, atol=1e-9)


def test_pnet_structure_answers_lines_not_flat_regions_or_blobs():
    x = _canvas()
    x[..., 10:38, 12:14] = 0.3  # a dark vertical line, 2 px wide
    yy, xx = torch.meshgrid(torch.arange(64.0), torch.arange(64.0), indexing="ij")
    x[..., (yy - 24) ** 2 + (xx - 40) ** 2 <= 36] = 0.3  # a dark disk, radius 6
    s = vesselness(x, (1.0, 2.0), c=0.05)[0, 0]
    assert s[16:32, 12:14].min() > 0.5  # along the line
    assert s[:, 54:].max() < 1e-6 and s[50:, :].max() < 1e-6  # flat background
    assert s[24, 40] < 0.1  # the disk's centre: curved alike both ways (R_b = 1), a blob, not a line
    flat = vesselness(_canvas(), (1.0, 2.0), c=0.05)
    assert flat.abs().max() < 1e-6


# ------------------------------------------------------------------ a fitted detector
def _vessels(n, seed, blot=False):
    """Grey 32 px images with two dark 'vessels' at fixed places (+-1 px jitter) on a noisy background;
    ``blot``: a dark blot (a disk of radius 4, a haemorrhage) breaks the vertical vessel at rows 6-14."""
    g = torch.Generator().manual_seed(seed)
    x = 0.65 + 0.03 * torch.randn(n, 1, 32, 32, generator=g)
    yy, xx = torch.meshgrid(torch.arange(32.0), torch.arange(32.0), indexing="ij")
    for i in range(n):
        j = int(torch.randint(-1, 2, (1,), generator=g))
        x[i, :, 4:28, 9 + j : 11 + j] = 0.35
        x[i, :, 20 + j : 22 + j, 4:28] = 0.35
        if blot:
            x[i, :, (yy - 10) ** 2 + (xx - 10) ** 2 <= 16] = 0.25
    return x.clamp(0, 1).repeat(1, 3, 1, 1)


@pytest.fixture(scope="module")
def fitted():
    kw = dict(image_size=32, width=8, levels=2, disc_width=8, epochs=30, batch_size=4, lr=3e-3,
              structure_sigmas=(1.0,), seed=0)
    return az.create("pnet", **kw).fit(_vessels(16, 0))


def test_pnet_score_and_map_recomputed_from_their_two_terms(fitted):
    x = _vessels(4, 1)
    pred = fitted.predict(x)
    with torch.no_grad():
        s = fitted.structure(x)
        x_hat = fitted.generator_(x, s)
        s_hat = fitted.structure(x_hat)
    rec, st = (x - x_hat).abs().flatten(1).mean(1), (s - s_hat).abs().flatten(1).mean(1)
    torch.testing.assert_close(torch.stack(pnet_terms(x, x_hat, s, s_hat)), torch.stack([rec, st]))
    lf = fitted.lambda_f
    torch.testing.assert_close(pred.scores, (1 - lf) * rec + lf * st, rtol=1e-5, atol=1e-7)
    want_map = (1 - lf) * (x - x_hat).abs().mean(1) + lf * (s - s_hat).abs()[:, 0]
    torch.testing.assert_close(pred.maps, want_map, rtol=1e-5, atol=1e-7)
    assert st.min() > 0 and rec.min() > 0  # both terms take part


def test_pnet_broken_structure_scores_higher_than_intact(fitted):
    intact, broken = _vessels(6, 2), _vessels(6, 2, blot=True)  # the same images, with and without the blot
    p_intact, p_broken = fitted.predict(intact), fitted.predict(broken)
    assert (p_broken.scores > p_intact.scores).all() and p_broken.scores.min() > p_intact.scores.max()
    rec_i, st_i = fitted.terms(intact)[:2]
    rec_b, st_b = fitted.terms(broken)[:2]
    assert (st_b > st_i).all() and (rec_b > rec_i).all()  # both differences see it
    # the map points at the blot: its disk outscores the untouched bottom rows
    assert (p_broken.maps[:, 7:14, 7:14].mean((1, 2)) > 3 * p_broken.maps[:, 26:, :].mean((1, 2))).all()


def test_pnet_fits_its_structure_constant_on_training_images(fitted):
    assert fitted.structure_c_ > 0 and fitted.shapes_["structure_c"] == pytest.approx(float(fitted.structure_c_))
    assert set(fitted.history_) == {"discriminator", "generator"}


@pytest.mark.parametrize("kw, match", [
    (dict(lambda_f=1.5), "lambda_f=1.5"), (dict(lambda_str=-1.0), "lambda_str=-1.0"),
    (dict(polarity="white"), "polarity='white'"), (dict(structure_sigmas=(0.0,)), "structure_sigmas"),
    (dict(structure_sigmas=(1, 2)), "structure_sigmas"), (dict(image_size=36, levels=3), "multiple of"),
    (dict(d_lr_ratio=0.0), "d_lr_ratio=0.0"),
])
def test_pnet_bad_parameters_raise_one_clear_error(kw, match):
    with pytest.raises(AnomalyZooError, match=match):
        az.create("pnet", preset="quick", **kw).fit(torch.rand(4, 3, 32, 32))


def test_pnet_misuse_raises_clear_errors():
    det = az.create("pnet", preset="quick")
    with pytest.raises(az.NotFittedError):
        det.predict(torch.rand(2, 3, 64, 64))
    with pytest.raises(AnomalyZooError, match="unsupervised"):
        det.fit(torch.rand(4, 3, 64, 64), labels=[0, 0, 1, 1])
    with pytest.raises(AnomalyZooError, match="multiples of"):
        az.create("pnet", preset="quick", image_size=None, epochs=1).fit(torch.rand(4, 3, 36, 36))
    with pytest.raises(AnomalyZooError, match="polarity"):
        vesselness(torch.rand(1, 3, 8, 8), (1.0,), 0.1, polarity="white")
