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
    det = az.create("efficientad", preset="quick", teacher="distil", teacher_steps=2, teacher_batch=2, steps=2,
                    pdn_width=0.0625, val_fraction=0.15).fit(train)
    assert det.diagnostics_["held_out_images"] == 2
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(det.seed))
    val = det._prepare(train[order[-2:]], "x").to(det.device_)
    with torch.no_grad():
        st, ae = det._raw_maps(val)
    qa, qb = torch.quantile(st.flatten(), 0.9), torch.quantile(st.flatten(), 0.995)
    assert torch.allclose(det.quantiles_[:2], torch.stack([qa, qb]), rtol=1e-5)
    # the combined map of an image is the mean of both normalised maps, padded by 4 edge cells and resized
    pred = det.predict(train[order[-2:]])
    norm = 0.5 * (0.1 * (st - qa) / (qb - qa) + 0.1 * (ae - det.quantiles_[2]) / (det.quantiles_[3] - det.quantiles_[2]))
    padded = F.pad(norm[:, None], (4, 4, 4, 4), mode="replicate")
    expected = F.interpolate(padded, size=(64, 64), mode="bilinear", align_corners=False)[:, 0]
    assert torch.allclose(pred.maps, expected.cpu(), atol=1e-5)
    assert pred.scores == pytest.approx(expected.flatten(1).amax(1).cpu(), abs=1e-6)


def test_efficientad_padding_never_ranks_the_unseen_border_above_the_interior():
    """The bug behind phantom's anti-correlated maps (pixel AUROC .37): the border the PDN does not centre on
    was padded with 0, above every normal cell (their normalised maps are mostly < 0, below q_a)."""
    st = torch.full((1, 8, 8), 1.0)  # every cell below q_a = 2 (normalised: -0.1) ...
    st[0, 5, 0] = 3.0  # ... but an anomalous cell on the left edge (its receptive field covers the border)
    st[0, 0, :] = 0.5  # and a quiet top row (-0.15)
    m = efficientad.combine_maps(st, st, [2.0, 3.0, 2.0, 3.0], (64, 64))[0]
    row, col = divmod(int(m.argmax()), 64)
    assert 36 <= row <= 39 and col < 20 and m.amax() > 0  # the anomalous cell, padded cell (9, 4): px 36-39
    assert m[:16].max() == pytest.approx(-0.15) and m[:, :16].max() == m.amax()  # the border repeats its edge
    assert m[63, 40] == pytest.approx(-0.1)
    mask = torch.zeros(1, 64, 64)
    mask[0, 34:42, 0:20] = 1  # the anomalous cell and the border beside it
    assert az.metrics.pixel_auroc(m[None], mask) > 0.9


def test_efficientad_padded_teacher_is_the_unpadded_one_shifted_by_four_cells():
    """The teacher is distilled padded (its output is the image side / 4, the target's grid) and used unpadded:
    with the same weights, the unpadded output is the padded one without its 4 outer cells."""
    torch.manual_seed(0)
    padded = efficientad.pdn_small(5, width=0.0625, padded=True)
    plain = efficientad.pdn_small(5, width=0.0625)
    plain.load_state_dict(padded.state_dict())
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        big, small = padded(x), plain(x)
    assert big.shape[-1] == 16 and small.shape[-1] == efficientad.pdn_grid(64) == 8
    assert torch.allclose(big[..., 4:-4, 4:-4], small, atol=1e-6)


def test_efficientad_distil_teacher_is_deterministic():
    kw = dict(size=64, batch=2, lr=1e-3)
    a, b = efficientad.distil_teacher(0.0625, 3, 5, **kw), efficientad.distil_teacher(0.0625, 3, 5, **kw)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    c = efficientad.distil_teacher(0.0625, 3, 6, **kw)
    assert not torch.equal(a["0.weight"], c["0.weight"])


def test_efficientad_shipped_teacher_loads_and_predicts_the_features():
    """The file in the package: the recorded command and width, strict loading into the detector's PDN, and
    the distillation target on fresh crops (a seed the distillation never drew) mostly explained."""
    state, meta = efficientad.read_teacher(efficientad.teacher_path(0.25))
    assert meta["width"] == 0.25 and meta["layers"] == ["stage3", "stage5"] and "distil-teacher" in meta["command"]
    assert meta["steps"] == efficientad.SHIPPED["steps"] and meta["variance_left"] < 0.8
    pdn = efficientad.pdn_small(152, 0.25, padded=True)
    pdn.load_state_dict(state)
    fx = az.backbones.create_backbone(layers=meta["layers"])
    big, x = efficientad._photos(12, meta["size"], torch.Generator().manual_seed(12345))
    with torch.no_grad():
        t = (efficientad.feature_target(fx, big, (16, 16)) - meta["target_mean"]) / meta["target_std"]
        left = (pdn(x) - t).pow(2).mean() / (t - t.mean((0, 2, 3), keepdim=True)).pow(2).mean()
        torch.manual_seed(0)
        fresh = (efficientad.pdn_small(152, 0.25, padded=True)(x) - t).pow(2).mean() / (t - t.mean()).pow(2).mean()
    assert left < 0.8 < fresh


def test_efficientad_shipped_teacher_errors_name_the_width_and_the_command(tiny):
    with pytest.raises(az.AnomalyZooError, match=r"pdn_width=0\.5.*distil-teacher --width 0\.5"):
        az.create("efficientad", preset="quick", pdn_width=0.5).fit(tiny[0])
    with pytest.raises(az.AnomalyZooError, match=r"layers.*teacher='distil'"):
        az.create("efficientad", preset="quick", layers=("stage2", "stage3")).fit(tiny[0])
    with pytest.raises(az.AnomalyZooError, match="teacher='bogus'"):
        az.create("efficientad", teacher="bogus").fit(tiny[0])


def test_efficientad_quick_fit_uses_the_shipped_teacher(tiny):
    det = az.create("efficientad", preset="quick", steps=2).fit(tiny[0])
    state, _ = efficientad.read_teacher(efficientad.teacher_path(0.25))
    assert all(torch.equal(det.teacher_.state_dict()[k].cpu(), v) for k, v in state.items())
    assert "teacher" not in det.history_ and all(not p.requires_grad for p in det.teacher_.parameters())
    rand = az.create("efficientad", preset="quick", steps=2, pretrained=False).fit(tiny[0])  # random-teacher baseline
    assert not torch.equal(rand.teacher_.state_dict()["0.weight"].cpu(), state["0.weight"])


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
