"""DeScarGAN: weak supervision (labels required, both classes), the networks, the losses recomputed
from their parts, the map |x - G_h(x)|, and what training on phantom's weak split achieves."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import anomaly_zoo as az
from anomaly_zoo.models.gan.blocks import gradient_penalty, to_signed
from anomaly_zoo.models.medical.descargan import Discriminator, Generator, by_class
from anomaly_zoo.training import Context

TINY = dict(image_size=32, width=4, disc_width=4, depth=2, epochs=1, batch_size=4)


@pytest.fixture(scope="module")
def small():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(8, 3, 32, 32, generator=g)
    return x, torch.tensor([0, 1] * 4)


@pytest.fixture(scope="module")
def fitted(small):
    x, y = small
    return az.create("descargan", **TINY).fit(x, labels=y)


def test_descargan_refuses_a_fit_without_diseased_examples(small):
    x, y = small
    det = az.create("descargan", **TINY)
    assert det.supervision == "weak"
    for labels, got in ((None, "got no labels"), (torch.zeros(8), r"got only healthy \(0\) labels"),
                        (torch.ones(8), r"got only diseased \(1\) labels")):
        with pytest.raises(az.AnomalyZooError, match="needs labelled examples of both.*" + got):
            det.fit(x, labels=labels)
    with pytest.raises(az.AnomalyZooError, match="labels: expected 8 values"):
        det.fit(x, labels=[0, 1, 2, 0, 1, 0, 1, 0])
    with pytest.raises(az.AnomalyZooError, match="image_size=48 is out of range"):
        az.create("descargan", **{**TINY, "image_size": 48}).fit(x, labels=y)
    with pytest.raises(az.AnomalyZooError, match="score='max' is out of range"):
        az.create("descargan", **{**TINY, "score": "max"}).fit(x, labels=y)


def test_descargan_generator_branches_and_identity_start():
    torch.manual_seed(0)
    gen = Generator(3, 4, 2, residual=True)
    from anomaly_zoo.models.medical.descargan import init_weights_

    init_weights_(gen, Discriminator(32, 3, 4))
    gen.eval()
    x = torch.rand(6, 3, 32, 32) * 2 - 1
    mixed = torch.tensor([0, 1, 1, 0, 1, 0])
    with torch.no_grad():
        assert torch.equal(gen(x, mixed), x)  # the residual generator starts as the identity
        for m in gen.heads.modules():  # give the two branches different outputs
            if isinstance(m, torch.nn.Conv2d):
                m.weight.normal_(0, 0.1)
        out = gen(x, mixed)
        for c in (0, 1):  # a mixed batch = each sample through its own class's branch
            sel = mixed == c
            assert torch.allclose(out[sel], gen(x[sel], torch.full((int(sel.sum()),), c)), atol=1e-6)
        assert not torch.allclose(gen(x, torch.zeros(6, dtype=torch.long)), gen(x, torch.ones(6, dtype=torch.long)))
    # by_class: each sample through the head of its class, in the original order
    heads = torch.nn.ModuleList([torch.nn.Conv2d(2, 2, 1), torch.nn.Conv2d(2, 2, 1)])
    h, t = torch.randn(5, 2, 4, 4), torch.tensor([1, 0, 1, 1, 0])
    with torch.no_grad():
        expected = torch.stack([heads[int(c)](h[i : i + 1])[0] for i, c in enumerate(t)])
        assert torch.allclose(by_class(heads, h, t), expected, atol=1e-6)


def test_descargan_map_and_score_recomputed_from_the_parts(fitted, small):
    x, _ = small
    pred = fitted.predict(x)
    healthy = fitted.translate(x, 0)  # G_h(x) in [0, 1]
    assert torch.allclose(pred.maps, (x - healthy).abs().mean(1), atol=1e-5)
    with torch.no_grad():
        logits = fitted.disc_.classify(to_signed(x))
    assert torch.allclose(pred.scores, logits[:, 1] - logits[:, 0], atol=1e-5)
    assert torch.allclose(fitted.classify(x), logits.softmax(1)[:, 1], atol=1e-6)
    # the other image score: the mean of the same map
    other = az.create("descargan", **TINY, score="difference").fit(x, labels=small[1]).predict(x)
    assert torch.allclose(other.scores, other.maps.flatten(1).mean(1), atol=1e-6)


def test_descargan_losses_are_the_papers_sums(small):
    """L_g = 1 L_adv,g + 50 L_rec + 50 L_id + 1 L_cls,g and L_d = 20 W + GP + 5 L_cls,d, recomputed."""
    x, y = small
    det = az.create("descargan", **TINY).fit(x, labels=y)
    det.input_noise = 0.0  # no input noise: the terms are deterministic
    det.train()
    r, other = to_signed(x), 1 - y
    ctx = Context(0, 0, torch.Generator().manual_seed(5), torch.device("cpu"))
    loss_g, logs = det._g_step((x, y), ctx)
    with torch.no_grad():
        fake = det.gen_(r, other)
        adv = -det.disc_.critic(fake, other).mean()
        cls = F.cross_entropy(det.disc_.classify(fake), other)
        ident = F.mse_loss(det.gen_(r, y), r)
        rec = F.mse_loss(det.gen_(fake, y), r)
    assert torch.allclose(loss_g, adv + 50 * rec + 50 * ident + cls, rtol=1e-4, atol=1e-5)
    assert torch.allclose(logs["rec"], rec, atol=1e-6) and torch.allclose(logs["id"], ident, atol=1e-6)
    loss_d, _ = det._d_step((x, y), Context(0, 0, torch.Generator().manual_seed(7), torch.device("cpu")))
    with torch.no_grad():
        fake = det.gen_(r, other)
        w = det.disc_.critic(fake, other).mean() - det.disc_.critic(r, y).mean()
        cls_d = F.cross_entropy(det.disc_.classify(r), y)
    g = torch.Generator().manual_seed(7)
    torch.rand(x.shape, generator=g), torch.rand(x.shape, generator=g)  # the step's two (zero-weighted) noises
    gp = gradient_penalty(lambda z: (det.disc_.critic_map(z, other).flatten(1).sum(1),), r, fake, g, 10.0)
    assert torch.allclose(loss_d, 20 * w + gp + 5 * cls_d, rtol=1e-4, atol=1e-4)


# The paper's networks (plain tanh generator, dense classifier head), small enough for a test: 32 px, n_critic 1,
# 10 epochs on phantom's weak split (80 images), ~25 s on one thread. Measured on phantom data seeds 0 / 1 / 2:
# mean |G_h(x) - x| on the healthy test images 0.036 / 0.036 / 0.040 (untrained network 0.331 / 0.334 / 0.332);
# pixel AUROC 0.893 / 0.871 / 0.840 (untrained 0.50); image AUROC 0.519 / 0.439 / 0.505 (chance: not tested).
SMALL = dict(image_size=32, width=8, disc_width=4, depth=2, epochs=10, n_critic=1, lr=1e-3)


@pytest.fixture(scope="module")
def phantom_fit():
    ds = az.data.load("phantom", quick=True)
    det = az.create("descargan", **SMALL).fit(ds.weak_images, labels=ds.weak_labels)
    untrained = az.create("descargan", **{**SMALL, "lr": 1e-12, "epochs": 1}).fit(ds.weak_images, labels=ds.weak_labels)
    return ds, det, untrained


def _change(det, x, target):
    return float((det.translate(x, target) - az.base.resize(x, det.image_size)).abs().mean())


def test_descargan_leaves_healthy_images_almost_unchanged(phantom_fit):
    ds, det, untrained = phantom_fit
    healthy = ds.test_images[ds.test_labels == 0]
    diseased = ds.weak_images[ds.weak_labels == 1]
    # identity loss: translating an image to its own class changes it little, far less than before training
    assert _change(det, healthy, 0) < 0.07 and _change(det, healthy, 0) < 0.25 * _change(untrained, healthy, 0)
    assert _change(det, diseased, 1) < 0.08 and _change(det, diseased, 1) < 0.25 * _change(untrained, diseased, 1)


def test_descargan_quality_on_phantom(phantom_fit):
    ds, det, untrained = phantom_fit
    pred = det.predict(ds.test_images)
    report = az.metrics.evaluate(pred, ds.test_labels, ds.test_masks)
    base = az.metrics.evaluate(untrained.predict(ds.test_images), ds.test_labels, ds.test_masks)
    assert report["pixel_auroc"] >= 0.80 and report["pixel_auroc"] >= base["pixel_auroc"] + 0.2, (report, base)
    negated = az.metrics.evaluate(az.Prediction(-pred.scores, -pred.maps), ds.test_labels, ds.test_masks)
    noise = torch.rand(pred.maps.shape, generator=torch.Generator().manual_seed(0))
    noisy = az.metrics.evaluate(az.Prediction(pred.scores, noise), ds.test_labels, ds.test_masks)
    assert negated["pixel_auroc"] < 0.80 and noisy["pixel_auroc"] < 0.80
