"""Normalizing-flow family: the blocks are exact (inverse to float tolerance, log-determinant equal to
log |det| of the autograd Jacobian), each method's equations against an independent computation, and
the papers' claims the quick presets can show (pretrained features beat random ones)."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch.autograd.functional import jacobian

import anomaly_zoo as az
from anomaly_zoo.models.flow import cflow, coupling, csflow, differnet, fastflow


def _randomise(module: torch.nn.Module, seed: int = 0, std: float = 0.3) -> torch.nn.Module:
    """Move every parameter away from its initialisation (CS-Flow's gammas start at 0: the identity)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * std)
    return module.double()


def _check_exact(forward, inverse, x: torch.Tensor, cond=None):
    """inverse(forward(x)) == x, and logdet == log |det J| of the autograd Jacobian, per sample."""
    y, logdet = forward(x, cond)
    back = inverse(y, cond)
    assert torch.allclose(back, x, rtol=0, atol=1e-9), float((back - x).abs().max())
    for b in range(len(x)):
        c = None if cond is None else cond[b : b + 1]

        def f(v, c=c):
            return forward(v.view(1, *x.shape[1:]), c)[0].flatten()

        jac = jacobian(f, x[b].flatten(), vectorize=True)
        sign, logabs = torch.linalg.slogdet(jac)
        assert float(sign) != 0
        assert float(logdet[b].detach()) == pytest.approx(float(logabs), abs=1e-8)


BLOCKS = {
    "one-sided coupling, atan clamp": lambda: coupling.AffineCoupling(6, coupling.mlp(8), 3.0, "atan"),
    "one-sided coupling, odd channels": lambda: coupling.AffineCoupling(5, coupling.mlp(8), 1.9, "tanh"),
    "two-sided (GLOW) coupling": lambda: coupling.AffineCoupling(6, coupling.mlp(8), 3.0, two_sided=True),
    "permutation": lambda: coupling.Permutation(6, seed=1),
    "rotation (soft permutation)": lambda: coupling.Permutation(6, seed=1, soft=True),
    "global affine": lambda: coupling.GlobalAffine(6),
    "DifferNet chain": lambda: coupling.glow_flow(6, 3, differnet.fc_subnet(8), 3.0),
}


@pytest.mark.parametrize("name", list(BLOCKS))
def test_flow_blocks_invertible_and_logdet_exact(name):
    block = _randomise(BLOCKS[name]())
    x = torch.randn(4, 5 if "odd" in name else 6, generator=torch.Generator().manual_seed(1),
                    dtype=torch.float64)
    _check_exact(block, block.inverse, x)


def test_cflow_conditional_chain_exact():
    """CFLOW's decoder: AllInOneBlocks conditioned on a positional code (the condition changes the map)."""
    flow = _randomise(coupling.all_in_one_flow(6, 3, coupling.mlp(factor=2), 1.9, cond_channels=4,
                                               soft_permutation=True))
    g = torch.Generator().manual_seed(2)
    x = torch.randn(3, 6, generator=g, dtype=torch.float64)
    cond = torch.randn(3, 4, generator=g, dtype=torch.float64)
    _check_exact(flow, flow.inverse, x, cond)
    assert not torch.allclose(flow(x, cond)[0], flow(x, cond + 1)[0])


def test_fastflow_conv_chain_exact():
    """FastFlow's 2-D flow (3x3 and 1x1 subnets alternating) on a 4-channel 3x3 map: 36 dimensions."""
    subnets = [coupling.conv_subnet(1.0, 3 if k % 2 == 0 else 1) for k in range(3)]
    flow = _randomise(coupling.all_in_one_flow(4, 3, None, 2.0, subnets=subnets))
    x = torch.randn(2, 4, 3, 3, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    _check_exact(flow, flow.inverse, x)


def test_csflow_cross_scale_flow_exact():
    """CS-Flow's flow on three scales (4x4, 2x2, 1x1): one Jacobian over all 84 dimensions at once,
    so the cross-scale terms are checked too."""
    flow = _randomise(csflow.CrossScaleFlow(4, 2, 6, 3.0))
    shapes = [(4, 4, 4), (4, 2, 2), (4, 1, 1)]
    sizes = [int(np.prod(s)) for s in shapes]

    def split(v):
        return [p.view(len(v), *s) for p, s in zip(v.split(sizes, 1), shapes)]

    def forward(v, cond=None):
        zs, logdet = flow(split(v))
        return torch.cat([z.flatten(1) for z in zs], 1), logdet

    def inverse(v, cond=None):
        return torch.cat([z.flatten(1) for z in flow.inverse(split(v))], 1)

    x = torch.randn(2, sum(sizes), generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    _check_exact(forward, inverse, x)
    # the scales talk to each other: the coarsest latent depends on the finest input
    jac = jacobian(lambda v: forward(v[None])[0][0], x[0], vectorize=True)
    assert jac[-4:, : sizes[0]].abs().max() > 1e-6


def test_soft_clamp_bounds_and_slope():
    s = torch.linspace(-100, 100, 1001, dtype=torch.float64)
    for kind, bound in (("atan", 3 * coupling.ATAN_FACTOR * math.pi / 2), ("tanh", 3.0)):
        c = coupling.soft_clamp(s, 3.0, kind)
        assert bound >= c.abs().max() > 0.95 * bound
    small = torch.tensor([1e-4], dtype=torch.float64)
    assert float(coupling.soft_clamp(small, 3.0, "tanh")) == pytest.approx(3e-4, rel=1e-6)  # a tanh(s) ~ a s
    assert float(coupling.soft_clamp(small, 3.0, "atan")) == pytest.approx(1e-4 * 3 * 0.636 / 3, rel=1e-6)


def test_gaussian_nll_matches_torch_distributions():
    z = torch.randn(5, 7, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    logdet = torch.randn(5, dtype=torch.float64)
    normal = torch.distributions.Normal(torch.zeros(7, dtype=torch.float64), 1.0)
    expected = -(normal.log_prob(z).sum(1) + logdet)
    assert torch.allclose(coupling.gaussian_nll(z, logdet), expected)
    assert torch.allclose(cflow.log_likelihood(z, logdet), -expected)
    assert torch.allclose(fastflow.fastflow_nll(z, logdet), expected - 3.5 * math.log(2 * math.pi))


def test_cflow_positional_encoding_formula():
    pe = cflow.positional_encoding_2d(8, 3, 5)  # [8, 3, 5]
    for k in range(2):  # frequencies 1/10000^(2k/4), k = 0, 1
        f = 1 / 10000 ** (2 * k / 4)
        for i in range(3):
            for j in range(5):
                assert float(pe[2 * k, i, j]) == pytest.approx(math.sin(j * f), abs=1e-6)
                assert float(pe[2 * k + 1, i, j]) == pytest.approx(math.cos(j * f), abs=1e-6)
                assert float(pe[4 + 2 * k, i, j]) == pytest.approx(math.sin(i * f), abs=1e-6)
                assert float(pe[5 + 2 * k, i, j]) == pytest.approx(math.cos(i * f), abs=1e-6)


def test_differnet_rotation_matches_rot90():
    x = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(6))
    r = differnet.rotate(x, torch.tensor([90.0, 0.0]))
    assert torch.allclose(r[1], x[1], atol=1e-5)
    # counter-clockwise by 90 degrees, as torch.rot90 in the image plane (y down): compare the interior
    assert torch.allclose(r[0], torch.rot90(x[0], 1, (1, 2)), atol=1e-4) or \
        torch.allclose(r[0], torch.rot90(x[0], -1, (1, 2)), atol=1e-4)


def test_differnet_map_is_the_input_gradient_of_the_score(tiny):
    """Item 5: the map at a pixel equals mean_c |d tau / d x_c| from central finite differences."""
    train, test = tiny
    det = az.create("differnet", preset="quick", pretrained=False, image_size=64, epochs=1, sigma=0.0,
                    device="cpu").fit(train)
    det.double()
    x = test[:1].double()
    det.views_per_pass = 3  # the map is added up over passes of 3 + 1 of the 4 rotations
    pred_map = det._score(x)[1][0]
    angles = torch.arange(det.n_transforms_test, dtype=torch.float64) * 360 / det.n_transforms_test
    i, j = 20, 37
    eps = 1e-4
    grads = []
    for c in range(3):
        up, down = x.clone(), x.clone()
        up[0, c, i, j] += eps
        down[0, c, i, j] -= eps
        with torch.no_grad():
            grads.append(float(det.view_scores(up, angles).mean() - det.view_scores(down, angles).mean()) / (2 * eps))
    assert float(pred_map[i, j]) == pytest.approx(np.mean(np.abs(grads)), rel=1e-3, abs=1e-9)


# ------------------------------------------------------------------ claims on real data (quick presets)
# Measured on brick, data seed 0 (CPU, one thread): pretrained vs random backbone
#   cflow:    random image AUROC 0.671, AUPRO 0.472; pretrained 0.883, 0.870 (gaps 0.21, 0.40)
#   fastflow: random image AUROC 0.783, AUPRO 0.722; pretrained 0.974, 0.933 (gaps 0.19, 0.21)
# The margins asked are about half the measured gaps.
MARGIN = {"cflow": (0.10, 0.20), "fastflow": (0.10, 0.10)}  # (image AUROC, AUPRO)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["cflow", "fastflow"])
def test_flow_pretrained_features_beat_random_features(name, brick):
    """The papers' premise: a flow on ImageNet features beats the same flow on a random CNN."""
    report = {}
    for pretrained in (True, False):
        det = az.create(name, preset="quick", pretrained=pretrained).fit(brick.train_images)
        report[pretrained] = az.metrics.evaluate(det.predict(brick.test_images), brick.test_labels, brick.test_masks)
    for metric, margin in (("image_auroc", MARGIN[name][0]), ("aupro", MARGIN[name][1])):
        assert report[True][metric] >= report[False][metric] + margin, (name, metric, report)

