"""Small helpers every part of the library shares: seeding, the device, input checks.

Input checks live here once so that every method, metric and dataset rejects bad
input with the same one-line message instead of a deep traceback.
"""
from __future__ import annotations

import os
import random

import numpy as np
import torch


class AnomalyZooError(ValueError):
    """A user error: bad input, a missing file, a method used in the wrong order.

    Subclasses ``ValueError`` so ``except ValueError`` keeps working; the CLI
    prints its message on one line and exits non-zero.
    """


class NotFittedError(AnomalyZooError, RuntimeError):
    """``predict`` (or ``save``) was called on a detector that was never fitted."""


def set_seed(seed: int = 0) -> None:
    """Seed Python, NumPy and torch (CPU and CUDA) so runs repeat exactly on CPU."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``"auto"`` -> cuda if available, else mps, else cpu; anything else as given."""
    if isinstance(device, torch.device):
        return device
    if device is None or device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        mps = getattr(torch.backends, "mps", None)
        if mps is not None and mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise AnomalyZooError(f"unknown device {device!r}: use 'auto', 'cpu', 'cuda' or 'mps'") from err
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise AnomalyZooError("device 'cuda' was asked for but torch sees no CUDA GPU; use device='auto' or 'cpu'")
    return dev


def check_images(x, name: str = "images", *, min_count: int = 1) -> torch.Tensor:
    """Return ``x`` as a float32 CPU tensor ``[N, 3, H, W]`` in ``[0, 1]``, or raise one clear error.

    Accepts a torch tensor or a numpy array of that shape. Grayscale ``[N, 1, H, W]``
    is repeated to three channels, as the datasets do.
    """
    if isinstance(x, np.ndarray):
        if not (np.issubdtype(x.dtype, np.floating) or np.issubdtype(x.dtype, np.integer)):
            raise AnomalyZooError(f"{name}: expected a numeric array, got dtype {x.dtype}")
        x = torch.from_numpy(np.ascontiguousarray(x))
    elif not isinstance(x, torch.Tensor):
        raise AnomalyZooError(
            f"{name}: expected a torch.Tensor or numpy array of shape [N, 3, H, W], got {type(x).__name__}"
        )
    if x.ndim != 4:
        raise AnomalyZooError(
            f"{name}: expected 4 dimensions [N, 3, H, W], got {x.ndim} (shape {tuple(x.shape)})"
            + ("; add a batch dimension with x[None]" if x.ndim == 3 else "")
        )
    if x.shape[0] < min_count:
        raise AnomalyZooError(f"{name}: the set is empty (need at least {min_count} image(s))")
    if x.shape[1] == 1:
        x = x.repeat(1, 3, 1, 1)
    if x.shape[1] != 3:
        raise AnomalyZooError(
            f"{name}: expected 3 channels (or 1, repeated) in dimension 1, got {x.shape[1]} "
            f"(shape {tuple(x.shape)}); channels-last images need x.permute(0, 3, 1, 2)"
        )
    x = x.detach().to("cpu", torch.float32)
    if not torch.isfinite(x).all():
        raise AnomalyZooError(f"{name}: contains NaN or infinite values")
    lo, hi = float(x.min()), float(x.max())
    if lo < 0.0 or hi > 1.0:
        raise AnomalyZooError(
            f"{name}: values must lie in [0, 1], got [{lo:.3g}, {hi:.3g}]"
            + ("; divide 8-bit images by 255" if hi > 1.0 and hi <= 255.0 else "")
        )
    return x


def check_masks(masks, images: torch.Tensor | None = None, name: str = "masks") -> torch.Tensor:
    """Return binary masks ``[N, H, W]`` as a bool tensor; they must match ``images`` if given."""
    if isinstance(masks, np.ndarray):
        masks = torch.from_numpy(np.ascontiguousarray(masks))
    if not isinstance(masks, torch.Tensor):
        raise AnomalyZooError(f"{name}: expected a tensor or numpy array [N, H, W], got {type(masks).__name__}")
    if masks.ndim == 4 and masks.shape[1] == 1:
        masks = masks[:, 0]
    if masks.ndim != 3:
        raise AnomalyZooError(f"{name}: expected shape [N, H, W], got {tuple(masks.shape)}")
    if images is not None and (masks.shape[0] != images.shape[0] or masks.shape[-2:] != images.shape[-2:]):
        raise AnomalyZooError(
            f"{name}: shape {tuple(masks.shape)} does not match the images {tuple(images.shape)} "
            "(need the same N, H and W)"
        )
    return masks.detach().cpu() > 0


def env_flag(name: str, default: bool = False) -> bool:
    """Read a boolean environment variable (``1/true/yes`` vs ``0/false/no``)."""
    val = os.environ.get(name)
    if val is None or val == "":
        return default
    return val.strip().lower() in {"1", "true", "yes", "on"}


def progress_enabled() -> bool:
    """Whether to show progress bars: someone is watching (a terminal or a Jupyter kernel) and
    ``AZOO_NO_PROGRESS`` is not set. CI logs and piped output stay quiet."""
    if env_flag("AZOO_NO_PROGRESS"):
        return False
    import sys

    if "ipykernel" in sys.modules:
        return True
    stream = getattr(sys, "stderr", None)
    return bool(stream is not None and hasattr(stream, "isatty") and stream.isatty())
