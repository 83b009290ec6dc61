"""Reconstruction family: the pieces checked against hand computations, and the chapter's
claims checked on data (ae on digits, the skip-connection failure on brick)."""
from __future__ import annotations

import math

import pytest
import torch

import anomaly_zoo as az
from anomaly_zoo.models.reconstruction.memory import Memory, addressing_entropy, hard_shrink
from anomaly_zoo.models.reconstruction.ms_ssim_ae import local_ms_ssim, region_map
from anomaly_zoo.ssim import ms_ssim


# ------------------------------------------------------------------ MemAE's memory (Gong et al. 2019)
def test_hard_shrinkage_and_renormalisation_on_a_hand_case():
    w = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    out = hard_shrink(w, 0.1)  # eq. (7): 0.05 < 0.1 is dropped, the rest renormalised by 0.95
    expected = torch.tensor([[0.5, 0.3, 0.15, 0.0]]) / 0.95
    assert torch.allclose(out, expected, atol=1e-6)
    assert float(out.sum()) == pytest.approx(1.0)
    # a threshold above every weight keeps nothing (and does not divide by zero)
    assert torch.equal(hard_shrink(w, 0.6), torch.zeros_like(w))
    # differentiable: the surviving weights carry gradient, the dropped one none
    w = w.clone().requires_grad_(True)
    hard_shrink(w, 0.1)[0, 0].backward()
    assert w.grad[0, 3] == 0 and w.grad[0, 0] != 0


def test_addressing_entropy_values():
    assert float(addressing_entropy(torch.tensor([[0.5, 0.5, 0.0, 0.0]]))) == pytest.approx(math.log(2), abs=1e-6)
    assert float(addressing_entropy(torch.full((3, 4), 0.25))) == pytest.approx(math.log(4), abs=1e-6)
    assert float(addressing_entropy(torch.tensor([[1.0, 0.0, 0.0]]))) == pytest.approx(0.0, abs=1e-6)


def test_memory_reads_a_combination_of_items_per_position():
    torch.manual_seed(0)
    mem = Memory(n_items=5, dim=3, threshold=0.0)
    z = torch.randn(2, 3, 4, 4)  # 2 images, 16 queries each
    z_hat, w = mem(z)
    assert z_hat.shape == z.shape and w.shape == (32, 5)
    expected = torch.softmax(z.permute(0, 2, 3, 1).reshape(-1, 3) @ mem.items.T, -1) @ mem.items  # dot attention
    assert torch.allclose(z_hat.permute(0, 2, 3, 1).reshape(-1, 3), expected, atol=1e-6)
    # with the default threshold 1/N every row is sparse and sums to one
    mem = Memory(n_items=5, dim=3)
    assert mem.threshold == pytest.approx(0.2)
    w = mem.address(torch.randn(10, 3) * 5)
    assert torch.allclose(w.sum(1), torch.ones(10)) and (w == 0).any()


def test_memae_memory_items_decode_to_images(tiny):
    train, _ = tiny
    det = az.create("memae", preset="quick", epochs=1, memory_size=7).fit(train)
    assert det.decode_memory().shape == (7, 3, 64, 64)
    w = det.addressing(train)
    assert w.shape == (len(train), 7) and torch.allclose(w.sum(1), torch.ones(len(train)), atol=1e-5)


# ------------------------------------------------------------------ MS-SSIM auto-encoder (CCD eq. 7)
def test_ms_ssim_ae_score_is_eq7_and_regions_localise():
    g = torch.Generator().manual_seed(0)
    x = az.ops.gaussian_blur(torch.rand(2, 3, 64, 64, generator=g), 1.0)
    y = x.clone()
    y[1, :, 8:24, 8:24] = 1 - y[1, :, 8:24, 8:24]  # a local defect in image 1 only
    det = az.create("ms_ssim_ae", nu=0.3, patch_size=16, stride=4)
    det.meta_ = {"input_hw": [64, 64]}
    s = det.msi(x, y)
    local = torch.stack([1 - ms_ssim(x[i:i + 1, :, a:a + 16, b:b + 16], y[i:i + 1, :, a:a + 16, b:b + 16])
                         for i in range(2) for a in range(0, 64, 16) for b in range(0, 64, 16)]).view(2, 16)
    expected = 1 - (0.3 * ms_ssim(x, y, reduction="none") + 0.7 * (1 - local.mean(1)))
    assert torch.allclose(s, expected, atol=1e-5) and float(s[0]) == pytest.approx(0.0, abs=1e-6)
    assert local_ms_ssim(x, y, 16).shape == (2, 16)
    m = region_map(x, y, 16, 4)
    assert m.shape == (2, 64, 64) and float(m[0].abs().max()) < 1e-5
    assert float(m[1, 8:24, 8:24].mean()) > 5 * float(m[1, 40:, 40:].mean())


def test_ae_accepts_the_ms_ssim_loss(tiny):
    train, test = tiny
    det = az.create("ae", preset="quick", loss="ms_ssim", epochs=2).fit(train)
    assert all(math.isfinite(v) for v in det.meta_["history"])
    pred = det.predict(test)
    assert pred.maps.shape == (3, 64, 64) and (pred.maps >= 0).all()
    with pytest.raises(az.AnomalyZooError, match="unknown loss"):
        az.create("ae", loss="l1", epochs=1).fit(train)


# ------------------------------------------------------------------ the chapter's claims on data
DIGIT_CLASSES = (1, 3, 8)  # three classes (8 is a hard one) keep the run short; the chapter runs all ten


@pytest.mark.slow
def test_digits_one_vs_rest_auroc():
    name = "ae"
    aurocs = []
    for k in DIGIT_CLASSES:
        ds = az.data.load("digits", normal_class=k, quick=True)
        pred = az.create(name, preset="quick").fit(ds.train_images).predict(ds.test_images)
        aurocs.append(az.metrics.image_auroc(pred.scores, ds.test_labels))
    assert sum(aurocs) / len(aurocs) >= 0.85, f"{name}: {aurocs}"


@pytest.mark.slow
def test_skip_connections_rebuild_better_and_the_detection_claim(brick):
    """The survey's point, measured. Part one must hold: with the skips (the only difference) the
    network rebuilds its training images far better (quick brick: train MSE 0.0012 against ae's
    0.0029; the mean image's is 0.0066). Part two, "so it localises worse", is an expected failure
    on brick: measured 2026-11-23 with the quick presets, pixel AUROC ae 0.806 vs unet_ae 0.910
    (0.778 vs 0.881 at dataset seed 1), while on grass ae 0.714 vs unet_ae 0.662: the skips copy
    defects through on grass, not on brick. Chapter 5 shows both."""
    px, mse = {}, {}
    for name in ("ae", "unet_ae"):
        det = az.create(name, preset="quick").fit(brick.train_images)
        x = det._prepare(brick.train_images, "images")
        mse[name] = float((det.reconstruct(brick.train_images) - x).pow(2).mean())
        px[name] = az.metrics.pixel_auroc(det.predict(brick.test_images).maps, brick.test_masks)
    mean_image_mse = float((x - x.mean(0, keepdim=True)).pow(2).mean())
    assert mse["ae"] < 0.7 * mean_image_mse, f"ae rebuilds no better than the mean image: {mse}, {mean_image_mse:.4f}"
    assert mse["unet_ae"] < 0.7 * mse["ae"], f"the skips do not help reconstruction: {mse}"
    if px["unet_ae"] >= px["ae"]:
        pytest.xfail(f"unet_ae does not localise worse than ae on brick: {px}")


def test_unet_ae_has_a_skip_at_every_resolution():
    """Besides the additive skips, the input itself reaches the output at full resolution: with the
    ``fuse`` convolution set to pass the input channels through, the network is sigmoid(x)."""
    from anomaly_zoo.models.reconstruction.unet_ae import UNetAutoEncoder

    torch.manual_seed(0)
    net = UNetAutoEncoder(image_size=32, latent_dim=4, width=4).eval()
    with torch.no_grad():
        net.fuse.weight.zero_()
        net.fuse.bias.zero_()
        for c in range(3):
            net.fuse.weight[c, 3 + c, 1, 1] = 1.0  # input channel c -> output channel c, centre tap
        x = torch.rand(2, 3, 32, 32)
        assert torch.allclose(net(x), torch.sigmoid(x), atol=1e-6)


@pytest.mark.slow
def test_memae_addressing_is_sparse_and_not_collapsed(brick):
    """Measured on training images: many items in use, few per image, reconstructions that differ
    (without the code's batch norm every image read the same single item with weight 1)."""
    det = az.create("memae", preset="quick").fit(brick.train_images)
    w = det.addressing(brick.train_images)
    used, per_image = int((w.sum(0) > 0).sum()), float((w > 0).sum(1).float().mean())
    assert used >= 10 and per_image <= 20, (used, per_image)
    assert float(det.reconstruct(brick.train_images).std(0).mean()) > 0.01
    with pytest.raises(az.AnomalyZooError, match="at least 2 training images"):
        az.create("memae", preset="quick", epochs=1).fit(brick.train_images[:1])
