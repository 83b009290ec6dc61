"""CutPaste, DRAEM and SSPCAB: losses, densities, scores and maps against independent computations;
frozen stages stay frozen; SSPCAB never sees the position it predicts; seeded fits repeat."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import anomaly_zoo as az
from anomaly_zoo.backbones import create_backbone
from anomaly_zoo.models.ssl import cutpaste as cp
from anomaly_zoo.models.ssl import draem as dr
from anomaly_zoo.models.ssl.sspcab import SSPCAB, corner_mask, sspcab_loss


def g(seed=0):
    return torch.Generator().manual_seed(seed)


# ------------------------------------------------------------------ CutPaste: density and loss
def test_cutpaste_ledoit_wolf_equals_sklearn():
    from sklearn.covariance import LedoitWolf

    x = torch.randn(40, 12, generator=g(0)) @ torch.randn(12, 12, generator=g(1))
    mean, cov, shrink = cp.ledoit_wolf(x)
    ref = LedoitWolf().fit(x.double().numpy())
    np.testing.assert_allclose(cov.numpy(), ref.covariance_, rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(shrink, ref.shrinkage_, rtol=1e-6)
    np.testing.assert_allclose(mean.numpy(), ref.location_, atol=1e-9)


def test_cutpaste_mahalanobis_and_loss():
    f = torch.randn(5, 4, generator=g(0))
    mean = torch.randn(4, generator=g(1)).double()
    a = torch.randn(4, 4, generator=g(2)).double()
    precision = a @ a.T + torch.eye(4, dtype=torch.float64)
    d = cp.mahalanobis(f, mean, precision).double().numpy()
    z = f.double().numpy() - mean.numpy()
    expected = np.sqrt(np.einsum("ni,ij,nj->n", z, precision.numpy(), z))
    np.testing.assert_allclose(d, expected, rtol=1e-5)
    logits, y = torch.randn(6, 3, generator=g(3)), torch.tensor([0, 0, 1, 1, 2, 2])
    p = np.exp(logits.numpy()) / np.exp(logits.numpy()).sum(1, keepdims=True)
    np.testing.assert_allclose(float(cp.cutpaste_loss(logits, y)), -np.log(p[np.arange(6), y.numpy()]).mean(),
                               rtol=1e-5)


def test_cutpaste_three_way_batch():
    x = torch.rand(4, 3, 32, 32, generator=g(0))
    xb, y = cp.three_way_batch(x, g(1))
    assert xb.shape == (12, 3, 32, 32) and y.tolist() == [0] * 4 + [1] * 4 + [2] * 4
    assert torch.equal(xb[:4], x)  # class 0: the normal images themselves
    assert all(not torch.equal(xb[4 + i], x[i]) and not torch.equal(xb[8 + i], x[i]) for i in range(4))


def test_cutpaste_frozen_stages_keep_their_weights_and_statistics(tiny):
    train, _ = tiny
    det = az.create("cutpaste", preset="quick", epochs=2, lr=0.5, localize=False).fit(train)
    ref = create_backbone("efficientnet_lite0", pretrained=True, layers=["stage7"]).model.state_dict()
    got = det.net_.backbone.model.state_dict()
    lo, hi = det.net_.backbone.model.stage_slices["stage6"]
    frozen = [k for k in ref if k.startswith(("_conv_stem", "_bn0")) or
              (k.startswith("_blocks.") and int(k.split(".")[1]) < lo)]
    trained = [k for k in ref if k.startswith("_blocks.") and lo <= int(k.split(".")[1]) < hi and "weight" in k]
    assert frozen and trained
    assert all(torch.equal(got[k], ref[k]) for k in frozen)  # weights and BN running statistics
    assert any(not torch.equal(got[k], ref[k]) for k in trained)


def test_cutpaste_scores_and_maps_equal_a_patch_by_patch_computation():
    x = torch.rand(4, 3, 32, 32, generator=g(0))
    det = az.create("cutpaste", image_size=32, patch_size=16, patch_stride=8, epochs=1, batch_size=4,
                    head_dims=(16, 8), pretrained=False, sigma=0.0).fit(x)
    test = torch.rand(2, 3, 32, 32, generator=g(1))
    pred = det.predict(test)
    with torch.no_grad():
        f = det.net_.backbone(test)
        s = cp.mahalanobis(f, det.mean_, det.precision_)
        np.testing.assert_allclose(pred.scores.numpy(), s.numpy(), rtol=1e-5)
        # every 16 px patch at stride 8 on its own through the patch network, then the mean over covering patches
        grid = torch.zeros(2, 3, 3)
        for i in range(3):
            for j in range(3):
                fp = det.patch_net_.backbone(test[:, :, 8 * i : 8 * i + 16, 8 * j : 8 * j + 16])
                grid[:, i, j] = cp.mahalanobis(fp, det.patch_mean_, det.patch_precision_)
    total, count = torch.zeros(2, 32, 32), torch.zeros(32, 32)
    for i in range(3):
        for j in range(3):
            total[:, 8 * i : 8 * i + 16, 8 * j : 8 * j + 16] += grid[:, i, j, None, None]
            count[8 * i : 8 * i + 16, 8 * j : 8 * j + 16] += 1
    np.testing.assert_allclose(pred.maps.numpy(), (total / count).numpy(), rtol=1e-4, atol=1e-4)


def test_cutpaste_bad_settings():
    x = torch.rand(4, 3, 32, 32)
    for kw in (dict(freeze="stage7"), dict(tap="stage9"), dict(patch_size=64, image_size=32),
               dict(layers=("stage3",))):
        with pytest.raises(az.AnomalyZooError, match=next(iter(kw))):
            az.create("cutpaste", preset="quick", pretrained=False, **kw).fit(x)


# ------------------------------------------------------------------ DRAEM: losses and score
def test_draem_focal_loss_against_the_formula():
    logits = torch.randn(2, 2, 5, 5, generator=g(0))
    target = (torch.rand(2, 5, 5, generator=g(1)) > 0.7).float()
    p = torch.softmax(logits, 1).numpy()
    pt = np.where(target.numpy() == 1, p[:, 1], p[:, 0])
    for gamma in (0.0, 2.0):
        expected = (-(1 - pt) ** gamma * np.log(pt)).mean()
        np.testing.assert_allclose(float(dr.focal_loss(logits, target, gamma)), expected, rtol=1e-5)
    assert torch.allclose(dr.focal_loss(logits, target, 0.0), F.cross_entropy(logits, target.long()))


def test_draem_reconstruction_loss_is_eq1():
    from skimage.metrics import structural_similarity

    x = torch.rand(1, 3, 32, 32, generator=g(0))
    r = (x + 0.1 * torch.randn(1, 3, 32, 32, generator=g(1))).clamp(0, 1)
    loss = float(dr.reconstruction_loss(x, r, lam=1.0))
    mse = float(((x - r) ** 2).mean())
    # the SSIM part: 1 - mean SSIM map; inside the border it is scikit-image's SSIM map
    ssim_part = loss - mse
    _, full = structural_similarity(x[0].permute(1, 2, 0).numpy(), r[0].permute(1, 2, 0).numpy(),
                                    channel_axis=2, gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
                                    data_range=1.0, full=True)
    ours = dr.ssim_map(x, r)[0].permute(1, 2, 0).numpy()
    np.testing.assert_allclose(ours[5:-5, 5:-5], full[5:-5, 5:-5], atol=1e-4)
    np.testing.assert_allclose(ssim_part, 1 - ours.mean(), rtol=1e-5)


def test_draem_image_score_is_max_of_the_mean_filtered_map():
    from scipy.ndimage import uniform_filter

    m = torch.rand(3, 20, 20, generator=g(0))
    got = dr.image_score(m, 5).numpy()
    expected = [uniform_filter(mi, 5, mode="constant", cval=0.0).max() for mi in m.double().numpy()]
    np.testing.assert_allclose(got, expected, rtol=1e-5)


def test_draem_networks_and_the_discriminator_input():
    rec, disc = dr.ReconstructiveNet(4), dr.DiscriminativeNet(4)
    x = torch.rand(2, 3, 64, 64)
    assert rec(x).shape == (2, 3, 64, 64) and disc(torch.cat((x, x), 1)).shape == (2, 2, 64, 64)
    # sspcab=True puts exactly one SSPCAB block in the reconstructive network (its fifth encoder block)
    assert sum(isinstance(m, SSPCAB) for m in dr.ReconstructiveNet(4, sspcab=True).modules()) == 1
    det = az.create("draem", preset="quick", epochs=1, width=4, disc_width=4)
    det.fit(torch.rand(4, 3, 64, 64, generator=g(0)))
    seen = {}
    det.disc_.register_forward_pre_hook(lambda mod, inp: seen.setdefault("x", inp[0]))
    test = torch.rand(2, 3, 64, 64, generator=g(1))
    pred = det.predict(test)
    rec_out = det.reconstruct(test)
    assert torch.allclose(seen["x"], torch.cat((rec_out, test), 1))  # [I_r, I]
    assert pred.maps.min() >= 0 and pred.maps.max() <= 1  # a softmax probability


def test_draem_training_step_is_eq3_plus_sspcab():
    x = torch.rand(4, 3, 64, 64, generator=g(0))
    det = az.create("draem", preset="quick", epochs=1, width=4, disc_width=4, sspcab=True).fit(x)
    det.train()
    det.textures_ = torch.rand(2, 3, 64, 64, generator=g(2))

    def step(weight):
        det.sspcab_weight = weight
        ctx = type("Ctx", (), {"generator": g(5)})()
        torch.manual_seed(0)
        loss, logs = det._step(x, ctx)
        return float(loss.detach()), logs

    l0, logs0 = step(0.0)
    l1, logs1 = step(0.1)
    assert abs(l0 - (float(logs0["rec"]) + float(logs0["seg"]))) < 1e-5
    assert abs(l1 - l0 - 0.1 * float(logs1["sspcab"])) < 1e-5 and float(logs1["sspcab"]) > 0


def test_draem_bad_settings():
    x = torch.rand(4, 3, 64, 64)
    for kw in (dict(image_size=48), dict(beta=(0.8, 0.2)), dict(beta=(0.1, 1.5))):
        with pytest.raises(az.AnomalyZooError, match=next(iter(kw))):
            az.create("draem", preset="quick", **kw).fit(x)


# ------------------------------------------------------------------ SSPCAB
def test_sspcab_masked_convolution_never_sees_the_centre():
    torch.manual_seed(0)
    block = SSPCAB(4, kernel=1, dilation=1)
    x = torch.rand(1, 4, 9, 9)
    base = block.masked_conv(x)
    for (dy, dx), sees in (((0, 0), False), ((1, 0), False), ((1, 1), False), ((2, 2), True), ((-2, 2), True),
                           ((2, 0), False)):
        y = x.clone()
        y[0, :, 4 + dy, 4 + dx] += 1.0
        changed = not torch.allclose(block.masked_conv(y)[0, :, 4, 4], base[0, :, 4, 4])
        assert changed == sees, (dy, dx)
    assert corner_mask(2, 1).sum() == 16 and corner_mask(2, 1).shape == (7, 7)


def test_sspcab_is_four_corner_convolutions_and_channel_attention():
    torch.manual_seed(1)
    c = 6
    block = SSPCAB(c, kernel=1, dilation=1, reduction=2)
    x = torch.rand(2, c, 8, 8)
    w, b = block.conv.weight.detach(), block.conv.bias.detach()
    xp = F.pad(x, (2, 2, 2, 2))
    total = sum(F.conv2d(xp[:, :, r : r + 8, q : q + 8], w[:, :, r : r + 1, q : q + 1]) for r in (0, 4) for q in (0, 4))
    f = F.relu(total + b.view(1, -1, 1, 1))
    z = f.mean((2, 3))
    att = torch.sigmoid(block.fc2(F.relu(block.fc1(z))))
    expected = f * att[:, :, None, None]
    out = block(x)
    assert torch.allclose(out, expected, atol=1e-6)
    assert torch.allclose(block.loss, ((out - x) ** 2).mean()) and torch.allclose(sspcab_loss(out, x), block.loss)


# ------------------------------------------------------------------ seeding
@pytest.mark.parametrize("name,kw", [("draem", dict(epochs=2, width=4, disc_width=4)),
                                     ("draem", dict(epochs=2, width=4, disc_width=4, sspcab=True)),
                                     ("cutpaste", dict(epochs=2, pretrained=False))])
def test_seeded_fits_repeat_exactly(name, kw, tiny):
    train, test = tiny
    a = az.create(name, preset="quick", seed=1, **kw).fit(train).predict(test)
    b = az.create(name, preset="quick", seed=1, **kw).fit(train).predict(test)
    assert torch.equal(a.scores, b.scores) and torch.equal(a.maps, b.maps)


@pytest.mark.slow
def test_cutpaste_learns_its_proxy_task(brick):
    """Training data only: the 3-way loss (image- and patch-level, chance = 2 ln 3) falls well below chance.
    (The quick preset's maps and scores barely beat the untrained network, see the module docstring, so this
    is what shows the training works.)"""
    det = az.create("cutpaste", preset="quick", epochs=8).fit(brick.train_images[:32])
    loss = det.history_["loss"]
    assert loss[-1] < 0.9 * loss[0] and loss[-1] < 2 * np.log(3) - 0.2, loss
