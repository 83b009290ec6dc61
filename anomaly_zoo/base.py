"""The one API every method implements: ``Detector``, ``FeatureDetector`` and ``Prediction``.

A detector learns from normal images only (``fit``) and then scores new images
(``predict``): one anomaly score per image, and, for methods that localise, one
anomaly map per image with the input's height and width. Higher means more
anomalous, everywhere.

The rules follow scikit-learn:

* Hyperparameters are declared once, as ``Param`` class attributes (:mod:`anomaly_zoo.params`).
  ``__init__`` is generated: keyword-only, it stores each value as given and does
  nothing else, so ``get_params()`` reads them back and ``save``/``load`` rebuild the object.
* ``fit`` checks every hyperparameter (one ``AnomalyZooError`` naming the parameter,
  its value and the allowed range), checks the images, resolves the device
  (``"auto"``: cuda, then mps, then cpu), seeds, builds the networks, moves them to the
  device, learns, and returns ``self``. Learned state lives in attributes ending in
  ``_`` (buffers and sub-modules, so it travels in the ``state_dict``).
* ``predict`` before ``fit`` raises one clear error.

What ``fit`` records besides the weights, in three plainly named dicts (all JSON, all saved):

* ``shapes_``: what ``_build`` needs to rebuild the networks on ``az.load`` (input size,
  feature grid, number of components, ...);
* ``history_``: the training curves (``{"loss": [one mean per epoch]}``, one key per player);
* ``diagnostics_``: numbers worth showing that nothing depends on (support vectors, ...).

A method file writes, top to bottom: its networks (plain ``nn.Module``), its loss and
score functions (with the paper's equation numbers), and a ``Detector`` subclass with

* its ``Param`` declarations;
* ``_build(self, shapes)``: create the networks/buffers whose shapes ``shapes`` gives
  (``fit`` calls it before ``_fit``, ``az.load`` before reading the state dict back);
* ``_fit(self, x)``: learn from normal images ``x`` (float32 ``[N, 3, H, W]`` on the CPU,
  checked and resized to ``image_size``); a trainable method calls ``self._train(step, x)``,
  the one training loop, with ``step(batch, ctx) -> loss``;
* ``_score(self, x)``: for a batch on ``self.device_``, return ``(scores [B], maps [B, h, w] or None)``;
* optionally ``_check_params(self)`` for constraints between parameters.
"""
from __future__ import annotations

import hashlib
import inspect
import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .backbones import create_backbone, list_backbones, taps_at
from .params import Param, check_params, collect_params
from .training import fit_loop
from .utils import AnomalyZooError, NotFittedError, check_images, resolve_device, set_seed

FORMAT = "anomaly_zoo.detector/2"


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
    # "none": unsupervised, fit refuses labels; "weak": fit needs image-level labels (DeScarGAN)
    supervision: str = "none"

    device = Param("auto", str, help="'auto' (cuda, then mps, then cpu), 'cpu', 'cuda', 'cuda:1', 'mps'")
    seed = Param(0, int, low=0, help="seeds Python, NumPy and torch at the start of fit")

    _params: dict[str, Param] = {}

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        cls._params = collect_params(cls)
        kw = inspect.Parameter.KEYWORD_ONLY
        cls.__signature__ = inspect.Signature([inspect.Parameter(k, kw, default=p.default)
                                               for k, p in cls._params.items()])

    def __init__(self, **params):
        super().__init__()
        unknown = sorted(set(params) - set(self._params))
        if unknown:
            raise AnomalyZooError(f"{self.name} has no parameter {', '.join(unknown)}; "
                                  f"its parameters: {', '.join(self._params)}")
        for key, spec in self._params.items():  # stored as given: checked when fit starts
            setattr(self, key, params.get(key, spec.default))

    # ------------------------------------------------------------------ params
    @classmethod
    def _param_names(cls) -> list[str]:
        return list(cls._params)

    def get_params(self) -> dict:
        """Hyperparameters as given to ``__init__`` (scikit-learn's rule)."""
        return {k: getattr(self, k) for k in self._params}

    def check_params(self) -> None:
        """Raise ``AnomalyZooError`` for the first hyperparameter out of its range (``fit`` calls this)."""
        check_params(self.name, self.get_params(), self._params)
        self._check_params()

    def _check_params(self) -> None:
        """Constraints between parameters (override; raise ``params.bad(...)``)."""

    def __repr__(self) -> str:  # short, like scikit-learn, instead of nn.Module's tree
        changed = {k: v for k, v in self.get_params().items() if self._params[k].default != v}
        return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in changed.items())})"

    # --------------------------------------------------------------- fit/predict
    @property
    def is_fitted(self) -> bool:
        return getattr(self, "shapes_", None) is not None

    def _prepare(self, images, name: str) -> torch.Tensor:
        x = check_images(images, name)
        size = getattr(self, "image_size", None)
        x = resize(x, size) if size else x
        # one memory layout for every method: channels-last input (a numpy HWC array permuted, as the retina
        # set's) crashed torch 2.13's CPU convolution backward in NSA's ResNet (a segfault, not an error)
        return x.contiguous()

    def fit(self, images, checkpoint: str | Path | None = None, labels=None) -> Detector:
        """Learn normality from ``images`` (normal only). Returns ``self``.

        ``checkpoint=path``: if the file holds this detector trained with the same parameters
        on the same images, load it instead of training; otherwise train and write it there.
        ``labels``: image-level labels (0 normal, 1 anomalous), only for weakly supervised methods.
        """
        self.check_params()
        x = self._prepare(images, "train images")
        labels = self._check_labels(labels, len(x))
        fingerprint = data_fingerprint(x, labels)
        if checkpoint is not None and self._load_checkpoint(checkpoint, fingerprint):
            return self
        self.device_ = resolve_device(self.device)
        set_seed(self.seed)
        self.shapes_ = {"input_hw": list(x.shape[-2:])}
        self.history_, self.diagnostics_ = {}, {}
        self._build(self.shapes_)
        self.to(self.device_)
        self._fit(x) if labels is None else self._fit(x, labels)
        self.to(self.device_)
        self.eval()
        self.fingerprint_ = fingerprint
        if checkpoint is not None:
            self.save(checkpoint)
        return self

    def _check_labels(self, labels, n: int) -> torch.Tensor | None:
        if self.supervision == "none":
            if labels is not None:
                raise AnomalyZooError(f"{self.name} is unsupervised: fit it on normal images only, without labels")
            return None
        if labels is None:
            raise AnomalyZooError(f"{self.name} is weakly supervised: fit(images, labels=...) needs image labels")
        y = torch.as_tensor(np.asarray(labels)).flatten()
        if len(y) != n or not bool(((y == 0) | (y == 1)).all()):
            raise AnomalyZooError(f"labels: expected {n} values, each 0 (normal) or 1 (anomalous)")
        return y.long()

    def predict(self, images, batch_size: int | None = None) -> Prediction:
        """Score ``images``: ``Prediction(scores [N], maps [N, H, W] or None)`` on CPU."""
        if not self.is_fitted:
            raise NotFittedError(f"this {type(self).__name__} is not fitted yet: call .fit(train_images) first")
        raw = check_images(images, "test images")
        x = self._prepare(raw, "test images")
        if self.fixed_size and list(x.shape[-2:]) != self.shapes_["input_hw"]:
            raise AnomalyZooError(
                f"test images are {tuple(x.shape[-2:])} but {type(self).__name__} was fitted on "
                f"{tuple(self.shapes_['input_hw'])}: resize them, or create the detector with image_size="
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
    def _build(self, shapes: dict) -> None:
        """Create the networks whose shapes ``shapes`` gives (default: nothing)."""

    def _fit(self, x: torch.Tensor) -> None:
        raise NotImplementedError

    def _score(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        raise NotImplementedError

    def _train(self, step, data, module: nn.Module | None = None, key: str = "loss", **options) -> list[float]:
        """Run the one training loop (:func:`anomaly_zoo.training.fit_loop`) with this detector's
        ``epochs``, ``batch_size``, ``lr``, ``weight_decay``, device and seed; ``options`` override them.
        The per-epoch losses go to ``history_[key]`` (one key per player) and are returned."""
        kw = {k: getattr(self, k) for k in ("epochs", "batch_size", "lr", "weight_decay") if hasattr(self, k)}
        kw.update(device=self.device_, seed=self.seed, desc=self.name)
        kw.update(options)
        history = fit_loop(module if module is not None else self, step, data, **kw)
        self.history_.update({key: history} if isinstance(history, list) else history)
        return history

    # ------------------------------------------------------------- save/load
    def _config(self) -> dict:
        return {"format": FORMAT, "name": self.name, "params": _jsonable(self.get_params()), "shapes": self.shapes_,
                "history": self.history_, "diagnostics": _jsonable(self.diagnostics_),
                "fingerprint": getattr(self, "fingerprint_", None)}

    def save(self, path: str | Path) -> Path:
        """Write config (JSON) + ``state_dict`` to one file; ``az.load(path)`` rebuilds it exactly."""
        if not self.is_fitted:
            raise NotFittedError(f"this {type(self).__name__} is not fitted yet: nothing to save")
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().cpu() for k, v in self.state_dict().items()}
        torch.save({"config": json.dumps(self._config()), "state_dict": state}, path)
        return path

    def _restore(self, config: dict, state: dict, device="auto") -> Detector:
        """Fill this (unfitted) detector from a saved config and state dict."""
        self.shapes_, self.history_ = config["shapes"], config.get("history", {})
        self.diagnostics_, self.fingerprint_ = config.get("diagnostics", {}), config.get("fingerprint")
        self._build(self.shapes_)
        _register_missing_buffers(self, state)
        self.load_state_dict(state, strict=True)
        self.device_ = resolve_device(device if device != "auto" else self.device)
        self.to(self.device_)
        self.eval()
        return self

    def _load_checkpoint(self, path, fingerprint: str) -> bool:
        """Load ``path`` into self if it was saved by this method with these parameters and data."""
        if not Path(path).is_file():
            return False
        config, state = read_saved(path)
        same = {k: v for k, v in _jsonable(self.get_params()).items() if k != "device"}
        saved = {k: v for k, v in config["params"].items() if k != "device"}
        if config["name"] != self.name or saved != same or config.get("fingerprint") != fingerprint:
            return False
        self._restore(config, state, self.device)
        return True


class FeatureDetector(Detector):
    """A detector that reads a frozen, pretrained backbone (PaDiM, PatchCore, FCDD, students...).

    ``layers=None`` picks the backbone's taps at ``default_strides`` (a class attribute:
    ``(4, 8, 16)`` unless the method says otherwise), so a new backbone needs only its
    table of taps in :mod:`anomaly_zoo.backbones`. ``_build`` creates ``self.layers_`` (the
    taps the method models, from ``_taps()``) and ``self.extractor_`` (frozen, BatchNorm
    included), which reads them plus any ``_extra_taps()``.
    """

    default_strides: tuple[int, ...] = (4, 8, 16)

    backbone = Param("efficientnet_lite0", str, help="one of anomaly_zoo.backbones.list_backbones()")
    pretrained = Param(True, bool, help="ImageNet weights; False gives the random-feature baseline")
    layers = Param(None, tuple, item=str, none=True, help="tap names; None: the taps at default_strides")
    weights = Param(None, str, none=True, help="a state-dict file instead of the default weights")

    def _check_params(self) -> None:
        if self.backbone not in list_backbones():
            raise AnomalyZooError(f"{self.name}: backbone={self.backbone!r} is out of range; "
                                  f"allowed: one of {', '.join(map(repr, list_backbones()))}")

    def _taps(self) -> list[str]:
        """The taps the method models: ``layers`` if given, else the backbone's taps at ``default_strides``."""
        return list(self.layers) if self.layers else taps_at(self.backbone, self.default_strides)

    def _extra_taps(self) -> list[str]:
        """Taps read besides ``layers_`` (e.g. SPADE's deepest stage for its pooled features); default none."""
        return []

    def _build(self, shapes: dict) -> None:
        self.layers_ = self._taps()
        self.extractor_ = create_backbone(self.backbone, pretrained=self.pretrained,
                                          layers=[*self.layers_, *self._extra_taps()], weights=self.weights)


# ---------------------------------------------------------------- helpers
def resize(x: torch.Tensor, size) -> torch.Tensor:
    """Resize images ``[N, C, H, W]`` to ``size`` (int or (h, w)) with antialiased bilinear."""
    hw = (size, size) if isinstance(size, int) else tuple(size)
    if tuple(x.shape[-2:]) == hw:
        return x
    return F.interpolate(x, size=hw, mode="bilinear", align_corners=False, antialias=True).clamp_(0, 1)


def data_fingerprint(x: torch.Tensor, labels: torch.Tensor | None = None) -> str:
    """A cheap fingerprint of a training set: its shape and a BLAKE2 hash of its bytes."""
    h = hashlib.blake2b(digest_size=16)
    h.update(str(tuple(x.shape)).encode())
    h.update(x.contiguous().numpy().tobytes())
    if labels is not None:
        h.update(labels.numpy().tobytes())
    return h.hexdigest()


def read_saved(path) -> tuple[dict, dict]:
    """``(config, state_dict)`` of a file written by ``Detector.save``, or one clear error."""
    path = Path(path)
    if not path.is_file():
        raise AnomalyZooError(f"no saved detector at {path}")
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
        config, state = json.loads(blob["config"]), blob["state_dict"]
    except Exception as err:  # noqa: BLE001 - any failure here means the same thing to the user
        raise AnomalyZooError(f"{path} is not a detector saved by anomaly_zoo ({type(err).__name__})") from err
    if config.get("format") != FORMAT:
        raise AnomalyZooError(f"{path}: unknown format {config.get('format')!r} (expected {FORMAT}); fit it again")
    config["params"] = _from_jsonable(config["params"])
    return config, state


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


def _from_jsonable(obj):
    if isinstance(obj, dict):
        if "__tuple__" in obj:
            return tuple(_from_jsonable(v) for v in obj["__tuple__"])
        if "__float__" in obj:
            return float(obj["__float__"])
        return {k: _from_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_from_jsonable(v) for v in obj]
    return obj
