"""ccd: eq. (2) against a direct computation, the pretext labels of eq. (3) and (4), the augmentations, the
transfer of the pre-trained encoder into each downstream detector, pretrain="none" = the plain detector,
and the errors."""
from __future__ import annotations

import math

import pytest
import torch

import anomaly_zoo as az
from anomaly_zoo.models.ssl.ccd import OFFSETS, contrastive_loss, neighbour_pairs
from anomaly_zoo.synthesis.augment import STRONG, cutperm, noise, resized_crop, rotation, strong_augment, weak_augment
from anomaly_zoo.utils import AnomalyZooError

TINY = dict(igd=dict(epochs=2), f_anogan=dict(epochs=2, encoder_epochs=2), ms_ssim_ae=dict(epochs=2))
FROZEN = dict(igd=dict(epochs=1, lr=1e-12), f_anogan=dict(epochs=1, encoder_epochs=1, encoder_lr=1e-12),
              ms_ssim_ae=dict(epochs=1, lr=1e-12))


def _images(n=6, side=64, seed=0):
    return torch.rand(n, 3, side, side, generator=torch.Generator().manual_seed(seed))


def test_ccd_contrastive_loss_is_eq2_on_a_hand_made_batch():
    z_a = torch.tensor([[1.0, 0.0], [0.0, 2.0], [3.0, 4.0]], dtype=torch.float64)
    z_b = torch.tensor([[2.0, 1.0], [-1.0, 1.0], [0.0, -1.0]], dtype=torch.float64)
    tau = 0.5

    def cos(u, v):
        return sum(a * b for a, b in zip(u, v)) / math.sqrt(sum(a * a for a in u) * sum(b * b for b in v))

    want = 0.0
    for n in range(3):  # -log exp(c(a_n, b_n)/tau) / (exp(c(a_n, b_n)/tau) + sum_{m != n} exp(c(a_n, b_m)/tau))
        pos = math.exp(cos(z_a[n].tolist(), z_b[n].tolist()) / tau)
        neg = sum(math.exp(cos(z_a[n].tolist(), z_b[m].tolist()) / tau) for m in range(3) if m != n)
        want -= math.log(pos / (pos + neg)) / 3
    assert float(contrastive_loss(z_a, z_b, tau)) == pytest.approx(want, rel=1e-12)
    # aligned positives and orthogonal negatives: the loss falls towards 0 as tau shrinks
    eye = torch.eye(3, dtype=torch.float64)
    assert float(contrastive_loss(eye, 5 * eye, 0.05)) < 1e-8 < float(contrastive_loss(eye, eye.roll(1, 0), 0.05))


def test_ccd_neighbour_pairs_labels_are_the_eight_neighbours():
    side, k = 48, 12
    rows = torch.arange(side, dtype=torch.float32).view(1, side, 1).expand(1, side, side)
    cols = torch.arange(side, dtype=torch.float32).view(1, 1, side).expand(1, side, side)
    x = torch.cat([rows, cols, rows * 0], 0)[None].repeat(200, 1, 1, 1)  # each pixel holds its own coordinates
    p1, p2, labels, corners = neighbour_pairs(x, k, torch.Generator().manual_seed(0))
    assert p1.shape == p2.shape == (200, 3, k, k) and set(labels.tolist()) == set(range(8))
    y1, x1, y2, x2 = corners.T
    torch.testing.assert_close(p1[:, 0, 0, 0], y1.float())  # the crops are where the corners say
    torch.testing.assert_close(p2[:, 1, 0, 0], x2.float())
    d = torch.tensor(OFFSETS)[labels]
    assert torch.equal(torch.sign(y2 - y1), d[:, 0]) and torch.equal(torch.sign(x2 - x1), d[:, 1])
    for shift, moves in ((y2 - y1, d[:, 0] != 0), (x2 - x1, d[:, 1] != 0)):
        assert ((shift.abs() >= 3 * k // 4) & (shift.abs() < k))[moves].all()
    assert corners.min() >= 0 and corners.max() <= side - k
    assert OFFSETS[0] == (-1, -1) and OFFSETS[4] == (0, 1) and OFFSETS[7] == (1, 1) and len(set(OFFSETS)) == 8
    with pytest.raises(az.AnomalyZooError, match="at least 36 px"):
        neighbour_pairs(x[:, :, :30, :30], k, torch.Generator())


def test_ccd_strong_augmentations_and_their_labels():
    x = _images(2, 8)
    out, labels = strong_augment(x, "cutperm")
    assert labels.tolist() == [0, 1, 2, 3, 0, 1, 2, 3]
    top, bottom, left, right = (slice(0, 4), slice(4, 8)) * 2
    for i in range(2):
        assert torch.equal(out[4 * i], x[i])  # a_0 is the identity
        assert torch.equal(out[4 * i + 1][..., left], x[i][..., right])  # bit 0: left and right halves swapped
        assert torch.equal(out[4 * i + 2][..., top, :], x[i][..., bottom, :])  # bit 1: top and bottom
        assert torch.equal(out[4 * i + 3][..., top, left], x[i][..., bottom, right])
    assert torch.equal(cutperm(x, 1), torch.roll(x, 4, -1))
    rot, labels = strong_augment(x, "rotation")
    assert all(torch.equal(rot[4 * i + j], torch.rot90(x[i], j, (-2, -1))) for i in range(2) for j in range(4))
    assert torch.equal(rotation(x, 0), x)
    g = torch.Generator().manual_seed(0)
    noisy = [noise(x, j, g) for j in range(4)]
    assert torch.equal(noisy[0], x) and all((n != x).any() and n.min() >= 0 and n.max() <= 1 for n in noisy[1:])
    assert set(STRONG) == {"cutperm", "rotation", "noise"}
    with pytest.raises(az.AnomalyZooError, match="unknown strong augmentation"):
        strong_augment(x, "blur")


def test_ccd_weak_augmentations():
    x = _images(4, 32)
    same = resized_crop(x, torch.Generator(), scale=(1.0, 1.0), ratio=(1.0, 1.0), flip=0.0)
    torch.testing.assert_close(same, x, atol=1e-5, rtol=0)  # the full crop, unflipped: the image
    flipped = resized_crop(x, torch.Generator(), scale=(1.0, 1.0), ratio=(1.0, 1.0), flip=1.0)
    torch.testing.assert_close(flipped, x.flip(-1), atol=1e-5, rtol=0)
    a = weak_augment(x, torch.Generator().manual_seed(1))
    b = weak_augment(x, torch.Generator().manual_seed(1))
    c = weak_augment(x, torch.Generator().manual_seed(2))
    assert torch.equal(a, b) and not torch.equal(a, c) and a.shape == x.shape and a.min() >= 0 and a.max() <= 1


def test_ccd_pretraining_learns_its_pretext_tasks():
    ds = az.data.load("digits", normal_class=3, quick=True)
    det = az.create("ccd", preset="quick", epochs=40, downstream_params=dict(epochs=1)).fit(ds.train_images[:48])
    h = det.history_  # measured: eq. (2) 4.47 -> 3.73, accuracies .81 and .53 at the last epoch
    assert h["pretrain_con"][-1] < h["pretrain_con"][0] - 0.4
    assert h["pretrain_acc_cla"][-1] > 0.6  # which of the four strong augmentations (chance 0.25)
    assert h["pretrain_acc_pos"][-1] > 0.3  # which of the eight neighbours (chance 0.125)
    assert len(h["igd_autoencoder"]) == 1  # the downstream's own curves are kept too
    simclr = az.create("ccd", preset="quick", pretrain="simclr", epochs=2, downstream_params=dict(epochs=1))
    simclr.fit(ds.train_images[:16])
    assert "pretrain_con" in simclr.history_ and "pretrain_cla" not in simclr.history_
    assert simclr.ssl_.classify is None and simclr.ssl_.position is None


@pytest.mark.parametrize("downstream", sorted(TINY))
def test_ccd_pretrain_none_is_the_plain_downstream(downstream):
    x, t = _images(6, 64, 0), _images(3, 64, 1)
    kw = TINY[downstream]
    a = az.create("ccd", preset="quick", pretrain="none", downstream=downstream, downstream_params=kw, seed=3)
    pa = a.fit(x).predict(t)
    pb = az.create(downstream, preset="quick", seed=3, **kw).fit(x).predict(t)
    assert torch.equal(pa.scores, pb.scores) and torch.equal(pa.maps, pb.maps)
    assert not hasattr(a, "ssl_")


@pytest.mark.parametrize("downstream", sorted(FROZEN))
def test_ccd_encoder_weights_are_transferred(downstream):
    """With the downstream's encoder frozen (lr 1e-12), it ends where CCD's pre-training left it."""
    x = _images(6, 64, 0)
    det = az.create("ccd", preset="quick", epochs=2, downstream=downstream, downstream_params=FROZEN[downstream])
    det.fit(x)
    down = det.downstream_
    enc = dict(down.get_submodule(down.ccd_encoder).named_parameters())
    pre = dict(det.ssl_.encoder.named_parameters())
    assert enc.keys() == pre.keys()
    for key in enc:
        torch.testing.assert_close(enc[key], pre[key], atol=1e-6, rtol=0)
    assert down.encoder_init is None  # the hook is reset after the fit
    plain = az.create("ccd", preset="quick", pretrain="none", downstream=downstream,
                      downstream_params=FROZEN[downstream]).fit(x).downstream_
    scratch = dict(plain.get_submodule(plain.ccd_encoder).named_parameters())
    assert max(float((enc[k] - scratch[k]).detach().abs().max()) for k in enc) > 1e-3  # pre-training moved it


def test_ccd_score_and_map_are_the_downstreams():
    ds = az.data.load("digits", normal_class=1, quick=True)
    det = az.create("ccd", preset="quick", epochs=2, downstream_params=dict(epochs=2)).fit(ds.train_images[:24])
    pred = det.predict(ds.test_images[:10])
    own = det.downstream_.predict(ds.test_images[:10])
    assert torch.equal(pred.scores, own.scores) and torch.equal(pred.maps, own.maps)
    assert det.embed(ds.test_images[:3]).shape == (3, 64)


@pytest.mark.parametrize("kw, message", [
    (dict(downstream="padim"), r"ccd: downstream='padim' is out of range; allowed: one of 'igd', 'f_anogan'"),
    (dict(pretrain="byol"), r"ccd: pretrain='byol' is out of range; allowed: one of 'ccd', 'simclr', 'none'"),
    (dict(strong="blur"), r"ccd: strong='blur' is out of range"),
    (dict(downstream_params="epochs=3"), r"ccd: downstream_params='epochs=3' is out of range; allowed: a dict with string keys, or None"),
    (dict(downstream_params={"foo": 1}), r"ccd: downstream_params: igd has no parameter foo"),
    (dict(downstream_params={"seed": 1}), r"no 'seed': the downstream gets ccd's own seed"),
    (dict(downstream_params={"xi": 2.0}), r"ccd: downstream igd: xi=2.0 is out of range"),
    (dict(downstream="f_anogan", image_size=48), r"image_size=48 is out of range; allowed: a power of two"),
    (dict(patch_size=12), r"ccd: patch_size=12 is out of range; allowed: at most a third of the image side \(32 px\)"),
    (dict(tau=0.0), r"ccd: tau=0.0 is out of range"),
])
def test_ccd_clear_errors(kw, message):
    with pytest.raises(AnomalyZooError, match=message):
        az.create("ccd", preset="quick", **kw).fit(_images(4, 32))
