"""The two lines every chapter of the book starts and ends with.

    import anomaly_zoo as az
    cfg = az.notebook.setup(QUICK, SEED, DEVICE, DATA_DIR)   # first code cell after the parameters
    ...
    az.notebook.footer()                                     # last code cell

``setup`` resolves the chapter's parameters once, in one place:

* ``QUICK=None`` means: the environment variable ``AZOO_QUICK`` if it is set
  (``make book`` sets ``AZOO_QUICK=1``), else quick mode unless a CUDA GPU is present.
  Papermill overrides it with ``-p QUICK True``.
* ``DEVICE="auto"``: cuda, then mps, then cpu (``az.resolve_device``).
* ``SEED`` seeds Python, NumPy and torch.
* ``DATA_DIR=None``: the library's default data folder (``$AZOO_DATA``, the
  checkout's ``data/``, else a user cache folder); pass it on as ``root=cfg.data_dir``.

It prints one line with the mode and device and starts a clock; ``footer`` states
the mode, the device and how long the page took, so every page of the book says
how it was made. Nothing here selects a matplotlib backend.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field

import torch

from .utils import env_flag, resolve_device, set_seed

__all__ = ["Settings", "setup", "footer"]


@dataclass
class Settings:
    """A chapter's resolved parameters (what ``setup`` returns)."""

    quick: bool
    seed: int
    device: torch.device
    data_dir: str | None
    why: str  # how ``quick`` was decided, for the page
    started: float = field(default_factory=time.perf_counter)

    @property
    def mode(self) -> str:
        return "quick" if self.quick else "full"

    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self.started


_current: Settings | None = None


def _resolve_quick(quick) -> tuple[bool, str]:
    if quick is not None:
        if isinstance(quick, str):  # papermill -p QUICK true / "1" from a shell
            return quick.strip().lower() in {"1", "true", "yes", "on"}, "set by the QUICK parameter"
        return bool(quick), "set by the QUICK parameter"
    if os.environ.get("AZOO_QUICK", "").strip():
        return env_flag("AZOO_QUICK"), f"AZOO_QUICK={os.environ['AZOO_QUICK'].strip()}"
    if torch.cuda.is_available():
        return False, "a CUDA GPU is present"
    return True, "no CUDA GPU found"


def setup(quick=None, seed: int = 0, device: str = "auto", data_dir: str | None = None,
          verbose: bool = True) -> Settings:
    """Resolve a chapter's ``QUICK, SEED, DEVICE, DATA_DIR``, seed everything, start the clock."""
    global _current
    q, why = _resolve_quick(quick)
    set_seed(int(seed))
    dev = resolve_device(device)
    _current = Settings(quick=q, seed=int(seed), device=dev, data_dir=None if data_dir in (None, "") else str(data_dir),
                        why=why)
    if verbose:
        print(f"{_current.mode} mode ({why}) on {dev.type}, seed {_current.seed}\n"
              f"torch {torch.__version__}, {torch.get_num_threads()} CPU thread(s)")
    return _current


def footer(settings: Settings | None = None) -> None:
    """Say in which mode and on which device the page ran, and how long it took."""
    s = settings or _current
    if s is None:
        text = "This page was run without `az.notebook.setup()`: mode and device unknown."
    else:
        secs = s.elapsed
        took = f"{secs:.0f} s" if secs < 120 else f"{secs / 60:.1f} min"
        text = (f"This page ran in **{s.mode} mode** ({s.why}) on **{s.device.type}** "
                f"in **{took}** (torch {torch.__version__}).")
    try:
        from IPython import get_ipython
        from IPython.display import Markdown, display

        if get_ipython() is not None:
            display(Markdown(text))
            return
    except ImportError:  # pragma: no cover - IPython ships with every Jupyter install
        pass
    print(text.replace("**", ""))
