import numpy as np
import pytest
import torch
from skimage.metrics import structural_similarity

from anomaly_zoo.ops import gaussian_blur
from anomaly_zoo.ssim import ssim, ssim_map


def _pair(seed=0, size=48):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(1, 1, size, size, generator=g)
    x = gaussian_blur(x, 1.0)  # some structure, not only noise
    y = (x + 0.1 * torch.randn(x.shape, generator=g)).clamp(0, 1)
    return x.double(), y.double()


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_ssim_matches_scikit_image(seed):
    x, y = _pair(seed)
    ref = structural_similarity(x[0, 0].numpy(), y[0, 0].numpy(), gaussian_weights=True, sigma=1.5,
                                use_sample_covariance=False, data_range=1.0)
    assert float(ssim(x, y)) == pytest.approx(ref, abs=1e-6)


def test_ssim_map_matches_scikit_image_inside():
    x, y = _pair(3)
    _, ref = structural_similarity(x[0, 0].numpy(), y[0, 0].numpy(), gaussian_weights=True, sigma=1.5,
                                   use_sample_covariance=False, data_range=1.0, full=True)
    ours = ssim_map(x, y)[0, 0].numpy()
    np.testing.assert_allclose(ours[5:-5, 5:-5], ref[5:-5, 5:-5], atol=1e-6)


def test_ssim_known_values_and_gradient():
    x, y = _pair(4)
    assert float(ssim(x, x)) == pytest.approx(1.0, abs=1e-12)
    assert float(ssim(x, 1 - x)) < 0  # anti-correlated structure
    y = y.clone().requires_grad_(True)
    (1 - ssim(x, y)).backward()
    assert torch.isfinite(y.grad).all() and y.grad.abs().sum() > 0


def test_gaussian_blur_matches_scipy_inside():
    from scipy.ndimage import gaussian_filter

    m = torch.rand(2, 40, 40, dtype=torch.float64)
    ours = gaussian_blur(m, 2.0).numpy()
    ref = np.stack([gaussian_filter(a, 2.0, mode="reflect") for a in m.numpy()])
    np.testing.assert_allclose(ours[:, 9:-9, 9:-9], ref[:, 9:-9, 9:-9], atol=1e-10)
    assert gaussian_blur(m, 2.0).sum() == pytest.approx(float(m.sum()), rel=0.02)


# ------------------------------------------------------------------------------ MS-SSIM
PAPER_WEIGHTS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)  # Wang, Simoncelli & Bovik (2003)


def _np_ms_ssim(x: np.ndarray, y: np.ndarray, weights=PAPER_WEIGHTS) -> float:
    """An independent MS-SSIM of two 2-D images: SciPy Gaussian filtering for the per-scale
    contrast-structure terms, scikit-image's SSIM at the coarsest scale, NumPy 2x2 means."""
    from scipy.ndimage import gaussian_filter

    def cs(a, b):
        f = lambda z: gaussian_filter(z, 1.5, truncate=3.5, mode="reflect")  # noqa: E731 - 11x11 window
        mu_a, mu_b = f(a), f(b)
        saa, sbb, sab = f(a * a) - mu_a**2, f(b * b) - mu_b**2, f(a * b) - mu_a * mu_b
        c2 = (0.03 * 1.0) ** 2
        return ((2 * sab + c2) / (saa + sbb + c2))[5:-5, 5:-5].mean()

    def down(a):
        h, w = (a.shape[0] // 2) * 2, (a.shape[1] // 2) * 2
        return a[:h, :w].reshape(h // 2, 2, w // 2, 2).mean((1, 3))

    out = 1.0
    for j, wj in enumerate(weights):
        if j == len(weights) - 1:
            s = structural_similarity(x, y, gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
                                      data_range=1.0)
            out *= max(s, 1e-6) ** wj
        else:
            out *= max(cs(x, y), 1e-6) ** wj
            x, y = down(x), down(y)
    return out


@pytest.mark.parametrize("seed", [0, 1])
def test_ms_ssim_matches_an_independent_composition_with_the_paper_weights(seed):
    from anomaly_zoo.ssim import MS_WEIGHTS, ms_levels, ms_ssim

    assert MS_WEIGHTS == PAPER_WEIGHTS and ms_levels(192) == 5
    x, y = _pair(seed, size=192)  # 192 px: all five scales fit the 11x11 window
    ref = _np_ms_ssim(x[0, 0].numpy(), y[0, 0].numpy())
    assert float(ms_ssim(x, y)) == pytest.approx(ref, abs=1e-6)
    assert 0 < ref < 1


def test_ms_ssim_on_small_images_uses_the_scales_that_fit_renormalised():
    from anomaly_zoo.ssim import ms_levels, ms_ssim

    assert [ms_levels(s) for s in (11, 21, 22, 64, 128, 176)] == [1, 1, 2, 3, 4, 5]
    x, y = _pair(5, size=64)
    w = np.array(PAPER_WEIGHTS[:3]) / sum(PAPER_WEIGHTS[:3])
    ref = _np_ms_ssim(x[0, 0].numpy(), y[0, 0].numpy(), tuple(w))
    assert float(ms_ssim(x, y)) == pytest.approx(ref, abs=1e-6)
    with pytest.raises(ValueError, match="at least 11"):
        ms_ssim(x[..., :8, :8], y[..., :8, :8])


def test_ms_ssim_identity_order_and_gradient():
    from anomaly_zoo.ssim import ms_ssim, ms_ssim_map

    x, y = _pair(6, size=96)
    assert float(ms_ssim(x, x)) == pytest.approx(1.0, abs=1e-12)
    assert torch.allclose(ms_ssim_map(x, x), torch.ones_like(x))
    noisier = (x + 0.3 * (y - x)).clamp(0, 1)  # closer to x than y is
    assert float(ms_ssim(x, noisier)) > float(ms_ssim(x, y))
    per_image = ms_ssim(torch.cat([x, y]), torch.cat([y, y]), reduction="none")
    assert per_image.shape == (2,) and float(per_image[1]) == pytest.approx(1.0)
    # the map is per pixel, at the input size, and localises a local change
    z = x.clone()
    z[..., 10:30, 10:30] = 1 - z[..., 10:30, 10:30]
    m = 1 - ms_ssim_map(x, z)[0, 0]
    assert m.shape == (96, 96) and float(m[15:25, 15:25].mean()) > 5 * float(m[60:, 60:].mean())
    # differentiable, finite gradient even where contrast-structure is clamped
    y = y.clone().float().requires_grad_(True)
    (1 - ms_ssim(x.float(), y)).backward()
    assert torch.isfinite(y.grad).all() and y.grad.abs().sum() > 0
