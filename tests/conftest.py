"""Shared fixtures: seeding, the optional real data in ../shared/data, tiny synthetic datasets."""

from __future__ import annotations

import os
import random

import numpy as np
import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED_DATA = os.path.normpath(os.path.join(ROOT, "..", "shared", "data"))


@pytest.fixture(autouse=True)
def _seed_everything():
    """Every test starts from the same seeds."""
    random.seed(0)
    np.random.seed(0)
    yield


def shared_data_path(*parts: str) -> str:
    """Path under ../shared/data, or skip the test with the reason when it is absent."""
    path = os.path.join(SHARED_DATA, *parts)
    if not os.path.exists(path):
        pytest.skip(f"real data not available: {path} is absent (see ../shared/data/README.md)")
    return path


@pytest.fixture
def shared_data():
    """Returns a function mapping parts under ../shared/data to a path, skipping if absent."""
    return shared_data_path
