"""Knowledge distillation (stpm, reverse_distillation, efficientad, mkd): each loss and map checked
against an independent computation on small inputs, and the networks' geometry the papers state."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import anomaly_zoo as az
from anomaly_zoo.models.distillation import common, efficientad, mkd, reverse_distillation, stpm


def _feats(seed, shapes):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*s, generator=g) for s in shapes]


SHAPES = [(2, 5, 8, 8), (2, 7, 4, 4), (2, 9, 2, 2)]


# ------------------------------------------------------------------ STPM
def test_stpm_loss_is_eq_1_2_by_hand():
    t, s = _feats(0, SHAPES), _feats(1, SHAPES)
    expected = 0.0
    for a, b in zip(t, s):
        a, b = a.double().numpy(), b.double().numpy()
        an = a / np.linalg.norm(a, axis=1, keepdims=True)
        bn = b / np.linalg.norm(b, axis=1, keepdims=True)
        expected += (0.5 * ((an - bn) ** 2).sum(1)).mean(axis=(1, 2)).mean()
    got = stpm.stpm_loss(dict(enumerate(t)), dict(enumerate(s)))
    assert float(got) == pytest.approx(expected, rel=1e-5)


def test_stpm_map_is_the_product_of_upsampled_layer_maps_and_one_minus_cosine():
    t, s = _feats(2, SHAPES), _feats(3, SHAPES)
    m = stpm.stpm_map(dict(enumerate(t)), dict(enumerate(s)), (16, 16))
    expected = torch.ones(2, 16, 16)
    for a, b in zip(t, s):
        cos = F.cosine_similarity(a, b, dim=1)  # 1/2 |a/|a| - b/|b||^2 = 1 - cos
        expected *= F.interpolate((1 - cos)[:, None], size=(16, 16), mode="bilinear", align_corners=False)[:, 0]
    assert torch.allclose(m, expected, atol=1e-5)


def test_stpm_student_has_teacher_architecture_from_random_weights(tiny):
    det = az.create("stpm", preset="quick", epochs=1, image_size=64).fit(tiny[0])
    t_keys = {k for k in det.extractor_.model.state_dict() if "num_batches" not in k}
    s_keys = {k for k in det.student_.model.state_dict() if "num_batches" not in k}
    assert t_keys == s_keys
    # the student started from random weights: its first layer is far from the teacher's
    w_t, w_s = det.extractor_.model._conv_stem.weight, det.student_.model._conv_stem.weight
    assert F.cosine_similarity(w_t.flatten(), w_s.flatten(), dim=0).abs() < 0.3
    assert all(not p.requires_grad for p in det.extractor_.parameters())
    maps = det.layer_maps(tiny[1])
    assert list(maps) == ["stage2", "stage3", "stage5"]
    prod = maps["stage2"] * maps["stage3"] * maps["stage5"]
    assert torch.allclose(prod, det.predict(tiny[1]).maps, atol=1e-6, rtol=1e-4)


# ------------------------------------------------------------------ Reverse Distillation
def test_reverse_distillation_loss_forms_by_hand():
    t, s = _feats(4, SHAPES), _feats(5, SHAPES)
    per_position = sum((1 - F.cosine_similarity(a, b, dim=1)).mean() for a, b in zip(t, s))
    flat = 0.0
    for a, b in zip(t, s):
        a2, b2 = a.reshape(2, -1).double().numpy(), b.reshape(2, -1).double().numpy()
        flat += np.mean(1 - (a2 * b2).sum(1) / np.linalg.norm(a2, axis=1) / np.linalg.norm(b2, axis=1))
    assert float(reverse_distillation.rd_loss(t, s, "position")) == pytest.approx(float(per_position), rel=1e-5)
    assert float(reverse_distillation.rd_loss(t, s, "flattened")) == pytest.approx(flat, rel=1e-5)
    m = reverse_distillation.rd_map(t, s, (8, 8))
    assert m.shape == (2, 8, 8) and torch.allclose(m[..., :, :], sum(
        F.interpolate((1 - F.cosine_similarity(a, b, dim=1))[:, None], size=(8, 8), mode="bilinear",
                      align_corners=False)[:, 0] for a, b in zip(t, s)), atol=1e-6)


def test_reverse_distillation_decoder_mirrors_the_teacher(tiny):
    det = az.create("reverse_distillation", preset="quick", epochs=1, image_size=64).fit(tiny[0])
    x = tiny[1].to(det.device_)
    t, s = det._features(x)
    assert [a.shape for a in t] == [b.shape for b in s]
    z = det.bottleneck_(*t)
    assert z.shape[-1] == t[-1].shape[-1] // 2 and z.shape[1] == 2 * t[-1].shape[1]  # one-class embedding at stride 32
    # only the bottleneck and the decoder train; the teacher is frozen
    assert all(not p.requires_grad for p in det.extractor_.parameters())


# ------------------------------------------------------------------ EfficientAD
def test_efficientad_pdn_sees_33_pixels_and_grid_formula():
    net = efficientad.pdn_small(3, width=0.125)
    for side in (64, 100, 256):
        assert net(torch.zeros(1, 3, side, side)).shape[-1] == efficientad.pdn_grid(side)
    assert efficientad.pdn_grid(256) == 56  # the paper's 56 x 56 output at 256 px
    x = torch.rand(1, 3, 64, 64, requires_grad=True)
    net(x)[0, 0, 4, 4].backward()
    rows = torch.nonzero(x.grad.abs().sum((0, 1)).sum(1)).flatten()
    assert rows.max() - rows.min() + 1 == 33


def test_efficientad_hard_feature_loss_by_hand():
    t, s = _feats(6, [(2, 4, 6, 6), (2, 4, 6, 6)])
    d = ((t - s) ** 2).double().numpy().ravel()
    q = np.quantile(d, 0.9)
    expected = d[d >= q].mean()
    assert float(efficientad.hard_feature_loss(t, s, 0.9)) == pytest.approx(expected, rel=1e-4)
    assert float(efficientad.hard_feature_loss(t, s, 0.0)) == pytest.approx(d.mean(), rel=1e-5)


def test_efficientad_maps_are_quantile_normalised_on_held_out_images(tiny):
    train = torch.cat([tiny[0], tiny[0].flip(-1)])  # 12 images: 2 held out at val_fraction 0.15
    det = az.create("efficientad", preset="quick", teacher_steps=2, teacher_batch=2, steps=2, pdn_width=0.0625,
                    val_fraction=0.15).fit(train)
    assert det.diagnostics_["held_out_images"] == 2
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(det.seed))
    val = det._prepare(train[order[-2:]], "x").to(det.device_)
    with torch.no_grad():
        st, ae = det._raw_maps(val)
    qa, qb = torch.quantile(st.flatten(), 0.9), torch.quantile(st.flatten(), 0.995)
    assert torch.allclose(det.quantiles_[:2], torch.stack([qa, qb]), rtol=1e-5)
    # the combined map of an image is the mean of both normalised maps, padded by 4 and resized
    pred = det.predict(train[order[-2:]])
    norm = 0.5 * (0.1 * (st - qa) / (qb - qa) + 0.1 * (ae - det.quantiles_[2]) / (det.quantiles_[3] - det.quantiles_[2]))
    expected = F.interpolate(F.pad(norm, (4, 4, 4, 4))[:, None], size=(64, 64), mode="bilinear", align_corners=False)[:, 0]
    assert torch.allclose(pred.maps, expected.cpu(), atol=1e-5)


def test_efficientad_generic_images_exclude_the_test_sources():
    assert not {"brick", "grass", "gravel", "retina", "shepp_logan_phantom"} & set(common.GENERIC_SOURCES)
    g1, g2 = torch.Generator().manual_seed(0), torch.Generator().manual_seed(0)
    a, b = common.generic_images(3, 32, g1), common.generic_images(3, 32, g2)
    assert torch.equal(a, b) and a.shape == (3, 3, 32, 32) and 0 <= a.min() and a.max() <= 1


# ------------------------------------------------------------------ MKD
def test_mkd_loss_is_eq_1_3_by_hand():
    t, s = _feats(7, SHAPES), _feats(8, SHAPES)
    lam = 0.3
    expected = np.zeros(2)
    for a, b in zip(t, s):
        a2, b2 = a.reshape(2, -1).double().numpy(), b.reshape(2, -1).double().numpy()
        expected += ((a2 - b2) ** 2).mean(1)
        expected += lam * (1 - (a2 * b2).sum(1) / np.linalg.norm(a2, axis=1) / np.linalg.norm(b2, axis=1))
    assert np.allclose(mkd.mkd_loss(t, s, lam).double().numpy(), expected, rtol=1e-5)


def test_mkd_score_is_the_loss_and_map_its_input_gradient(tiny):
    det = az.create("mkd", preset="quick", epochs=1, sigma=0.0).fit(tiny[0])
    pred = det.predict(tiny[1])
    x = det._prepare(tiny[1][:1], "x").to(det.device_).requires_grad_(True)
    loss = mkd.mkd_loss(*det._pair(x), det.lamda)
    loss.backward()
    assert float(pred.scores[0]) == pytest.approx(float(loss.detach()), rel=1e-5)
    assert torch.allclose(pred.maps[:1], x.grad.abs().sum(1).cpu(), atol=1e-7, rtol=1e-4)
    m = det.extractor_.model
    source = sum(p.numel() for p in [*m._conv_stem.parameters(), *m._bn0.parameters()])
    source += sum(p.numel() for b in m._blocks[: m.stage_slices["stage5"][1]] for p in b.parameters())
    assert sum(p.numel() for p in det.cloner_.parameters()) < 0.3 * source  # a smaller network (0.19 M vs 0.70 M)
