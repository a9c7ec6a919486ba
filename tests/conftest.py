"""Shared fixtures: seeded tiny bundles and one thread for torch/BLAS in unit tests."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="session")
def random_bundle(tmp_path_factory):
    """A small valid bundle (200 items, raw 32-d, aligned 16-d, 3x16 RQ, VQ k=5)."""
    from qarm_features.testing import make_random_bundle

    return make_random_bundle(tmp_path_factory.mktemp("bundles") / "b0")
