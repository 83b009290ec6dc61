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
