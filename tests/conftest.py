"""Shared fixtures. Datasets are generated once into the checkout's data/ folder (git-ignored)
and reused; tests that check caching use their own tmp folders."""
from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("AZOO_NO_PROGRESS", "1")
os.environ.setdefault("MPLBACKEND", "Agg")  # tests only; chapters never select a backend

# pytest-xdist runs one process per core: one torch thread each avoids oversubscription
if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def brick():
    import anomaly_zoo as az

    return az.data.load("textures", category="brick", quick=True)


@pytest.fixture(scope="session")
def tiny():
    """A few small random images: enough for smoke tests of any method."""
    g = torch.Generator().manual_seed(0)
    return torch.rand(6, 3, 64, 64, generator=g), torch.rand(3, 3, 64, 64, generator=g)
