"""The GAN family: AnoGAN, GANomaly, Skip-GANomaly, f-AnoGAN.

Equations against independent computations on small inputs, the claims of the papers that the
quick presets can show, and the two GANomaly pitfalls (batch-dependent scores). Every test
name carries the model's name. Quality thresholds: see the comments next to them (measured on
the quick sets, data seeds 0, 1, 2, quick presets, one CPU thread).
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

import anomaly_zoo as az
from anomaly_zoo.models.gan import blocks
from anomaly_zoo.models.gan.ganomaly import generator_loss
from anomaly_zoo.models.gan.skip_ganomaly import UNet

FAST = dict(image_size=16, width=4, latent_dim=8, batch_size=4)


@pytest.fixture(scope="module")
def small():
    g = torch.Generator().manual_seed(0)
    return torch.rand(8, 3, 16, 16, generator=g), torch.rand(5, 3, 16, 16, generator=g)


# ------------------------------------------------------------------ shared blocks
@pytest.mark.parametrize("shape", [(3, 4, 4), (2,)])
def test_f_anogan_gradient_penalty_of_a_linear_critic(shape):
    """WGAN-GP eq. (3): a linear critic D(x) = <w, x> has gradient w everywhere, so the penalty
    is lambda (||w|| - 1)^2 whatever the interpolates are; images and vectors (the chapter's toy)
    alike: the interpolates keep the samples' shape (one eps per sample, not a broadcast grid)."""
    w = torch.randn(*shape, generator=torch.Generator().manual_seed(1))
    seen = []

    class Linear(nn.Module):
        def forward(self, x):
            seen.append(x.shape)
            return (x * w).flatten(1).sum(1), None

    real, fake = torch.rand(5, *shape), torch.rand(5, *shape)
    gp = blocks.gradient_penalty(Linear(), real, fake, torch.Generator().manual_seed(0), weight=10.0)
    assert seen == [real.shape]
    assert float(gp) == pytest.approx(10.0 * (float(w.norm()) - 1) ** 2, rel=1e-5)


def test_gan_dcgan_blocks_shapes_and_init():
    """The pyramid reaches 4x4 from any power-of-two side; the decoder mirrors it into [-1, 1]."""
    for side in (16, 32, 64):
        d = blocks.Discriminator(side, 4)
        logit, f = d(torch.rand(2, 3, side, side))
        assert logit.shape == (2,) and f.shape[-2:] == (4, 4)
        out = blocks.Decoder(side, 8, 4)(torch.randn(2, 8))
        assert out.shape == (2, 3, side, side) and out.abs().max() <= 1
    conv = blocks.dcgan_init_(blocks.Encoder(32, 8, 16)).head.weight
    assert float(conv.detach().std()) == pytest.approx(0.02, rel=0.1)


@pytest.mark.parametrize("name", ["anogan", "ganomaly", "skip_ganomaly", "f_anogan"])
def test_gan_image_size_must_be_a_power_of_two(name, small):
    with pytest.raises(az.AnomalyZooError, match="power of two"):
        az.create(name, preset="quick", image_size=48).fit(small[0])
    with pytest.raises(az.AnomalyZooError, match="power of two"):  # images as given (None) must be too
        az.create(name, preset="quick", image_size=None).fit(torch.rand(4, 3, 24, 24))


# ------------------------------------------------------------------ GANomaly
def test_ganomaly_generator_loss_written_out():
    """Eq. (1)-(4) by hand: w_adv mean (f - f^)^2 + w_con mean |x - x^| + w_enc mean (z - z^)^2."""
    g = torch.Generator().manual_seed(2)
    x, x_hat = torch.rand(3, 3, 8, 8, generator=g), torch.rand(3, 3, 8, 8, generator=g)
    z, z_hat = torch.randn(3, 5, generator=g), torch.randn(3, 5, generator=g)
    f, f_hat = torch.randn(3, 7, 4, 4, generator=g), torch.randn(3, 7, 4, 4, generator=g)
    loss, _ = generator_loss(x, x_hat, z, z_hat, f, f_hat, 1.0, 50.0, 1.0)
    by_hand = ((f - f_hat) ** 2).mean() + 50 * (x - x_hat).abs().mean() + ((z - z_hat) ** 2).mean()
    assert float(loss) == pytest.approx(float(by_hand), rel=1e-6)


def test_ganomaly_score_is_the_code_distance_scaled_by_training_statistics(small):
    train, test = small
    det = az.create("ganomaly", epochs=2, **FAST).fit(train)
    x = det._prepare(test, "test")
    with torch.no_grad():
        _, z, z_hat = det.generator_(x * 2 - 1)
    raw = ((z - z_hat) ** 2).mean(1)
    train_raw = det.raw_score(det._prepare(train, "train"))
    expected = (raw - train_raw.min()) / (train_raw.max() - train_raw.min())
    assert torch.allclose(det.predict(test).scores, expected, atol=1e-5)
    # on its own training images the scaled score spans exactly [0, 1]
    s = det.predict(train).scores
    assert float(s.min()) == pytest.approx(0, abs=1e-5) and float(s.max()) == pytest.approx(1, abs=1e-5)


def test_ganomaly_score_does_not_depend_on_the_batch(small):
    """The two pitfalls of the official test(): per-test-set min-max and BatchNorm in train mode
    both make one image's score depend on the others. Here neither does."""
    train, test = small
    det = az.create("ganomaly", epochs=2, **FAST).fit(train)
    together = det.predict(test).scores
    alone = torch.cat([det.predict(test[i : i + 1]).scores for i in range(len(test))])
    assert torch.allclose(together, alone, atol=1e-5)
    # what the pitfall would do: BatchNorm in train mode gives another score to the same image
    x = det._prepare(test, "test").to(det.device_)
    det.train()
    with torch.no_grad():
        in_batch = det.raw_score(x)[:1]
        alone_train_mode = det.raw_score(torch.cat([x[:1], x[:1]]))[:1]
    det.eval()
    assert not torch.allclose(in_batch, alone_train_mode, atol=1e-4)


# ------------------------------------------------------------------ Skip-GANomaly
def test_skip_ganomaly_unet_reaches_1x1_and_uses_its_skips():
    net = UNet(32, 4)
    assert len(net.down) == 5  # 32 -> 16 -> 8 -> 4 -> 2 -> 1
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    assert net(x).shape == x.shape
    # with the outermost skip the output depends on the input's fine detail even when the
    # bottleneck is cut: zero the innermost layer and the output still changes with the input
    net.eval()
    with torch.no_grad():
        net.down[-1][1].weight.zero_()
        a, b = net(x), net(x.flip(-1))
    assert (a - b).abs().mean() > 1e-3


def test_skip_ganomaly_score_is_eq5_written_out(small):
    train, test = small
    det = az.create("skip_ganomaly", epochs=2, **FAST).fit(train)
    x = det._prepare(test, "test")
    xs = x * 2 - 1
    with torch.no_grad():
        x_hat = det.generator_(xs)
        rec = ((xs - x_hat) ** 2).mean((1, 2, 3))
        lat = ((det.discriminator_(xs)[1] - det.discriminator_(x_hat)[1]) ** 2).mean((1, 2, 3))
    pred = det.predict(test)
    assert torch.allclose(pred.scores, 0.9 * rec + 0.1 * lat, atol=1e-5)
    assert torch.allclose(pred.maps, ((xs - x_hat) ** 2).mean(1), atol=1e-5)


# ------------------------------------------------------------------ f-AnoGAN
def test_f_anogan_score_and_map_written_out(small):
    """Eq. (10): A = 1/n ||x - G(E(x))||^2 + kappa/n_d ||f(x) - f(G(E(x)))||^2; map |x - G(E(x))|."""
    train, test = small
    det = az.create("f_anogan", epochs=2, encoder_epochs=2, kappa=0.7, **FAST).fit(train)
    xs = det._prepare(test, "test") * 2 - 1
    with torch.no_grad():
        rec = det.generator_(det.encoder_(xs))
        a_r = ((xs - rec) ** 2).flatten(1).mean(1)
        a_d = ((det.critic_(xs)[1] - det.critic_(rec)[1]) ** 2).flatten(1).mean(1)
    pred = det.predict(test)
    assert torch.allclose(pred.scores, a_r + 0.7 * a_d, atol=1e-5)
    assert torch.allclose(pred.maps, (xs - rec).abs().mean(1), atol=1e-5)


def test_f_anogan_two_stages_and_the_critic_schedule(small):
    """Stage 1 updates the critic n_critic times per generator step; stage 2 moves only the encoder."""
    train, _ = small
    det = az.create("f_anogan", epochs=3, encoder_epochs=3, **FAST)
    seen = {"critic": 0, "generator": 0}
    for role, step in (("critic", "_critic_step"), ("generator", "_generator_step")):
        original = getattr(det, step)

        def counted(x, ctx, original=original, role=role):
            seen[role] += 1
            return original(x, ctx)

        setattr(det, step, counted)
    det.fit(train)
    assert set(det.history_) == {"critic", "generator", "encoder"}
    assert seen["critic"] == 6 and seen["generator"] == 2  # 2 batches x 3 epochs; every 5th of 6 steps
    # after stage 2 the generator and critic still produce what stage 1 left: refit stage 2 only
    g_before = {k: v.clone() for k, v in det.generator_.state_dict().items()}
    det._train(det._encoder_step, det._prepare(train, "t"), module=det.encoder_, key="encoder", epochs=1,
               params=det.encoder_.parameters())
    assert all(torch.equal(g_before[k], v) for k, v in det.generator_.state_dict().items())


def test_f_anogan_encoder_learns_the_inverse_of_the_generator(small):
    """izi_f training lowers its own loss: the encoder's reconstructions approach the images."""
    train, _ = small
    det = az.create("f_anogan", epochs=2, encoder_epochs=10, encoder_lr=1e-3, **FAST).fit(train)
    curve = det.history_["encoder"]
    assert curve[-1] < curve[0]


# ------------------------------------------------------------------ AnoGAN
def test_anogan_search_lowers_eq4_and_scores_eq5(small):
    train, test = small
    det = az.create("anogan", epochs=2, search_steps=15, search_lr=0.1, **FAST).fit(train)
    x = det._prepare(test, "test")
    _, r0, d0, _ = det.search(x, steps=0)
    z, r, d, _ = det.search(x)
    lam = det.lam
    assert bool(((1 - lam) * r + lam * d < (1 - lam) * r0 + lam * d0).all())
    with torch.no_grad():
        gen = det.generator_(z)
        by_hand_r = (x * 2 - 1 - gen).abs().flatten(1).sum(1)
        by_hand_d = (det.discriminator_(x * 2 - 1)[1] - det.discriminator_(gen)[1]).abs().flatten(1).sum(1)
    pred = det.predict(test)
    assert torch.allclose(pred.scores, (1 - lam) * by_hand_r + lam * by_hand_d, rtol=1e-4)
    # the search is per image: an image's score does not depend on the batch it is in
    alone = det.predict(test[:1]).scores
    assert torch.allclose(alone, pred.scores[:1], rtol=1e-4)


def test_anogan_search_leaves_the_networks_alone(small):
    train, test = small
    det = az.create("anogan", epochs=1, search_steps=5, **FAST).fit(train)
    before = {k: v.clone() for k, v in det.state_dict().items()}
    for p in det.parameters():  # the training loop leaves its last gradients: clear them
        p.grad = None
    det.predict(test)
    assert all(torch.equal(before[k], v) for k, v in det.state_dict().items())
    assert all(p.grad is None for p in det.parameters())


# ------------------------------------------------------------------ quality (the targets)
def _report(name, ds, **kw):
    det = az.create(name, preset="quick", **kw).fit(ds.train_images)
    pred = det.predict(ds.test_images)
    return pred, az.metrics.evaluate(pred, ds.test_labels, ds.test_masks)


# brick pixel AUROC of the quick presets, data seeds 0 / 1 / 2 (one CPU thread):
# skip_ganomaly 0.881 / 0.872 / 0.894; f_anogan 0.796 / 0.750 / 0.785; anogan 0.807 / 0.776 / 0.790;
# the mean training image: 0.73-0.76. Thresholds: the 0.70, and 0.80 for skip_ganomaly.
@pytest.mark.slow
@pytest.mark.parametrize("name, threshold", [("skip_ganomaly", 0.80), ("f_anogan", 0.70), ("anogan", 0.70)])
def test_anogan_skip_ganomaly_f_anogan_localise_brick_defects(name, threshold, brick):
    """Brick pixel AUROC of the quick presets; a negated map must fail the same threshold."""
    pred, report = _report(name, brick)
    assert report["pixel_auroc"] >= threshold, report
    assert az.metrics.pixel_auroc(-pred.maps, brick.test_masks) < threshold
