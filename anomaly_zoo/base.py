"""The one API every method implements: ``Detector`` and its ``Prediction``.

A detector learns from normal images only (``fit``) and then scores new images
(``predict``): one anomaly score per image, and, for methods that localise, one
anomaly map per image with the input's height and width. Higher means more
anomalous, everywhere.

The rules follow scikit-learn:

* ``__init__`` only stores the hyperparameters it is given (no logic), so
  ``get_params()`` can read them back and ``save``/``load`` can rebuild the object.
* ``fit`` resolves the device (``"auto"``: cuda, then mps, then cpu), seeds,
  learns, and returns ``self``. Learned state lives in attributes ending in ``_``
  (buffers and sub-modules, so it travels in the ``state_dict``).
* ``predict`` before ``fit`` raises one clear error.

A subclass writes four small things, top to bottom in its file:

* ``_build(self, meta)``: create the networks/buffers whose shapes are known from
  ``meta`` (a JSON-able dict that ``fit`` fills, e.g. the feature size). Called by
  ``fit`` and again by ``az.load`` before the state dict is read back.
* ``_fit(self, x)``: learn from normal images ``x`` (float32 ``[N, 3, H, W]`` on CPU,
  already checked and resized to ``image_size``).
* ``_score(self, x)``: for a batch on ``self.device_``, return ``(scores [B], maps [B, h, w] or None)``.
* class attributes set by ``@register`` (name, family, ...).
"""
from __future__ import annotations

import inspect
import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .utils import AnomalyZooError, NotFittedError, check_images, resolve_device, set_seed

FORMAT = "anomaly_zoo.detector/1"


@dataclass
class Prediction:
    """What ``Detector.predict`` returns (CPU tensors).

    scores: ``[N]`` image-level anomaly scores, higher = more anomalous.
    maps:   ``[N, H, W]`` pixel-level anomaly maps at the input size, or ``None``
            for methods that only detect.
    """

    scores: torch.Tensor
    maps: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.scores)

    def __getitem__(self, idx) -> Prediction:
        idx = torch.as_tensor(idx) if not isinstance(idx, slice) else idx
        return Prediction(self.scores[idx], None if self.maps is None else self.maps[idx])

    def __repr__(self) -> str:
        maps = "None" if self.maps is None else f"[{', '.join(map(str, self.maps.shape))}]"
        return f"Prediction(scores=[{len(self.scores)}], maps={maps})"


class Detector(nn.Module):
    """Base class of every anomaly detector in the zoo (see the module docstring)."""

    # set by @register
    name: str = "detector"
    family: str = ""
    localizes: bool = True
    trains: bool = False
    # predict() batch size; subclasses may lower it for memory-heavy scoring
    predict_batch_size: int = 32
    # whether _score needs autograd (e.g. gradient-based maps)
    needs_grad: bool = False
    # whether test images must have the training size (after ``image_size`` resizing)
    fixed_size: bool = True

    # ------------------------------------------------------------------ params
    @classmethod
    def _param_names(cls) -> list[str]:
        sig = inspect.signature(cls.__init__)
        return [p.name for p in sig.parameters.values() if p.name != "self" and p.kind != p.VAR_KEYWORD]

    def get_params(self) -> dict:
        """Hyperparameters as given to ``__init__`` (scikit-learn's rule)."""
        return {k: getattr(self, k) for k in self._param_names()}

    def __repr__(self) -> str:  # short, like scikit-learn, instead of nn.Module's tree
        defaults = {
            p.name: p.default for p in inspect.signature(type(self).__init__).parameters.values() if p.name != "self"
        }
        changed = {k: v for k, v in self.get_params().items() if defaults.get(k, inspect.Parameter.empty) != v}
        args = ", ".join(f"{k}={v!r}" for k, v in changed.items())
        return f"{type(self).__name__}({args})"

    # --------------------------------------------------------------- fit/predict
    @property
    def is_fitted(self) -> bool:
        return getattr(self, "meta_", None) is not None

    def _prepare(self, images, name: str) -> torch.Tensor:
        x = check_images(images, name)
        size = getattr(self, "image_size", None)
        if size:
            x = resize(x, size)
        return x

    def fit(self, images) -> Detector:
        """Learn normality from ``images`` (normal only). Returns ``self``."""
        x = self._prepare(images, "train images")
        self.device_ = resolve_device(getattr(self, "device", "auto"))
        set_seed(getattr(self, "seed", 0))
        self.meta_ = {"input_hw": list(x.shape[-2:])}
        self._fit(x)
        self.to(self.device_)
        self.eval()
        return self

    def predict(self, images, batch_size: int | None = None) -> Prediction:
        """Score ``images``: ``Prediction(scores [N], maps [N, H, W] or None)`` on CPU."""
        if not self.is_fitted:
            raise NotFittedError(f"this {type(self).__name__} is not fitted yet: call .fit(train_images) first")
        raw = check_images(images, "test images")
        x = self._prepare(raw, "test images")
        if self.fixed_size and list(x.shape[-2:]) != self.meta_["input_hw"]:
            raise AnomalyZooError(
                f"test images are {tuple(x.shape[-2:])} but {type(self).__name__} was fitted on "
                f"{tuple(self.meta_['input_hw'])}: resize them, or create the detector with image_size="
            )
        bs = batch_size or self.predict_batch_size
        self.eval()
        scores, maps = [], []
        with torch.set_grad_enabled(self.needs_grad), torch.inference_mode(not self.needs_grad):
            for i in range(0, len(x), bs):
                s, m = self._score(x[i : i + bs].to(self.device_))
                scores.append(s.detach().float().cpu())
                if m is not None:
                    if m.shape[-2:] != raw.shape[-2:]:
                        m = F.interpolate(m[:, None].float(), size=raw.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
                    maps.append(m.detach().float().cpu())
        return Prediction(torch.cat(scores), torch.cat(maps) if maps else None)

    def fit_predict(self, train_images, test_images) -> Prediction:
        return self.fit(train_images).predict(test_images)

    # ----------------------------------------------------------- to implement
    def _build(self, meta: dict) -> None:  # pragma: no cover - default: nothing to build
        pass

    def _fit(self, x: torch.Tensor) -> None:
        raise NotImplementedError

    def _score(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        raise NotImplementedError

    # ------------------------------------------------------------- save/load
    def save(self, path: str | Path) -> Path:
        """Write config (JSON) + ``state_dict`` to one file; ``az.load(path)`` rebuilds it exactly."""
        if not self.is_fitted:
            raise NotFittedError(f"this {type(self).__name__} is not fitted yet: nothing to save")
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        config = {"format": FORMAT, "name": self.name, "params": _jsonable(self.get_params()), "meta": self.meta_}
        state = {k: v.detach().cpu() for k, v in self.state_dict().items()}
        torch.save({"config": json.dumps(config), "state_dict": state}, path)
        return path


def load(path: str | Path, device: str = "auto") -> Detector:
    """Load a detector written by ``Detector.save`` (``torch.load(weights_only=True)``)."""
    from .registry import get_class

    path = Path(path)
    if not path.is_file():
        raise AnomalyZooError(f"no saved detector at {path}")
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
        config = json.loads(blob["config"])
        state = blob["state_dict"]
    except Exception as err:  # noqa: BLE001 - any failure here means the same thing to the user
        raise AnomalyZooError(f"{path} is not a detector saved by anomaly_zoo ({type(err).__name__})") from err
    if config.get("format") != FORMAT:
        raise AnomalyZooError(f"{path}: unknown format {config.get('format')!r} (expected {FORMAT})")
    cls = get_class(config["name"])
    params = _from_jsonable(config["params"], cls)
    det = cls(**params)
    det.meta_ = config["meta"]
    det._build(det.meta_)
    _register_missing_buffers(det, state)
    det.load_state_dict(state, strict=True)
    det.device_ = resolve_device(device if device != "auto" else getattr(det, "device", "auto"))
    det.to(det.device_)
    det.eval()
    return det


# ---------------------------------------------------------------- helpers
def resize(x: torch.Tensor, size) -> torch.Tensor:
    """Resize images ``[N, C, H, W]`` to ``size`` (int or (h, w)) with antialiased bilinear."""
    hw = (size, size) if isinstance(size, int) else tuple(size)
    if tuple(x.shape[-2:]) == hw:
        return x
    return F.interpolate(x, size=hw, mode="bilinear", align_corners=False, antialias=True).clamp_(0, 1)


def _register_missing_buffers(module: nn.Module, state: dict) -> None:
    """Buffers learned in ``fit`` (``register_buffer`` there) do not exist on a fresh object:
    create them with the saved shapes so ``load_state_dict(strict=True)`` can fill them."""
    own = module.state_dict()
    for key, value in state.items():
        if key in own:
            continue
        *path, leaf = key.split(".")
        sub = module
        for p in path:
            if not hasattr(sub, p):
                raise AnomalyZooError(f"saved state has {key!r} but the rebuilt detector has no {p!r}")
            sub = getattr(sub, p)
        sub.register_buffer(leaf, torch.empty_like(value))


def _jsonable(obj):
    if isinstance(obj, tuple):
        return {"__tuple__": [_jsonable(v) for v in obj]}
    if isinstance(obj, list):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (np.integer, np.floating)):
        return obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return {"__float__": repr(obj)}
    if isinstance(obj, (str, int, float, bool)) or obj is None:
        return obj
    if isinstance(obj, (Path, torch.device)):
        return str(obj)
    raise AnomalyZooError(f"hyperparameter value {obj!r} cannot be saved (use str, numbers, lists, tuples, dicts)")


def _from_jsonable(obj, cls=None):
    if isinstance(obj, dict):
        if "__tuple__" in obj:
            return tuple(_from_jsonable(v) for v in obj["__tuple__"])
        if "__float__" in obj:
            return float(obj["__float__"])
        return {k: _from_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_from_jsonable(v) for v in obj]
    return obj
