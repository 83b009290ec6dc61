"""Uninformed Students (Bergmann et al., CVPR 2020): the losses of eq. (1)-(5) and (8) against an
independent computation, the receptive field of each patch network by its input gradient, the
dense (FDFE-equivalent) descriptors against the network applied patch by patch, the score of
eq. (9)-(13) rebuilt by hand, the quality on brick and its sabotage, and seeded repeatability."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import anomaly_zoo as az
from anomaly_zoo.models.distillation import uninformed_students as us

NAME = "uninformed_students"
# a detector small enough for the unit tests: one scale, narrow networks, few steps
TINY = dict(image_size=64, receptive_fields=(17, 33), width=0.0625, descriptor_dim=8, teacher_patches=32,
            teacher_steps=2, teacher_batch=8, epochs=1, batch_size=2, student_crop=None, pretrained=False)


def _rand(seed, *shape):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------ losses, by hand
def test_uninformed_students_teacher_losses_eq_1_to_5_by_hand():
    dec, tgt = _rand(0, 6, 10), _rand(1, 6, 10)
    assert float(us.distillation_loss(dec, tgt)) == pytest.approx(
        np.mean(((dec.double().numpy() - tgt.double().numpy()) ** 2).sum(1)), rel=1e-6)
    a, pos, neg = _rand(2, 6, 4), _rand(3, 6, 4), _rand(4, 6, 4)
    an, pn, nn_ = (t.double().numpy() for t in (a, pos, neg))
    expected = []
    for i in range(6):  # eq. (2)-(4), one triplet at a time
        d_pos = ((an[i] - pn[i]) ** 2).sum()
        d_neg = min(((an[i] - nn_[i]) ** 2).sum(), ((pn[i] - nn_[i]) ** 2).sum())
        expected.append(max(0.0, 0.7 + d_pos - d_neg))
    assert float(us.triplet_loss(a, pos, neg, 0.7)) == pytest.approx(np.mean(expected), rel=1e-6)
    desc = _rand(5, 16, 5)
    c = np.corrcoef(desc.double().numpy(), rowvar=False)  # eq. (5): off-diagonal sum of the correlation matrix
    assert float(us.compactness_loss(desc)) == pytest.approx(c.sum() - np.trace(c), abs=1e-5)


def test_uninformed_students_student_loss_and_error_variance_eq_8_to_11_by_hand():
    s, t = _rand(6, 3, 2, 4, 5, 5), _rand(7, 2, 4, 5, 5)  # M=3 students, B=2, d=4, 5x5
    sn, tn = s.double().numpy(), t.double().numpy()
    eq8 = sum(((sn[i] - tn) ** 2).sum(1).mean() for i in range(3))
    assert float(us.student_loss(list(s), t)) == pytest.approx(eq8, rel=1e-6)
    e, v = us.error_and_variance(s, t)
    mean = sn.mean(0)
    assert np.allclose(e.numpy(), ((mean - tn) ** 2).sum(1), rtol=1e-5)
    # eq. (11) is the spread of the students around their mean
    assert np.allclose(v.numpy(), ((sn - mean) ** 2).sum(2).mean(0), rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------ the patch networks
@pytest.mark.parametrize("p", [17, 33, 65])
def test_uninformed_students_patch_network_sees_exactly_p_pixels(p):
    torch.manual_seed(0)
    net = us.PatchNet(p, d=4, width=0.0625)
    assert net(torch.zeros(1, 3, p, p)).shape[-2:] == (1, 1)  # one descriptor per p x p patch
    side = p + 3 * net.stride
    support = torch.zeros(side, side, dtype=torch.bool)
    for seed in range(6):  # max pooling routes the gradient to one pixel of four: take the union over inputs
        x = torch.rand(1, 3, side, side, generator=torch.Generator().manual_seed(seed), requires_grad=True)
        out = net(x)
        (out[0, :, 1, 1] * _rand(seed, 4)).sum().backward()
        support |= x.grad.abs().sum((0, 1)) > 0
    rows, cols = torch.nonzero(support.any(1)).flatten(), torch.nonzero(support.any(0)).flatten()
    assert rows.max() - rows.min() + 1 == p and cols.max() - cols.min() + 1 == p
    assert rows.min() == net.stride and cols.min() == net.stride  # output (1, 1) starts at one stride


@pytest.mark.parametrize("p", [33, 65])
def test_uninformed_students_dense_output_is_the_network_on_every_patch(p):
    torch.manual_seed(1)
    net = us.PatchNet(p, d=3, width=0.0625)
    x = torch.rand(1, 3, p + 9, p + 9)
    with torch.no_grad():
        dense, strided = net(x, dense=True), net(x)
        assert dense.shape[-1] == 10
        for r, c in [(0, 0), (3, 7), (9, 9), (5, 2)]:
            assert torch.allclose(dense[..., r, c], net(x[..., r : r + p, c : c + p])[..., 0, 0], atol=1e-5)
        s = net.stride
        assert torch.allclose(strided, dense[..., ::s, ::s][..., : strided.shape[-2], : strided.shape[-1]], atol=1e-5)


# ------------------------------------------------------------------ the score, rebuilt by hand
def test_uninformed_students_score_is_normalised_error_plus_variance(tiny):
    train, test = tiny
    det = az.create(NAME, **TINY, val_fraction=0.34).fit(train)
    assert det.diagnostics_["held_out_images"] == 2
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(det.seed))
    fit_part, val = train[order[:-2]], train[order[-2:]]
    def desc(net, x, p):  # reflect padding by p // 2, the backbone's input normalisation, dense
        x = F.pad(x, (p // 2,) * 4, mode="reflect")
        return net((x - det.extractor_.mean) / det.extractor_.std, dense=True)

    def e_v(x, p, mu, sd):  # eq. (9)-(11) in numpy
        t = ((desc(det.teachers_[str(p)], x, p) - mu) / sd).double().numpy()
        s = np.stack([desc(st, x, p).double().numpy() for st in det.students_[str(p)]])
        m = s.mean(0)
        return ((m - t) ** 2).sum(1), (s**2).sum(2).mean(0) - (m**2).sum(1)

    maps = []
    with torch.no_grad():
        for p in (17, 33):
            y = desc(det.teachers_[str(p)], fit_part, p)
            mu, sd = y.mean((0, 2, 3), keepdim=True), y.transpose(0, 1).flatten(1).std(1).view(1, -1, 1, 1)
            assert torch.allclose(getattr(det, f"mu_{p}_"), mu, atol=1e-5)
            assert torch.allclose(getattr(det, f"sigma_{p}_"), sd, rtol=1e-4)
            e_val, v_val = e_v(val, p, mu, sd)
            stats = [e_val.mean(), e_val.std(ddof=1), v_val.mean(), v_val.std(ddof=1)]
            assert np.allclose(getattr(det, f"stats_{p}_").numpy(), stats, rtol=1e-3)
            e, v = e_v(test, p, mu, sd)
            maps.append((e - stats[0]) / stats[1] + (v - stats[2]) / stats[3])  # eq. (12)
    expected = np.mean(maps, 0)  # eq. (13): dense maps have the image size already
    pred = det.predict(test)
    assert np.allclose(pred.maps.numpy(), expected, atol=1e-3 * np.abs(expected).max())
    assert torch.allclose(pred.scores, pred.maps.flatten(1).amax(1))
    parts = det.score_parts(test)  # the two normalised terms, per receptive field, for the book
    assert np.allclose(parts[17]["error"] + parts[17]["variance"], maps[0], atol=1e-3 * np.abs(maps[0]).max())


def test_uninformed_students_one_seed_twice_identical_and_bad_params(tiny):
    train, test = tiny
    a = az.create(NAME, **TINY, seed=5).fit(train).predict(test)
    b = az.create(NAME, **TINY, seed=5).fit(train).predict(test)
    assert torch.equal(a.scores, b.scores) and torch.equal(a.maps, b.maps)
    for kw, key in [(dict(receptive_fields=(17, 31)), "receptive_fields"), (dict(receptive_fields=(33, 33)), "receptive_fields"),
                    (dict(lambda_k=0.0, lambda_c=0.0), "lambda_k"), (dict(student_crop=256), "student_crop")]:
        with pytest.raises(az.AnomalyZooError, match=f"{NAME}: {key}="):
            az.create(NAME, **{**TINY, **kw}).fit(train)


def test_uninformed_students_triplet_term_trains(tiny):
    det = az.create(NAME, **{**TINY, "receptive_fields": (17,)}, lambda_m=1.0, margin=0.5).fit(tiny[0])
    assert np.isfinite(det.history_["teacher_17"]).all()


# The brick quality (AUPRO >= 0.70, issue 14), the sabotage check and the baseline are in
# tests/test_models.py (QUALITY["uninformed_students"]).
