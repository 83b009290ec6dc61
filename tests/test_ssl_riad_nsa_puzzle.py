"""RIAD, NSA and Puzzle-AE: their losses, inpaintings, perturbations, maps and scores checked against
independent computations on small inputs; ae's MSGMS loss (the survey's AE-MSGMS)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy import ndimage
from torch import nn

import anomaly_zoo as az
from anomaly_zoo.gms import msgms_loss, msgms_map
from anomaly_zoo.models.ssl.nsa import ResEncoderDecoder, nsa_score
from anomaly_zoo.models.ssl.puzzle_ae import PuzzleUNet, perturb, reconstruction_error
from anomaly_zoo.models.ssl.riad import UNet, inpaint, mean_filter, riad_loss
from anomaly_zoo.ssim import ssim_map
from anomaly_zoo.synthesis.masks import grid_masks


def _images(n=4, side=32, seed=0):
    return torch.rand(n, 3, side, side, generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------ RIAD
def test_riad_inpainting_takes_each_pixel_from_the_input_that_hid_it():
    torch.manual_seed(0)
    net = UNet(3, 3, width=4, depth=2).eval()
    x = _images()
    hidden = grid_masks(4, 32, 32, 4, 3, torch.Generator().manual_seed(1))
    with torch.no_grad():
        got = inpaint(net, x, hidden)
        expected = torch.zeros_like(x)
        for i in range(3):  # written out: I_r = sum_i M_i * f(I * (1 - M_i))
            m = hidden[:, i : i + 1]
            expected += m * torch.sigmoid(net(x * (1 - m)))
    assert torch.allclose(got, expected, atol=1e-6)
    # the inpainted value of a pixel never depends on that pixel's own value
    x = x.clone().requires_grad_(True)
    out = inpaint(net, x, hidden)
    (grad,) = torch.autograd.grad(out[0, :, 5, 7].sum(), x)
    assert float(grad[0, :, 5, 7].abs().max()) == 0.0
    assert float(grad[0].abs().sum()) > 0  # it does depend on the neighbours


def test_riad_loss_is_l2_plus_weighted_msgms_and_ssim():
    x, y = _images(seed=1), _images(seed=2)
    mse = float(((x - y) ** 2).mean())
    assert float(riad_loss(x, y, 0.0, 0.0)) == pytest.approx(mse, rel=1e-5)
    expected = mse + 2 * float(msgms_loss(x, y)) + 0.5 * float(1 - ssim_map(x, y).mean())
    assert float(riad_loss(x, y, 2.0, 0.5)) == pytest.approx(expected, rel=1e-5)
    assert float(riad_loss(x, x)) == pytest.approx(0.0, abs=1e-5)


def test_riad_mean_filter_matches_scipy_and_map_and_score_follow_the_paper():
    maps = torch.rand(2, 20, 20, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    for i in range(2):
        assert np.allclose(mean_filter(maps, 5)[i].numpy(), ndimage.uniform_filter(maps[i].numpy(), 5, mode="nearest"))
    x = _images(n=6)
    det = az.create("riad", preset="quick", epochs=1, k_values=(2, 8)).fit(x)
    pred = det.predict(x)
    with torch.no_grad():  # recomputed: mean over k of 1 - MSGMS of the combined inpainting, filtered, max
        g = [1 - msgms_map(det._prepare(x, "x"), det.inpainting(det._prepare(x, "x"), k)) for k in (2, 8)]
        m = mean_filter(torch.stack(g).mean(0), 5)
    m = F.interpolate(m[:, None], size=(32, 32), mode="bilinear", align_corners=False)[:, 0]
    assert torch.allclose(pred.maps, m, atol=1e-5)
    # the score is the maximum of the (input-size) map before upsampling
    assert torch.all(pred.scores >= pred.maps.flatten(1).amax(1) - 1e-5)


def test_riad_rejects_bad_settings():
    x = _images(n=2)
    for kw in (dict(filter_size=4), dict(k_values=(0, 2)), dict(image_size=60)):
        with pytest.raises(az.AnomalyZooError, match="riad"):
            az.create("riad", preset="quick", **kw).fit(x)


# ------------------------------------------------------------------ Puzzle-AE
class _Identity(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.ones(()))

    def forward(self, x):
        return self.w * x


def test_puzzle_ae_perturbation_is_the_signed_gradient_step_inside_the_ball():
    """With f(x) = x, L = mean((x_adv - target)^2) and alpha >> eps, one step from the random start gives
    delta = eps * sign(x_in + delta_0 - target) (the authors' FGSM): computed here by hand."""
    g = torch.Generator().manual_seed(0)
    x_in = 0.25 + 0.5 * torch.rand(2, 3, 8, 8, generator=g)  # away from 0 and 1: no clipping
    target = torch.rand(2, 3, 8, 8, generator=g)
    eps = 0.05
    delta0 = (torch.rand(x_in.shape, generator=torch.Generator().manual_seed(5)) * 2 - 1) * eps
    expected = x_in + eps * torch.sign(x_in + delta0 - target)
    got = perturb(_Identity(), x_in, target, eps, 2.0, 1, torch.Generator().manual_seed(5))
    assert torch.allclose(got, expected, atol=1e-6)
    assert float((got - x_in).abs().max()) <= eps + 1e-6
    # it raises the loss more than the random start does; eps 0 or no steps leaves the input alone
    loss = lambda z: float(((z - target) ** 2).mean())  # noqa: E731
    assert loss(got) > loss(x_in + delta0)
    assert torch.equal(perturb(_Identity(), x_in, target, 0.0, 2.0, 1, g), x_in)
    assert torch.equal(perturb(_Identity(), x_in, target, eps, 2.0, 0, g), x_in)


def test_puzzle_ae_score_and_map_are_the_reconstruction_error():
    x = _images(n=6)
    det = az.create("puzzle_ae", preset="quick", epochs=1, image_size=32).fit(x)
    pred = det.predict(x)
    with torch.no_grad():
        x_hat = det.net_(x)
    maps = ((x - x_hat) ** 2).mean(1)
    assert torch.allclose(pred.maps, maps, atol=1e-6)
    assert torch.allclose(pred.scores, maps.flatten(1).mean(1), atol=1e-6)
    s, m = reconstruction_error(x, x)
    assert float(s.abs().max()) == 0 and float(m.abs().max()) == 0


def test_puzzle_ae_trains_on_shuffled_inputs_never_the_identity():
    det = az.create("puzzle_ae", preset="quick", epochs=1)
    det.check_params()
    x = _images(n=64, side=16)
    out = det._puzzle(x, torch.Generator().manual_seed(0))
    tiles = lambda z: z.unfold(2, 8, 8).unfold(3, 8, 8)  # noqa: E731  [N, C, 2, 2, 8, 8]
    assert not bool((out == x).flatten(1).all(1).any()), "an image came back unshuffled"
    assert torch.allclose(tiles(out).sum((2, 3)), tiles(x).sum((2, 3)), atol=1e-5)  # the same tiles, moved


def test_puzzle_unet_output_in_unit_range():
    net = PuzzleUNet(3, 4, 2)
    with torch.no_grad():
        y = net(_images(n=2, side=16))
    assert y.shape == (2, 3, 16, 16) and float(y.min()) >= 0 and float(y.max()) <= 1


# ------------------------------------------------------------------ NSA
def test_nsa_map_is_the_network_output_and_score_its_mean():
    x = _images(n=6)
    det = az.create("nsa", preset="quick", epochs=1, image_size=32).fit(x)
    pred = det.predict(x)
    with torch.no_grad():
        expected = torch.sigmoid(det.net_(x))
    assert torch.allclose(pred.maps, expected, atol=1e-6)
    assert torch.allclose(pred.scores, expected.flatten(1).mean(1), atol=1e-6)
    s, m = nsa_score(torch.zeros(2, 4, 4))
    assert torch.allclose(s, torch.full((2,), 0.5)) and torch.allclose(m, torch.full((2, 4, 4), 0.5))


def test_nsa_training_pairs_repeat_with_a_seed_and_targets_sit_in_the_patches():
    x = _images(n=4, side=64)
    det = az.create("nsa", preset="quick")
    det.check_params()
    bad1, y1 = det.synthesize(x, torch.Generator().manual_seed(3))
    bad2, y2 = det.synthesize(x, torch.Generator().manual_seed(3))
    assert torch.equal(bad1, bad2) and torch.equal(y1, y2)
    changed = (bad1 != x).any(1)
    assert not bool(((y1 > 0) & ~changed).any()), "a target where nothing changed"
    assert float(y1.min()) >= 0 and float(y1.max()) <= 1 and float(y1.max()) > 0.5


def test_nsa_network_shape_and_bce_target():
    net = ResEncoderDecoder(width=4, blocks=1, stages=3)
    assert net(_images(n=2, side=32)).shape == (2, 32, 32)
    for kw in (dict(half_width=(0.3, 0.1)), dict(half_width=(0.1, 0.6)), dict(resize=(0.0, 2.0))):
        with pytest.raises(az.AnomalyZooError, match="nsa"):
            az.create("nsa", preset="quick", **kw).fit(_images(n=2))


# ------------------------------------------------------------------ AE-MSGMS
def test_ae_msgms_loss_and_residual():
    x = _images(n=6, side=32)
    det = az.create("ae", preset="quick", loss="msgms", epochs=1, image_size=32).fit(x)
    with torch.no_grad():
        x_hat = det.net_(x)
        assert float(det._loss(x)) == pytest.approx(float(msgms_loss(x, x_hat)), rel=1e-5)
    pred = det.predict(x)
    assert torch.allclose(pred.maps, 1 - msgms_map(x, x_hat), atol=1e-6)
