"""ResNet-18 and Wide-ResNet-50-2 (He et al. 2016; Zagoruyko & Komodakis 2016) in torchvision's layout,
so torchvision's ``.pth`` files load strictly (ImageNet mean/std input, symmetric padding)."""
from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


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

    def geometry(self, tap: str) -> list[tuple[int, int, int]]:
        """``(kernel, stride, pad_top)`` of every spatial layer up to ``tap`` (for receptive fields)."""
        bottleneck = isinstance(self.layer1[0], Bottleneck)
        layers = [(7, 2, 3), (3, 2, 1)]  # conv1, maxpool
        for i, blocks in enumerate(len(getattr(self, name)) for name in self.stages):
            for b in range(blocks):
                stride = 2 if (b == 0 and i > 0) else 1
                layers += [(3, stride, 1)] if bottleneck else [(3, stride, 1), (3, 1, 1)]
            if f"layer{i + 1}" == tap:
                return layers
        raise KeyError(tap)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(F.relu(self.bn1(self.conv1(x))))
        for name in self.stages:
            x = getattr(self, name)(x)
        return self.fc(x.mean(dim=(2, 3)))


#: tap -> (channels, stride), without building the network
RESNET18_TAPS = {f"layer{i}": (64 * 2 ** (i - 1), 2 ** (i + 1)) for i in range(1, 5)}
WIDE_RESNET50_2_TAPS = {f"layer{i}": (256 * 2 ** (i - 1), 2 ** (i + 1)) for i in range(1, 5)}


def resnet18() -> ResNet:
    return ResNet(BasicBlock, (2, 2, 2, 2))


def wide_resnet50_2() -> ResNet:
    return ResNet(Bottleneck, (3, 4, 6, 3), width_per_group=128)
